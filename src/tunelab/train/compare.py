"""`tunelab compare-methods`: train one config with several methods on the same data and step budget and
tabulate what each costs (parameters, memory, speed, time) and buys (eval loss, task metric).

Each method trains in its own process, so its peak memory is its own and a crash in one method leaves the
others' results standing. Every method runs at its recommended learning rate (the best single value per
method on the bundled data, see methods.RECOMMENDED_LR) unless the config's is asked for: one shared rate
would favour whichever method it happens to suit. The base model is evaluated once, by the first method's
run, and its numbers stand as the baseline of every row.

Ctrl-C reaches the method training at that moment as it would reach it alone: it stops at its step boundary and
saves a checkpoint; then the tables of the methods so far are written and the command exits 130.
"""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console

from tunelab.config import METHOD_CLASSES, RunConfig, dump_config
from tunelab.errors import ConfigError
from tunelab.methods import RECOMMENDED_LR

COLUMNS = [
    ("method", "method"),
    ("status", "status"),
    ("trainable_parameters", "trainable params"),
    ("trainable_percent", "trainable %"),
    ("lr", "lr"),
    ("peak_memory_mb", "peak memory MB"),
    ("peak_memory_estimate_mb", "estimated MB"),
    ("input_tokens_per_second", "input tokens/s"),
    ("train_seconds", "train s"),
    ("wall_seconds", "wall s"),
    ("base_eval_loss", "base eval loss"),
    ("final_eval_loss", "eval loss"),
    ("metric_before", "metric before"),
    ("metric_after", "metric after"),
]


@dataclass(frozen=True)
class MethodRun:
    method: str
    config: RunConfig
    lr: float


def plan_runs(base: RunConfig, methods: list[str], output: Path, *, lr_from_config: bool) -> list[MethodRun]:
    """One validated config per method: the base config with `method.name` switched, the options the new
    method also has carried over (r, alpha, target_modules ...), the output under `output/<method>`."""
    if not methods:
        raise ConfigError(f"no method named; choose from {', '.join(METHOD_CLASSES)}", where="--methods")
    unknown = [m for m in methods if m not in METHOD_CLASSES]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHOD_CLASSES)}",
                          where="--methods")
    if len(set(methods)) != len(methods):
        raise ConfigError("a method is named twice", where="--methods")
    current = base.method.model_dump()
    current_fields = type(base.method).model_fields
    runs = []
    for name in methods:
        fields = METHOD_CLASSES[name].model_fields
        shared = [k for k in current if k != "name" and k in fields
                  and fields[k].annotation == current_fields[k].annotation]
        method = {"name": name, **{k: current[k] for k in shared}}
        lr = base.train.lr if lr_from_config else RECOMMENDED_LR[name]
        tree = base.model_dump(mode="json")
        tree.update(method=method, output_dir=str(output / name))
        tree["train"]["lr"] = lr
        runs.append(MethodRun(name, _method_config(name, tree), lr))
    return runs


def _method_config(name: str, tree: dict) -> RunConfig:
    """The validated config of one method's run; a ConfigError naming the method when the shared settings do not
    suit it (data.packing with prompt tuning ...), before any method trains."""
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        reasons = "; ".join(problem["msg"].removeprefix("Value error, ") for problem in err.errors())
        raise ConfigError(f"{name} cannot train with this config: {reasons}; leave it out of --methods or change "
                          "the setting", where="--methods") from None


def compare_methods(
    base: RunConfig, methods: list[str], output: Path, *, lr_from_config: bool = False, overwrite: bool = False,
    on_result=lambda row: None,
) -> list[dict]:
    """Train every method in a child process, then write compare.{md,csv,json,png} under `output`."""
    runs = plan_runs(base, methods, output, lr_from_config=lr_from_config)
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise ConfigError(f"{output} already holds files; pass --overwrite to replace it", where="--output")
        shutil.rmtree(output)
    (output / "logs").mkdir(parents=True)
    rows: list[dict] = []
    for run in runs:
        baseline = next((r for r in rows if r.get("base_eval_loss") is not None), None)
        if baseline is not None:  # the base model was measured once; later runs skip it
            run = MethodRun(run.method, _without_baseline(run.config), run.lr)
        row, interrupted = _train_one(run, output)
        if baseline is not None:
            row.update(base_eval_loss=baseline["base_eval_loss"], metric_before=baseline["metric_before"])
        rows.append(row)
        write_tables(rows, output, base)
        on_result(row)
        if interrupted:
            _say_interrupted(run, output)
            raise KeyboardInterrupt
    return rows


def _say_interrupted(run: MethodRun, output: Path) -> None:
    """Where an interrupted comparison left things (the CLI then exits 130)."""
    logs = output / "logs"
    Console(stderr=True).print(
        f"[yellow]interrupted while training {run.method}: {logs / run.method}.log says what it saved, and "
        f"`tunelab train {logs / run.method}.yaml --resume` continues it; {output}/compare.md holds the methods "
        "trained before it and this one as interrupted[/]", highlight=False, soft_wrap=True)


def _without_baseline(config: RunConfig) -> RunConfig:
    return config.model_copy(update={"eval": config.eval.model_copy(update={"before_after": False})})


def _train_one(run: MethodRun, output: Path) -> tuple[dict, bool]:
    """The method's table row, and whether Ctrl-C interrupted its training."""
    config_file = output / "logs" / f"{run.method}.yaml"
    config_file.write_text(dump_config(run.config))
    log_file = output / "logs" / f"{run.method}.log"
    started = time.perf_counter()
    with open(log_file, "w") as log:
        child = subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(config_file), "--overwrite"],
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        code, interrupted = _wait_passing_on_ctrl_c(child)
    wall = time.perf_counter() - started
    summary_file = run.config.output_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    return _row(run, summary, code, wall, log_file, interrupted), interrupted


def _wait_passing_on_ctrl_c(child: subprocess.Popen) -> tuple[int, bool]:
    """The child's exit code, and whether Ctrl-C came meanwhile. The child runs in its own session, so a terminal's
    Ctrl-C reaches only this process, which passes each one on exactly once: the first lets the training stop at
    its next step boundary and save its checkpoint, a second stops it at once (as when it runs alone)."""
    interrupted = False
    try:
        while True:
            try:
                return child.wait(), interrupted
            except KeyboardInterrupt:
                interrupted = True
                child.send_signal(signal.SIGINT)
    finally:
        if child.poll() is None:  # only an error of this process's own leaves it running
            child.kill()


def _row(run: MethodRun, summary: dict, code: int, wall: float, log_file: Path, interrupted: bool = False) -> dict:
    # The task metric's name from whichever evaluation measured it: a failed last evaluation leaves no "after".
    metric = next(iter(summary.get("metrics_after") or summary.get("metrics_before") or {}), None)
    total = summary.get("total_parameters") or 0
    if code == 0:
        status = summary.get("status", "failed")
    elif interrupted:
        status = f"interrupted (at step {summary.get('steps', 0)}, see {log_file.name})"
    else:
        status = f"failed (exit {code}, see {log_file.name})"
    return {
        "method": run.method,
        "status": status,
        "trainable_parameters": summary.get("trainable_parameters"),
        "trainable_percent": round(100 * summary["trainable_parameters"] / total, 3) if total else None,
        "lr": run.lr,
        "peak_memory_mb": summary.get("peak_memory_mb"),
        "peak_memory_estimate_mb": summary.get("peak_memory_estimate_mb"),
        "input_tokens_per_second": summary.get("input_tokens_per_second"),
        "train_seconds": summary.get("train_seconds"),
        "wall_seconds": round(wall, 1),
        "base_eval_loss": _rounded(summary.get("base_eval_loss")),
        "final_eval_loss": _rounded(summary.get("final_eval_loss")),
        "metric": metric,
        "metric_before": _rounded((summary.get("metrics_before") or {}).get(metric)),
        "metric_after": _rounded((summary.get("metrics_after") or {}).get(metric)),
    }


def _rounded(value):
    return round(value, 4) if isinstance(value, float) else value


def write_tables(rows: list[dict], output: Path, base: RunConfig) -> None:
    """compare.json (everything), compare.csv, compare.md and compare.png."""
    (output / "compare.json").write_text(json.dumps(rows, indent=2))
    with open(output / "compare.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[key for key, _ in COLUMNS] + ["metric"])
        writer.writeheader()
        writer.writerows({key: row.get(key) for key in writer.fieldnames} for row in rows)
    (output / "compare.md").write_text(markdown_table(rows, base))
    _plot(rows, output / "compare.png")


def markdown_table(rows: list[dict], base: RunConfig) -> str:
    metric = next((row["metric"] for row in rows if row.get("metric")), None)
    budget = f"max_steps={base.train.max_steps}" if base.train.max_steps else f"epochs={base.train.epochs}"
    lines = [
        f"Methods on `{base.model}`, data `{base.data.train}`, {budget}, batch {base.train.batch_size}, "
        f"max_length {base.data.max_length}, seed {base.train.seed}. Task metric: {metric or 'none'}.",
        "",
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("final_eval_loss", "eval loss"), ("metric_after", "task metric"),
              ("peak_memory_mb", "peak memory (MB)"), ("input_tokens_per_second", "input tokens/s")]
    names = [row["method"] for row in rows]
    figure, axes = plt.subplots(2, 2, figsize=(11, 7))
    for axis, (key, title) in zip(axes.flat, panels, strict=True):
        values = [row.get(key) or 0 for row in rows]
        axis.bar(names, values, color="#4C72B0")
        before_key = {"final_eval_loss": "base_eval_loss", "metric_after": "metric_before"}.get(key)
        before = [row.get(before_key) for row in rows if before_key and row.get(before_key) is not None]
        if before:
            axis.axhline(before[0], color="#C44E52", linestyle="--", label="base model")
            axis.legend()
        axis.set_title(title)
        axis.tick_params(axis="x", rotation=45)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
