"""`tunelab data inspect` for prompt-only rows (GRPO): what a GRPO run would sample completions for.

Rows go through the prompt pipeline's own steps (read, detect, `to_prompt_row`, `tokenize_prompt`), so formats,
problems and token counts are what `prepare_prompt_data` produces. Prompts are never cut in training, so the
report counts those that leave no room for the completion (`objective.max_new_tokens`, from a run config) and
lists the other columns with how many rows carry each: what rewards can read.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunelab.config import DataConfig
from tunelab.data.inspect import FileSummary, LengthStats, RowCounts, length_stats
from tunelab.data.inspect_render import LISTED
from tunelab.data.preference import tokenize_prompt
from tunelab.data.prepare import convert_rows, read_file_rows, split_samples, train_sources
from tunelab.data.prompts import PromptRow, to_prompt_row
from tunelab.data.template import ChatRenderer, TemplateError, checked_renderer


@dataclass
class ShownPrompt:
    where: str
    prompt: str
    """The prompt as the model sees it, generation prompt included."""
    prompt_tokens: int
    columns: dict


@dataclass
class PromptInspectReport(RowCounts):
    target: str
    files: list[FileSummary]
    problems: list[str]
    valid_rows: int
    tokens: dict[str, LengthStats]
    """`prompt`: tokens of each valid training prompt."""
    max_length: int
    overlong: str
    completion_tokens: int
    """Room each prompt must leave within max_length (objective.max_new_tokens; 0 when not known)."""
    too_long: list[str]
    """Prompts with no room for the completion: dropped, or an error under data.overlong: error."""
    columns: dict[str, int]
    """Every other column and how many training rows carry a value in it."""
    duplicates: list[list[str]]
    eval_source: str | None
    eval_rows: int
    eval_overlap: list[tuple[str, str]]
    samples: list[ShownPrompt]
    lengths: list[int] = field(default_factory=list)
    completion_lengths: list[int] = field(default_factory=list)
    kind: str = "prompts"

    def to_json(self, limit: int = LISTED) -> dict:
        return {
            **self.files_json(limit),
            "valid_rows": self.valid_rows,
            "tokens": {"rows": self.valid_rows, **{name: asdict(s) for name, s in self.tokens.items()}},
            "max_length": {"limit": self.max_length, "overlong": self.overlong,
                           "completion_tokens": self.completion_tokens, "too_long_rows": len(self.too_long),
                           "too_long_examples": self.too_long[:limit]},
            "columns": self.columns,
            "duplicates": {"rows": self.duplicate_rows, "groups": self.duplicates[:limit]},
            "eval_overlap": {"eval": self.eval_source, "eval_rows": self.eval_rows,
                             "overlapping": len(self.eval_overlap),
                             "examples": [{"eval": e, "train": t} for e, t in self.eval_overlap[:limit]]},
            "samples": [asdict(s) for s in self.samples],
        }


def inspect_prompts(target: Path | str, config: DataConfig, seed: int, *, tokenizer, samples_to_show: int = 2,
                    completion_tokens: int = 0) -> PromptInspectReport:
    """The prompt-only report for the data `config` names (see `inspect.inspect_data`)."""
    renderer = checked_renderer(tokenizer, config.chat_template)
    files: list[FileSummary] = []
    problems: list[str] = []
    train_rows: list[list[PromptRow]] = []
    measured: list[tuple[PromptRow, int]] = []
    for source in train_sources(config):
        rows, file_measured, summary = _load(source.path, source.format or config.format, "train", config,
                                             renderer, problems)
        files.append(summary)
        train_rows.append(rows)
        measured += file_measured
    eval_rows: list[PromptRow] | None = None
    if config.eval is not None:
        eval_rows, _, summary = _load(config.eval, config.format, "eval", config, renderer, problems)
        files.append(summary)
    room = config.max_length - completion_tokens
    fits = {id(row) for row, length in measured if length <= room}
    kept = [[row for row in rows if id(row) in fits] for rows in train_rows]  # training splits what it keeps
    columns: Counter[str] = Counter()
    for row, _ in measured:
        columns.update(key for key, value in row.columns.items() if value is not None)
    return PromptInspectReport(
        target=str(target),
        files=files,
        problems=problems,
        valid_rows=len(measured),
        tokens={"prompt": length_stats([length for _, length in measured])},
        max_length=config.max_length,
        overlong=config.overlong,
        completion_tokens=completion_tokens,
        too_long=[row.where for row, length in measured if length > room],
        columns=dict(columns.most_common()),
        duplicates=_duplicates([row for rows in train_rows for row in rows]),
        **_eval_overlap(kept, eval_rows, config, seed),
        samples=[ShownPrompt(row.where, renderer.prompt(row.prompt), length, row.columns)
                 for row, length in measured[:samples_to_show]],
        lengths=[length for _, length in measured],
        completion_lengths=[completion_tokens] * len(measured),
    )


def _load(path, fmt: str, role: str, config: DataConfig, renderer: ChatRenderer, problems: list[str]):
    """A file's valid rows, each with its prompt's token count, and its summary."""
    before = len(problems)
    records, fmt, why, count, _ = read_file_rows(path, fmt, problems, skip_unreadable=True, columns=config.columns)
    rows = convert_rows(records, lambda r: to_prompt_row(r, config.system_prompt), path, problems, config.columns)
    measured = []
    for row in rows:
        try:
            measured.append((row, len(tokenize_prompt(row.prompt, renderer)[1])))
        except TemplateError as err:
            problems.append(f"{row.where}: {err}")
    return rows, measured, FileSummary(str(path), role, fmt, why, count, len(problems) - before)


def _duplicates(rows: list[PromptRow]) -> list[list[str]]:
    groups: dict[str, list[str]] = {}
    for row in rows:
        groups.setdefault(json.dumps(row.prompt, sort_keys=True), []).append(row.where)
    return [wheres for wheres in groups.values() if len(wheres) > 1]


def _eval_overlap(train_rows: list[list[PromptRow]], eval_rows: list[PromptRow] | None, config: DataConfig,
                  seed: int) -> dict:
    """Eval prompts that also appear in training, with the eval set chosen the way training does."""
    if eval_rows is not None:
        train, held_out, source = [r for rows in train_rows for r in rows], eval_rows, str(config.eval)
    elif config.eval_split > 0:
        train, held_out = [], []
        for rows in train_rows:
            part, held = split_samples(rows, config.eval_split, seed)
            train += part
            held_out += held
        source = f"data.eval_split={config.eval_split}, seed {seed}"
    else:
        return {"eval_source": None, "eval_rows": 0, "eval_overlap": []}
    first_seen: dict[str, str] = {}
    for row in train:
        first_seen.setdefault(json.dumps(row.prompt, sort_keys=True), row.where)
    overlap = [(row.where, first_seen[key]) for row in held_out
               if (key := json.dumps(row.prompt, sort_keys=True)) in first_seen]
    return {"eval_source": source, "eval_rows": len(held_out), "eval_overlap": overlap}
