"""Prompt-only rows for GRPO: a `prompt` column (text, or chat messages ending with a user turn) and any other
columns, which reward functions receive as keyword lists (TRL's convention, so its users' functions work).

Each prompt is rendered with `ChatRenderer.prompt` and tokenised on its own, exactly as `generate` feeds a model,
so the completions sampled in training continue the same tokens a user's generation would. A prompt is never
cut: one that leaves no room for `max_new_tokens` within data.max_length is an error, or left out under
data.overlong: drop or truncate (a cut prompt would ask a different question).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tunelab.config import DataConfig
from tunelab.data.formats import PROMPTS_FORMAT, RowError, Sample
from tunelab.data.pairs import parse_prompt, with_system_prompt
from tunelab.data.preference import data_kind, tokenize_prompt
from tunelab.data.prepare import nothing_left, raise_problems, split_tables, tokenized_cache_status
from tunelab.data.row_cache import RowKind, RowTokens, tokenized_rows
from tunelab.data.row_table import RowTable, RowView
from tunelab.data.sources import Record
from tunelab.data.template import IGNORE_INDEX, ChatRenderer, TemplateError, TokenizedSample, checked_renderer
from tunelab.data.tokenize import MAX_LISTED
from tunelab.errors import DataError

Messages = list[dict[str, str]]


@dataclass
class PromptRow:
    """One prompt to sample completions for, with the row's other columns."""

    where: str
    prompt: Messages
    """The conversation to continue (with data.system_prompt when set)."""
    original: Any
    """The prompt as the row gave it, text or messages: what reward functions receive as `prompts`."""
    columns: dict[str, Any]
    """Every other column of the row (reference answers, metadata)."""
    source: str = ""
    prompt_ids: list[int] = field(default_factory=list)

    @property
    def conversational(self) -> bool:
        """Messages in, messages out: TRL hands such rows' completions to reward functions as message lists."""
        return isinstance(self.original, list)


REFERENCE_COLUMNS = ("answer", "solution", "ground_truth", "reference")
"""Columns read as a row's reference answer for task metrics when no built-in reward names one (GSM8K's, and the
names TRL's math examples use)."""


@dataclass
class PreparedPrompts:
    """Tokenised train and eval prompts for GRPO, and what a user should know about them."""

    train: RowView
    """In training order; `lengths` counts each prompt plus the completion's room (train.extra_length)."""
    eval: RowView
    reference_column: str | None = None
    """The column holding each row's reference answer (the first built-in reward's), for task metrics."""
    kind: str = PROMPTS_FORMAT
    formats: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    identical: list[str] = field(default_factory=list)
    source_weights: dict[str, float] = field(default_factory=dict)
    cache: dict[str, str] = field(default_factory=dict)
    """Per data file: `hit`, `miss` or `off` (see data/cache.py)."""
    dropped_count: int = 0

    @property
    def eval_samples(self) -> list[Sample]:
        """Held-out prompts with their reference answer as the reply (when the rows have one): what task metrics
        compare generations against. Without a built-in reward naming the column, the first of
        REFERENCE_COLUMNS the rows have (a Python reward or a reward model alone names none)."""
        first = next(iter(self.eval), None)
        column = self.reference_column or next(
            (name for name in REFERENCE_COLUMNS if first is not None and name in first.columns), None)
        if column is None:
            return []
        return [Sample(row.where, [*row.prompt, {"role": "assistant", "content": _text(row.columns[column])}],
                       source=row.source)
                for row in self.eval if column in row.columns]

    @property
    def fingerprint(self) -> str:
        """Identifies the training rows in order; a resumed run must see the same ones to continue exactly."""
        return self.train.digest()

    @property
    def stats(self) -> dict[str, object]:
        prompts = np.sort(self.train.column("longest"))
        completion = self.train.extra_length
        total = int(prompts.sum())
        return {
            "kind": self.kind,
            "train_rows": len(self.train),
            "eval_rows": len(self.eval),
            "train_samples": len(self.train),
            "eval_samples": len(self.eval),
            "train_tokens": total,
            # Completions are what GRPO trains; at their longest they are this share of each sequence.
            "trainable_fraction": completion / (completion + total / max(1, len(prompts))),
            "max_length_seen": int(prompts[-1]) if len(prompts) else 0,
            "median_length": int(prompts[len(prompts) // 2]) if len(prompts) else 0,
            "dropped_rows": self.dropped_count,
            "formats": self.formats,
            "tokenized_cache": tokenized_cache_status(self.cache),
        }


def to_prompt_row(record: Record, system_prompt: str | None) -> PromptRow:
    """The canonical prompt row for one file row. Raises RowError."""
    row = record.row
    if row.get("prompt") is None:
        raise RowError("missing field 'prompt'")
    prompt = with_system_prompt(parse_prompt(row, "prompt"), system_prompt)
    columns = {key: value for key, value in row.items() if key != "prompt"}
    return PromptRow(record.where, prompt, row["prompt"], columns)


RowCheck = Callable[[PromptRow], "str | None"]
"""What an objective requires of each row (its reward's reference column, ...): None, or why the row fails."""


def prepare_prompt_data(config: DataConfig, tokenizer, seed: int, *, completion_tokens: int,
                        check: RowCheck = lambda row: None, check_key: str = "",
                        reference_column: str | None = None) -> PreparedPrompts:
    """Read, validate, split and tokenise prompt-only data with the same sources, weights, seeded split and
    cached, memory-mapped tables as every other kind. `check_key` names what `check` looks at (it is part of the
    cache key). Raises DataError listing every bad row (file:line: why)."""
    kind = data_kind(config)
    if kind != PROMPTS_FORMAT:
        raise DataError(f"grpo trains on prompt-only rows (a 'prompt' column and no reply), but the data holds "
                        f"{kind} rows; set data.format: prompts to read a prompt column alone", where="data.train")
    renderer = checked_renderer(tokenizer, config.chat_template)
    row_kind = RowKind(
        "prompts", (PROMPTS_FORMAT,),
        lambda fmt, why: f"rows are '{fmt}' data ({why}), not prompt-only rows (a 'prompt' column)",
        convert=lambda record, fmt: to_prompt_row(record, config.system_prompt),
        tokenize=lambda row: _row_tokens(row, renderer, config, completion_tokens, check),
        key={"completion_tokens": completion_tokens, "check": check_key})
    problems: list[str] = []
    split = split_tables(config, seed, lambda path, fmt: tokenized_rows(path, fmt, row_kind, config, renderer,
                                                                        problems, use_cache=config.cache))
    raise_problems(problems)
    prepared = PreparedPrompts(train=RowView(split.tables, split.train, _decode),
                               eval=RowView(split.tables, split.eval, _decode), reference_column=reference_column,
                               formats=split.formats, source_weights=split.source_weights, cache=split.cache)
    prepared.train.extra_length = completion_tokens
    prepared.dropped = [text for table in split.tables for text in table.notes("dropped")][:MAX_LISTED]
    prepared.dropped_count = sum(table.meta["dropped"] for table in split.tables)
    if not prepared.train:
        raise nothing_left("prompts", {"dropped": (prepared.dropped_count, prepared.dropped)})
    return prepared


def _row_tokens(row: PromptRow, renderer: ChatRenderer, config: DataConfig, completion_tokens: int,
                check: RowCheck) -> RowTokens:
    """The row's prompt tokenised, or the reason it is invalid or left out (too long: prompts are never cut)."""
    problem = check(row)
    if problem:
        return RowTokens(problem=problem)
    try:
        _, prompt_ids = tokenize_prompt(row.prompt, renderer)
    except TemplateError as err:
        return RowTokens(problem=str(err))
    canonical = {"prompt": row.prompt, "original": row.original, "columns": row.columns}
    sequence = TokenizedSample(prompt_ids, [IGNORE_INDEX] * len(prompt_ids), row.where)
    if len(prompt_ids) <= config.max_length - completion_tokens:
        return RowTokens(canonical, len(prompt_ids), [sequence])
    why = (f"the prompt has {len(prompt_ids)} tokens; with objective.max_new_tokens={completion_tokens} "
           f"that exceeds data.max_length={config.max_length}")
    if config.overlong == "error":
        return RowTokens(problem=f"{why} (data.overlong=error)")
    return RowTokens(notes={"dropped": f"{why}; dropped (prompts are never cut)"})


def _decode(table: RowTable, index: int) -> PromptRow:
    row = table.row(index)
    return PromptRow(table.where(index), row["prompt"], row["original"], row["columns"], table.source,
                     table.sequences(index)[0].input_ids)


def _text(value: Any) -> str:
    """A reference value as the text task metrics compare (JSON for objects and lists)."""
    return value if isinstance(value, str) else json.dumps(value)
