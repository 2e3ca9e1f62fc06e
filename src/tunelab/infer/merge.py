"""Fold a trained adapter into its base model, giving a plain checkpoint any tool can load."""

from __future__ import annotations

from pathlib import Path

from tunelab.config import load_config
from tunelab.data.template import ChatRenderer
from tunelab.errors import ConfigError, ModelError
from tunelab.infer.load import is_run_dir
from tunelab.methods import METHODS, bottleneck
from tunelab.models.load import load_model, load_tokenizer
from tunelab.models.resolve import resolve_model, staged_folder


def merge_adapter(run_dir: Path, output: Path, *, overwrite: bool = False) -> Path:
    """Write base + adapter as one full-precision model to `output` (safetensors, tokenizer, the chat template the
    run trained with). A QLoRA adapter is merged into the full-precision base it was quantised from; a reward
    model keeps its score head (transformers' AutoModelForSequenceClassification loads it)."""
    if not (run_dir.is_dir() and is_run_dir(run_dir)):
        raise ModelError("not a tunelab run directory", where=str(run_dir))
    if (run_dir / bottleneck.CONFIG_FILE).is_file():
        raise ConfigError(f"{run_dir} cannot be merged: {bottleneck.CANNOT_MERGE}", where="merge")
    if not (run_dir / "adapter_config.json").is_file():
        raise ConfigError(f"{run_dir} holds full weights already: there is no adapter to merge", where="merge")
    if not (run_dir / "adapter_model.safetensors").is_file():
        raise ModelError("the run's adapter weights (adapter_model.safetensors) are missing", where=str(run_dir))
    check_merge_output(run_dir, output, overwrite)
    from peft import PeftModel

    config = load_config(run_dir / "config.yaml")
    why_not = getattr(METHODS[config.method.name], "CANNOT_MERGE", None)
    if why_not:
        raise ConfigError(f"{run_dir} cannot be merged: {why_not}", where="merge")
    tokenizer = load_tokenizer(run_dir)
    head = {"head": "reward", "pad_token_id": tokenizer.pad_token_id} if config.objective.name == "reward" else {}
    base = load_model(resolve_model(config.model), device="cpu", **head)
    try:
        merged = PeftModel.from_pretrained(base, run_dir).merge_and_unload()
    except Exception as err:  # a damaged adapter_config.json or safetensors file: peft and safetensors raise many kinds
        raise ModelError(f"cannot load the adapter ({type(err).__name__}: {err})", where=str(run_dir)) from None
    tokenizer.chat_template = ChatRenderer(tokenizer, config.data.chat_template).portable_template
    with staged_folder(output) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return output


def check_merge_output(run_dir: Path, output: Path, overwrite: bool) -> None:
    """Refuse an output that holds something (unless overwrite) or that is the run or a folder above it, which
    replacing would delete."""
    run, target = run_dir.resolve(), output.resolve()
    if target == run or target in run.parents:
        raise ConfigError(f"{output} is the run directory or holds it: the merged model would replace the run; "
                          "choose another folder", where="--output")
    if output.exists() and not output.is_dir():
        raise ConfigError(f"{output} is a file; the merged model is a folder", where="--output")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ConfigError(f"{output} already exists; pass --overwrite to replace it", where="--output")
