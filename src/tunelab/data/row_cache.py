"""Read, validate and tokenise one data file of objective rows (preference pairs, feedback, prompts) into a
RowTable, once: cached beside the SFT tables (data/cache.py, same key material plus the objective's own
settings), memory-mapped on later runs, streamed so a file larger than memory builds in bounded memory.

Each kind gives two functions: `convert(record) -> canonical row` (raises RowError) and `tokenize(row) ->
RowTokens` (what the row became, or why it was left out); everything else (format checks, problems by file and
line, notes, the entry appearing whole or not at all) is shared here.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.config import DataConfig
from tunelab.data.cache import DATA_VERSION, cache_key, cached_table, streamed_rows
from tunelab.data.columns import explain
from tunelab.data.formats import RowError
from tunelab.data.row_table import RowTable, RowTableWriter
from tunelab.data.sources import Record
from tunelab.data.template import ChatRenderer, TokenizedSample
from tunelab.data.tokenize import MAX_LISTED
from tunelab.errors import DataError

NOTE_KINDS = ("truncated", "dropped", "identical")


@dataclass
class RowTokens:
    """What one canonical row became: its JSON form and token sequences, or a problem, or a note on why it was
    changed (truncated) or left out (dropped, identical)."""

    row: dict | None = None
    prompt_length: int = 0
    sequences: list[TokenizedSample] = field(default_factory=list)
    problem: str | None = None
    notes: dict[str, str] = field(default_factory=dict)


@dataclass
class RowKind:
    """How one kind of objective row is read: the formats a file may hold, and the two functions."""

    name: str
    formats: tuple[str, ...]
    wrong_format: Callable[[str, str], str]
    """(format found, why) -> the message for a file of another kind."""
    convert: Callable[[Record, str], object]
    """(record, format) -> canonical row; raises RowError."""
    tokenize: Callable[[object], RowTokens]
    key: dict = field(default_factory=dict)
    """Settings of the objective that change what rows become (completion room, checked columns): cache key."""


def tokenized_rows(path: Path | str, fmt: str, kind: RowKind, config: DataConfig, renderer: ChatRenderer,
                   problems: list[str], *, use_cache: bool = True) -> tuple[RowTable | None, str]:
    """The table of one file's rows and how it was got (`hit` | `miss` | `off`); None when the file holds invalid
    rows (added to `problems`)."""
    name = str(path)
    key = material = None
    if use_cache:
        pinned, parts = cache_key(path, fmt, config, renderer)
        material = {**parts, "rows": {"kind": kind.name, **kind.key}}
        if pinned is not None:
            key = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return cached_table(
        name, key, material,
        build=lambda folder: _build(path, fmt, kind, config, problems, folder),
        from_built=lambda rows, meta: RowTable(rows, meta, name),
        from_entry=lambda entry, meta: RowTable(entry / "rows.arrow", meta, name),
    )


def _build(path, fmt: str, kind: RowKind, config: DataConfig, problems: list[str], folder: Path | None):
    """Stream the file's rows through validation and tokenisation into a RowTableWriter. Returns (rows, meta) or
    None when a row was invalid."""
    name = str(path)
    already = len(problems)
    head, records, fmt, why, columns = streamed_rows(path, fmt, config.columns, problems)
    if head and fmt not in kind.formats:
        raise DataError(kind.wrong_format(fmt, why), where=name)
    writer = RowTableWriter(name, folder)
    notes: dict[str, list[str]] = {note: [] for note in NOTE_KINDS}
    counts = dict.fromkeys(NOTE_KINDS, 0)
    readable = invalid = 0
    for record in itertools.chain(head, records):
        readable += 1
        try:
            row = kind.convert(record, fmt)
        except RowError as err:
            invalid += 1
            problems.append(f"{record.where}: {explain(str(err), columns)}")
            continue
        result = kind.tokenize(row)
        if result.problem:
            invalid += 1
            problems.append(f"{record.where}: {result.problem}")
            continue
        for note, text in result.notes.items():
            counts[note] += 1
            if len(notes[note]) < MAX_LISTED:
                notes[note].append(f"{record.where[len(name):]}: {text}")
        if result.row is not None:
            writer.add(record.where, result.row, result.prompt_length, result.sequences)
    unreadable = len(problems) - already - invalid
    if not readable + unreadable:
        raise DataError("file holds no rows", where=name)
    if len(problems) > already:
        return None
    rows = writer.finish()
    meta = {
        "version": DATA_VERSION,
        "format": fmt,
        "format_reason": why,
        "kind": kind.name,
        "rows": readable + unreadable,
        "kept": writer.num_rows,
        "rows_sha256": writer.digest.hexdigest(),
        **counts,
        **{f"{note}_notes": listed for note, listed in notes.items()},
    }
    return rows, meta
