"""The report's plots, drawn from the records of metrics.jsonl (and the task metrics of summary.json for the run
comparison). Each builder returns None when there is nothing to draw, so a page shows no empty axes."""

from __future__ import annotations

import io
import itertools
import math

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from tunelab.eval.metrics import metric_scale

DATASET_COLORS = ("tab:red", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
RUN_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray")


def series(metrics: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of every record that logged `key`."""
    points = [(r["step"], r[key]) for r in metrics if r.get(key) is not None and "step" in r]
    return [p[0] for p in points], [p[1] for p in points]


def _figure(title: str, width: float = 7.0) -> tuple[Figure, Axes]:
    # A bare Figure on the Agg canvas keeps no pyplot state, so there is nothing to close and nothing leaks.
    fig = Figure(figsize=(width, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig, ax


def _is_percent_scale(key: str, values: list[float]) -> bool:
    """BLEU and chrF run 0-100 while accuracies run 0-1; on one axis the latter would lie flat on zero. A built-in
    metric's own scale decides (a BLEU of 0.8 is still on the 0-100 axis); a user's metric's values."""
    scale = metric_scale(key)
    if scale is not None:
        return scale == "0-100"
    return max((v for v in values if math.isfinite(v)), default=0) > 1


def _scaled(key: str, right: bool) -> str:
    """A metric's name with its scale where known, and which axis it is read on: `bleu (0-100, right)`."""
    notes = [note for note in (metric_scale(key), "right" if right else None) if note]
    return f"{key} ({', '.join(notes)})" if notes else key


def loss_figure(metrics: list[dict]) -> Figure | None:
    """Train loss per logged step and eval loss per evaluation, from the base model's step-0 point on."""
    train, evals = series(metrics, "loss"), series(metrics, "eval_loss")
    if not train[0] and not evals[0]:
        return None
    fig, ax = _figure("loss")
    if train[0]:
        ax.plot(*train, color="tab:blue", linewidth=1.2, alpha=0.8, label="train loss")
    if evals[0]:
        # Named in the legend rather than annotated at the point: the base model's loss is usually the highest
        # point of the plot, where a text label runs into the frame.
        label = "eval loss (step 0: base model)" if evals[0][0] == 0 else "eval loss"
        ax.plot(*evals, "o-", color="tab:orange", linewidth=2, label=label)
    per_dataset = sorted({k for r in metrics for k in r if k.startswith("eval_loss/")})
    for key, color in zip(per_dataset, itertools.cycle(DATASET_COLORS)):
        ax.plot(*series(metrics, key), "--", color=color, linewidth=1, label=f"eval loss ({key.split('/', 1)[1]})")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    return fig


def is_loss_key(key: str) -> bool:
    return "loss" in key or "perplexity" in key


OBJECTIVE_REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "kl")
OBJECTIVE_RATES = ("rewards/accuracies", "preference_accuracy")


DISTILL_KEYS = ("distill/divergence", "ce")
"""What a distillation run logs at each step, and as eval_<key> at each evaluation (with eval_perplexity)."""


def is_objective_key(key: str) -> bool:
    """Metrics a preference objective, GRPO or distillation logs (TRL's names), train or eval: drawn in their own
    figure."""
    name = key.removeprefix("eval_")
    return (name.startswith(("rewards/", "logps/", "completions/", "clip_ratio/", "seconds/"))
            or name in ("kl", "preference_accuracy", "reward", "reward_std", "frac_reward_zero_std", *DISTILL_KEYS))


def objective_figure(metrics: list[dict]) -> Figure | None:
    """A preference objective's own curves: implied rewards and their margin (and KTO's KL) on the left, the
    share of pairs ranked right on the right; lines for training steps, markers for evaluations. A falling
    rewards/chosen (both replies pushed down) is the failure users most often miss."""
    # GRPO: the total reward and each reward's mean (eval_reward is the greedy held-out completions')
    grpo = ["reward", *sorted({k for r in metrics for k in r if k.startswith("rewards/") and k.endswith("/mean")})]
    left = [k for k in (*OBJECTIVE_REWARDS, *grpo) if series(metrics, k)[0]]
    right_keys = [k for k in OBJECTIVE_RATES if series(metrics, k)[0]]
    if not left and not right_keys:
        return None
    title = ("objective: reward of sampled (lines) and greedy held-out (markers) completions" if "reward" in left
             else "objective: rewards and ranking accuracy")
    fig, ax = _figure(title)
    right = ax.twinx() if right_keys else None
    colors = itertools.cycle(DATASET_COLORS)  # one cycle over both axes: no two curves share a colour
    for axis, keys in ((ax, left), (right, right_keys)):
        for key, color in zip(keys, colors, strict=False):
            axis.plot(*series(metrics, key), "-", color=color, linewidth=1.2, label=key)
            if series(metrics, f"eval_{key}")[0]:
                axis.plot(*series(metrics, f"eval_{key}"), "o", color=color, markersize=5, label=f"eval {key}")
    if right is not None:
        right.set_ylim(-0.02, 1.02)
        right.set_ylabel("share of pairs")
    ax.axhline(0, color="gray", linewidth=0.5)
    ax.set_xlabel("step")
    handles = [h for axis in (ax, right) if axis for h in axis.get_legend_handles_labels()[0]]
    (right or ax).legend(handles=handles, fontsize=7, ncol=2)
    return fig


def distill_figure(metrics: list[dict]) -> Figure | None:
    """A distillation run's parts of its loss: the divergence to the teacher and the student's cross-entropy on the
    data's replies (lines for training steps, markers for evaluations), and the held-out perplexity, exp(ce), on
    the right. A falling divergence with a rising cross-entropy is a student copying the teacher's mistakes."""
    keys = [k for k in DISTILL_KEYS if series(metrics, k)[0] or series(metrics, f"eval_{k}")[0]]
    perplexity = series(metrics, "eval_perplexity")
    if not keys:
        return None
    fig, ax = _figure("distillation: divergence to the teacher and cross-entropy")
    for key, color in zip(keys, DATASET_COLORS, strict=False):
        ax.plot(*series(metrics, key), "-", color=color, linewidth=1.2, label=key)
        ax.plot(*series(metrics, f"eval_{key}"), "o", color=color, markersize=5, label=f"eval {key}")
    right = ax.twinx() if perplexity[0] else None
    if right is not None:
        right.plot(*perplexity, "s--", color="tab:gray", linewidth=1, markersize=4, label="eval perplexity (right)")
        right.set_ylabel("perplexity")
    ax.set_xlabel("step")
    ax.set_ylim(bottom=0)
    handles = [h for axis in (ax, right) if axis for h in axis.get_legend_handles_labels()[0]]
    (right or ax).legend(handles=handles, fontsize=7)
    return fig


def task_metrics_figure(metrics: list[dict], best_step: int | None) -> Figure | None:
    """Task metrics logged at each evaluation (eval.during_training), from the base model at step 0; metrics on
    a 0-100 scale (BLEU, chrF) get their own axis on the right."""
    keys = sorted({k for r in metrics for k in r
                   if k.startswith("eval_") and not is_loss_key(k) and not is_objective_key(k)})
    if not keys:
        return None
    fig, ax = _figure("task metrics on the eval subset")
    wide = [k for k in keys if _is_percent_scale(k, series(metrics, k)[1])]
    right = ax.twinx() if wide else None
    for key, color in zip(keys, itertools.cycle(DATASET_COLORS)):
        # Dashed with small markers on the right axis: where a 0-1 and a 0-100 metric coincide, both stay visible.
        axis, style, size = (right, "s--", 4) if key in wide else (ax, "o-", 6)
        label = _scaled(key.removeprefix("eval_"), key in wide)
        axis.plot(*series(metrics, key), style, color=color, linewidth=1.5, markersize=size, label=label)
    if best_step is not None:
        ax.axvline(best_step, color="gray", linestyle=":", linewidth=1, label=f"best step {best_step}")
    ax.set_xlabel("step")
    handles = [h for axis in (ax, right) if axis for h in axis.get_legend_handles_labels()[0]]
    (right or ax).legend(handles=handles, fontsize=8)  # on the top axis, so no line is drawn over it
    return fig


def learning_rate_figure(metrics: list[dict]) -> Figure | None:
    steps, lrs = series(metrics, "lr")
    if not steps:
        return None
    fig, ax = _figure("learning rate")
    ax.plot(steps, lrs, color="tab:green")
    ax.set_xlabel("step")
    ax.set_ylim(bottom=0)  # warmup from zero and a constant rate both read right only against zero
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return fig


def throughput_figure(metrics: list[dict], run_average: float | None) -> Figure | None:
    steps, speeds = series(metrics, "tokens_per_second")
    if not steps:
        return None
    fig, ax = _figure("throughput (trained tokens / s)")
    ax.plot(steps, speeds, color="tab:purple", linewidth=1.2, label="per step")
    if run_average:
        ax.axhline(run_average, color="gray", linestyle="--", linewidth=1, label=f"run average {run_average:,.0f}")
        ax.legend(fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylim(bottom=0)
    return fig


def eval_loss_overlay(runs: list[tuple[str, list[dict]]]) -> Figure | None:
    """One eval-loss curve per (label, metrics) run."""
    curves = [(label, series(metrics, "eval_loss")) for label, metrics in runs]
    if not any(steps for _, (steps, _) in curves):
        return None
    fig, ax = _figure("eval loss", width=9)
    for (label, (steps, losses)), color in zip(curves, itertools.cycle(RUN_COLORS)):
        if steps:
            ax.plot(steps, losses, "o-", color=color, linewidth=1.5, markersize=3, label=label)
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    return fig


def metric_bars(runs: list[tuple[str, dict]]) -> Figure | None:
    """Grouped bars per task metric after fine-tuning, one colour per (label, metrics_after) run; metrics on a
    0-100 scale are drawn against a second axis on the right."""
    names = list(dict.fromkeys(name for _, metrics in runs for name in metrics))
    if not names:
        return None
    wide = {n for n in names
            if _is_percent_scale(n, [m[n] for _, m in runs if isinstance(m.get(n), (int, float))])}
    fig, ax = _figure("task metrics after fine-tuning", width=max(9.0, 3 + len(names) * (0.4 + 0.3 * len(runs))))
    right = ax.twinx() if wide else None
    width = 0.8 / len(runs)
    legend = []
    for i, ((label, metrics), color) in enumerate(zip(runs, itertools.cycle(RUN_COLORS))):
        offset = (i - (len(runs) - 1) / 2) * width
        legend.append(Patch(color=color, label=label if metrics else f"{label} (no task metrics)"))
        for axis, digits in ((ax, 2), (right, 1)):
            group = [n for n in names if (n in wide) == (axis is right)]
            if axis is not None and group:
                positions = [names.index(n) + offset for n in group]
                bars = axis.bar(positions, [metrics.get(n, math.nan) for n in group], width, color=color)
                axis.bar_label(bars, fmt=f"%.{digits}f", fontsize=7)
    ticks = [_scaled(n, n in wide) for n in names]
    ax.set_xticks(range(len(names)), ticks, rotation=20, ha="right", fontsize=9)
    for axis in (ax, right):
        if axis is not None:
            axis.margins(y=0.12)  # headroom for the value labels of the tallest bars
    fig.legend(handles=legend, loc="outside right upper", fontsize=8)  # beside the bars, never over them
    return fig


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})  # no version stamp: same run, same bytes
    return buffer.getvalue()
