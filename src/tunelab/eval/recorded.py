"""Evaluations `tunelab eval` makes of a run, kept in the run directory so that its report shows them.

`tunelab eval RUN --data held_out.jsonl --baseline base` answers the question a run exists for: is the fine-tuned
model better than the base model on data neither saw in training, and by how much. Those numbers are evidence
about the run, so they are saved with it (RUN/evals/<data file name>-<metrics>.json, the command's JSON output; a
second data file of the same name adds a hash of its path) and report.html shows each evaluation: the baseline's
value, the run's, the difference and its 95% paired-bootstrap interval (an interval that excludes 0 is a difference
the held-out sample supports).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

from tunelab.data.sources import source_name
from tunelab.track.jsonl import finite_or_null

EVALS_DIR = "evals"
LOWER_IS_BETTER = {"loss", "perplexity"}


def record_evaluation(run_dir: Path, result: dict, metrics: list[str]) -> Path:
    """Save `result` (evaluate_model's output for `metrics`) as RUN/evals/<data stem>-<metrics>.json, replacing an
    earlier evaluation of the same data and metrics, and rebuild report.html so that it shows it."""
    from tunelab.eval.report import write_report  # the report reads what this module writes

    folder = Path(run_dir) / EVALS_DIR
    folder.mkdir(exist_ok=True)
    path = record_path(folder, result["data"], metrics)
    path.write_text(result_json(result))
    write_report(Path(run_dir))
    return path


def record_path(folder: Path, data: str, metrics: list[str]) -> Path:
    """Where the evaluation of `data` with `metrics` is kept: <data stem>-<metrics>.json, or, when that name holds
    another data source's evaluation (a/test.jsonl and b/test.jsonl), <data stem>-<hash of its path>-<metrics>.json,
    so that neither replaces the other."""
    names = "-".join(_readable(Path(m).name if ":" in m else m) for m in metrics)
    stem = _readable(source_name(data), keep="-")
    plain = folder / f"{stem}-{names}.json"
    if not plain.exists() or _same_source(_recorded_data(plain), data):
        return plain
    return folder / f"{stem}-{_source_digest(data)}-{names}.json"


def _readable(name: str, keep: str = "") -> str:
    """`name` as part of a file name: letters of any script, digits, `_`, `.` and `keep` kept, the rest `_`."""
    return re.sub(rf"[^\w.{re.escape(keep)}]+", "_", name)


def _source_key(data: str) -> str:
    """What identifies a data source: a file's resolved path, or a dataset's (lm-eval tasks') name as given."""
    path = Path(data)
    return str(path.resolve()) if path.exists() else data


def _same_source(recorded: str | None, data: str) -> bool:
    return recorded is not None and _source_key(recorded) == _source_key(data)


def _source_digest(data: str) -> str:
    return hashlib.sha256(_source_key(data).encode()).hexdigest()[:8]


def _recorded_data(path: Path) -> str | None:
    """The `data` an evaluation record names (None when it cannot be read: then it is replaced)."""
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    data = recorded.get("data") if isinstance(recorded, dict) else None
    return data if isinstance(data, str) else None


def result_json(result: dict | list[dict]) -> str:
    """An evaluation result (or several) as JSON text; a NaN or infinite metric is written null (bare NaN is not
    JSON)."""
    return json.dumps(finite_or_null(result), indent=2, allow_nan=False)


def read_evaluations(run_dir: Path) -> tuple[list[tuple[str, dict]], list[str]]:
    """(file name, result) of every recorded evaluation, and a line for each unreadable file."""
    found, problems = [], []
    for path in sorted((Path(run_dir) / EVALS_DIR).glob("*.json")):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            problems.append(f"{EVALS_DIR}/{path.name} is unreadable ({err}) and was skipped")
            continue
        if isinstance(result, dict):
            found.append((path.name, result))
        else:
            problems.append(f"{EVALS_DIR}/{path.name} is not a JSON object and was skipped")
    return found, problems


def evaluation_rows(result: dict) -> list[tuple[str, float | None, float, dict | None]]:
    """(metric, baseline value, the run's value, {difference, ci95_low, ci95_high} or None) for every number."""
    baseline = result.get("baseline") or {}
    differences = (result.get("comparison") or {}).get("differences") or {}
    rows = []
    for name, value in result.items():
        if name == "samples" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        rows.append((name, baseline.get(name), float(value), differences.get(name)))
    return rows


def evaluations_section(run_dir: Path) -> str:
    """The report's section of recorded evaluations ("" when the run has none)."""
    from tunelab.eval.report_html import change as _change
    from tunelab.eval.report_html import esc as _esc
    from tunelab.eval.report_html import notice as _notice
    from tunelab.eval.report_html import num as _num
    from tunelab.eval.report_html import section as _section
    from tunelab.eval.report_html import table as _table

    found, problems = read_evaluations(run_dir)
    if not found and not problems:
        return ""
    parts = [_notice(problems, "Some recorded evaluations could not be read.")]
    for name, result in found:
        baseline_model = (result.get("baseline") or {}).get("model")
        against = f", against {_esc(baseline_model)}" if baseline_model else ""
        parts.append(
            f"<p><strong>{_esc(result.get('data', name))}</strong>: {_num(result.get('samples'))} samples"
            f"{against} (<code>{EVALS_DIR}/{_esc(name)}</code>)</p>"
        )
        rows = []
        for metric, base, value, difference in evaluation_rows(result):
            interval = "—"
            if difference and "ci95_low" in difference:
                interval = f"[{difference['ci95_low']:+.4f}, {difference['ci95_high']:+.4f}]"
            change = _change(base, value, metric in LOWER_IS_BETTER) if base is not None else "—"
            if base is not None and not math.isfinite(value - base):
                change = "—"
            rows.append([metric, _num(base), _num(value), change, interval])
        header = ["", "baseline", "this run", "difference", "95% interval"]
        parts.append(_table(rows, header, table_id=f"eval-{Path(name).stem}"))
    return _section("held-out evaluations (tunelab eval)", "".join(parts))
