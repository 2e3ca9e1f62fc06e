"""Resumable checkpoints and final weights.

A checkpoint holds the trainable parameters, optimiser, scheduler, RNG states, the data position and whatever
state the objective carries between steps (GRPO's rollout, reused for several updates);
it is written to a scratch folder and renamed into place, so a crash mid-write never leaves a
checkpoint that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
OBJECTIVE_STATE = "objective.safetensors"


@dataclass
class TrainerState:
    """Where training stands: enough, with the weights and optimiser, to continue exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    """Index of the next micro-batch to run in `epoch`."""
    tokens_seen: int = 0
    train_seconds: float = 0.0
    best_eval_loss: float | None = None
    """Eval loss at best_step."""
    best_step: int | None = None
    """Step of the best evaluation by train.best_metric."""
    best_value: float | None = None
    """train.best_metric at best_step."""
    evals_without_improvement: int = 0
    extra: dict = field(default_factory=dict)


def trainable_state(model) -> dict[str, torch.Tensor]:
    """A copy (never a view) of every trainable parameter, on the CPU."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in tensors]
    if missing:
        raise RuntimeError(f"checkpoint lacks trainable parameters, e.g. {missing[:3]}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def rng_snapshot() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def save_checkpoint(
    run_dir: Path, model, optimizer, scheduler, state: TrainerState, keep: int, rng: dict | None = None,
    objective=None,
) -> Path:
    """Write checkpoints/step-N atomically and keep only the newest `keep`.

    `rng` is the random state as it was at the end of step N (taken when the step finished, since an
    interruption may come after the next step has already drawn dropout masks)."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:06d}"
    tmp = root / f".tmp-step-{state.step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model), tmp / "trainable.safetensors")
    carried = objective.state_dict() if hasattr(objective, "state_dict") else {}
    if carried:
        save_file(carried, tmp / OBJECTIVE_STATE)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng or rng_snapshot(),
        },
        tmp / "optimizer.pt",
    )
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / CHECKPOINTS).glob("step-*"))
    return found[-1] if found else None


def load_checkpoint(path: Path, model, optimizer, scheduler, objective=None) -> TrainerState:
    """Restore weights, optimiser, scheduler, RNG and the objective's carried state from `path`; return the
    trainer state."""
    load_trainable_state(model, load_file(path / "trainable.safetensors"))
    if (path / OBJECTIVE_STATE).is_file() and hasattr(objective, "load_state_dict"):
        objective.load_state_dict(load_file(path / OBJECTIVE_STATE))
    saved = torch.load(path / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    random.setstate(saved["rng"]["python"])
    torch.set_rng_state(saved["rng"]["torch"])
    return TrainerState(**json.loads((path / "state.json").read_text()))


def data_order_fingerprint(config, rows_digest: str) -> str:
    """Identifies the sequence of batches a run trains on: its rows (PreparedData.fingerprint) and every setting
    the epoch planner uses. Empty when the rows cannot be identified."""
    if not rows_digest:
        return ""
    plan = [rows_digest, config.train.seed, config.train.batch_size, config.train.group_by_length,
            config.data.shuffle, config.data.packing, config.data.max_length]
    return hashlib.sha256(json.dumps(plan).encode()).hexdigest()


def check_same_data(checkpoint: Path, fingerprint: str) -> None:
    """Refuse to resume on other batches: the saved data position would point elsewhere. Checkpoints written
    before tunelab recorded the fingerprint are not checked."""
    from tunelab.errors import ConfigError

    saved = json.loads((checkpoint / "state.json").read_text()).get("extra", {}).get("data_fingerprint")
    if saved and fingerprint and saved != fingerprint:
        raise ConfigError(
            f"the training data or their batching differ from those of {checkpoint} (data files, tokenizer, "
            "data settings, train.seed or train.batch_size changed), so its data position would not continue the "
            "same sequence; restore them or start a new run",
            where="data",
        )
