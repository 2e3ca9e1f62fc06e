"""The best evaluation of a run, by any metric it logs, and that step's weights on disk.

Early stopping and `train.keep_best` follow `train.best_metric`: eval_loss by default, or any eval_<key> that
metrics.jsonl holds (task metrics come from `eval.during_training`). The baseline at step 0 is logged but is
never a candidate: the run ends with weights it trained.

When early stopping or keep_best is on, the trainable weights of each new best are written to
RUN/best/step-N.safetensors (scratch file, then rename), so a resumed run can restore them: the in-memory copy
of an interrupted process is gone. A file is kept while the current best or a kept checkpoint refers to it,
because resuming from an older checkpoint must find the best weights as of that checkpoint, not a later best
that the resumed run may never reach again. Only improvements cost a write: the trainable parameters (small
for adapters, the whole model for full fine-tuning).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from safetensors.torch import load_file, save_file

from tunelab.errors import ConfigError
from tunelab.eval.metrics import ROUGE_TYPES, is_custom_metric
from tunelab.train.checkpoint import CHECKPOINTS, TrainerState, load_trainable_state, trainable_state

BEST = "best"
LOSS_KEYS = ("eval_loss", "eval_perplexity")
_LOWER_IS_BETTER = ("loss", "perplexity")
# What each built-in metric adds to an evaluation (logged with an eval_ prefix during training).
_METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "exact_match": ("exact_match",),
    "accuracy": ("accuracy",),
    "bleu": ("bleu",),
    "chrf": ("chrf",),
    "rouge": ROUGE_TYPES,
    "json_field_accuracy": ("field_accuracy", "json_valid", "exact_match", "json_field_accuracy/exact_match"),
    "label_accuracy": ("label_accuracy",),
}


def metric_mode(metric: str, mode: str | None = None) -> str:
    """`min` or `max`: the given mode, else min for losses and perplexity and max for everything else."""
    if mode:
        return mode
    return "min" if any(word in metric for word in _LOWER_IS_BETTER) else "max"


def best_metric_problem(train, evaluation, *, has_eval_data: bool, objective_keys: tuple[str, ...] = ()) -> str | None:
    """Why train.best_metric / keep_best / eval.during_training cannot work with this config, or None.
    `objective_keys` are the metrics the objective itself logs at every evaluation (eval_<key>)."""
    if not has_eval_data:
        for on, key in ((train.keep_best, "train.keep_best"), (evaluation.during_training, "eval.during_training")):
            if on:
                return f"{key} needs eval data: set data.eval or data.eval_split"
    metric = train.best_metric
    if metric in LOSS_KEYS or metric.startswith("eval_loss/"):
        return None
    key = metric[len("eval_") :] if metric.startswith("eval_") else ""
    if key in objective_keys:
        return None
    if not key:
        return (
            f"train.best_metric: '{metric}' is not an eval metric; use eval_loss, eval_perplexity or "
            "eval_<key> for a key of a metric in eval.metrics (e.g. eval_exact_match)"
        )
    if not evaluation.during_training:
        return (
            f"train.best_metric: {metric} is a task metric; it is measured during training only with "
            "eval.during_training: true"
        )
    if any(is_custom_metric(name) for name in evaluation.metrics):
        return None  # a custom metric's keys are known only once it has run
    keys = sorted({k for name in evaluation.metrics for k in _METRIC_KEYS.get(name, ())})
    if key in keys or ("json_field_accuracy" in evaluation.metrics and key.startswith("field/")):
        return None
    choices = ", ".join([*LOSS_KEYS, *(f"eval_{k}" for k in keys)])
    return (
        f"train.best_metric: eval.metrics ({', '.join(evaluation.metrics)}) logs no {metric}; choose one of {choices}"
    )


def best_path(run_dir: Path, step: int) -> Path:
    return run_dir / BEST / f"step-{step:06d}.safetensors"


def save_best(run_dir: Path, model, step: int, metric: str, value: float) -> Path:
    """Write the trainable weights of `step` atomically, then drop best files nothing refers to any more."""
    final = best_path(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = final.with_name(f".tmp-{final.name}")
    save_file(trainable_state(model), scratch, metadata={"step": str(step), "metric": metric, "value": repr(value)})
    os.replace(scratch, final)
    referenced = {step} | _checkpoint_best_steps(run_dir)
    for old in (run_dir / BEST).glob("step-*.safetensors"):
        if int(old.stem.split("-")[1]) not in referenced:
            old.unlink(missing_ok=True)
    return final


def _checkpoint_best_steps(run_dir: Path) -> set[int]:
    steps = set()
    for state_file in (run_dir / CHECKPOINTS).glob("step-*/state.json"):
        best_step = json.loads(state_file.read_text()).get("best_step")
        if best_step is not None:
            steps.add(int(best_step))
    return steps


class BestTracker:
    """Follows train.best_metric across evaluations for early stopping and keep-best."""

    def __init__(self, train, run_dir: Path, model) -> None:
        self.metric = train.best_metric
        self.mode = metric_mode(train.best_metric, train.best_mode)
        self.patience = train.early_stopping_patience
        self.keep = bool(train.keep_best or train.early_stopping_patience)
        self.run_dir = run_dir
        self.model = model

    def better(self, value: float, best: float | None) -> bool:
        if not math.isfinite(value):
            return False
        if best is None:
            return True
        return value < best if self.mode == "min" else value > best

    def observe(self, state: TrainerState, metrics: dict[str, float]) -> bool:
        """Record the evaluation at state.step; True when early stopping says stop. Ties do not improve."""
        if not metrics:
            return False  # no eval data
        if self.metric not in metrics:
            logged = ", ".join(sorted(k for k in metrics if k.startswith("eval_")))
            raise ConfigError(
                f"{self.metric} is not among the evaluation's metrics ({logged})", where="train.best_metric"
            )
        value = float(metrics[self.metric])
        if self.better(value, state.best_value):
            state.best_value, state.best_step = value, state.step
            state.best_eval_loss = metrics.get("eval_loss")
            state.evals_without_improvement = 0
            if self.keep:
                save_best(self.run_dir, self.model, state.step, self.metric, value)
            return False
        state.evals_without_improvement += 1
        return bool(self.patience and state.evals_without_improvement >= self.patience)

    def restore(self, state: TrainerState) -> None:
        """Load the best step's weights from disk when the run should end with them."""
        if not self.keep or state.best_step is None or state.best_step == state.step:
            return
        path = best_path(self.run_dir, state.best_step)
        if not path.is_file():
            # Only a checkpoint written before best weights were persisted lacks the file.
            state.extra["best_not_restored"] = f"{path} is missing"
            return
        load_trainable_state(self.model, load_file(path))
        state.extra["restored_best_step"] = state.best_step

    def summary(self, state: TrainerState) -> dict:
        """What summary.json records about the best evaluation."""
        return {
            "metric": self.metric,
            "mode": self.mode,
            "step": state.best_step,
            "value": state.best_value,
            "restored": state.extra.get("restored_best_step") is not None,
        }
