"""Rows for the preference objectives, in canonical form: a preference pair (shared prompt turns, a chosen
and a rejected reply) or an unpaired feedback sample (prompt turns, one reply, a good/bad label).

Like formats.py, everything here is pure: a row in, a canonical row or a RowError out (the caller adds file
and line). Prompts may be text or chat messages; replies may be text, or messages ending with the assistant
reply, optionally preceded by the prompt turns (the style of chat preference datasets without a prompt column).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunelab.data.formats import (
    CHOSEN_KEYS,
    PAIR_FORMATS,
    PROMPT_KEYS,
    REJECTED_KEYS,
    RowError,
    _chat_messages,
    as_text,
    check_roles,
)
from tunelab.data.sources import Record

Messages = list[dict[str, str]]

_TRUE_LABELS = {"true", "1", "good", "yes"}
_FALSE_LABELS = {"false", "0", "bad", "no"}


@dataclass
class PreferencePair:
    """One preference row: the conversation so far (ending with a user turn) and two replies to it."""

    where: str
    prompt: Messages
    chosen: str
    rejected: str
    source: str = ""
    margin: float | None = None
    """How far the chosen reply should score above the rejected one (reward models; the `margin` column)."""

    @property
    def identical(self) -> bool:
        """Chosen and rejected say the same thing (up to surrounding whitespace): the pair teaches nothing."""
        return self.chosen.strip() == self.rejected.strip()

    @property
    def reference(self) -> str:
        """The reply generation is compared against."""
        return self.chosen


@dataclass
class FeedbackSample:
    """One unpaired feedback row (KTO-style): a reply to the prompt, labelled good (True) or bad (False)."""

    where: str
    prompt: Messages
    completion: str
    label: bool
    source: str = ""


PairRow = PreferencePair | FeedbackSample


def to_pair(record: Record, fmt: str, system_prompt: str | None = None) -> PairRow:
    """The canonical row for one row of format `preference` or `feedback`. Raises RowError."""
    row = record.row
    if fmt == "preference":
        return _preference(row, record.where, system_prompt)
    if fmt == "feedback":
        return _feedback(row, record.where, system_prompt)
    raise RowError(f"unknown pair format '{fmt}'; expected one of {', '.join(PAIR_FORMATS)}")


def _preference(row: dict[str, Any], where: str, system_prompt: str | None) -> PreferencePair:
    chosen_key = _present(row, CHOSEN_KEYS)
    rejected_key = _present(row, REJECTED_KEYS)
    prompt_key = _present(row, PROMPT_KEYS, required=False)
    chosen_turns, chosen = _reply(row, chosen_key)
    rejected_turns, rejected = _reply(row, rejected_key)
    if prompt_key is not None:
        prompt = parse_prompt(row, prompt_key)
        for key, turns in ((chosen_key, chosen_turns), (rejected_key, rejected_turns)):
            if turns and turns != prompt:
                difference = _first_difference(turns, prompt)
                raise RowError(f"the prompt turns in '{key}' differ from '{prompt_key}'{difference}")
    else:
        if not chosen_turns or not rejected_turns:
            text = chosen_key if not chosen_turns else rejected_key
            raise RowError(f"missing field 'prompt' ('{text}' holds only the reply, so the prompt must be given)")
        if chosen_turns != rejected_turns:
            raise RowError(
                f"'{chosen_key}' and '{rejected_key}' have different prompt turns"
                f"{_first_difference(chosen_turns, rejected_turns)}"
            )
        prompt = chosen_turns
    prompt = with_system_prompt(prompt, system_prompt)
    check_roles([*prompt, {"role": "assistant", "content": chosen}])
    return PreferencePair(where, prompt, chosen, rejected, margin=_margin(row.get("margin")))


def _margin(value: Any) -> float | None:
    if value is None:
        return None
    try:
        margin = float(value)
    except (TypeError, ValueError):
        raise RowError(f"margin {value!r} is not a number") from None
    if margin != margin or margin in (float("inf"), float("-inf")):
        raise RowError(f"margin {value!r} is not a finite number")
    return margin


def _feedback(row: dict[str, Any], where: str, system_prompt: str | None) -> FeedbackSample:
    prompt = parse_prompt(row, _present(row, ("prompt",)))
    turns, completion = _reply(row, _present(row, ("completion",)))
    if turns and turns != prompt:
        raise RowError(f"the prompt turns in 'completion' differ from 'prompt'{_first_difference(turns, prompt)}")
    label = parse_label(row.get("label"))
    prompt = with_system_prompt(prompt, system_prompt)
    check_roles([*prompt, {"role": "assistant", "content": completion}])
    return FeedbackSample(where, prompt, completion, label)


def parse_label(value: Any) -> bool:
    """A feedback label: a bool, 0/1, or the words true/false, good/bad, yes/no (any case). Raises RowError."""
    if value is None:
        raise RowError("missing field 'label'")
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE_LABELS | _FALSE_LABELS:
        return value.strip().lower() in _TRUE_LABELS
    raise RowError(f"label {value!r} is not a yes/no value; use true/false, 1/0 or good/bad")


def _present(row: dict[str, Any], keys: tuple[str, ...], *, required: bool = True) -> str | None:
    """The first of `keys` the row has (alternative names of one field)."""
    found = next((k for k in keys if row.get(k) is not None), None)
    if found is None and required:
        raise RowError(f"missing field '{keys[0]}'")
    return found


def _messages(row: dict[str, Any], key: str) -> Messages:
    """A message list field, with errors that say which field they are about."""
    try:
        return _chat_messages({"messages": row[key]}, key)
    except RowError as err:
        message = str(err)
        raise RowError(message if f"'{key}'" in message else f"'{key}': {message}") from None


def parse_prompt(row: dict[str, Any], key: str) -> Messages:
    value = row[key]
    if isinstance(value, list):
        turns = _messages(row, key)
        if turns[-1]["role"] != "user":
            raise RowError(f"'{key}' must end with a user turn to be answered; it ends with '{turns[-1]['role']}'")
        return turns
    text = as_text(value, key)
    if not text.strip():
        raise RowError(f"field '{key}' is empty")
    return [{"role": "user", "content": text}]


def _reply(row: dict[str, Any], key: str) -> tuple[Messages, str]:
    """(prompt turns given with the reply, possibly none; the reply text). The reply is the final assistant turn."""
    value = row[key]
    if isinstance(value, list):
        turns = _messages(row, key)
        if turns[-1]["role"] != "assistant":
            raise RowError(f"'{key}' must end with an assistant turn (the reply); it ends with '{turns[-1]['role']}'")
        return turns[:-1], turns[-1]["content"]
    if isinstance(value, dict):
        raise RowError(f"'{key}' must be text or a list of {{role, content}} messages, not an object")
    text = as_text(value, key)
    if not text.strip():
        raise RowError(f"field '{key}' is empty")
    return [], text


def _first_difference(a: Messages, b: Messages) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f" (first at message {i})"
    return f" ({len(a)} turns against {len(b)})"


def with_system_prompt(prompt: Messages, system_prompt: str | None) -> Messages:
    if system_prompt and prompt[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *prompt]
    return prompt
