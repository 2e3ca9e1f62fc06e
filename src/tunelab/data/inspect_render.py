"""`tunelab data inspect` for people: the reports of inspect.py (SFT data) and inspect_pairs.py (preference
and feedback data) as text, with trained tokens marked, and the token-length histogram."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.data.template import IGNORE_INDEX

if TYPE_CHECKING:
    from tunelab.data.inspect import InspectReport, LengthStats
    from tunelab.data.inspect_pairs import PairInspectReport
    from tunelab.data.inspect_prompts import PromptInspectReport

LISTED = 10
"""How many problems, duplicate groups and overlaps the text rendering and the JSON list."""

_ANSI_TRAINED = "\x1b[1;32m"
_ANSI_DIM = "\x1b[2m"
_ANSI_BOLD = "\x1b[1m"
_ANSI_RESET = "\x1b[0m"


def token_segments(tokenizer, input_ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """Runs of consecutive tokens with the same trained/untrained state, decoded to text."""
    pairs = zip(input_ids, labels, strict=True)
    return [
        (tokenizer.decode([token for token, _ in run]), trained)
        for trained, run in itertools.groupby(pairs, key=lambda pair: pair[1] != IGNORE_INDEX)
    ]


def render_text(report: InspectReport | PairInspectReport, *, color: bool = False, limit: int = LISTED) -> str:
    """The report for people. Trained tokens of the shown samples are green with `color`, else `[[...]]`."""
    if report.kind == "prompts":
        return render_prompts_text(report, color=color, limit=limit)
    if report.kind != "sft":
        return render_pairs_text(report, color=color, limit=limit)
    bold, dim, reset = (_ANSI_BOLD, _ANSI_DIM, _ANSI_RESET) if color else ("", "", "")
    lines = _header(report, bold, reset, limit)
    lines.append(f"{bold}tokens per sample{reset} ({len(report.lengths)} valid training samples):")
    lines += _stats_table(
        [
            ("prompt (untrained)", report.prompt_tokens),
            ("completion (trained)", report.completion_tokens),
            ("total", report.total_tokens),
        ]
    )
    lines.append(f"trainable tokens: {report.trainable_fraction:.1%} of all tokens")
    longer = report.longer_than_max_length
    lines.append(
        f"data.max_length={report.max_length} (overlong: {report.overlong}): {len(longer)} sample(s) longer, "
        f"{len(report.no_trainable_token_left)} would keep no trainable token"
    )
    empty = report.no_trainable_token_left
    if report.overlong == "truncate" and empty:
        lines.append(f"  training stops on these {len(empty)}; raise data.max_length or set data.overlong: drop")
    elif report.overlong == "drop" and longer:
        lines.append(f"  training drops these {len(longer)}")
    elif report.overlong == "error" and longer:
        lines.append(f"  training stops on these {len(longer)} (data.overlong: error)")
    lines += _listed([f"{w}: no trainable token left (the reply lies beyond data.max_length)" for w in empty], limit)
    if report.chunked_documents:
        lines.append(f"{report.chunked_documents} text document(s) split into max_length chunks")
    lines += _duplicates_and_overlap(report, report.eval_samples, limit)
    for sample in report.samples:
        legend = "green" if color else "in double brackets"
        lines += ["", f"{bold}sample {sample.where}{reset} {dim}({sample.tokens} tokens; trained: {legend}){reset}"]
        lines.append("".join(_mark(text, trained, color) for text, trained in sample.segments))
        if sample.cut_tokens:
            lines.append(
                f"{dim}... {sample.cut_tokens} more token(s) beyond data.max_length={report.max_length} "
                f"(overlong: {report.overlong}){reset}"
            )
    return "\n".join(lines)


def render_pairs_text(report: PairInspectReport, *, color: bool = False, limit: int = LISTED) -> str:
    """The preference/feedback report for people: like `render_text`, per reply, with each shown row's
    prompt once and every reply after it (trained tokens marked)."""
    bold, dim, reset = (_ANSI_BOLD, _ANSI_DIM, _ANSI_RESET) if color else ("", "", "")
    lines = _header(report, bold, reset, limit)
    replies = [name for name in report.tokens if name not in ("prompt", "total")]
    left_out = "; identical pairs left out" if report.kind == "preference" else ""
    lines.append(f"{bold}tokens per row{reset} ({report.measured_rows} of {report.valid_rows} valid rows{left_out}):")
    lines += _stats_table(
        [
            ("prompt (untrained)", report.tokens["prompt"]),
            *((f"{name} (trained)", report.tokens[name]) for name in replies),
            ("longest sequence", report.tokens["total"]),
        ]
    )
    if report.labels is not None:
        good, bad = report.labels["good"], report.labels["bad"]
        share = good / (good + bad) if good + bad else 0.0
        lines.append(f"labels: {good} good, {bad} bad ({share:.0%} good)")
    longer, no_room = report.longer_than_max_length, report.no_room_for_reply
    lines.append(
        f"data.max_length={report.max_length} (overlong: {report.overlong}): {len(longer)} row(s) longer, "
        f"{len(no_room)} with no room for the reply after the prompt"
    )
    if report.overlong == "truncate" and longer:
        lines.append(
            f"  training cuts the replies' ends (the prompt is kept) and stops on the {len(no_room)} without room"
            if no_room
            else "  training cuts the replies' ends; the prompt is kept"
        )
    elif report.overlong == "drop" and longer:
        lines.append(f"  training drops these {len(longer)}")
    elif report.overlong == "error" and longer:
        lines.append(f"  training stops on these {len(longer)} (data.overlong: error)")
    lines += _listed([f"{w}: the prompt alone fills data.max_length" for w in no_room], limit)
    if report.kind == "preference":
        lines.append(f"identical pairs: {len(report.identical)} (chosen == rejected, or within data.max_length; "
                     "training leaves them out)")
        lines += _listed(report.identical, limit)
    lines += _duplicates_and_overlap(report, report.eval_rows, limit)
    legend = "green" if color else "in double brackets"
    for shown in report.samples:
        lines += [
            "",
            f"{bold}row {shown.where}{reset} {dim}(prompt: {shown.prompt_tokens} tokens; trained: {legend}){reset}",
            shown.prompt,
        ]
        for reply in shown.replies:
            lines.append(f"{bold}-- {reply.name}{reset} {dim}({reply.tokens} tokens with the prompt){reset}")
            lines.append("".join(_mark(text, trained, color) for text, trained in reply.segments))
            if reply.cut_tokens:
                lines.append(
                    f"{dim}... {reply.cut_tokens} more token(s) beyond data.max_length="
                    f"{report.max_length} (overlong: {report.overlong}){reset}"
                )
    return "\n".join(lines)


def render_prompts_text(report: PromptInspectReport, *, color: bool = False, limit: int = LISTED) -> str:
    """The prompt-only report for people: prompt lengths, the room left for completions, the columns rewards can
    read, and each shown prompt as the model sees it."""
    bold, dim, reset = (_ANSI_BOLD, _ANSI_DIM, _ANSI_RESET) if color else ("", "", "")
    lines = _header(report, bold, reset, limit)
    lines.append(f"{bold}tokens per prompt{reset} ({report.valid_rows} valid training prompts):")
    lines += _stats_table([("prompt", report.tokens["prompt"])])
    room = f"max_new_tokens={report.completion_tokens}" if report.completion_tokens else "no completion room known"
    lines.append(f"data.max_length={report.max_length} ({room}): {len(report.too_long)} prompt(s) leave no room; "
                 + ("training stops on them (data.overlong: error)" if report.overlong == "error"
                    else "training drops them (prompts are never cut)"))
    lines += _listed(report.too_long, limit)
    shown = ", ".join(f"{name} ({count})" for name, count in report.columns.items()) or "none"
    lines.append(f"other columns, rows with a value (what rewards can read): {shown}")
    lines += _duplicates_and_overlap(report, report.eval_rows, limit)
    for sample in report.samples:
        lines += ["", f"{bold}row {sample.where}{reset} {dim}({sample.prompt_tokens} tokens){reset}", sample.prompt]
        if sample.columns:
            lines.append(f"{dim}columns: {json.dumps(sample.columns, ensure_ascii=False)[:300]}{reset}")
    return "\n".join(lines)


def _stats_table(rows: list[tuple[str, LengthStats]]) -> list[str]:
    lines = [f"  {'':<22}{'min':>8}{'median':>10}{'p95':>8}{'max':>8}{'total':>12}"]
    for name, stats in rows:
        lines.append(f"  {name:<22}{stats.min:>8}{stats.median:>10g}{stats.p95:>8}{stats.max:>8}{stats.total:>12}")
    return lines


def _duplicates_and_overlap(report: InspectReport | PairInspectReport, eval_count: int, limit: int) -> list[str]:
    lines = [f"duplicates: {report.duplicate_rows} row(s) repeat an earlier row"]
    lines += _listed([" = ".join(group) for group in report.duplicates], limit)
    if report.eval_source is None:
        lines.append("train/eval overlap: no eval data (data.eval unset, data.eval_split=0)")
    else:
        lines.append(
            f"train/eval overlap ({report.eval_source}): {len(report.eval_overlap)} of "
            f"{eval_count} eval prompt(s) also in training"
        )
        lines += _listed([f"{e} (eval) = {t} (train)" for e, t in report.eval_overlap], limit)
    return lines


def _header(report: InspectReport | PairInspectReport, bold: str, reset: str, limit: int) -> list[str]:
    """Each file with its format and why, then the invalid rows."""
    lines = []
    for f in report.files:
        lines.append(
            f"{bold}{f.path}{reset} ({f.role}): {f.format} ({f.format_reason}), {f.rows} rows, {f.invalid_rows} invalid"
        )
    if report.problems:
        lines.append(f"{bold}invalid rows ({report.invalid_rows}){reset}, left out of the statistics:")
        lines += _listed(report.problems, limit)
    return lines


def _listed(items: list[str], limit: int) -> list[str]:
    more = [f"  ... and {len(items) - limit} more"] if len(items) > limit else []
    return [f"  {item}" for item in items[:limit]] + more


def _mark(text: str, trained: bool, color: bool) -> str:
    if not trained:
        return text
    return f"{_ANSI_TRAINED}{text}{_ANSI_RESET}" if color else f"[[{text}]]"


def write_length_histogram(report: InspectReport | PairInspectReport, path: Path | str) -> Path:
    """A PNG histogram of total and trained tokens per sample (per sequence for pairs: chosen and rejected
    each count), with data.max_length marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(figure)  # no pyplot: no global backend or figure state
    axes = figure.add_subplot()
    top = max([report.max_length, *report.lengths])
    bins = [top * i / 60 for i in range(61)]  # shared edges, so both series have bars of one width
    if report.lengths:
        axes.hist(report.lengths, bins=bins, alpha=0.6, label="total tokens")
        axes.hist(report.completion_lengths, bins=bins, alpha=0.6, label="trained tokens")
    axes.axvline(report.max_length, color="red", linestyle="--", label=f"data.max_length={report.max_length}")
    axes.set_xlabel("tokens per sample")
    axes.set_ylabel("samples")
    axes.set_title(f"{report.target}: {len(report.lengths)} samples")
    axes.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100, bbox_inches="tight")
    return path
