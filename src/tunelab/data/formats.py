"""Detect a row format from its columns and turn every row into the one canonical form: a list of
messages (or raw text). Each function here is pure: a row in, a sample or an error message out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.data.sources import Record
from tunelab.errors import UnknownFormat

ROLES = ("system", "user", "assistant")
# ShareGPT-style role names, mapped to ours.
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}

# Columns that identify each format, in detection order (first match wins).
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "qa": ("question", "answer"),
    "text": ("text",),
}
# Pair formats for the preference objectives (see data/pairs.py). Alternative column names: each tuple lists
# the accepted names of one field, first the canonical one.
PROMPT_KEYS = ("prompt", "question")
CHOSEN_KEYS = ("chosen", "response_chosen")
REJECTED_KEYS = ("rejected", "response_rejected")
FEEDBACK_COLUMNS = ("prompt", "completion", "label")
PAIR_FORMATS = ("preference", "feedback")
PROMPTS_FORMAT = "prompts"
"""Prompt-only rows (a `prompt` column, no reply; any other columns ride along) for GRPO."""
OBJECTIVE_FORMATS = (*PAIR_FORMATS, PROMPTS_FORMAT)
"""Formats that need an objective other than SFT."""


@dataclass
class Sample:
    """The canonical form of one row: chat messages, or raw text for continued pretraining."""

    where: str
    messages: list[dict[str, str]] = field(default_factory=list)
    text: str | None = None
    source: str = ""
    """Which dataset of a multi-task mix the sample came from."""

    @property
    def reference(self) -> str:
        """The last assistant reply: what generation is compared against."""
        return self.messages[-1]["content"] if self.messages else ""


class RowError(ValueError):
    """A row that cannot become a sample; the message says why, the caller adds file and line."""


def detect_format(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """The format of a dataset and why it was chosen, from the columns of its first rows."""
    for row in rows[:20]:
        keys = set(row)
        if "conversations" in keys:
            return "chat", "column 'conversations' (ShareGPT-style chat)" + _ignored("chat", rows[:20])
        pair = _pair_format(keys)
        if pair is not None:
            return pair
        for name, columns in FORMAT_COLUMNS.items():
            if set(columns) <= keys:
                return name, f"columns {', '.join(repr(c) for c in columns)}" + _ignored(name, rows[:20])
    seen = ", ".join(sorted(set().union(*(set(r) for r in rows[:20])))) if rows else "none"
    expected = "; ".join(f"{name}: {', '.join(cols)}" for name, cols in FORMAT_COLUMNS.items())
    expected += (f"; preference: [prompt,] chosen, rejected; feedback: {', '.join(FEEDBACK_COLUMNS)}; "
                 "prompts (grpo): prompt")
    raise RowError(f"cannot detect the format from columns ({seen}); expected one of: {expected}; or map your "
                   "columns to these fields with data.columns (data inspect: --column FIELD=COLUMN)")


READ_COLUMNS: dict[str, set[str]] = {
    "chat": {"messages", "conversations"},
    "alpaca": {"instruction", "input", "output", "system"},
    "prompt_completion": {"prompt", "completion"},
    "qa": {"question", "answer"},
    "text": {"text"},
}
"""Every column each SFT format reads; the rest of a file's columns are ignored, and the detection says so."""


def _ignored(fmt: str, rows: list[dict[str, Any]]) -> str:
    ignored = sorted(set().union(*rows) - READ_COLUMNS[fmt])
    return f"; ignored: {', '.join(ignored)}" if ignored else ""


def _pair_format(keys: set[str]) -> tuple[str, str] | None:
    """`preference` for chosen/rejected columns, `feedback` for prompt/completion/label; None for neither."""
    chosen = next((k for k in CHOSEN_KEYS if k in keys), None)
    rejected = next((k for k in REJECTED_KEYS if k in keys), None)
    if chosen and rejected:
        prompt = next((k for k in PROMPT_KEYS if k in keys), None)
        columns = [c for c in (prompt, chosen, rejected) if c]
        return "preference", f"columns {', '.join(repr(c) for c in columns)}"
    if set(FEEDBACK_COLUMNS) <= keys:
        return "feedback", f"columns {', '.join(repr(c) for c in FEEDBACK_COLUMNS)}"
    if "prompt" in keys and "completion" not in keys:
        return PROMPTS_FORMAT, "column 'prompt' without a reply column"
    return None


def as_text(value: Any, key: str) -> str:
    """A text field's value: text, or a number written as text (CSV and Parquet columns may hold numbers). A
    list, object or true/false is a mistake in the data, not text."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    kind = {bool: "true/false", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)
    raise RowError(f"field '{key}' must be text, not {kind}")


def _text_field(row: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise RowError(f"missing field '{key}'")
        return ""
    value = as_text(value, key)
    if required and not value.strip():
        raise RowError(f"field '{key}' is empty")
    return value


def to_sample(record: Record, fmt: str, system_prompt: str | None = None) -> Sample:
    """The canonical sample for one row of format `fmt`. Raises RowError."""
    row = record.row
    if fmt == "text":
        return Sample(where=record.where, text=_text_field(row, "text"))
    if fmt == "chat":
        messages = _chat_messages(row)
    elif fmt == "preference_chosen":
        from tunelab.data.pairs import to_pair  # pairs builds on this module

        pair = to_pair(record, "preference", system_prompt)
        return Sample(where=record.where, messages=[*pair.prompt, {"role": "assistant", "content": pair.chosen}])
    elif fmt == "alpaca":
        instruction = _text_field(row, "instruction")
        extra = _text_field(row, "input", required=False).strip()
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text_field(row, "output")}]
        if row.get("system"):
            messages.insert(0, {"role": "system", "content": as_text(row["system"], "system")})
    elif fmt == "prompt_completion":
        messages = _turns(row, "prompt", "user") + _turns(row, "completion", "assistant")
    elif fmt == "qa":
        messages = [
            {"role": "user", "content": _text_field(row, "question")},
            {"role": "assistant", "content": _text_field(row, "answer")},
        ]
    else:
        raise RowError(f"unknown format '{fmt}'")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    check_roles(messages)
    return Sample(where=record.where, messages=messages)


def _turns(row: dict[str, Any], key: str, role: str) -> list[dict[str, str]]:
    """A prompt or completion given as text, or (TRL's conversational style) as a list of messages."""
    if isinstance(row.get(key), list):
        return _chat_messages({"messages": row[key]}, key)
    return [{"role": role, "content": _text_field(row, key)}]


def _chat_messages(row: dict[str, Any], field_name: str = "messages") -> list[dict[str, str]]:
    raw = row.get("messages", row.get("conversations"))
    if raw is None:
        raise RowError(f"missing field '{field_name}'")
    if not isinstance(raw, list) or not raw:
        raise RowError(f"'{field_name}' must be a non-empty list of {{role, content}} objects")
    messages = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict):
            raise RowError(f"message {i} is not an object")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role is None:
            raise RowError(f"message {i} has no 'role'")
        role = _ROLE_ALIASES.get(str(role), str(role))
        if role not in ROLES:
            raise RowError(f"message {i} has role '{role}'; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise RowError(f"message {i} ({role}) has empty content")
        messages.append({"role": role, "content": content})
    return messages


def check_roles(messages: list[dict[str, str]]) -> None:
    """Roles must be: an optional system turn, then user and assistant alternating, ending on assistant."""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not turns:
        raise RowError("conversation has no user or assistant turn")
    for i, turn in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn["role"] != expected:
            position = i + (len(messages) - len(turns))
            raise RowError(f"message {position} has role '{turn['role']}' where '{expected}' was expected")
    if turns[-1]["role"] != "assistant":
        raise RowError("conversation does not end with an assistant turn: nothing to train on")


def prompt_messages(row: dict[str, Any], system_prompt: str | None = None) -> list[dict[str, str]]:
    """The conversation to reply to, from a row of any format whose answer may be absent. Raises RowError."""
    pair = _pair_format(set(row))
    if pair is not None and pair[0] != PROMPTS_FORMAT:
        from tunelab.data.pairs import to_pair  # pairs builds on this module

        return to_pair(Record(row, ""), pair[0], system_prompt).prompt
    if "messages" in row or "conversations" in row:
        messages = _chat_messages(row)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
    elif "instruction" in row:
        instruction = _text_field(row, "instruction")
        extra = _text_field(row, "input", required=False).strip()
        messages = [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction}]
    else:
        key = next((k for k in ("prompt", "question", "text") if k in row), None)
        if key is None:
            raise RowError("no prompt found: expected 'messages', 'instruction', 'prompt', 'question' or 'text'")
        messages = _turns(row, key, "user")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    if messages[-1]["role"] != "user":
        raise RowError("the conversation must end with a user turn to be answered")
    return messages


def file_format(records: list[Record], fmt: str, path: Path | str) -> tuple[str, str]:
    """(format, why): as configured, or detected from the columns of the file's first rows."""
    if fmt != "auto":
        return fmt, "set in the config"
    if not records:
        return "unknown", "no readable row"
    try:
        return detect_format([r.row for r in records])
    except RowError as err:
        raise UnknownFormat(str(err), where=str(path)) from None


def needs_pair_objective(fmt: str, why: str) -> str:
    """Why SFT cannot train on preference, feedback or prompt-only rows, and what would."""
    if fmt == PROMPTS_FORMAT:
        return (f"rows hold prompts without replies ({why}): supervised fine-tuning needs a reply to imitate; set "
                "objective.name: grpo with objective.rewards to train on completions the model samples itself")
    if fmt == "preference":
        return (f"rows hold preference pairs ({why}): supervised fine-tuning needs one reply to imitate; set "
                "objective.name: dpo (or orpo, simpo) to train on the pairs, or data.format: preference_chosen to "
                "fine-tune on the chosen replies alone")
    return (f"rows hold unpaired feedback ({why}): supervised fine-tuning cannot learn from replies labelled "
            "bad; set objective.name: kto to train on them")
