"""What a finished (or stopped) run reports: the data it read, the base model's numbers (baseline.json),
summary.json, and the before/after table."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from rich.console import Console

from tunelab.config import RunConfig
from tunelab.data.preference import PreparedPairs
from tunelab.data.prepare import PreparedData
from tunelab.data.prompts import PreparedPrompts
from tunelab.errors import ConfigError
from tunelab.eval.report import before_after_keys
from tunelab.methods import has_frozen_base
from tunelab.models.fused_ops import kernels_in_use
from tunelab.textio import replace_text
from tunelab.track.jsonl import MetricsLog
from tunelab.train.best import BestTracker
from tunelab.train.flops import hardware, matmul_peak_flops, training_flops
from tunelab.train.memory import MemoryEstimate
from tunelab.train.outputs import peak_memory_mb


def report_data(console: Console, data: PreparedData | PreparedPairs | PreparedPrompts) -> None:
    stats = data.stats
    for path, fmt in data.formats.items():
        console.print(f"data {path}: {fmt}")
    if isinstance(data, PreparedPrompts):
        console.print(f"{stats['train_rows']} train / {stats['eval_rows']} eval prompts, {stats['train_tokens']:,} "
                      f"prompt tokens, median prompt {stats['median_length']}")
        for note in data.dropped[:5]:
            console.print(f"[yellow]{note}[/]")
        return
    if isinstance(data, PreparedPairs):
        console.print(f"{stats['train_rows']} train / {stats['eval_rows']} eval {data.kind} rows, "
                      f"{stats['train_tokens']:,} train tokens, median sequence {stats['median_length']}")
        for note in (data.truncated + data.dropped + data.identical)[:5]:
            console.print(f"[yellow]{note}[/]")
        return
    console.print(
        f"{stats['train_samples']} train / {stats['eval_samples']} eval samples, {stats['train_tokens']:,} train "
        f"tokens ({100 * stats['trainable_fraction']:.0f}% trained), median length {stats['median_length']}"
    )
    for note in (data.truncated + data.dropped)[:5]:
        console.print(f"[yellow]{note}[/]")
    extra = data.truncated_count + data.dropped_count - 5
    if extra > 0:
        console.print(f"[yellow]... and {extra} more over-long samples[/]")


BASELINE_FILE = "baseline.json"
MEASURED_WITH = "measured_with"
"""baseline.json's record of the settings its numbers were measured with."""


def baseline_settings(config: RunConfig) -> dict:
    """What the base model's numbers depend on besides its weights: the eval settings (except how many replies the
    console shows), the held-out data, the precision and the objective (its loss)."""
    return {
        "eval": config.eval.model_dump(mode="json", exclude={"show_samples"}),
        "data": config.data.model_dump(mode="json", include={"eval", "eval_split", "max_length"}),
        "train": {"precision": config.train.precision},
        "objective": {"name": config.objective.name},
    }


def read_baseline(run_dir: Path, settings: dict) -> tuple[dict | None, list[str]]:
    """baseline.json's numbers when they were measured with `settings` (or by a tunelab that did not record
    them); else None and what changed since, as "key old -> new"."""
    path = Path(run_dir) / BASELINE_FILE
    if not path.is_file():
        return None, []
    baseline = json.loads(path.read_text())
    measured_with = baseline.pop(MEASURED_WITH, None)
    if measured_with is None or measured_with == settings:
        return baseline, []
    return None, _changed_settings(measured_with, settings)


def write_baseline(run_dir: Path, baseline: dict, settings: dict) -> None:
    replace_text(Path(run_dir) / BASELINE_FILE, json.dumps({**baseline, MEASURED_WITH: settings}, indent=2))


def _changed_settings(before: dict, now: dict, prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(before) | set(now)):
        old, new = before.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += _changed_settings(old, new, f"{prefix}{key}.")
        elif old != new:
            changed.append(f"{prefix}{key} {old} -> {new}")
    return changed


def base_measurement(config: RunConfig, run_dir: Path, evaluate_base: Callable[[], dict], console: Console, *,
                     measures: bool, writes: bool, resume: bool) -> dict:
    """The base model's numbers (empty with eval.before_after off): a resumed run reuses baseline.json unless the
    settings that shape them changed since (then the fine-tuned numbers would be measured otherwise). The main
    process measures (with a sharded model, every process) and writes the file; the others get {}."""
    if not measures:
        return {}
    settings = baseline_settings(config)
    baseline, changed = read_baseline(run_dir, settings) if resume else (None, [])
    if baseline is not None:
        return baseline
    if changed:
        console.print(f"[yellow]changed since the base model was measured ({', '.join(changed)}): measuring it "
                      "again[/]")
    baseline = {}
    if config.eval.before_after:
        console.print("evaluating the base model ...")
        try:
            baseline = evaluate_base()
        except KeyboardInterrupt:
            console.print("[yellow]interrupted while evaluating the base model: " + (
                "the checkpoint is untouched; --resume measures it again[/]" if resume else
                "before the first step, nothing trained or saved; start again with --overwrite[/]"))
            raise
    if writes:
        write_baseline(run_dir, baseline, settings)
    return baseline


def check_best_metric_is_logged(metric: str, measured: dict) -> None:
    """Refuse a train.best_metric the evaluations do not log, as soon as the base model's shows which they do,
    not at the first evaluation after steps have run."""
    logged = sorted(key for key in measured if key.startswith("eval_"))
    if logged and metric not in logged:
        raise ConfigError(f"{metric} is not among the evaluation's metrics; the base model's evaluation logged "
                          f"{', '.join(logged)}", where="train.best_metric")


def utilisation(model, config, state, precision, device) -> dict:
    """Achieved training FLOP/s and MFU against this machine's measured matmul peak."""
    if not state.train_seconds:
        return {}
    base_trains = not has_frozen_base(config.method.name)
    computed = state.extra.get("real_tokens", 0) - state.extra.get("shared_tokens", 0)  # a shared prefix counts once
    flops = training_flops(model, input_tokens=computed, trained_tokens=state.tokens_seen,
                           base_trains=base_trains)
    achieved = flops / state.train_seconds
    peak = matmul_peak_flops(device.type, precision)
    # Significant figures, not decimals: a tiny model on a GPU reaches MFU ~1e-5, which round(x, 4) made 0.0.
    return {"achieved_tflops": _significant(achieved / 1e12), "peak_matmul_tflops": _significant(peak / 1e12),
            "mfu": _significant(achieved / peak)}


def _significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def write_summary(run_dir, model, config, data, state, baseline, after, trainable, total, precision, device,
                   status, memory: MemoryEstimate, step_breakdown: dict | None = None):
    records = MetricsLog(run_dir / "metrics.jsonl").read()
    train_losses = [r["loss"] for r in records if r.get("loss") is not None]  # skipped steps log None
    computed = state.extra.get("computed_tokens", 0)
    real, shared = state.extra.get("real_tokens", 0), state.extra.get("shared_tokens", 0)
    real_computed = real - shared  # non-padding positions the model ran
    summary = {
        "status": status,
        "model": config.model,
        "method": config.method.name,
        "objective": config.objective.name,
        "steps": state.step,
        "train_tokens": state.tokens_seen,
        "train_seconds": round(state.train_seconds, 2),
        # tokens that carry loss per second; all non-padding tokens per second (what TRL logs as num_tokens)
        "tokens_per_second": round(state.tokens_seen / state.train_seconds, 2) if state.train_seconds else 0.0,
        "input_tokens_per_second": (
            round(state.extra.get("real_tokens", 0) / state.train_seconds, 2) if state.train_seconds else 0.0
        ),
        # trained tokens / computed positions, and non-padding tokens / computed positions
        "padding_efficiency": round(state.tokens_seen / computed, 4) if computed else None,
        "non_padding_fraction": round(real_computed / computed, 4) if computed else None,
        # samples' tokens not computed because their batch held a shared prefix once (train.share_prefix)
        "shared_prefix_fraction": round(shared / real, 4) if real else 0.0,
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "peak_memory_estimate_mb": round(memory.peak_mb, 1),
        "memory_estimate": memory.as_dict(),
        **utilisation(model, config, state, precision, device),
        "final_train_loss": train_losses[-1] if train_losses else None,
        "base_eval_loss": baseline.get("eval_loss"),
        "final_eval_loss": after.get("eval_loss", state.best_eval_loss),
        "final_eval_perplexity": after.get("eval_perplexity"),
        "eval_before": {k: v for k, v in baseline.items() if k.startswith("eval_")},
        "eval_after": {k: v for k, v in after.items() if k.startswith("eval_")},
        "metrics_before": baseline.get("metrics", {}),
        "metrics_after": after.get("metrics", {}),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "precision": precision,
        "device": str(device),
        "hardware": hardware(device),
        "kernels": kernels_in_use(model),
        "data": data.stats,
        "best": BestTracker(config.train, run_dir, model).summary(state),
        "trainer_state": asdict(state),
    }
    summary["warnings"] = outcome_warnings(summary, config)
    if step_breakdown:
        summary["step_breakdown"] = step_breakdown
    replace_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def outcome_warnings(summary: dict, config) -> list[str]:
    """What the before/after numbers say went wrong (a run can end `completed` with a worse model: a learning rate
    far too high ruins the weights without a NaN), for the console and summary.json."""
    base, tuned = summary.get("base_eval_loss"), summary.get("final_eval_loss")
    if not isinstance(base, int | float) or not isinstance(tuned, int | float) or not math.isfinite(base):
        return []
    if tuned <= base + max(1e-3, 0.01 * abs(base)):
        return []
    return [f"the fine-tuned model's held-out loss {tuned:.4f} is worse than the base model's {base:.4f}: training "
            f"made it worse at this data (train.lr is {config.train.lr:g}; see the loss curve in plots/)"]


def print_outcome(console, summary, samples, before, after, show) -> None:
    from rich.table import Table

    table = Table(title="before / after fine-tuning")
    table.add_column("metric")
    table.add_column("base model", justify="right")
    table.add_column("fine-tuned", justify="right")
    rows = [(f"eval loss ({summary['objective']})", summary["base_eval_loss"], summary["final_eval_loss"])]
    if "eval_perplexity" in summary["eval_after"]:
        rows.append(("eval perplexity", summary["eval_before"].get("eval_perplexity"),
                     summary["eval_after"]["eval_perplexity"]))
    for name in before_after_keys(summary["objective"], summary["eval_after"]):
        if name in summary["eval_after"]:
            rows.append((name.removeprefix("eval_"), summary["eval_before"].get(name), summary["eval_after"][name]))
    for name, value in summary["metrics_after"].items():
        rows.append((name, summary["metrics_before"].get(name), value))
    for name, base, tuned in rows:
        table.add_row(name, "-" if base is None else f"{base:.4f}", "-" if tuned is None else f"{tuned:.4f}")
    console.print(table)
    for warning in summary.get("warnings", []):
        console.print(f"[yellow]warning:[/] {warning}")
    for sample, base, tuned in list(zip(samples, before or [None] * len(after), after, strict=False))[:show]:
        console.print(f"[bold]prompt:[/] {sample.messages[-2]['content']}")
        console.print(f"  [dim]reference:[/]  {sample.reference}")
        if base is not None:
            console.print(f"  [red]base:[/]       {base}")
        console.print(f"  [green]fine-tuned:[/] {tuned}")
    shared = summary.get("shared_prefix_fraction")
    shared_note = f", {100 * shared:.0f}% of them a shared prefix computed once" if shared else ""
    console.print(
        f"trained {summary['train_tokens']:,} tokens in {summary['train_seconds']:.0f}s "
        f"({summary['tokens_per_second']:.0f} trained tokens/s, "
        f"{summary['input_tokens_per_second']:.0f} input tokens/s{shared_note}), "
        f"peak memory {summary['peak_memory_mb']:.0f} MB, MFU {100 * summary.get('mfu', 0):.3g}% of the measured "
        f"{summary.get('peak_matmul_tflops', 0) * 1000:.0f} GFLOP/s matmul peak"
    )
