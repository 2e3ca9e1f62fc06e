"""Llama-architecture models built from a config with random weights, for throughput runs where no checkpoint
of that size is at hand (`--model random-llama-1b` on a GPU machine). The tokenizer and chat template are the
default model's, so the case data and both tools' templates are unchanged; only speed and memory mean anything
in such a run, not the losses' values (they still must agree between the tools)."""

from __future__ import annotations

from pathlib import Path

SHAPES = {
    # ~1.07 B parameters (Llama-3.2-1B's body with SmolLM2's 49,152-token vocabulary, tied head)
    "random-llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                        "num_attention_heads": 32, "num_key_value_heads": 8},
    # a few MB: exercises the path on any machine
    "random-llama-tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "num_key_value_heads": 2},
}


def build_random_model(name: str, tokenizer_source: Path, folder: Path, seed: int = 0) -> Path:
    """Write config, float32 safetensors and the tokenizer of a random `name` model to `folder` (reused when
    already there)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    config = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **SHAPES[name],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def parameter_count(name: str, vocab_size: int = 49152) -> int:
    shape = SHAPES[name]
    hidden, inner, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = hidden // shape["num_attention_heads"] * shape["num_key_value_heads"]
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inner + 2 * hidden
    return vocab_size * hidden + layers * per_layer + hidden


def model_folder(spec: str, workdir: Path, tokenizer: Path | None = None, seed: int = 0) -> Path:
    """The folder a bench runs: a random-weight model built into `workdir` when `spec` names one of SHAPES (with
    `tokenizer`'s tokenizer, the default model's unless given: a GPU machine that cannot fetch the default model
    gets a copy of its tokenizer alone), else tunelab's own resolution of a preset, hub id or folder."""
    from tunelab.models.resolve import resolve_model

    if spec not in SHAPES:
        return resolve_model(spec)
    source = tokenizer or resolve_model("smollm2-135m-instruct")
    return build_random_model(spec, source, workdir / "models" / spec, seed=seed)
