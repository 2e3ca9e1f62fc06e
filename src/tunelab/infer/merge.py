"""Fold a trained adapter into its base model, giving a plain checkpoint any tool can load."""

from __future__ import annotations

from pathlib import Path

from tunelab.config import load_config
from tunelab.errors import ConfigError, ModelError
from tunelab.infer.load import is_run_dir
from tunelab.methods import METHODS, bottleneck
from tunelab.models.load import load_model, load_tokenizer
from tunelab.models.resolve import resolve_model, staged_folder


def merge_adapter(run_dir: Path, output: Path, *, overwrite: bool = False) -> Path:
    """Write base + adapter as one full-precision model to `output` (safetensors, tokenizer, chat template).

    A QLoRA adapter is merged into the full-precision base it was quantised from.
    """
    if not (run_dir.is_dir() and is_run_dir(run_dir)):
        raise ModelError("not a tunelab run directory", where=str(run_dir))
    if (run_dir / bottleneck.CONFIG_FILE).is_file():
        raise ConfigError(f"{run_dir} cannot be merged: {bottleneck.CANNOT_MERGE}", where="merge")
    if not (run_dir / "adapter_config.json").is_file():
        raise ConfigError(f"{run_dir} holds full weights already: there is no adapter to merge", where="merge")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ConfigError(f"{output} already exists; pass --overwrite to replace it", where="--output")
    from peft import PeftModel

    config = load_config(run_dir / "config.yaml")
    why_not = getattr(METHODS[config.method.name], "CANNOT_MERGE", None)
    if why_not:
        raise ConfigError(f"{run_dir} cannot be merged: {why_not}", where="merge")
    base = load_model(resolve_model(config.model), device="cpu")
    merged = PeftModel.from_pretrained(base, run_dir).merge_and_unload()
    tokenizer = load_tokenizer(run_dir)
    with staged_folder(output) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return output
