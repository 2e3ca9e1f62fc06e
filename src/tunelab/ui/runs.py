"""What the web app knows about runs: read from the run directories themselves (config.yaml, status.json,
metrics.jsonl, summary.json), so runs started from the CLI, from the app or on another day all look the same,
and refreshing the page or restarting the app loses nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from tunelab.track.jsonl import finite_or_null
from tunelab.train.console_log import LOG_FILE
from tunelab.train.live import live_status


def is_run_dir(folder: Path) -> bool:
    return (folder / "config.yaml").is_file() and any(
        (folder / name).exists() for name in ("metrics.jsonl", "status.json", "summary.json", LOG_FILE))


def list_runs(root: Path) -> list[dict[str, Any]]:
    """Every run under `root` (one level down, and `root` itself if it is a run), newest first."""
    folders = [root] if is_run_dir(root) else []
    if root.is_dir():
        folders += [f for f in sorted(root.iterdir()) if f.is_dir() and not f.name.startswith(".") and is_run_dir(f)]
    runs = [run_summary(folder, root) for folder in folders]
    return sorted(runs, key=lambda r: r.get("updated") or 0, reverse=True)


def run_summary(folder: Path, root: Path) -> dict[str, Any]:
    """One row of the runs table: status, model, method/objective, data, steps, time, eval loss, the main task
    metric before -> after, peak memory."""
    config = read_yaml(folder / "config.yaml")
    summary = read_json(folder / "summary.json") or {}
    status = live_status(folder) or {}
    last = last_record(folder / "metrics.jsonl")
    before, after = summary.get("metrics_before") or {}, summary.get("metrics_after") or {}
    metric = next((k for k in after if "/" not in k), None)
    data = (config.get("data") or {}).get("train")
    live = status.get("status") == "running"  # a resumed run's summary.json is its previous, interrupted one
    return {
        "name": name_of(folder, root),
        "status": status.get("status") or summary.get("status") or ("unknown" if summary else "incomplete"),
        "error": status.get("error"),
        "model": config.get("model"),
        "method": (config.get("method") or {}).get("name"),
        "objective": (config.get("objective") or {}).get("name", "sft"),
        "data": data if isinstance(data, str) else ", ".join(str(s.get("path")) for s in data or []),
        "steps": last.get("step") if live or not summary else summary.get("steps"),
        "train_seconds": summary.get("train_seconds"),
        "eval_loss": last.get("eval_loss") if live or not summary else summary.get("final_eval_loss"),
        "base_eval_loss": summary.get("base_eval_loss"),
        "metric": metric,
        "metric_before": before.get(metric) if metric else None,
        "metric_after": after.get(metric) if metric else None,
        "peak_memory_mb": summary.get("peak_memory_mb"),
        "started": status.get("started_at"),
        "updated": _mtime(folder),
    }


def run_detail(folder: Path, root: Path) -> dict[str, Any]:
    """Everything the run page shows besides the curves: the row, the resolved config (YAML text and tree), the
    summary, the data statistics and which files exist."""
    summary = read_json(folder / "summary.json") or {}
    return {
        **run_summary(folder, root),
        "config_yaml": _read_text(folder / "config.yaml"),
        "config": read_yaml(folder / "config.yaml"),
        "summary": {k: v for k, v in summary.items() if k != "trainer_state"},
        "data_stats": summary.get("data"),
        "has_report": (folder / "report.html").is_file(),
        "checkpoints": sorted(p.name for p in (folder / "checkpoints").glob("step-*")),
    }


def read_metrics(folder: Path, after_line: int = 0) -> tuple[list[dict], int]:
    """The records of metrics.jsonl from line `after_line` on, and the number of complete lines read so far (a
    line still being written is left for the next call)."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return [], 0
    lines = path.read_bytes().split(b"\n")
    complete = lines[:-1]  # the part after the last newline is unfinished (or empty)
    records = []
    for line in complete[after_line:]:
        try:
            records.append(finite_or_null(json.loads(line)))  # files written before NaN became null
        except json.JSONDecodeError:
            records.append({})
    return [r for r in records if r], len(complete)


def read_samples(folder: Path) -> list[dict]:
    """The held-out gallery (samples.jsonl): complete lines that hold a sample; a line still being written, or
    half a line a killed run left, is not one."""
    path = folder / "samples.jsonl"
    if not path.is_file():
        return []
    samples = []
    for line in path.read_bytes().split(b"\n")[:-1]:
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(record, dict):
            samples.append(record)
    return samples


def last_record(path: Path) -> dict:
    """The newest step and eval_loss of metrics.jsonl, reading only its end."""
    if not path.is_file():
        return {}
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - 64 * 1024))
        tail = handle.read().decode("utf-8", errors="replace").splitlines()
    found: dict = {}
    for line in reversed(tail):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        found.setdefault("step", record.get("step"))
        if "eval_loss" in record:
            found.setdefault("eval_loss", record["eval_loss"])
        if "step" in found and "eval_loss" in found:
            break
    return found


def name_of(folder: Path, root: Path) -> str:
    """The run's name in the app and in its URLs: its folder's name (`root_run_name` for the runs folder itself)."""
    return root_run_name(root) if folder.resolve() == root.resolve() else folder.name


def root_run_name(root: Path) -> str:
    """The name the runs folder goes by when it is a run itself (`tunelab ui --runs RUN_DIR`): its own folder name,
    not `.`, which browsers and HTTP clients drop from a URL (`/api/runs/./metrics` reaches `/api/runs/metrics`).
    Leading dots go (run names never start with one) and `~` is added while a folder inside has that name."""
    name = root.resolve().name.lstrip(".") or "run"
    while (root / name).exists():
        name += "~"
    return name


def run_folder_of(root: Path, name: str) -> Path:
    """Where the run called `name` lives (it may not be a run yet): the runs folder itself under its
    `root_run_name` when it is a run, else the folder of that name in it."""
    if is_run_dir(root) and name == root_run_name(root):
        return root
    return root / name


def read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def read_yaml(path: Path) -> dict:
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return value if isinstance(value, dict) else {}


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return ""


def _mtime(folder: Path) -> float:
    times = [(folder / n).stat().st_mtime for n in ("metrics.jsonl", "status.json", "summary.json", LOG_FILE,
                                                   "config.yaml") if (folder / n).exists()]
    return max(times, default=0.0)
