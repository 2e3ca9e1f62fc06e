"""Resumable checkpoints and final weights.

A checkpoint holds the trainable parameters, optimiser, scheduler, RNG states, the data position and whatever
state the objective carries between steps (GRPO's rollout, reused for several updates). It survives a kill at
any moment: it is written to a scratch folder, every file is flushed to disk, a completion marker naming each
file and its size is written last, and only then is the folder renamed into place; resume loads only folders
whose marker matches their files. Loading runs no code from the folder: tensors are safetensors, the rest JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tunelab.errors import CheckpointError, ConfigError, SaveFailed
from tunelab.train import sharding

CHECKPOINTS = "checkpoints"
OBJECTIVE_STATE = "objective.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
"""Optimiser moments and the torch RNG state."""
RESUME_STATE = "resume.json"
"""Optimiser hyper-parameters, scheduler and Python RNG state."""
COMPLETE = "complete.json"
"""Written last: every other file of the checkpoint with its size in bytes."""
LEGACY_OPTIMIZER = "optimizer.pt"
"""Earlier tunelab versions kept optimiser, scheduler and RNG in one torch pickle (loaded as weights only)."""


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
    snapshot = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        snapshot["cuda"] = torch.cuda.get_rng_state()
    return snapshot


def _restore_rng(rng: dict) -> None:
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def save_checkpoint(
    run_dir: Path, model, optimizer, scheduler, state: TrainerState, keep: int, rng: dict | None = None,
    objective=None, other_ranks: list[dict] | None = None, trainable: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict | None = None,
) -> Path:
    """Write checkpoints/step-N so that a kill at any moment leaves either no step-N or a complete one, and
    keep only the newest `keep` complete ones.

    `rng` is the random state as it was at the end of step N (taken when the step finished, since an
    interruption may come after the next step has already drawn dropout masks). With several processes,
    `other_ranks` holds each other process's {"rng", "objective"} (its random state and objective state), which
    differ from this one's. `trainable` and `optimizer_state`, when given, are what to save (whole tensors
    gathered from sharded training) instead of reading `model` and `optimizer`."""
    root = run_dir / CHECKPOINTS
    final = root / f"step-{state.step:06d}"
    tmp = root / f".tmp-step-{state.step:06d}"
    try:
        trainable = trainable if trainable is not None else trainable_state(model)
        optimizer_state = optimizer_state if optimizer_state is not None else optimizer.state_dict()
        _write_checkpoint(root, tmp, trainable, optimizer_state, optimizer, scheduler, state, rng, objective,
                          other_ranks or [])
    except (OSError, SafetensorError) as err:  # a full disk, a quota, a lost mount
        shutil.rmtree(tmp, ignore_errors=True)
        intact = latest_checkpoint(run_dir)
        reason = getattr(err, "strerror", None) or str(err)
        raise SaveFailed(
            f"could not write checkpoint {final.name} ({reason}); "
            + (f"{intact} is intact: make room, then continue with --resume" if intact else "no earlier checkpoint")
        ) from err
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    _flush_to_disk(root)
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_checkpoint(root: Path, tmp: Path, trainable: dict[str, torch.Tensor], optimizer_state: dict, optimizer,
                      scheduler, state: TrainerState, rng: dict | None, objective, other_ranks: list[dict]) -> None:
    """Every file of a checkpoint into `tmp`, flushed to disk, the completion marker last."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    rng = rng or rng_snapshot()
    save_file(trainable, tmp / "trainable.safetensors")
    carried = objective.state_dict() if hasattr(objective, "state_dict") else {}
    ranks = [{"rng": rng, "objective": carried}, *other_ranks]
    for rank, entry in enumerate(ranks):
        if entry["objective"]:
            save_file(entry["objective"], tmp / _objective_file(rank))
    optimizer_tensors, optimizer_rest = _split_optimizer_state(optimizer_state)
    rng_tensors = {f"{_rng_key(rank)}/{kind}": entry["rng"][kind]
                   for rank, entry in enumerate(ranks) for kind in ("torch", "cuda") if kind in entry["rng"]}
    save_file({**optimizer_tensors, **rng_tensors}, tmp / OPTIMIZER_TENSORS)
    python_rngs = [entry["rng"]["python"] for entry in ranks]
    resume = {"optimizer": optimizer_rest, "scheduler": scheduler.state_dict(),
              "rng_python": [[state[0], list(state[1]), state[2]] for state in python_rngs]}
    (tmp / RESUME_STATE).write_text(json.dumps(resume))
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2))
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    for name in files:
        _flush_to_disk(tmp / name)
    (tmp / COMPLETE).write_text(json.dumps({"step": state.step, "files": files}))
    _flush_to_disk(tmp / COMPLETE)
    _flush_to_disk(tmp)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders that resume may load, oldest first."""
    return [path for path in sorted((run_dir / CHECKPOINTS).glob("step-*")) if checkpoint_problem(path) is None]


def incomplete_checkpoints(run_dir: Path) -> list[tuple[Path, str]]:
    """Checkpoint folders that resume ignores, each with the reason (a write that a kill interrupted)."""
    root = run_dir / CHECKPOINTS
    found = [(path, "its write never finished") for path in sorted(root.glob(".tmp-step-*"))]
    for path in sorted(root.glob("step-*")):
        problem = checkpoint_problem(path)
        if problem is not None:
            found.append((path, problem))
    return found


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` must not be loaded, or None when its files are all there, at their recorded sizes."""
    marker = path / COMPLETE
    if not marker.is_file():
        if (path / LEGACY_OPTIMIZER).is_file() and (path / "state.json").is_file():
            return None  # written by an earlier tunelab, renamed into place only when whole
        return f"it has no {COMPLETE} (its write never finished)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"its {COMPLETE} is unreadable"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, not the {size} written"
    return None


def _objective_file(rank: int) -> str:
    return OBJECTIVE_STATE if rank == 0 else f"objective-rank{rank}.safetensors"


def _rng_key(rank: int) -> str:
    return "rng" if rank == 0 else f"rng-rank{rank}"


def load_checkpoint(path: Path, model, optimizer, scheduler, objective=None, rank: int = 0,
                    sharded_root=None) -> TrainerState:
    """Restore weights, optimiser, scheduler, RNG and the objective's carried state from `path` (the random and
    objective state of process `rank` where several trained); return the trainer state. `sharded_root` is the
    FSDP root when the model is sharded (train/sharding.py): whole tensors then go into each process's shards."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"cannot resume from it: {problem}", where=str(path))
    if sharded_root is not None:
        sharding.load_trainable(model, load_file(path / "trainable.safetensors"))
    else:
        load_trainable_state(model, load_file(path / "trainable.safetensors"))
    if (path / _objective_file(rank)).is_file() and hasattr(objective, "load_state_dict"):
        objective.load_state_dict(load_file(path / _objective_file(rank)))
    if (path / OPTIMIZER_TENSORS).is_file():
        tensors = load_file(path / OPTIMIZER_TENSORS)
        resume = json.loads((path / RESUME_STATE).read_text())
        optimizer_state = _join_optimizer_state(tensors, resume["optimizer"], optimizer)
        scheduler_state = resume["scheduler"]
        pythons = resume["rng_python"]
        key = _rng_key(rank if rank < len(pythons) else 0)  # fewer processes saved: continue from the first's
        python_rng = pythons[rank if rank < len(pythons) else 0]
        rng = {"python": (python_rng[0], tuple(python_rng[1]), python_rng[2]), "torch": tensors[f"{key}/torch"]}
        if f"{key}/cuda" in tensors:
            rng["cuda"] = tensors[f"{key}/cuda"]
    else:
        saved = _load_legacy(path / LEGACY_OPTIMIZER)
        optimizer_state, scheduler_state, rng = saved["optimizer"], saved["scheduler"], saved["rng"]
    if sharded_root is not None:
        sharding.load_optimizer(sharded_root, optimizer, optimizer_state)
    else:
        optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    _restore_rng(rng)
    return TrainerState(**json.loads((path / "state.json").read_text()))


def _split_optimizer_state(saved: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimiser's state_dict as tensors (for safetensors) and everything else (for JSON). A slot may nest a
    dict of tensors (bitsandbytes keeps its 8-bit state under one key): its tensors are named slot/key."""
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, dict] = {}
    seen: set[int] = set()

    def own(tensor: torch.Tensor) -> torch.Tensor:
        """A CPU copy safetensors accepts: bitsandbytes' quantisation maps are one tensor shared by every slot."""
        tensor = tensor.detach().to("cpu").contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:
            return tensor.clone()
        seen.add(pointer)
        return tensor

    for index, slots in saved["state"].items():
        rest[str(index)] = {}
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{index}/{key}"] = own(value)
            elif isinstance(value, dict):
                rest[str(index)][key] = {k: v for k, v in value.items() if not torch.is_tensor(v)}
                for inner, tensor in value.items():
                    if torch.is_tensor(tensor):
                        tensors[f"optimizer/{index}/{key}/{inner}"] = own(tensor)
            else:
                rest[str(index)][key] = value
    return tensors, {"state": rest, "param_groups": saved["param_groups"]}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict, optimizer) -> dict:
    """The inverse of _split_optimizer_state; tuples (JSON made them lists) restored where the optimiser has them."""
    state = {_param_key(index): dict(values) for index, values in rest["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            index, *path = key.removeprefix("optimizer/").split("/")
            if len(path) == 1:
                state[_param_key(index)][path[0]] = value
            else:
                state[_param_key(index)].setdefault(path[0], {})[path[1]] = value
    groups = []
    for saved, current in zip(rest["param_groups"], optimizer.param_groups, strict=False):
        groups.append({k: tuple(v) if isinstance(current.get(k), tuple) else v for k, v in saved.items()})
    return {"state": state, "param_groups": groups + rest["param_groups"][len(groups):]}


def _param_key(text: str) -> int | str:
    """Optimiser state is keyed by parameter index (torch) or by parameter name (whole state of a sharded run)."""
    return int(text) if text.isdigit() else text


def _load_legacy(path: Path) -> dict:
    """An earlier tunelab's optimizer.pt, read as data only: a pickle that would run code is refused."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError or RuntimeError depending on what it meets
        raise CheckpointError(
            f"refused: this pickle holds more than tensors and plain values, so loading it could run code "
            f"({type(err).__name__}); resume from a checkpoint written by this tunelab instead",
            where=str(path),
        ) from None


def _flush_to_disk(path: Path) -> None:
    """fsync a file or folder, so a rename after it never exposes data the disk does not hold yet."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def data_order_fingerprint(config, rows_digest: str, world_size: int = 1) -> str:
    """Identifies the sequence of batches a run trains on: its rows (PreparedData.fingerprint) and every setting
    the epoch planner uses (the batch of a step is batch_size from each of world_size processes). Empty when the
    rows cannot be identified."""
    if not rows_digest:
        return ""
    plan = [rows_digest, config.train.seed, config.train.batch_size * world_size, config.train.group_by_length,
            config.data.shuffle, config.data.packing, config.data.max_length]
    return hashlib.sha256(json.dumps(plan).encode()).hexdigest()


def check_same_data(checkpoint: Path, fingerprint: str) -> None:
    """Refuse to resume on other batches: the saved data position would point elsewhere. Checkpoints written
    before tunelab recorded the fingerprint are not checked."""
    saved = json.loads((checkpoint / "state.json").read_text()).get("extra", {}).get("data_fingerprint")
    if saved and fingerprint and saved != fingerprint:
        raise ConfigError(
            f"the training data or their batching differ from those of {checkpoint} (data files, tokenizer, "
            "data settings, train.seed, or train.batch_size times the number of processes changed), so its data "
            "position would not continue the same sequence; restore them or start a new run",
            where="data",
        )


def checkpoint_step(checkpoint: Path) -> int:
    """The step a checkpoint was saved at (read without loading it)."""
    return int(json.loads((checkpoint / "state.json").read_text()).get("step", 0))


def check_same_schedule(checkpoint: Path, total_steps: int, train) -> None:
    """Refuse to resume with a step budget (train.max_steps, or train.epochs) that ends before the checkpoint, or
    that changes the learning-rate schedule the checkpoint's scheduler continues: its warmup and decay are
    fractions of the run's total steps, so the steps already trained would have followed one schedule and the rest
    another. Only a constant rate without warmup is free to run longer or shorter. Checkpoints written before
    tunelab recorded the total are checked against their step alone."""
    saved = json.loads((checkpoint / "state.json").read_text())
    step = int(saved.get("step", 0))
    key = "train.max_steps" if train.max_steps else "train.epochs"
    budget = f"train.max_steps {train.max_steps}" if train.max_steps else \
        f"train.epochs {train.epochs:g} ({total_steps} steps)"
    if total_steps < step:
        raise ConfigError(f"--resume continues {checkpoint.name}, saved at step {step}, but {budget} ends before "
                          f"it; give train.max_steps above {step}, or use the run's weights as they are", where=key)
    planned = saved.get("extra", {}).get("total_steps")
    length_free = train.scheduler == "constant" and train.warmup_ratio == 0
    if planned and planned != total_steps and not length_free:
        raise ConfigError(f"--resume continues the {train.scheduler} learning-rate schedule of {planned} steps that "
                          f"{checkpoint.name} holds; {budget} would switch to another schedule at step {step + 1}; "
                          f"restore the run's {planned} steps (train.max_steps={planned}), or start a new run from "
                          "its weights", where=key)


RESUMED_SCHEDULE = ("lr", "weight_decay", "scheduler", "warmup_ratio", "optimizer")
"""train keys whose values a checkpoint's optimizer and scheduler states restore over the config's."""


def check_same_parameters(run_dir: Path, config) -> None:
    """Refuse to resume with another model or method than the run's own (config.yaml): the checkpoint holds that
    model's trainable parameters, which another rank or method cannot load. Checked before the run writes."""
    from tunelab.config_load import load_config

    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    saved = load_config(saved_path)
    ours, theirs = config.method.model_dump(), saved.method.model_dump()
    changed = ["model"] if saved.model != config.model else []
    changed += [f"method.{key}" for key in sorted(set(ours) | set(theirs)) if ours.get(key) != theirs.get(key)]
    if changed:
        raise ConfigError(f"--resume continues {run_dir}, trained with other {', '.join(changed)} than this "
                          "config gives; restore them or start a new run", where=changed[0])
    # The checkpoint's optimizer and scheduler states carry these on: a new value would be written to config.yaml
    # and never used.
    schedule = [(f"train.{key}", getattr(saved.train, key), getattr(config.train, key)) for key in RESUMED_SCHEDULE
                if getattr(saved.train, key) != getattr(config.train, key)]
    if schedule:
        listed = ", ".join(f"{key} {was} -> {now}" for key, was, now in schedule)
        raise ConfigError(f"--resume continues {run_dir} with the optimizer and learning-rate schedule its checkpoint "
                          f"holds, so {listed} would not take effect; restore the run's values, or start a new run "
                          "from its weights", where=schedule[0][0])
