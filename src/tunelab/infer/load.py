"""Load a run directory or any model spec for inference, exactly as the run trained it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.config import QLoraMethod, RunConfig, load_config
from tunelab.data.template import ChatRenderer
from tunelab.errors import ConfigError, ModelError
from tunelab.methods import bottleneck
from tunelab.models.load import load_model, load_tokenizer, quantization_config
from tunelab.models.resolve import resolve_model


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    renderer: ChatRenderer
    run_config: RunConfig | None
    """The run's config when a tunelab run directory was loaded."""


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (
        (path / "adapter_config.json").is_file() or (path / "config.json").is_file()
        or (path / bottleneck.CONFIG_FILE).is_file()
    )


HOW_RUNS_STOPPED = {"interrupted": "interrupted", "failed": "stopped by an error", "died": "killed"}
"""status.json's word for how a run ended, as the refusal of an unfinished run says it."""


def refuse_unfinished_run(path: Path) -> None:
    """Raise ModelError saying how to go on when `path` is a run directory whose training stopped (or is still
    going) before its final weights were saved, so only checkpoints/ holds its progress: a plain "not a model"
    would send the user looking in the wrong place."""
    if not (path.is_dir() and (path / "config.yaml").is_file()) or is_run_dir(path):
        return
    from tunelab.train.checkpoint import latest_checkpoint
    from tunelab.train.live import live_status

    record = live_status(path) or {}
    status = record.get("status") or _summary_status(path)
    if status == "running":
        raise ModelError(f"the run is still training (process {record.get('pid')}); its final weights are saved "
                         "when it ends", where=str(path))
    how = HOW_RUNS_STOPPED.get(status, "stopped")
    checkpoint = latest_checkpoint(path)
    config = path / "config.yaml"
    if checkpoint is None:
        raise ModelError(f"the run was {how} before its first checkpoint: there is no model to load; "
                         f"`tunelab train {config} --overwrite` starts it again", where=str(path))
    step = int(checkpoint.name.removeprefix("step-"))
    raise ModelError(f"the run was {how} at step {step}, before its final weights were saved (checkpoints/"
                     f"{checkpoint.name} holds its progress); `tunelab train {config} --resume` continues it",
                     where=str(path))


def _summary_status(run_dir: Path) -> str | None:
    """summary.json's status, for runs written before status.json."""
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def load_for_inference(spec: str | Path, device: str | None = None) -> LoadedModel:
    """A run directory (adapter or full weights), or a preset / hub id / folder / .gguf file."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = Path(spec)
    if path.is_dir() and is_run_dir(path):
        return _load_run(path, device)
    refuse_unfinished_run(path)
    model_path = resolve_model(str(spec))
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, device=device)
    model.eval()
    return LoadedModel(model, tokenizer, ChatRenderer(tokenizer, "auto"), None)


def load_generator(spec: str | Path, device: str | None = None) -> LoadedModel:
    """Like load_for_inference, for commands that generate text: a reward model (a scalar head, no output head)
    is refused with what to use instead."""
    loaded = load_for_inference(spec, device)
    if loaded.run_config is not None and loaded.run_config.objective.name == "reward":
        raise ConfigError(f"{spec} is a reward model: it scores replies (tunelab score) and cannot write them",
                          where=str(spec))
    return loaded


def _load_run(run_dir: Path, device: str) -> LoadedModel:
    config = load_config(run_dir / "config.yaml")
    tokenizer = load_tokenizer(run_dir)
    renderer = ChatRenderer(tokenizer, config.data.chat_template)
    head = {"head": "reward", "pad_token_id": tokenizer.pad_token_id} if config.objective.name == "reward" else {}
    if (run_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        base_path = resolve_model(config.model)
        quantization = None
        if isinstance(config.method, QLoraMethod):
            # Same frozen base as in training, so outputs match the in-process ones.
            quantization = quantization_config(config.method, _compute_dtype(config, device))
        base = load_model(base_path, quantization=quantization, device=device, **head)
        try:
            model = PeftModel.from_pretrained(base, run_dir)
        except Exception as err:
            raise ModelError(f"cannot load the adapter: {err}", where=str(run_dir)) from None
    elif (run_dir / bottleneck.CONFIG_FILE).is_file():
        model = bottleneck.load(load_model(resolve_model(config.model), device=device), run_dir)
    else:
        model = load_model(run_dir, device=device, **head)
    model.eval()
    return LoadedModel(model, tokenizer, renderer, config)


def compute_precision(loaded: LoadedModel) -> str:
    """`bf16` or `fp32`: what the run trained in (its train.precision on this device), or `auto`'s choice for a
    model that is not a run."""
    from tunelab.train.precision import resolve_precision

    device = next(loaded.model.parameters()).device
    return resolve_precision(loaded.run_config.train.precision if loaded.run_config else "auto", device)


def _compute_dtype(config: RunConfig, device: str) -> torch.dtype:
    from tunelab.train.precision import resolve_precision

    precision = resolve_precision(config.train.precision, torch.device(device))
    return torch.bfloat16 if precision == "bf16" else torch.float32


def in_compute_dtype(model, precision: str, *, keep_adapters: bool):
    """A model loaded for inference only (serve, chat), converted in place to bf16 when `precision` says so and its
    weights can be cast: a run's adapter folded into the base (as `tunelab generate` decodes), or with
    keep_adapters (serve's --adapter runs, rows pick theirs) kept apart and cast with it; bf16 matmul weights
    packed for oneDNN on CPU. Quantised, prompt/prefix-tuned and bottleneck-adapter models stay as loaded."""
    from tunelab.methods import can_fold, fold_for_inference
    from tunelab.models.packed_linear import pack_linears

    if precision != "bf16" or next(model.parameters()).dtype != torch.float32 or not can_fold(model):
        return model
    if keep_adapters:
        model = model.to(torch.bfloat16).eval()
        pack_linears(model)
        return model
    return fold_for_inference(model, torch.bfloat16)
