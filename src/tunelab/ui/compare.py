"""Runs side by side: their curves (to overlay), the config keys that differ, and the numbers `tunelab report A B`
compares."""

from __future__ import annotations

from pathlib import Path

from tunelab.eval.report import comparison_table, read_run
from tunelab.track.fanout import flatten_params
from tunelab.ui.runs import read_yaml

SERIES = ("loss", "eval_loss", "lr")


def compare_runs(folders: list[Path], names: list[str]) -> dict:
    runs = [read_run(f) for f in folders]
    configs = [flatten_params(read_yaml(f / "config.yaml")) for f in folders]
    keys = sorted(set().union(*configs))
    differing = [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1 and k != "output_dir"]
    curves = {}
    for name, run in zip(names, runs, strict=True):
        curves[name] = {key: [[r["step"], r[key]] for r in run.metrics if isinstance(r.get(key), (int, float))]
                        for key in _series_keys(run.metrics)}
    return {
        "runs": names,
        "config_differences": [{"key": k, "values": [c.get(k) for c in configs]} for k in differing],
        "config_same": len(keys) - len(differing),
        "numbers": [{"name": name, "values": values, "lower_is_better": lower}
                    for name, values, lower, _ in comparison_table(runs)],
        "curves": curves,
    }


def _series_keys(records: list[dict]) -> list[str]:
    """loss, eval_loss, lr, then every other eval_ metric the records carry."""
    extra = sorted({k for r in records for k in r if k.startswith("eval_") and k not in SERIES
                    and isinstance(r[k], (int, float))})
    return [*SERIES, *extra]
