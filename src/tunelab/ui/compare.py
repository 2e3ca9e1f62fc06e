"""Runs side by side: their curves (to overlay), the config keys that differ, and the before/after numbers."""

from __future__ import annotations

from pathlib import Path

from tunelab.track.fanout import flatten_params
from tunelab.ui.runs import read_json, read_metrics, read_yaml

SERIES = ("loss", "eval_loss", "lr")


def compare_runs(folders: list[Path], names: list[str]) -> dict:
    configs = [flatten_params(read_yaml(f / "config.yaml")) for f in folders]
    keys = sorted(set().union(*configs))
    differing = [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1 and k != "output_dir"]
    summaries = [read_json(f / "summary.json") or {} for f in folders]
    curves = {}
    for name, folder in zip(names, folders, strict=True):
        records, _ = read_metrics(folder)
        curves[name] = {key: [[r["step"], r[key]] for r in records if isinstance(r.get(key), (int, float))]
                        for key in _series_keys(records)}
    return {
        "runs": names,
        "config_differences": [{"key": k, "values": [c.get(k) for c in configs]} for k in differing],
        "config_same": len(keys) - len(differing),
        "numbers": _numbers(names, summaries),
        "curves": curves,
    }


def _series_keys(records: list[dict]) -> list[str]:
    """loss, eval_loss, lr, then every other eval_ metric the records carry."""
    extra = sorted({k for r in records for k in r if k.startswith("eval_") and k not in SERIES
                    and isinstance(r[k], (int, float))})
    return [*SERIES, *extra]


def _numbers(names: list[str], summaries: list[dict]) -> list[dict]:
    """One row per number: its value in every run (the before/after table, side by side)."""
    rows = [("base eval loss", "base_eval_loss"), ("final eval loss", "final_eval_loss"),
            ("steps", "steps"), ("train seconds", "train_seconds"), ("peak memory MB", "peak_memory_mb"),
            ("input tokens/s", "input_tokens_per_second"), ("trainable parameters", "trainable_parameters")]
    table = [{"name": label, "values": [s.get(key) for s in summaries]} for label, key in rows]
    metrics = sorted({k for s in summaries for k in (s.get("metrics_after") or {})})
    for metric in metrics:
        table.append({"name": f"{metric} before", "values": [(s.get("metrics_before") or {}).get(metric)
                                                              for s in summaries]})
        table.append({"name": f"{metric} after", "values": [(s.get("metrics_after") or {}).get(metric)
                                                             for s in summaries]})
    return table
