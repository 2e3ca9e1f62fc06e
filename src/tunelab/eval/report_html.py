"""The report's HTML: one inline stylesheet, escaped text everywhere (model output can hold anything), number
formatting, and the sections that show one part of a run. No scripts, no external links: a page opens offline."""

from __future__ import annotations

import base64
import html
import math

Cell = str | tuple[str, str]
"""A table cell: its text, or (text, css class)."""
SAMPLES_SHOWN = 6
"""Sample cards shown open; the rest fold into one <details>, so a run with many held-out generations does not
push its data and config sections thousands of pixels down."""

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;background:#f6f7f9;
  color:#1d232b;line-height:1.45}
main{max-width:1120px;margin:0 auto;padding:24px}
h1{font-size:1.6em;margin:0 0 2px}
h2{font-size:1.2em;border-bottom:1px solid #d8dde3;padding-bottom:4px;margin-top:32px}
.subtitle{color:#5f6b7a;margin:0 0 16px;overflow-wrap:anywhere}
table{border-collapse:collapse;background:#fff;border:1px solid #e3e7ec;margin:8px 0}
th,td{padding:4px 12px;border-bottom:1px solid #e9ecf0;text-align:left;vertical-align:top;overflow-wrap:anywhere}
th{background:#f0f2f5;font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.better{color:#137333;font-weight:600}.worse{color:#b3261e;font-weight:600}.best{font-weight:700;background:#e8f5e9}
.notice{background:#fff4e5;border-left:4px solid #f0a020;padding:8px 12px;margin:12px 0}
.notice ul{margin:4px 0;padding-left:20px}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:12px}
.plots.wide{grid-template-columns:minmax(0,1fr)}
img{max-width:100%;background:#fff;border:1px solid #e3e7ec;border-radius:4px}
.sample{background:#fff;border:1px solid #e3e7ec;border-radius:6px;padding:10px 12px;margin:12px 0}
.replies{display:grid;grid-template-columns:repeat(3,minmax(0,1fr));gap:8px;margin-top:8px}
.label{font-size:.72em;text-transform:uppercase;letter-spacing:.04em;color:#5f6b7a;margin-bottom:2px}
.where{font-size:.8em;color:#5f6b7a;overflow-wrap:anywhere}
.empty{color:#5f6b7a;font-size:.85em}
summary{cursor:pointer;color:#1f5fbf}
pre{white-space:pre-wrap;word-break:break-word;margin:0;font-size:.85em;background:#f3f4f6;padding:6px 8px;
  border-radius:4px}
details pre{max-height:480px;overflow:auto}
"""


def esc(value) -> str:
    return html.escape(str(value))


def num(value, digits: int = 4, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        text = f"{value:,.{digits}f}" if math.isfinite(value) else str(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        text = f"{value:,}"
    else:
        text = str(value)
    return f"{text} {unit}" if unit else text


def with_scale(name: str) -> str:
    """A row's name with its metric's scale where it is a built-in's (`bleu (0-100)`, `rouge1 (0-1)`): BLEU and
    chrF run 0-100 beside 0-1 shares, and a table of bare numbers reads 25.3 as better than 0.4."""
    from tunelab.eval.metrics import metric_scale

    scale = metric_scale(name)
    return f"{name} ({scale})" if scale else name


def percent(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def change(before, after, lower_is_better: bool) -> Cell:
    if before is None or after is None:
        return "—"
    diff = after - before
    if diff == 0 or not math.isfinite(diff):
        return num(diff)
    return f"{diff:+.4f}", "num better" if (diff < 0) == lower_is_better else "num worse"


def img(png: bytes, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def page(title: str, subtitle: str, sections: list[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
        f'<h1>{esc(title)}</h1><p class="subtitle">{esc(subtitle)}</p>{"".join(sections)}</main></body></html>\n'
    )


def section(title: str, body: str) -> str:
    return f"<section><h2>{esc(title)}</h2>{body}</section>"


def table(
    rows: list[list[Cell]], header: list[str] | None = None, table_id: str | None = None, numbers: bool = True
) -> str:
    """With `numbers`, cells after the first are right-aligned unless they carry their own classes."""
    numeric = ' class="num"' if numbers else ""
    head = "".join(f"<th{numeric if i else ''}>{esc(h)}</th>" for i, h in enumerate(header or []))
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            text, css = cell if isinstance(cell, tuple) else (cell, "num" if i and numbers else "")
            cells.append(f'<td class="{css}">{esc(text)}</td>' if css else f"<td>{esc(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    ident = f' id="{table_id}"' if table_id else ""
    return f"<table{ident}>" + (f"<thead><tr>{head}</tr></thead>" if header else "") + "".join(body) + "</table>"


def notice(problems: list[str], heading: str = "This run is incomplete.") -> str:
    if not problems:
        return ""
    items = "".join(f"<li>{esc(p)}</li>" for p in problems)
    return f'<div class="notice"><strong>{esc(heading)}</strong><ul>{items}</ul></div>'


def plot_grid(images: list[str], empty: str, wide: bool = False) -> str:
    """Plots side by side, or (`wide`) one per row for figures too wide to shrink into half the page."""
    if not images:
        return f"<p>{esc(empty)}</p>"
    return f'<div class="plots{" wide" if wide else ""}">{"".join(images)}</div>'


def run_facts(summary: dict | None, metrics: list[dict]) -> list[list[Cell]]:
    s = summary
    if s is None:
        last = metrics[-1] if metrics else {}
        return [
            ["status", "unknown (no summary.json)"],
            ["steps logged", num(last.get("step"))],
            ["tokens trained", num(last.get("tokens"))],
        ]
    state = s.get("trainer_state") or {}
    extra = state.get("extra") or {}
    trainable, total = s.get("trainable_parameters"), s.get("total_parameters")
    share = f" ({100 * trainable / total:.2f}%)" if trainable and total else ""
    facts = [
        ["status", num(s.get("status"))],
        ["model", num(s.get("model"))],
        ["method", num(s.get("method"))],
        ["steps", num(s.get("steps"))],
        ["tokens trained", num(s.get("train_tokens"))],
        ["training time", num(s.get("train_seconds"), 1, "s")],
        ["throughput", num(s.get("tokens_per_second"), 1, "tokens/s")],
        ["padding efficiency", percent(s.get("padding_efficiency"))],
        ["peak memory", num(s.get("peak_memory_mb"), 0, "MB")],
        ["trainable parameters", f"{num(trainable)} of {num(total)}{share}"],
        ["precision, device", f"{num(s.get('precision'))} on {num(s.get('device'))}"],
        ["final train loss", num(s.get("final_train_loss"))],
        ["best eval step", num(state.get("best_step"))],
    ]
    if "early_stopped_at" in extra:
        facts.append(["early stopped at step", num(extra["early_stopped_at"])])
    if "restored_best_step" in extra:
        facts.append(["weights restored from step", num(extra["restored_best_step"])])
    return facts


def _last_user_turn(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    turns = [m for m in prompt or [] if isinstance(m, dict)]
    users = [m for m in turns if m.get("role") == "user"] or turns
    return str(users[-1].get("content", "")) if users else ""


def _reply(label: str, text) -> str:
    if text is None:
        shown = '<p class="empty"><em>not generated</em></p>'
    elif not str(text).strip():  # an empty <pre> renders as a thin grey bar that reads as broken
        shown = '<p class="empty"><em>empty reply</em></p>'
    else:
        shown = f"<pre>{esc(text)}</pre>"
    return f'<div><div class="label">{esc(label)}</div>{shown}</div>'


def _sample_card(sample: dict) -> str:
    return (
        f'<div class="sample"><div class="where">{esc(sample.get("where", ""))}</div>'
        f'<div class="label">prompt (last user turn)</div><pre>{esc(_last_user_turn(sample.get("prompt")))}</pre>'
        f'<div class="replies">{_reply("reference", sample.get("reference"))}'
        f"{_reply('base model', sample.get('base'))}{_reply('fine-tuned', sample.get('fine_tuned'))}</div></div>"
    )


def samples_section(samples: list[dict] | None) -> str:
    if samples is None:
        return section("samples", "<p>samples.jsonl is missing: no held-out generations to show.</p>")
    if not samples:
        return section("samples", "<p>No held-out generations were made (eval.generate_samples is 0).</p>")
    cards = [_sample_card(sample) for sample in samples]
    body = "".join(cards[:SAMPLES_SHOWN])
    if len(cards) > SAMPLES_SHOWN:
        more = len(cards) - SAMPLES_SHOWN
        body += (
            f"<details><summary>{more} more sample{'s' if more > 1 else ''}</summary>{''.join(cards[SAMPLES_SHOWN:])}"
        )
        body += "</details>"
    return section(f"samples ({len(samples)} held out)", body)


def data_section(data: dict | None) -> str:
    if not data:
        return section("data", "<p>Data statistics are recorded in summary.json, which this run lacks.</p>")
    rows = [
        ["train samples", num(data.get("train_samples"))],
        ["eval samples", num(data.get("eval_samples"))],
        ["train tokens", num(data.get("train_tokens"))],
        ["trained tokens", num(data.get("trainable_tokens"))],
        ["trained share of tokens", percent(data.get("trainable_fraction"))],
        ["longest sample (tokens)", num(data.get("max_length_seen"))],
        ["median sample (tokens)", num(data.get("median_length"))],
        ["truncated samples", num(data.get("truncated_samples"))],
        ["dropped samples", num(data.get("dropped_samples"))],
    ]
    formats = data.get("formats") or {}
    rows += [[f"format of {path}", fmt] for path, fmt in formats.items()]
    return section("data", table(rows, numbers=False))


def config_section(config_text: str | None) -> str:
    if config_text is None:
        return section("config", "<p>config.yaml is missing.</p>")
    return section("config", f"<details open><summary>config.yaml</summary><pre>{esc(config_text)}</pre></details>")
