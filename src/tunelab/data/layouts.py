"""Column layouts of public instruction datasets, read without a `data.columns` mapping.

tunelab's own formats name their columns instruction/input/output, prompt/completion, question/answer. Public sets
use other names for the same two sides: Dolly has instruction, context, response (and category); Bitext's customer
support sets instruction, response (and intent, category, flags); others query/response, input/target or
question/answer with a context. When no format of tunelab's matches a file, its columns are mapped here to the
instruction format (`input` being the extra context), and the mapping is said: the columns used, as what, and
the columns ignored. Two columns that could both be the reply stop the read with both choices.
"""

from __future__ import annotations

from typing import Any

from tunelab.data.formats import RowError, detect_format
from tunelab.errors import DataError

PROMPT_COLUMNS = ("instruction", "question", "query", "input")
"""The request, in order of preference (`prompt` is not here: prompt without completion is GRPO's format)."""
CONTEXT_COLUMNS = ("context", "input")
"""Material the request is about (Dolly's context), shown after it as alpaca's `input`."""
REPLY_COLUMNS = ("output", "response", "completion", "answer", "target")


def infer_columns(rows: list[dict[str, Any]], path: str) -> tuple[dict[str, str], str] | None:
    """({field: column}, what was used and ignored) for rows in a known layout, else None. Raises DataError when
    two columns could be the reply."""
    keys = set().union(*rows) if rows else set()
    replies = [column for column in REPLY_COLUMNS if column in keys]
    prompts = [column for column in PROMPT_COLUMNS if column in keys]
    if not replies or not prompts:
        return None
    prompt, reply = prompts[0], replies[0]
    if len(replies) > 1:
        choices = " or ".join(f"data.columns: {{instruction: {prompt}, output: {column}}}" for column in replies)
        raise DataError(f"columns {', '.join(repr(c) for c in replies)} could each be the reply; say which with "
                        f"{choices} (data inspect: --column instruction={prompt} --column output=COLUMN)", where=path)
    context = next((column for column in CONTEXT_COLUMNS if column in keys and column != prompt), None)
    mapping = {"instruction": prompt, "output": reply, **({"input": context} if context else {})}
    used = {prompt, reply, context, "system"}
    ignored = sorted(keys - used)
    note = (f"columns {prompt!r} as the instruction" + (f", {context!r} as its input" if context else "")
            + f", {reply!r} as the reply" + (f"; ignored: {', '.join(ignored)}" if ignored else ""))
    return {field: column for field, column in mapping.items() if field != column}, note


def layout_columns(rows: list[dict[str, Any]], columns: dict[str, str] | None, fmt: str,
                   path: str) -> tuple[dict[str, str] | None, str | None]:
    """The mapping to read a file with (the user's data.columns, else one inferred from a known layout when no
    format of tunelab's matches its first rows) and, when inferred, what it used and ignored."""
    if columns or fmt != "auto" or not rows:
        return columns, None
    try:
        detected, _ = detect_format(rows)
        if detected != "qa" or not any("context" in row for row in rows[:20]):
            return columns, None  # question/answer with a context reads the context too, as the instruction's input
    except RowError:
        pass
    inferred = infer_columns(rows[:20], path)
    return inferred if inferred else (columns, None)
