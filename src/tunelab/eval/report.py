"""The run report: one self-contained HTML page per run (opens offline; plots embedded as PNG data URIs), and
one page comparing several runs. Both are pure functions of the files a run directory holds, read leniently:
an interrupted run lacks some of them, and its report says which."""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tunelab.errors import ConfigError
from tunelab.eval.recorded import evaluations_section

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "samples.jsonl")
WHY_MISSING = {
    "config.yaml": "the run's settings are unknown",
    "metrics.jsonl": "no training step was logged",
    "summary.json": "the run stopped before it finished (killed or crashed); the numbers below come from "
    "metrics.jsonl where it has them",
    "samples.jsonl": "no generations were saved, as the run did not finish",
}
DATASET_COLORS = ("tab:red", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
Cell = str | tuple[str, str]
"""A table cell: its text, or (text, css class)."""


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
    rows = [("eval loss", base_loss, final_loss, True), ("eval perplexity", _ppl(base_loss), _ppl(final_loss), True)]
    per_dataset = sorted({k for r in (base_record, final_record) for k in r if k.startswith("eval_loss/")})
    rows += [(f"eval loss ({k.split('/', 1)[1]})", base_record.get(k), final_record.get(k), True) for k in per_dataset]
    before, after = summary.get("metrics_before") or {}, summary.get("metrics_after") or {}
    rows += [(name, before.get(name), after.get(name), False) for name in {**after, **before}]
    return rows


def _known(*values):
    return next((v for v in values if v is not None), None)


def _ppl(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 50.0))  # capped as evaluate_loss caps it


def _num(value, digits: int = 4, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        text = f"{value:,.{digits}f}" if math.isfinite(value) else str(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        text = f"{value:,}"
    else:
        text = str(value)
    return f"{text} {unit}" if unit else text


def _percent(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _change(before, after, lower_is_better: bool) -> Cell:
    if before is None or after is None:
        return "—"
    diff = after - before
    if diff == 0 or not math.isfinite(diff):
        return _num(diff)
    return f"{diff:+.4f}", "num better" if (diff < 0) == lower_is_better else "num worse"


# ---- plots -----------------------------------------------------------------------------------------------------


def _series(metrics: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in metrics if r.get(key) is not None and "step" in r]
    return [p[0] for p in points], [p[1] for p in points]


def _figure(title: str, width: float = 7.0) -> tuple[Figure, object]:
    # A bare Figure on the Agg canvas keeps no pyplot state, so there is nothing to close and nothing leaks.
    fig = Figure(figsize=(width, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig, ax


def loss_figure(metrics: list[dict]) -> Figure | None:
    """Train loss per logged step and eval loss per evaluation, from the base model's step-0 point on."""
    train, evals = _series(metrics, "loss"), _series(metrics, "eval_loss")
    if not train[0] and not evals[0]:
        return None
    fig, ax = _figure("loss")
    if train[0]:
        ax.plot(*train, color="tab:blue", linewidth=1.2, alpha=0.8, label="train loss")
    if evals[0]:
        ax.plot(*evals, "o-", color="tab:orange", linewidth=2, label="eval loss")
        if evals[0][0] == 0:
            ax.annotate("base model", (0, evals[1][0]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    per_dataset = sorted({k for r in metrics for k in r if k.startswith("eval_loss/")})
    for key, color in zip(per_dataset, itertools.cycle(DATASET_COLORS)):
        ax.plot(*_series(metrics, key), "--", color=color, linewidth=1, label=f"eval loss ({key.split('/', 1)[1]})")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    return fig


def task_metrics_figure(metrics: list[dict], best_step: int | None) -> Figure | None:
    """Task metrics logged at each evaluation (eval.during_training), from the base model at step 0; metrics on
    a 0-100 scale (BLEU, chrF) get their own axis on the right."""
    keys = sorted({k for r in metrics for k in r if k.startswith("eval_") and not _is_loss_key(k)})
    if not keys:
        return None
    fig, ax = _figure("task metrics on the eval subset")
    wide = [k for k in keys if max(_series(metrics, k)[1], default=0) > 1]
    right = ax.twinx() if wide else None
    for key, color in zip(keys, itertools.cycle(DATASET_COLORS)):
        axis, side = (right, " (right)") if key in wide else (ax, "")
        axis.plot(*_series(metrics, key), "o-", color=color, linewidth=1.5, label=key.removeprefix("eval_") + side)
    if best_step is not None:
        ax.axvline(best_step, color="gray", linestyle=":", linewidth=1, label=f"best step {best_step}")
    ax.set_xlabel("step")
    handles = [h for axis in (ax, right) if axis for h in axis.get_legend_handles_labels()[0]]
    ax.legend(handles=handles, fontsize=8)
    return fig


def _is_loss_key(key: str) -> bool:
    return "loss" in key or "perplexity" in key


def learning_rate_figure(metrics: list[dict]) -> Figure | None:
    steps, lrs = _series(metrics, "lr")
    if not steps:
        return None
    fig, ax = _figure("learning rate")
    ax.plot(steps, lrs, color="tab:green")
    ax.set_xlabel("step")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return fig


def throughput_figure(metrics: list[dict], run_average: float | None) -> Figure | None:
    steps, speeds = _series(metrics, "tokens_per_second")
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


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})  # no version stamp: same run, same bytes
    return buffer.getvalue()


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


# ---- HTML ------------------------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;background:#f6f7f9;
  color:#1d232b;line-height:1.45}
main{max-width:1120px;margin:0 auto;padding:24px}
h1{font-size:1.6em;margin:0 0 2px}
h2{font-size:1.2em;border-bottom:1px solid #d8dde3;padding-bottom:4px;margin-top:32px}
.subtitle{color:#5f6b7a;margin:0 0 16px}
table{border-collapse:collapse;background:#fff;border:1px solid #e3e7ec;margin:8px 0}
th,td{padding:4px 12px;border-bottom:1px solid #e9ecf0;text-align:left;vertical-align:top}
th{background:#f0f2f5;font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.better{color:#137333;font-weight:600}.worse{color:#b3261e;font-weight:600}.best{font-weight:700;background:#e8f5e9}
.notice{background:#fff4e5;border-left:4px solid #f0a020;padding:8px 12px;margin:12px 0}
.notice ul{margin:4px 0;padding-left:20px}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:12px}
img{max-width:100%;background:#fff;border:1px solid #e3e7ec;border-radius:4px}
.sample{background:#fff;border:1px solid #e3e7ec;border-radius:6px;padding:10px 12px;margin:12px 0}
.replies{display:grid;grid-template-columns:repeat(3,minmax(0,1fr));gap:8px;margin-top:8px}
.label{font-size:.72em;text-transform:uppercase;letter-spacing:.04em;color:#5f6b7a;margin-bottom:2px}
.where{font-size:.8em;color:#5f6b7a}
pre{white-space:pre-wrap;word-break:break-word;margin:0;font-size:.85em;background:#f3f4f6;padding:6px 8px;
  border-radius:4px}
details pre{max-height:480px;overflow:auto}
"""


def _esc(value) -> str:
    return html.escape(str(value))


def _page(title: str, subtitle: str, sections: list[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body><main>"
        f'<h1>{_esc(title)}</h1><p class="subtitle">{_esc(subtitle)}</p>{"".join(sections)}</main></body></html>\n'
    )


def _section(title: str, body: str) -> str:
    return f"<section><h2>{_esc(title)}</h2>{body}</section>"


def _table(
    rows: list[list[Cell]], header: list[str] | None = None, table_id: str | None = None, numbers: bool = True
) -> str:
    """With `numbers`, cells after the first are right-aligned unless they carry their own classes."""
    numeric = ' class="num"' if numbers else ""
    head = "".join(f"<th{numeric if i else ''}>{_esc(h)}</th>" for i, h in enumerate(header or []))
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            text, css = cell if isinstance(cell, tuple) else (cell, "num" if i and numbers else "")
            cells.append(f'<td class="{css}">{_esc(text)}</td>' if css else f"<td>{_esc(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    ident = f' id="{table_id}"' if table_id else ""
    return f"<table{ident}>" + (f"<thead><tr>{head}</tr></thead>" if header else "") + "".join(body) + "</table>"


def _notice(problems: list[str], heading: str = "This run is incomplete.") -> str:
    if not problems:
        return ""
    items = "".join(f"<li>{_esc(p)}</li>" for p in problems)
    return f'<div class="notice"><strong>{_esc(heading)}</strong><ul>{items}</ul></div>'


def _run_facts(run: RunRecord) -> list[list[Cell]]:
    s = run.summary
    if s is None:
        last = run.metrics[-1] if run.metrics else {}
        return [
            ["status", "unknown (no summary.json)"],
            ["steps logged", _num(last.get("step"))],
            ["tokens trained", _num(last.get("tokens"))],
        ]
    state = s.get("trainer_state") or {}
    extra = state.get("extra") or {}
    trainable, total = s.get("trainable_parameters"), s.get("total_parameters")
    share = f" ({100 * trainable / total:.2f}%)" if trainable and total else ""
    facts = [
        ["status", _num(s.get("status"))],
        ["model", _num(s.get("model"))],
        ["method", _num(s.get("method"))],
        ["steps", _num(s.get("steps"))],
        ["tokens trained", _num(s.get("train_tokens"))],
        ["training time", _num(s.get("train_seconds"), 1, "s")],
        ["throughput", _num(s.get("tokens_per_second"), 1, "tokens/s")],
        ["padding efficiency", _percent(s.get("padding_efficiency"))],
        ["peak memory", _num(s.get("peak_memory_mb"), 0, "MB")],
        ["trainable parameters", f"{_num(trainable)} of {_num(total)}{share}"],
        ["precision, device", f"{_num(s.get('precision'))} on {_num(s.get('device'))}"],
        ["final train loss", _num(s.get("final_train_loss"))],
        ["best eval step", _num(state.get("best_step"))],
    ]
    if "early_stopped_at" in extra:
        facts.append(["early stopped at step", _num(extra["early_stopped_at"])])
    if "restored_best_step" in extra:
        facts.append(["weights restored from step", _num(extra["restored_best_step"])])
    return facts


def _before_after_section(run: RunRecord) -> str:
    rows = [
        [name, _num(base), _num(tuned), _change(base, tuned, lower)]
        for name, base, tuned, lower in before_after_rows(run)
    ]
    note = "" if run.summary else "<p>Without summary.json, only the losses logged in metrics.jsonl are known.</p>"
    return _section(
        "before / after fine-tuning",
        note + _table(rows, ["", "base model", "fine-tuned", "change"], table_id="before-after"),
    )


def _plots_section(run: RunRecord, plots_dir: Path) -> str:
    average = (run.summary or {}).get("tokens_per_second")
    figures = {
        "loss": loss_figure(run.metrics),
        "task_metrics": task_metrics_figure(run.metrics, ((run.summary or {}).get("best") or {}).get("step")),
        "learning_rate": learning_rate_figure(run.metrics),
        "throughput": throughput_figure(run.metrics, average),
    }
    images = []
    for name, fig in figures.items():
        if fig is not None:
            png = png_bytes(fig)
            plots_dir.mkdir(parents=True, exist_ok=True)
            (plots_dir / f"{name}.png").write_bytes(png)
            images.append(_img(png, name.replace("_", " ")))
    body = f'<div class="plots">{"".join(images)}</div>' if images else "<p>No training steps were logged.</p>"
    return _section("training curves", body)


def _last_user_turn(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    turns = [m for m in prompt or [] if isinstance(m, dict)]
    users = [m for m in turns if m.get("role") == "user"] or turns
    return str(users[-1].get("content", "")) if users else ""


def _reply(label: str, text) -> str:
    shown = "<em>not generated</em>" if text is None else f"<pre>{_esc(text)}</pre>"
    return f'<div><div class="label">{_esc(label)}</div>{shown}</div>'


def _samples_section(run: RunRecord) -> str:
    if run.samples is None:
        return _section("samples", "<p>samples.jsonl is missing: no held-out generations to show.</p>")
    if not run.samples:
        return _section("samples", "<p>No held-out generations were made (eval.generate_samples is 0).</p>")
    cards = []
    for sample in run.samples:
        cards.append(
            f'<div class="sample"><div class="where">{_esc(sample.get("where", ""))}</div>'
            f'<div class="label">prompt (last user turn)</div><pre>{_esc(_last_user_turn(sample.get("prompt")))}</pre>'
            f'<div class="replies">{_reply("reference", sample.get("reference"))}'
            f"{_reply('base model', sample.get('base'))}{_reply('fine-tuned', sample.get('fine_tuned'))}</div></div>"
        )
    return _section(f"samples ({len(run.samples)} held out)", "".join(cards))


def _data_section(run: RunRecord) -> str:
    data = (run.summary or {}).get("data")
    if not data:
        return _section("data", "<p>Data statistics are recorded in summary.json, which this run lacks.</p>")
    rows = [
        ["train samples", _num(data.get("train_samples"))],
        ["eval samples", _num(data.get("eval_samples"))],
        ["train tokens", _num(data.get("train_tokens"))],
        ["trained tokens", _num(data.get("trainable_tokens"))],
        ["trained share of tokens", _percent(data.get("trainable_fraction"))],
        ["longest sample (tokens)", _num(data.get("max_length_seen"))],
        ["median sample (tokens)", _num(data.get("median_length"))],
        ["truncated samples", _num(data.get("truncated_samples"))],
        ["dropped samples", _num(data.get("dropped_samples"))],
    ]
    formats = data.get("formats") or {}
    rows += [[f"format of {path}", fmt] for path, fmt in formats.items()]
    return _section("data", _table(rows, numbers=False))


def _config_section(run: RunRecord) -> str:
    if run.config_text is None:
        return _section("config", "<p>config.yaml is missing.</p>")
    config = f"<details open><summary>config.yaml</summary><pre>{_esc(run.config_text)}</pre></details>"
    return _section("config", config)


def write_report(run_dir: Path) -> Path:
    """Write run_dir/report.html (self-contained) and its plots as run_dir/plots/*.png; return the page's path."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    s = run.summary or {}
    subtitle = " · ".join(str(v) for v in (s.get("model"), s.get("method"), s.get("status")) if v) or str(run_dir)
    sections = [
        _notice(run.problems),
        _section("run", _table(_run_facts(run), numbers=False)),
        _before_after_section(run),
        evaluations_section(run_dir),
        _plots_section(run, run_dir / "plots"),
        _samples_section(run),
        _data_section(run),
        _config_section(run),
    ]
    path = run_dir / "report.html"
    path.write_text(_page(f"tunelab run: {run.name}", subtitle, sections), encoding="utf-8")
    return path


# ---- comparison ------------------------------------------------------------------------------------------------


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Each run's folder name, or parent/name where two runs share a name."""
    names = [Path(d).name for d in run_dirs]
    return [f"{Path(d).parent.name}/{n}" if names.count(n) > 1 else n for d, n in zip(run_dirs, names, strict=True)]


def _comparison_rows(runs: list[RunRecord]) -> list[list[Cell]]:
    summaries = [r.summary or {} for r in runs]
    losses = [{name: (base, tuned) for name, base, tuned, _ in before_after_rows(r)} for r in runs]
    metric_names = list(dict.fromkeys(name for s in summaries for name in s.get("metrics_after") or {}))
    spec = [  # (row name, value per run, lower is better or None: not ranked, decimals)
        ("status", [s.get("status", "no summary.json") for s in summaries], None, 0),
        ("model", [s.get("model") for s in summaries], None, 0),
        ("method", [s.get("method") for s in summaries], None, 0),
        ("steps", [s.get("steps") for s in summaries], None, 0),
        ("tokens trained", [s.get("train_tokens") for s in summaries], None, 0),
        ("trained tokens/s", [s.get("tokens_per_second") for s in summaries], False, 1),
        ("peak memory (MB)", [s.get("peak_memory_mb") for s in summaries], True, 0),
        ("trainable parameters", [s.get("trainable_parameters") for s in summaries], None, 0),
        ("base eval loss", [lo["eval loss"][0] for lo in losses], None, 4),
        ("final eval loss", [lo["eval loss"][1] for lo in losses], True, 4),
        ("final eval perplexity", [lo["eval perplexity"][1] for lo in losses], True, 4),
    ] + [(name, [(s.get("metrics_after") or {}).get(name) for s in summaries], False, 4) for name in metric_names]
    return [[name, *_ranked(values, lower, digits)] for name, values, lower, digits in spec]


def _ranked(values: list, lower_is_better: bool | None, digits: int) -> list[Cell]:
    cells: list[Cell] = [_num(v, digits) for v in values]
    numbers = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if lower_is_better is None or len(numbers) < 2 or len(set(numbers)) == 1:
        return cells
    best = min(numbers) if lower_is_better else max(numbers)
    return [(c, "num best") if v == best else c for c, v in zip(cells, values, strict=True)]


def eval_loss_overlay(runs: list[RunRecord], labels: list[str]) -> Figure | None:
    curves = [(label, _series(r.metrics, "eval_loss")) for r, label in zip(runs, labels, strict=True)]
    if not any(steps for _, (steps, _) in curves):
        return None
    fig, ax = _figure("eval loss", width=9)
    for label, (steps, losses) in curves:
        if steps:
            ax.plot(steps, losses, "o-", linewidth=1.5, markersize=3, label=label)
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    return fig


def metric_bars(runs: list[RunRecord], labels: list[str]) -> Figure | None:
    """Grouped bars per task metric after fine-tuning, one colour per run."""
    after = [(r.summary or {}).get("metrics_after") or {} for r in runs]
    names = list(dict.fromkeys(name for m in after for name in m))
    if not names:
        return None
    fig, ax = _figure("task metrics after fine-tuning", width=max(7.0, 3 + len(names) * (0.4 + 0.3 * len(runs))))
    width = 0.8 / len(runs)
    for i, (label, metrics) in enumerate(zip(labels, after, strict=True)):
        positions = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(names))]
        label = label if metrics else f"{label} (no task metrics)"
        bars = ax.bar(positions, [metrics.get(n, math.nan) for n in names], width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.legend(fontsize=8)
    return fig


COMPARISON_NOTE = "<p>Task metrics are the fine-tuned models'; the best value of each ranked row is highlighted.</p>"


def write_comparison(run_dirs: list[Path], output: Path) -> Path:
    """Write one self-contained HTML page comparing `run_dirs` side by side; return its path."""
    run_dirs = [Path(d) for d in run_dirs]
    runs, labels = [read_run(d) for d in run_dirs], run_labels(run_dirs)
    images = [
        _img(png_bytes(fig), alt)
        for fig, alt in (
            (eval_loss_overlay(runs, labels), "eval loss per run"),
            (metric_bars(runs, labels), "task metrics per run"),
        )
        if fig is not None
    ]
    problems = [f"{label}: {p}" for run, label in zip(runs, labels, strict=True) for p in run.problems]
    sections = [
        _notice(problems, "Some runs are incomplete."),
        _section("summary", COMPARISON_NOTE + _table(_comparison_rows(runs), ["", *labels], table_id="comparison")),
        _section(
            "curves and metrics",
            f'<div class="plots">{"".join(images)}</div>' if images else "<p>No evaluations were logged.</p>",
        ),
    ]
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(_page("tunelab run comparison", ", ".join(labels), sections), encoding="utf-8")
    return output
