"""The run report: one self-contained HTML page per run (opens offline; plots embedded as PNG data URIs), and
one page comparing several runs. Both are pure functions of the files a run directory holds, read leniently:
an interrupted run lacks some of them, and its report says which."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tunelab.config import ROLLOUT_OBJECTIVES
from tunelab.errors import ConfigError
from tunelab.eval.recorded import evaluations_section
from tunelab.eval.report_html import (
    Cell,
    change,
    config_section,
    data_section,
    img,
    notice,
    num,
    page,
    plot_grid,
    run_facts,
    samples_section,
    section,
    table,
    with_scale,
)

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "samples.jsonl")
WHY_MISSING = {
    "config.yaml": "the run's settings are unknown",
    "metrics.jsonl": "no training step was logged",
    "summary.json": "the run stopped before it finished (killed or crashed); the numbers below come from "
    "metrics.jsonl where it has them",
    "samples.jsonl": "no generations were saved, as the run did not finish",
}


@dataclass
class RunRecord:
    """What a run directory holds. A missing or damaged file leaves None and a line in `problems`."""

    name: str
    config_text: str | None
    metrics: list[dict]
    summary: dict | None
    samples: list[dict] | None
    problems: list[str] = field(default_factory=list)


def read_run(run_dir: Path) -> RunRecord:
    """Everything a report shows from `run_dir`; raises ConfigError when it is no run directory at all."""
    if not run_dir.is_dir() or not any((run_dir / name).exists() for name in RUN_FILES):
        raise ConfigError(f"not a tunelab run directory (it holds none of {', '.join(RUN_FILES)})", where=str(run_dir))
    problems: list[str] = []
    config_path = run_dir / "config.yaml"
    config_text = config_path.read_text(encoding="utf-8") if config_path.exists() else None
    if config_text is None:
        problems.append(f"config.yaml is missing: {WHY_MISSING['config.yaml']}")
    metrics = _read_jsonl(run_dir / "metrics.jsonl", problems)
    summary = _read_summary(run_dir / "summary.json", problems)
    samples = _read_jsonl(run_dir / "samples.jsonl", problems)
    status = (summary or {}).get("status")
    if status == "interrupted":
        problems.append(
            f"the run was interrupted at step {summary.get('steps')}; `tunelab train --resume` continues it"
        )
    elif status not in (None, "completed"):
        problems.append(f"the run {status} at step {summary.get('steps')}")
    problems.extend((summary or {}).get("warnings", []))  # e.g. a fine-tuned model worse than its base
    return RunRecord(run_dir.name, config_text, metrics or [], summary, samples, problems)


def _read_jsonl(path: Path, problems: list[str]) -> list[dict] | None:
    if not path.exists():
        problems.append(f"{path.name} is missing: {WHY_MISSING[path.name]}")
        return None
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a process killed mid-write leaves half a line
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            problems.append(f"{path.name} line {number} is not a JSON object and was skipped")
    return records


def _read_summary(path: Path, problems: list[str]) -> dict | None:
    if not path.exists():
        problems.append(f"summary.json is missing: {WHY_MISSING['summary.json']}")
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        summary = f"invalid JSON ({err})"
    if not isinstance(summary, dict):
        problems.append(f"summary.json is not a JSON object ({summary}) and was ignored")
        return None
    return summary


# ---- numbers ---------------------------------------------------------------------------------------------------


def run_objective(run: RunRecord) -> str:
    """The objective the run trained with, which says what its eval loss measures: summary.json's, else its
    config.yaml's (a run stopped before it wrote its summary), else sft."""
    if (run.summary or {}).get("objective"):
        return str(run.summary["objective"])
    try:
        config = yaml.safe_load(run.config_text or "")
    except yaml.YAMLError:
        config = None
    objective = config.get("objective") if isinstance(config, dict) else None
    if isinstance(objective, dict):
        objective = objective.get("name")
    return objective if isinstance(objective, str) else "sft"


def before_after_keys(objective: str, record: dict | None = None) -> tuple[str, ...]:
    """The eval metrics besides the loss that show what a non-SFT objective changed: the model's own ranking of
    held-out pairs (a reward model's ranking by its scores; for GRPO the total and each reward of its greedy
    held-out completions, found in `record`)."""
    if objective == "reward":
        return ("eval_rewards/accuracies", "eval_rewards/margins")
    if objective in ROLLOUT_OBJECTIVES:
        return ("eval_reward", *sorted(k for k in record or {} if k.startswith("eval_rewards/")))
    if objective == "kto":  # unpaired: the implied rewards of the good and of the bad replies, apart
        return ("eval_rewards/chosen", "eval_rewards/rejected", "eval_kl")
    if objective == "distill":  # how far from the teacher, and how well the data's own replies are predicted
        return ("eval_distill/divergence", "eval_ce")
    return ("eval_preference_accuracy", "eval_logps/margins")


def before_after_rows(run: RunRecord) -> list[tuple[str, float | None, float | None, bool]]:
    """(name, base model, fine-tuned, lower is better) for eval loss, perplexity, per-dataset eval losses and
    every task metric. Without summary.json the losses come from the first and last evaluations logged."""
    summary = run.summary or {}
    evals = [r for r in run.metrics if r.get("eval_loss") is not None]
    base_record = evals[0] if evals and evals[0].get("step") == 0 else {}
    final_record = evals[-1] if evals and evals[-1].get("step", 0) > 0 else {}
    restored = ((summary.get("trainer_state") or {}).get("extra") or {}).get("restored_best_step")
    final_record = next((r for r in evals if restored and r.get("step") == restored), final_record)
    base_loss = _known(summary.get("base_eval_loss"), base_record.get("eval_loss"))
    final_loss = _known(summary.get("final_eval_loss"), final_record.get("eval_loss"))
    objective = run_objective(run)
    if objective == "sft":
        rows = [("eval loss", base_loss, final_loss, True),
                ("eval perplexity", _ppl(base_loss), _ppl(final_loss), True)]
    else:  # a preference loss has no perplexity; the model's own ranking of the pairs is its before/after
        rows = [(f"eval loss ({objective})", base_loss, final_loss, True)]
        rows += [(key.removeprefix("eval_"), base_record.get(key), final_record.get(key),
                  key.endswith("/rejected") or objective == "distill")
                 for key in before_after_keys(objective, final_record) if key in final_record]
        if "eval_perplexity" in final_record:  # distillation: exp of the student's cross-entropy on the replies
            rows.append(("eval perplexity", base_record.get("eval_perplexity"), final_record["eval_perplexity"], True))
    per_dataset = sorted({k for r in (base_record, final_record) for k in r if k.startswith("eval_loss/")})
    rows += [(f"eval loss ({k.split('/', 1)[1]})", base_record.get(k), final_record.get(k), True) for k in per_dataset]
    before, after = summary.get("metrics_before") or {}, summary.get("metrics_after") or {}
    rows += [(name, before.get(name), after.get(name), False) for name in {**after, **before}]
    return rows


def _known(*values):
    return next((v for v in values if v is not None), None)


def _ppl(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 50.0))  # capped as evaluate_loss caps it


# ---- one run ---------------------------------------------------------------------------------------------------


def _before_after_section(run: RunRecord) -> str:
    rows = [
        [with_scale(name), num(base), num(tuned), change(base, tuned, lower)]
        for name, base, tuned, lower in before_after_rows(run)
    ]
    note = "" if run.summary else "<p>Without summary.json, only the losses logged in metrics.jsonl are known.</p>"
    return section(
        "before / after fine-tuning",
        note + table(rows, ["", "base model", "fine-tuned", "change"], table_id="before-after"),
    )


def _plots_section(run: RunRecord, plots_dir: Path) -> str:
    from tunelab.eval import report_plots as plots  # matplotlib: imported when a report is drawn

    summary = run.summary or {}
    figures = {
        "loss": plots.loss_figure(run.metrics),
        "objective": plots.objective_figure(run.metrics),
        "distillation": plots.distill_figure(run.metrics),
        "task_metrics": plots.task_metrics_figure(run.metrics, (summary.get("best") or {}).get("step")),
        "learning_rate": plots.learning_rate_figure(run.metrics),
        "throughput": plots.throughput_figure(run.metrics, summary.get("tokens_per_second")),
    }
    images = []
    for name, fig in figures.items():
        if fig is not None:
            png = plots.png_bytes(fig)
            plots_dir.mkdir(parents=True, exist_ok=True)
            (plots_dir / f"{name}.png").write_bytes(png)
            images.append(img(png, name.replace("_", " ")))
    return section("training curves", plot_grid(images, "No training steps were logged."))


def write_report(run_dir: Path) -> Path:
    """Write run_dir/report.html (self-contained) and its plots as run_dir/plots/*.png; return the page's path."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    s = run.summary or {}
    subtitle = " · ".join(str(v) for v in (s.get("model"), s.get("method"), s.get("status")) if v) or str(run_dir)
    sections = [
        notice(run.problems),
        section("run", table(run_facts(run.summary, run.metrics), numbers=False)),
        _before_after_section(run),
        evaluations_section(run_dir),
        _plots_section(run, run_dir / "plots"),
        samples_section(run.samples),
        data_section(s.get("data")),
        config_section(run.config_text),
    ]
    path = run_dir / "report.html"
    path.write_text(page(f"tunelab run: {run.name}", subtitle, sections), encoding="utf-8")
    return path


# ---- comparison ------------------------------------------------------------------------------------------------


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Each run's folder name, or parent/name where two runs share a name."""
    names = [Path(d).name for d in run_dirs]
    return [f"{Path(d).parent.name}/{n}" if names.count(n) > 1 else n for d, n in zip(run_dirs, names, strict=True)]


def comparison_table(runs: list[RunRecord]) -> list[tuple[str, list, bool | None, int]]:
    """(row name, value per run, lower is better or None: not ranked, decimals): what `tunelab report A B` and the
    web app's compare page put side by side. Eval losses are ranked only between runs of one objective: the loss is
    cross-entropy for SFT, the DPO loss for DPO, minus the reward for GRPO, and so on."""
    summaries = [r.summary or {} for r in runs]
    tables = [before_after_rows(r) for r in runs]
    losses = [rows[0][1:3] for rows in tables]  # the objective's own loss ("eval loss (dpo)" for DPO): first row
    perplexities = [next((tuned for name, _, tuned, _ in rows if name == "eval perplexity"), None) for rows in tables]
    metric_names = list(dict.fromkeys(name for s in summaries for name in s.get("metrics_after") or {}))
    objectives = [run_objective(r) for r in runs]
    shared = len(set(objectives)) == 1
    loss = tables[0][0][0] if shared else f"eval loss (each run's objective: {', '.join(dict.fromkeys(objectives))})"
    spec = [
        ("status", [s.get("status", "no summary.json") for s in summaries], None, 0),
        ("model", [s.get("model") for s in summaries], None, 0),
        ("method", [s.get("method") for s in summaries], None, 0),
        ("objective", objectives, None, 0),
        ("steps", [s.get("steps") for s in summaries], None, 0),
        ("tokens trained", [s.get("train_tokens") for s in summaries], None, 0),
        ("trained tokens/s", [s.get("tokens_per_second") for s in summaries], False, 1),
        ("peak memory (MB)", [s.get("peak_memory_mb") for s in summaries], True, 0),
        ("trainable parameters", [s.get("trainable_parameters") for s in summaries], None, 0),
        (f"base {loss}", [base for base, _ in losses], None, 4),
        (f"final {loss}", [tuned for _, tuned in losses], True if shared else None, 4),
        ("final eval perplexity", perplexities, True, 4),
    ] + [(name, [(s.get("metrics_after") or {}).get(name) for s in summaries], False, 4) for name in metric_names]
    return spec


def _comparison_rows(runs: list[RunRecord]) -> list[list[Cell]]:
    return [[with_scale(name), *_ranked(values, lower, digits)]
            for name, values, lower, digits in comparison_table(runs)]


def _ranked(values: list, lower_is_better: bool | None, digits: int) -> list[Cell]:
    cells: list[Cell] = [num(v, digits) for v in values]
    numbers = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if lower_is_better is None or len(numbers) < 2 or len(set(numbers)) == 1:
        return cells
    best = min(numbers) if lower_is_better else max(numbers)
    return [(c, "num best") if v == best else c for c, v in zip(cells, values, strict=True)]


COMPARISON_NOTE = ("<p>Task metrics are the fine-tuned models'; the best value of each ranked row is highlighted "
                   "(eval losses only between runs of one objective, as each objective's loss measures another "
                   "thing).</p>")


def write_comparison(run_dirs: list[Path], output: Path) -> Path:
    """Write one self-contained HTML page comparing `run_dirs` side by side; return its path."""
    from tunelab.eval import report_plots as plots  # matplotlib: imported when a report is drawn

    run_dirs = [Path(d) for d in run_dirs]
    runs, labels = [read_run(d) for d in run_dirs], run_labels(run_dirs)
    named = list(zip(labels, runs, strict=True))
    figures = (
        (plots.eval_loss_overlay([(label, run.metrics) for label, run in named]), "eval loss"),
        (
            plots.metric_bars([(label, (run.summary or {}).get("metrics_after") or {}) for label, run in named]),
            "task metrics",
        ),
    )
    images = [img(plots.png_bytes(fig), f"{alt} per run") for fig, alt in figures if fig is not None]
    problems = [f"{label}: {p}" for label, run in named for p in run.problems]
    sections = [
        notice(problems, "Some runs are incomplete."),
        section("summary", COMPARISON_NOTE + table(_comparison_rows(runs), ["", *labels], table_id="comparison")),
        section("curves and metrics", plot_grid(images, "No evaluations were logged.", wide=True)),
    ]
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(page("tunelab run comparison", ", ".join(labels), sections), encoding="utf-8")
    return output
