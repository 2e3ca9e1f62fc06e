"""Evaluations `tunelab eval` makes of a run, kept in the run directory so that its report shows them.

`tunelab eval RUN --data held_out.jsonl --baseline base` answers the question a run exists for: is the fine-tuned
model better than the base model on data neither saw in training, and by how much. Those numbers are evidence
about the run, so they are saved with it (RUN/evals/<data file name>-<metrics>.json, the command's JSON output) and
report.html shows each evaluation: the baseline's value, the run's, the difference and its 95% paired-bootstrap
interval (an interval that excludes 0 is a difference the held-out sample supports).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from tunelab.data.sources import source_name

EVALS_DIR = "evals"
LOWER_IS_BETTER = {"loss", "perplexity"}


def record_evaluation(run_dir: Path, result: dict, metrics: list[str]) -> Path:
    """Save `result` (evaluate_model's output for `metrics`) as RUN/evals/<data stem>-<metrics>.json, replacing an
    earlier evaluation of the same data and metrics, and rebuild report.html so that it shows it."""
    from tunelab.eval.report import write_report  # the report reads what this module writes

    folder = Path(run_dir) / EVALS_DIR
    folder.mkdir(exist_ok=True)
    names = "-".join(re.sub(r"[^A-Za-z0-9_.]+", "_", Path(m).name if ":" in m else m) for m in metrics)
    path = folder / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', source_name(result['data']))}-{names}.json"
    path.write_text(json.dumps(result, indent=2))
    write_report(Path(run_dir))
    return path


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
