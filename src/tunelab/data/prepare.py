"""The whole data pipeline before training: read, validate, split, mix, template and tokenise. Every bad row is
reported at once, by file and line, in one DataError.

Each data file is streamed through validation and tokenisation into memory-mapped Arrow tables (cached on disk,
see data/cache.py), so a file larger than memory trains with bounded memory. Splitting and mixing then pick
rows of those tables by index; they run the same way on every run, cache hit or not.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from tunelab.config import DataConfig, DataSource
from tunelab.data.arrow_store import SampleView, TokenizedView, TokenTable
from tunelab.data.batching import sample_lengths
from tunelab.data.cache import tokenized_file
from tunelab.data.columns import explain, rename_columns
from tunelab.data.formats import (  # noqa: F401 - file_format and needs_pair_objective are used from here
    OBJECTIVE_FORMATS,
    RowError,
    Sample,
    file_format,
    needs_pair_objective,
    to_sample,
)
from tunelab.data.layouts import layout_columns
from tunelab.data.sources import read_records, source_name
from tunelab.data.template import ChatRenderer, TokenizedSample, checked_renderer
from tunelab.data.template_check import TRAIN_CHECK_SAMPLES, verify_before_training
from tunelab.data.tokenize import MAX_LISTED, Problems, tokenize_sample
from tunelab.errors import DataError

_MAX_LISTED = MAX_LISTED
T = TypeVar("T")


@dataclass
class PreparedData:
    """Tokenised train and eval sets plus what a user should know about them."""

    train: Sequence[TokenizedSample]
    """In training order (mixing weights applied); a TokenizedView over memory-mapped tables."""
    eval: Sequence[TokenizedSample]
    eval_samples: Sequence[Sample]
    """Held-out samples in canonical form, for generation-based evaluation."""
    formats: dict[str, str] = field(default_factory=dict)
    """Detected format (and why) per data file."""
    truncated: list[str] = field(default_factory=list)
    """The first notes on truncated samples (all of them are counted in `truncated_count`)."""
    dropped: list[str] = field(default_factory=list)
    source_weights: dict[str, float] = field(default_factory=dict)
    truncated_count: int = 0
    dropped_count: int = 0
    cache: dict[str, str] = field(default_factory=dict)
    """Per data file: `hit` (tokenised rows read from the cache), `miss` (tokenised now and cached) or `off`."""

    @property
    def tokenized_cache(self) -> str:
        return tokenized_cache_status(self.cache)

    @property
    def fingerprint(self) -> str:
        """Identifies the training rows in order; a resumed run must see the same ones to continue exactly."""
        digest = getattr(self.train, "digest", None)
        return digest() if digest else ""

    @property
    def stats(self) -> dict[str, object]:
        lengths = np.sort(sample_lengths(self.train))
        trained = getattr(self.train, "trained_counts", None)
        trainable = int(trained.sum()) if trained is not None else sum(s.trainable_tokens for s in self.train)
        total = int(lengths.sum())
        return {
            "train_samples": len(self.train),
            "eval_samples": len(self.eval),
            "train_tokens": total,
            "trainable_tokens": trainable,
            "trainable_fraction": round(trainable / total, 4) if total else 0.0,
            "max_length_seen": int(lengths[-1]) if len(lengths) else 0,
            "median_length": int(lengths[len(lengths) // 2]) if len(lengths) else 0,
            "truncated_samples": self.truncated_count,
            "dropped_samples": self.dropped_count,
            "formats": self.formats,
            "tokenized_cache": self.tokenized_cache,
        }


def train_sources(config: DataConfig) -> list[DataSource]:
    if isinstance(config.train, list):
        return config.train
    return [DataSource(path=config.train)]


def load_samples(
    path: Path,
    fmt: str,
    system_prompt: str | None,
    problems: list[str],
    *,
    skip_unreadable: bool = False,
    columns: dict[str, str] | None = None,
) -> tuple[list[Sample], str, str, int]:
    """(canonical samples, format, why that format, rows in the file). Rows that cannot become samples go to
    `problems` as `file:line: why`; unreadable lines raise, or with `skip_unreadable` go there too. `columns` is
    data.columns (file columns read as tunelab's fields)."""
    records, fmt, why, rows, columns = read_file_rows(path, fmt, problems, skip_unreadable=skip_unreadable,
                                                     columns=columns)
    if records and fmt in OBJECTIVE_FORMATS:
        raise DataError(needs_pair_objective(fmt, why), where=str(path))
    return convert_rows(records, lambda r: to_sample(r, fmt, system_prompt), path, problems, columns), fmt, why, rows


def read_file_rows(path: Path, fmt: str, problems: list[str], *, skip_unreadable: bool = False,
                   columns: dict[str, str] | None = None):
    """(records with data.columns applied, format, why that format, rows in the file, the column mapping used:
    data.columns or one inferred from a known layout, see layouts.py): the reading every objective's loader
    shares. Raises DataError for a file without rows."""
    already = len(problems)
    raw = read_records(path, problems if skip_unreadable else None)
    columns, layout = layout_columns([r.row for r in raw[:20]], columns, fmt, str(path))
    records = rename_columns(raw, columns, path)
    rows = len(records) + len(problems) - already
    if not rows:
        raise DataError("file holds no rows", where=str(path))
    fmt, why = file_format(records, fmt, path)
    return records, fmt, layout or why, rows, columns


def convert_rows(records, convert, path: Path, problems: list[str], columns: dict[str, str] | None) -> list:
    """Each record through `convert` (to a sample, pair or feedback row) tagged with its source; rows that
    cannot convert go to `problems` as `file:line: why`."""
    out = []
    for record in records:
        try:
            row = convert(record)
        except RowError as err:
            problems.append(f"{record.where}: {explain(str(err), columns)}")
            continue
        row.source = source_name(path)
        out.append(row)
    return out


def split_indices(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) positions of a seeded split of `count` samples, each in file order; at least one eval
    sample when a fraction is asked for. The shuffle is Python's, so splits match earlier tunelab versions."""
    everything = np.arange(count, dtype=np.int64)
    if fraction <= 0 or count < 2:
        return everything, everything[:0]
    order = list(range(count))
    random.Random(seed).shuffle(order)
    held = np.zeros(count, bool)
    held[np.asarray(order[: max(1, round(count * fraction))], np.int64)] = True
    return everything[~held], everything[held]


def split_samples(samples: list[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """A seeded train/eval split; at least one eval sample when a fraction is asked for. Row kinds of every
    objective (SFT samples, preference pairs, feedback) split the same way."""
    train_ids, eval_ids = split_indices(len(samples), fraction, seed)
    if not len(eval_ids):
        return samples, []
    return [samples[i] for i in train_ids], [samples[i] for i in eval_ids]


def weighted_indices(ids: np.ndarray, weight: float, seed: int) -> np.ndarray:
    """A source's rows repeated (weight > 1) or subsampled (weight < 1) for multi-task mixing."""
    if weight == 1 or not len(ids):
        return ids
    whole, part = divmod(weight, 1)
    extra = round(len(ids) * part)
    picked = random.Random(seed + 1).sample(range(len(ids)), extra)
    return np.concatenate([np.tile(ids, int(whole)), ids[np.asarray(picked, np.int64)]])


@dataclass
class SplitTables:
    """The tables of every data file, and which of their rows train (weighted, in training order) and which are
    held out, as (table number, row ids) parts: what every objective's data is split into."""

    tables: list = field(default_factory=list)
    train: list[tuple[int, np.ndarray]] = field(default_factory=list)
    eval: list[tuple[int, np.ndarray]] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)
    source_weights: dict[str, float] = field(default_factory=dict)
    cache: dict[str, str] = field(default_factory=dict)


def split_tables(config: DataConfig, seed: int, read: Callable, count: Callable = lambda table: table.num_rows
                 ) -> SplitTables:
    """Read every file named by `config` with `read(path, format) -> (table or None, cache status)` and split
    its `count(table)` rows: a seeded eval_split of each training file (or data.eval whole), mixing weights
    applied to the training part. Files with invalid rows give None and are left out (their problems are the
    caller's to raise)."""
    split = SplitTables()
    files = [(s.path, s.format or config.format, s.weight, config.eval is None) for s in train_sources(config)]
    if config.eval is not None:
        files.append((config.eval, config.format, None, False))
    for path, fmt, weight, held_out in files:
        table, status = read(path, fmt)
        split.cache[str(path)] = status
        if weight is not None:
            split.source_weights[source_name(path)] = weight
        if table is None:
            continue
        split.formats[str(path)] = f"{table.meta['format']} ({table.meta['format_reason']})"
        rows = count(table)
        if held_out:
            train_ids, eval_ids = split_indices(rows, config.eval_split, seed)
        elif weight is not None:
            train_ids, eval_ids = np.arange(rows), np.zeros(0, np.int64)
        else:  # the data.eval file
            train_ids, eval_ids = np.zeros(0, np.int64), np.arange(rows)
        number = len(split.tables)
        split.tables.append(table)
        if weight is not None:
            split.train.append((number, weighted_indices(train_ids, weight, seed)))
        split.eval.append((number, eval_ids))
    return split


def tokenized_cache_status(cache: dict[str, str]) -> str:
    """One word for the run: `hit` or `off` when every file agrees, else `miss` (something was tokenised now)."""
    statuses = set(cache.values())
    return next(iter(statuses)) if len(statuses) == 1 else "miss" if "miss" in statuses else "off"


def prepare_data(config: DataConfig, tokenizer, seed: int) -> PreparedData:
    """Read, validate, split and tokenise all data named by `config`. Raises DataError listing every bad
    row (missing fields, empty text, wrong roles, over-long samples, samples with nothing to train)."""
    problems = Problems()
    renderer = checked_renderer(tokenizer, config.chat_template)
    split = split_tables(
        config, seed, lambda path, fmt: tokenized_file(path, fmt, config, renderer, problems, use_cache=config.cache),
        count=lambda table: table.num_samples)
    raise_problems(problems)
    tables = split.tables
    prepared = PreparedData(
        train=TokenizedView(tables, [(n, tables[n].units_of(ids)) for n, ids in split.train]),
        eval=TokenizedView(tables, [(n, tables[n].units_of(ids)) for n, ids in split.eval]),
        eval_samples=SampleView(tables, [(n, tables[n].with_messages(ids)) for n, ids in split.eval]),
        formats=split.formats, source_weights=split.source_weights, cache=split.cache)
    for table in tables:
        prepared.truncated += table.notes("truncated")[: MAX_LISTED - len(prepared.truncated)]
        prepared.dropped += table.notes("dropped")[: MAX_LISTED - len(prepared.dropped)]
        prepared.truncated_count += table.meta["truncated"]
        prepared.dropped_count += table.meta["dropped"]
    if not prepared.train:
        raise nothing_left("samples", {"dropped": (prepared.dropped_count, prepared.dropped)})
    # Token-level agreement with `generate` and the mask of every turn, on a seeded sample of conversations.
    verify_before_training(_check_sample(tables, seed), renderer, config.train_on, seed)
    return prepared


def _check_sample(tables: list[TokenTable], seed: int) -> list[Sample]:
    """A seeded handful of conversations from every file, for the template check (built without reading the
    rest, so large data stays on disk)."""
    chats = [(number, table.with_messages(np.arange(table.num_samples))) for number, table in enumerate(tables)]
    total = sum(len(ids) for _, ids in chats)
    if not total:
        return []
    picked = np.zeros(total, bool)
    picked[random.Random(seed).sample(range(total), min(total, TRAIN_CHECK_SAMPLES))] = True
    parts, at = [], 0
    for number, ids in chats:
        parts.append((number, ids[picked[at : at + len(ids)]]))
        at += len(ids)
    return list(SampleView(tables, parts))


def prepare_eval_file(path: Path, config: DataConfig, tokenizer) -> tuple[list[TokenizedSample], list[Sample]]:
    """A whole file as an evaluation set: tokenised samples for loss, canonical samples for generation."""
    problems: list[str] = []
    renderer = ChatRenderer(tokenizer, config.chat_template)
    samples, _, _, _ = load_samples(path, config.format, config.system_prompt, problems, columns=config.columns)
    tokenized: list[TokenizedSample] = []
    for sample in samples:
        result = tokenize_sample(sample, renderer, config)
        if result.problem:
            problems.append(result.problem)
        tokenized += result.units
    raise_problems(problems)
    return tokenized, [s for s in samples if s.messages]


def raise_problems(problems) -> None:
    """One DataError quoting the first problems (a list or a Problems log) and counting the rest."""
    if len(problems):
        shown = "\n  ".join(list(problems)[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise DataError(f"{len(problems)} invalid row(s):\n  {shown}{more}")


def nothing_left(what: str, left_out: dict[str, tuple[int, list[str]]]) -> DataError:
    """The error for data that validated but left no training rows, saying what took them: `left_out` maps a
    reason to (how many rows it took, the first of them as `file:line: why`)."""
    counted = [f"{count} {reason}" for reason, (count, _) in left_out.items() if count]
    quoted = [line for _, (_, listed) in left_out.items() for line in listed][:3]
    if not counted:
        return DataError(f"no training {what} left: data.eval_split or the sources' weights left none for "
                         "training", where="data.train")
    shown = "".join(f"\n  {line}" for line in quoted)
    return DataError(f"no training {what} left after validation: {', '.join(counted)}{shown}", where="data.train")


def weighted(samples: list[T], weight: float, seed: int) -> list[T]:
    """A list of rows (any objective's) repeated or subsampled exactly as `weighted_indices` picks them."""
    return [samples[i] for i in weighted_indices(np.arange(len(samples)), weight, seed)]
