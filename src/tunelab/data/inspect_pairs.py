"""`tunelab data inspect` for preference pairs and unpaired feedback: what a preference objective would see.

The rows go through the preference pipeline's own steps (read, detect, `to_pair`, `tokenize_row`), so formats,
problems, token counts and masks are exactly what `prepare_preference_data` produces. As for SFT data, bad
rows are listed with file and line and the statistics cover the valid rows; identical pairs (chosen == rejected, or
the same tokens within data.max_length when truncation cuts what tells them apart), which training leaves out, are
listed and left out of the statistics too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunelab.config import DataConfig
from tunelab.data.inspect import FileSummary, LengthStats, RowCounts, length_stats
from tunelab.data.inspect_render import LISTED, token_segments
from tunelab.data.pairs import FeedbackSample, PairRow, PreferencePair
from tunelab.data.preference import TokenizedPair, TokenizedRow, load_pairs, sequences_of, tokenize_row
from tunelab.data.prepare import split_samples, train_sources
from tunelab.data.template import ChatRenderer, TemplateError, checked_renderer


@dataclass
class ShownReply:
    """One reply of a shown row as training sees it: (text, trained) pieces up to data.max_length."""

    name: str
    """`chosen`, `rejected`, or `completion (good)` / `completion (bad)`."""
    segments: list[tuple[str, bool]]
    tokens: int
    """Tokens of the whole sequence, prompt included."""
    cut_tokens: int
    """Tokens beyond data.max_length (truncated or dropped by training, not shown)."""


@dataclass
class ShownPair:
    where: str
    prompt: str
    """The prompt as the model sees it (untrained), shared by the replies."""
    prompt_tokens: int
    replies: list[ShownReply]


@dataclass
class PairInspectReport(RowCounts):
    kind: str
    """`preference` or `feedback`."""
    target: str
    files: list[FileSummary]
    problems: list[str]
    valid_rows: int
    """Valid rows of the training files, identical pairs included."""
    measured_rows: int
    """Rows the token statistics cover: the valid ones, less identical pairs."""
    tokens: dict[str, LengthStats]
    """Per row of the statistics: `prompt`, the trained tokens of each reply (`chosen` and `rejected`, or
    `completion`), and `total`, the row's longest sequence (what data.max_length is checked against)."""
    max_length: int
    overlong: str
    longer_than_max_length: list[str]
    no_room_for_reply: list[str]
    """Of those, rows whose prompt alone fills data.max_length: an error for training even when truncating."""
    identical: list[str]
    """Pairs whose chosen and rejected replies are the same: training leaves them out."""
    duplicates: list[list[str]]
    labels: dict[str, int] | None
    """`good` and `bad` counts of feedback rows; None for preference pairs."""
    eval_source: str | None
    eval_rows: int
    eval_overlap: list[tuple[str, str]]
    """(eval row, training row) with the identical prompt."""
    samples: list[ShownPair]
    lengths: list[int] = field(default_factory=list)
    """Tokens of each sequence (chosen and rejected each count), for the histogram."""
    completion_lengths: list[int] = field(default_factory=list)

    def to_json(self, limit: int = LISTED) -> dict:
        """The report as JSON-serialisable data with stable keys; lists are cut to `limit` entries."""
        return {
            **self.files_json(limit),
            "valid_rows": self.valid_rows,
            "tokens": {"rows": self.measured_rows, **{name: asdict(stats) for name, stats in self.tokens.items()}},
            "max_length": {
                "limit": self.max_length,
                "overlong": self.overlong,
                "longer_rows": len(self.longer_than_max_length),
                "no_room_for_reply": len(self.no_room_for_reply),
                "longer_examples": self.longer_than_max_length[:limit],
                "no_room_examples": self.no_room_for_reply[:limit],
            },
            "identical_pairs": {"rows": len(self.identical), "examples": self.identical[:limit]},
            "duplicates": {"rows": self.duplicate_rows, "groups": self.duplicates[:limit]},
            "labels": self.labels,
            "eval_overlap": {
                "eval": self.eval_source,
                "eval_rows": self.eval_rows,
                "overlapping": len(self.eval_overlap),
                "examples": [{"eval": e, "train": t} for e, t in self.eval_overlap[:limit]],
            },
            "samples": [
                {
                    "where": s.where,
                    "prompt": s.prompt,
                    "prompt_tokens": s.prompt_tokens,
                    "replies": [
                        {
                            "name": r.name,
                            "tokens": r.tokens,
                            "cut_tokens": r.cut_tokens,
                            "segments": [{"text": text, "trained": trained} for text, trained in r.segments],
                        }
                        for r in s.replies
                    ],
                }
                for s in self.samples
            ],
        }


@dataclass
class _Measured:
    row: PairRow
    tokenized: TokenizedRow


def _identical_in_training(measured: _Measured, config: DataConfig) -> bool:
    """Whether training leaves the pair out as identical: the same replies, or (data.overlong truncate) the same
    tokens within data.max_length, where the replies differ only beyond it (data/preference.py)."""
    row, tokenized = measured.row, measured.tokenized
    if not isinstance(row, PreferencePair):
        return False
    if row.identical:
        return True
    if config.overlong != "truncate" or not isinstance(tokenized, TokenizedPair):
        return False
    limit = config.max_length
    chosen, rejected = tokenized.chosen, tokenized.rejected
    return (tokenized.prompt_length < limit and chosen.input_ids[:limit] == rejected.input_ids[:limit]
            and chosen.labels[:limit] == rejected.labels[:limit])


def inspect_pairs(
    target: Path | str, config: DataConfig, seed: int, *, tokenizer, samples_to_show: int = 2
) -> PairInspectReport:
    """The preference/feedback report for the data `config` names (see `inspect.inspect_data`)."""
    renderer = checked_renderer(tokenizer, config.chat_template)
    files: list[FileSummary] = []
    problems: list[str] = []
    train_rows: list[list[PairRow]] = []
    measured: list[_Measured] = []
    kind = "preference"
    for source in train_sources(config):
        rows, kind, file_measured, summary = _load(
            source.path, source.format or config.format, "train", config, renderer, problems
        )
        files.append(summary)
        train_rows.append(rows)
        measured += file_measured
    eval_rows: list[PairRow] | None = None
    if config.eval is not None:
        eval_rows, _, _, summary = _load(config.eval, config.format, "eval", config, renderer, problems)
        files.append(summary)
    limit = config.max_length
    identical = [m.row.where for m in measured if _identical_in_training(m, config)]
    counted = [m for m in measured if not _identical_in_training(m, config)]
    longer = [m for m in counted if max(len(s.input_ids) for s in sequences_of(m.tokenized)) > limit]
    eval_source, eval_count, overlap = _eval_overlap(train_rows, eval_rows, config, seed)
    feedback = [m.row for m in counted if isinstance(m.row, FeedbackSample)]
    return PairInspectReport(
        kind=kind,
        target=str(target),
        files=files,
        problems=problems,
        valid_rows=sum(len(rows) for rows in train_rows),
        measured_rows=len(counted),
        tokens=_token_stats(counted, kind),
        max_length=limit,
        overlong=config.overlong,
        longer_than_max_length=[m.row.where for m in longer],
        no_room_for_reply=[m.row.where for m in longer if m.tokenized.prompt_length >= limit],
        identical=identical,
        duplicates=_duplicates([row for rows in train_rows for row in rows]),
        labels={"good": sum(r.label for r in feedback), "bad": sum(not r.label for r in feedback)}
        if kind == "feedback"
        else None,
        eval_source=eval_source,
        eval_rows=eval_count,
        eval_overlap=overlap,
        samples=[_shown(m, renderer, limit) for m in counted[:samples_to_show]],
        lengths=[len(s.input_ids) for m in counted for s in sequences_of(m.tokenized)],
        completion_lengths=[s.trainable_tokens for m in counted for s in sequences_of(m.tokenized)],
    )


def _load(
    path: Path, fmt: str, role: str, config: DataConfig, renderer: ChatRenderer, problems: list[str]
) -> tuple[list[PairRow], str, list[_Measured], FileSummary]:
    """A file's valid rows, its format, its rows tokenised, and its summary (invalid rows of both steps)."""
    before = len(problems)
    rows, fmt, why, count = load_pairs(path, fmt, config.system_prompt, problems, skip_unreadable=True,
                                       columns=config.columns)
    measured = _measure(rows, renderer, problems)
    return rows, fmt, measured, FileSummary(str(path), role, fmt, why, count, len(problems) - before)


def _measure(rows: list[PairRow], renderer: ChatRenderer, problems: list[str]) -> list[_Measured]:
    """Each row tokenised as training does; rows the template cannot express go to `problems`."""
    measured = []
    for row in rows:
        try:
            measured.append(_Measured(row, tokenize_row(row, renderer)))
        except TemplateError as err:
            problems.append(f"{row.where}: {err}")
    return measured


def _token_stats(measured: list[_Measured], kind: str) -> dict[str, LengthStats]:
    names = ["chosen", "rejected"] if kind == "preference" else ["completion"]
    stats = {"prompt": length_stats([m.tokenized.prompt_length for m in measured])}
    for i, name in enumerate(names):
        stats[name] = length_stats([sequences_of(m.tokenized)[i].trainable_tokens for m in measured])
    stats["total"] = length_stats([max(len(s.input_ids) for s in sequences_of(m.tokenized)) for m in measured])
    return stats


def _shown(measured: _Measured, renderer: ChatRenderer, limit: int) -> ShownPair:
    tokenized = measured.tokenized
    if isinstance(tokenized, TokenizedPair):
        names = ["chosen", "rejected"]
    else:
        names = [f"completion ({'good' if tokenized.label else 'bad'})"]
    sequences = sequences_of(tokenized)
    start = tokenized.prompt_length
    prompt = renderer.tokenizer.decode(sequences[0].input_ids[: min(start, limit)])
    replies = [
        ShownReply(
            name,
            token_segments(renderer.tokenizer, s.input_ids[start:limit], s.labels[start:limit]),
            len(s.input_ids),
            max(0, len(s.input_ids) - limit),
        )
        for name, s in zip(names, sequences, strict=True)
    ]
    return ShownPair(tokenized.where, prompt, start, replies)


def _canonical(row: PairRow) -> str:
    if isinstance(row, PreferencePair):
        return json.dumps([row.prompt, row.chosen, row.rejected], sort_keys=True, ensure_ascii=False)
    return json.dumps([row.prompt, row.completion, row.label], sort_keys=True, ensure_ascii=False)


def _duplicates(rows: list[PairRow]) -> list[list[str]]:
    groups: dict[str, list[str]] = {}
    for row in rows:
        groups.setdefault(_canonical(row), []).append(row.where)
    return [wheres for wheres in groups.values() if len(wheres) > 1]


def _eval_overlap(
    train_rows: list[list[PairRow]], eval_rows: list[PairRow] | None, config: DataConfig, seed: int
) -> tuple[str | None, int, list[tuple[str, str]]]:
    """Eval rows whose prompt also appears in training, with the eval set chosen the way training does."""
    if eval_rows is not None:
        train = [row for rows in train_rows for row in rows]
        held_out, source = eval_rows, str(config.eval)
    elif config.eval_split > 0:
        train, held_out = [], []
        for rows in train_rows:
            train_part, eval_part = split_samples(rows, config.eval_split, seed)
            train += train_part
            held_out += eval_part
        source = f"data.eval_split={config.eval_split}, seed {seed}"
    else:
        return None, 0, []
    first_seen: dict[str, str] = {}
    for row in train:
        first_seen.setdefault(json.dumps(row.prompt, sort_keys=True), row.where)
    keys = [(row.where, json.dumps(row.prompt, sort_keys=True)) for row in held_out]
    return source, len(held_out), [(where, first_seen[key]) for where, key in keys if key in first_seen]
