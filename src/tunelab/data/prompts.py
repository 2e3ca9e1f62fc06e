"""Prompt-only rows for GRPO: a `prompt` column (text, or chat messages ending with a user turn) and any other
columns, which reward functions receive as keyword lists (TRL's convention, so its users' functions work).

Each prompt is rendered with `ChatRenderer.prompt` and tokenised on its own, exactly as `generate` feeds a model,
so the completions sampled in training continue the same tokens a user's generation would. A prompt is never
cut: one that leaves no room for `max_new_tokens` within data.max_length is an error, or left out under
data.overlong: drop or truncate (a cut prompt would ask a different question).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.config import DataConfig
from tunelab.data.formats import PROMPTS_FORMAT, RowError, Sample
from tunelab.data.pairs import parse_prompt, with_system_prompt
from tunelab.data.preference import data_kind, tokenize_prompt
from tunelab.data.prepare import convert_rows, raise_problems, read_file_rows, split_samples, train_sources, weighted
from tunelab.data.sources import Record
from tunelab.data.template import ChatRenderer, TemplateError, checked_renderer
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


class PromptList(list):
    """Prompt rows in training order; `lengths` is each prompt's tokens plus the longest completion, the length
    its sequences can reach (what batch planning and the memory estimate read)."""

    def __init__(self, rows=(), completion_tokens: int = 0) -> None:
        super().__init__(rows)
        self.completion_tokens = completion_tokens

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(r.prompt_ids) + self.completion_tokens for r in self), np.int64, count=len(self))


@dataclass
class PreparedPrompts:
    """Tokenised train and eval prompts for GRPO, and what a user should know about them."""

    train: PromptList
    eval: list[PromptRow]
    reference_column: str | None = None
    """The column holding each row's reference answer (the first built-in reward's), for task metrics."""
    kind: str = PROMPTS_FORMAT
    formats: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    identical: list[str] = field(default_factory=list)
    source_weights: dict[str, float] = field(default_factory=dict)

    @property
    def eval_samples(self) -> list[Sample]:
        """Held-out prompts with their reference answer as the reply (when the rows have one): what task metrics
        compare generations against."""
        if self.reference_column is None:
            return []
        return [Sample(row.where, [*row.prompt, {"role": "assistant", "content": _text(row.columns[column])}],
                       source=row.source)
                for row in self.eval if (column := self.reference_column) in row.columns]

    @property
    def fingerprint(self) -> str:
        """Identifies the training rows in order; a resumed run must see the same ones to continue exactly."""
        digest = hashlib.sha256()
        for row in self.train:
            digest.update(np.asarray(row.prompt_ids, np.int64).tobytes())
            digest.update(json.dumps(row.columns, sort_keys=True, default=str).encode())
        return digest.hexdigest()

    @property
    def stats(self) -> dict[str, object]:
        prompts = sorted(len(r.prompt_ids) for r in self.train)
        completion = self.train.completion_tokens
        return {
            "kind": self.kind,
            "train_rows": len(self.train),
            "eval_rows": len(self.eval),
            "train_samples": len(self.train),
            "eval_samples": len(self.eval),
            "train_tokens": sum(prompts),
            # Completions are what GRPO trains; at their longest they are this share of each sequence.
            "trainable_fraction": completion / (completion + (sum(prompts) / max(1, len(prompts)))),
            "max_length_seen": prompts[-1] if prompts else 0,
            "median_length": prompts[len(prompts) // 2] if prompts else 0,
            "dropped_rows": len(self.dropped),
            "formats": self.formats,
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
                        check: RowCheck = lambda row: None, reference_column: str | None = None) -> PreparedPrompts:
    """Read, validate, split and tokenise prompt-only data with the same sources, weights and seeded split as
    every other kind. Raises DataError listing every bad row (file:line: why)."""
    kind = data_kind(config)
    if kind != PROMPTS_FORMAT:
        raise DataError(f"grpo trains on prompt-only rows (a 'prompt' column and no reply), but the data holds "
                        f"{kind} rows; set data.format: prompts to read a prompt column alone", where="data.train")
    renderer = checked_renderer(tokenizer, config.chat_template)
    problems: list[str] = []
    prepared = PreparedPrompts(train=PromptList(completion_tokens=completion_tokens), eval=[],
                               reference_column=reference_column)
    train_rows: list[PromptRow] = []
    eval_rows: list[PromptRow] = []
    for source in train_sources(config):
        rows = _load(source.path, config, problems, prepared)
        prepared.source_weights[Path(str(source.path)).stem] = source.weight
        train_part, eval_part = (rows, []) if config.eval is not None else split_samples(rows, config.eval_split, seed)
        train_rows += weighted(train_part, source.weight, seed)
        eval_rows += eval_part
    if config.eval is not None:
        eval_rows += _load(config.eval, config, problems, prepared)
    unique = {id(row): row for row in train_rows + eval_rows}  # weighted sources repeat rows: check each once
    kept = {key for key, row in unique.items()
            if _fits(row, renderer, config, completion_tokens, check, problems, prepared)}
    prepared.train.extend(row for row in train_rows if id(row) in kept)
    prepared.eval = [row for row in eval_rows if id(row) in kept]
    raise_problems(problems)
    if not prepared.train:
        raise DataError("no training prompts left after validation", where="data.train")
    return prepared


def _load(path, config: DataConfig, problems: list[str], prepared: PreparedPrompts) -> list[PromptRow]:
    records, fmt, why, _ = read_file_rows(path, config.format, problems, columns=config.columns)
    if records and fmt != PROMPTS_FORMAT:
        raise DataError(f"rows are '{fmt}' data ({why}), not prompt-only rows (a 'prompt' column)", where=str(path))
    prepared.formats[str(path)] = f"{fmt} ({why})"
    return convert_rows(records, lambda r: to_prompt_row(r, config.system_prompt), path, problems, config.columns)


def _fits(row: PromptRow, renderer: ChatRenderer, config: DataConfig, completion_tokens: int, check: RowCheck,
          problems: list[str], prepared: PreparedPrompts) -> bool:
    """Tokenise the row's prompt; False (with the reason filed) when it is invalid or too long."""
    problem = check(row)
    if problem:
        problems.append(f"{row.where}: {problem}")
        return False
    try:
        _, row.prompt_ids = tokenize_prompt(row.prompt, renderer)
    except TemplateError as err:
        problems.append(f"{row.where}: {err}")
        return False
    room = config.max_length - completion_tokens
    if len(row.prompt_ids) <= room:
        return True
    why = (f"the prompt has {len(row.prompt_ids)} tokens; with objective.max_new_tokens={completion_tokens} "
           f"that exceeds data.max_length={config.max_length}")
    if config.overlong == "error":
        problems.append(f"{row.where}: {why} (data.overlong=error)")
        return False
    prepared.dropped.append(f"{row.where}: {why}; dropped (prompts are never cut)")
    return False


def _text(value: Any) -> str:
    """A reference value as the text task metrics compare (JSON for objects and lists)."""
    return value if isinstance(value, str) else json.dumps(value)
