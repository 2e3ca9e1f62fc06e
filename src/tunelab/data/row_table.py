"""Tokenised rows of the non-SFT objectives (preference pairs, feedback, prompts) as one Arrow IPC table per
data file, written in chunks and read memory-mapped, as arrow_store.py does for SFT samples.

A row keeps its canonical form as JSON (prompt messages, replies, label, other columns: what generation-based
evaluation and rewards read) and up to two token sequences (a pair's chosen and rejected; a feedback row's
reply; a prompt alone), each with the mask of its trained tokens. Rows become Python objects one at a time,
when a batch asks for them, through the `decode` function of their kind.

`where` is stored without the file name and put back on reading, so a moved file with the same content reuses
its table.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from tunelab.data.arrow_store import _IpcSink, _numpy, _Parts, _PartsView, _read_ipc
from tunelab.data.sources import source_name
from tunelab.data.template import IGNORE_INDEX, TokenizedSample

CHUNK_ROWS = 1024

ROWS_SCHEMA = pa.schema(
    [
        ("where", pa.string()),
        ("row", pa.string()),
        ("prompt_length", pa.int32()),
        ("first", pa.list_(pa.int32())),
        ("first_trained", pa.list_(pa.bool_())),
        ("second", pa.list_(pa.int32())),
        ("second_trained", pa.list_(pa.bool_())),
        ("longest", pa.int32()),
        ("tokens", pa.int32()),
        ("trained", pa.int32()),
    ]
)


class RowTableWriter:
    """Appends one file's rows, flushing every CHUNK_ROWS, and hashes rows and tokens as it goes."""

    def __init__(self, name: str, folder: Path | None) -> None:
        self.name = name
        self.sink = _IpcSink(folder / "rows.arrow" if folder else None, ROWS_SCHEMA)
        self.digest = hashlib.sha256()
        self.num_rows = 0
        self._pending: list[tuple[str, str, int, list[TokenizedSample]]] = []

    def add(self, where: str, row: dict, prompt_length: int, sequences: list[TokenizedSample]) -> None:
        if not where.startswith(self.name):
            raise ValueError(f"row location {where!r} does not start with the file name {self.name!r}")
        text = json.dumps(row, ensure_ascii=False, sort_keys=True, default=str)
        self.digest.update(text.encode())
        for sequence in sequences:
            self.digest.update(np.asarray(sequence.input_ids, np.int64).tobytes())
            self.digest.update(np.asarray(sequence.labels, np.int64).tobytes())
        self._pending.append((where[len(self.name) :], text, prompt_length, sequences))
        self.num_rows += 1
        if len(self._pending) >= CHUNK_ROWS:
            self._flush()

    def finish(self) -> Path | pa.Buffer:
        self._flush()
        return self.sink.finish()

    def _flush(self) -> None:
        if not self._pending:
            return
        rows = self._pending
        firsts = [r[3][0] for r in rows]
        seconds = [r[3][1] if len(r[3]) > 1 else None for r in rows]
        every = [r[3] for r in rows]
        self.sink.write([
            pa.array([r[0] for r in rows], pa.string()),
            pa.array([r[1] for r in rows], pa.string()),
            pa.array([r[2] for r in rows], pa.int32()),
            pa.array([s.input_ids for s in firsts], pa.list_(pa.int32())),
            pa.array([[t != IGNORE_INDEX for t in s.labels] for s in firsts], pa.list_(pa.bool_())),
            pa.array([s.input_ids if s else None for s in seconds], pa.list_(pa.int32())),
            pa.array([[t != IGNORE_INDEX for t in s.labels] if s else None for s in seconds], pa.list_(pa.bool_())),
            pa.array([max(len(s.input_ids) for s in seq) for seq in every], pa.int32()),
            pa.array([sum(len(s.input_ids) for s in seq) for seq in every], pa.int32()),
            pa.array([sum(s.trainable_tokens for s in seq) for seq in every], pa.int32()),
        ])
        self._pending = []


class RowTable:
    """One file's tokenised rows, read zero-copy; `meta` holds what reading it learned (format, notes, counts)."""

    def __init__(self, rows: Path | pa.Buffer, meta: dict, name: str) -> None:
        self.table = _read_ipc(rows)
        self.meta = meta
        self.name = name
        self.source = source_name(name)
        self._columns = {field: self.table.column(field) for field in ROWS_SCHEMA.names}
        self._arrays: dict[str, np.ndarray] = {}

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def array(self, field: str) -> np.ndarray:
        """A per-row integer column (prompt_length, longest, tokens, trained) as numpy (read once)."""
        if field not in self._arrays:
            self._arrays[field] = _numpy(self._columns[field], np.int64)
        return self._arrays[field]

    def notes(self, kind: str) -> list[str]:
        """The first truncated / dropped / identical notes, with this file's name."""
        return [self.name + note for note in self.meta[f"{kind}_notes"]]

    def where(self, index: int) -> str:
        return self.name + self._columns["where"][index].as_py()

    def row(self, index: int) -> dict:
        """The canonical row as it was written (JSON)."""
        return json.loads(self._columns["row"][index].as_py())

    def sequences(self, index: int) -> list[TokenizedSample]:
        where = self.where(index)
        out = []
        for ids_field, trained_field in (("first", "first_trained"), ("second", "second_trained")):
            value = self._columns[ids_field][index]
            if not value.is_valid:
                continue
            ids = value.values.to_numpy()
            trained = self._columns[trained_field][index].values.to_numpy(zero_copy_only=False)
            out.append(TokenizedSample(ids.tolist(), np.where(trained, ids, IGNORE_INDEX).tolist(), where,
                                       self.source))
        return out


Decode = Callable[[RowTable, int], object]
"""Builds one row object (TokenizedPair, TokenizedFeedback, PromptRow, ...) from a table row."""


class RowView(_PartsView):
    """Rows of several tables in a given order (training order, repeats from weighting included): a read-only
    list of row objects built on access, plain arrays (`lengths`) for the batch planner.

    What is computed per row after reading (reference log-probabilities, the partner of a feedback row) is kept
    here by the row's global id, so every later access, and every repeat of a row, carries it."""

    def __init__(self, tables: list[RowTable], parts: list[tuple[int, np.ndarray]], decode: Decode) -> None:
        self._parts = _Parts(tables, parts, lambda t: t.num_rows)
        self._decode = decode
        self.extra_length = 0
        """Tokens added to every row's longest sequence in `lengths` (GRPO: the completion's room)."""
        self.reference: np.ndarray | None = None
        """[rows of all tables, 2] reference log-probabilities, NaN until set (see set_reference)."""
        self.partner: np.ndarray | None = None
        """Global id of the row whose reply follows this row's prompt in its mismatched sequence (KTO)."""
        self.max_length = 0

    def _at(self, position: int):
        global_id = int(self._parts.index[position])
        row = self._decode(*self._locate(global_id))
        if self.partner is not None:
            partner_table, partner_local = self._locate(int(self.partner[global_id]))
            reply = partner_table.sequences(partner_local)[0]
            start = int(partner_table.array("prompt_length")[partner_local])
            row.mismatched = _mismatched(row, reply, start, self.max_length)
        if self.reference is not None and not np.isnan(self.reference[global_id, 0]):
            row.reference_logps = (float(self.reference[global_id, 0]), float(self.reference[global_id, 1]))
        return row

    def _locate(self, global_id: int) -> tuple[RowTable, int]:
        number = bisect.bisect_right(self._parts.starts, global_id) - 1
        return self._parts.tables[number], global_id - self._parts.starts[number]

    @property
    def global_ids(self) -> np.ndarray:
        """Each position's row id over all tables (a repeated row repeats its id)."""
        return self._parts.index

    def distinct_positions(self) -> np.ndarray:
        """Positions of each row's first appearance, in order (weighting repeats rows)."""
        _, first = np.unique(self._parts.index, return_index=True)
        return np.sort(first)

    def set_reference(self, position: int, values: tuple[float, float]) -> None:
        if self.reference is None:
            self.reference = np.full((self._parts.starts[-1], 2), np.nan)
        self.reference[self._parts.index[position]] = values

    def pair_with_next_distinct(self, max_length: int) -> None:
        """Give each row, as its mismatched sequence, its prompt followed by the reply of the next distinct row
        in this order (wrapping round): fixed per row, so a precomputed reference stays valid."""
        order = self._parts.index[self.distinct_positions()]
        self.partner = np.zeros(self._parts.starts[-1], np.int64)
        self.partner[order] = np.roll(order, -1)
        self.max_length = max_length

    def column(self, field: str) -> np.ndarray:
        """A per-row integer column of every table, in this view's order."""
        return self._parts.gather(lambda t: t.array(field))

    @property
    def lengths(self) -> np.ndarray:
        """Tokens of each row's longest sequence (its mismatched one included), plus extra_length."""
        longest = self.column("longest")
        if self.partner is not None and len(self):
            every_prompt = np.concatenate([t.array("prompt_length") for t in self._parts.tables])
            every_longest = np.concatenate([t.array("longest") for t in self._parts.tables])
            partner_reply = (every_longest - every_prompt)[self.partner[self._parts.index]]
            mismatched = np.minimum(every_prompt[self._parts.index] + partner_reply, self.max_length)
            longest = np.maximum(longest, mismatched)
        return longest + self.extra_length

    def digest(self) -> str:
        """Identifies the exact rows, in order: each table's row digest and the index."""
        digest = hashlib.sha256()
        for table in self._parts.tables:
            digest.update(table.meta["rows_sha256"].encode())
        digest.update(self._parts.index.tobytes())
        return digest.hexdigest()


def _mismatched(row, reply: TokenizedSample, reply_start: int, max_length: int) -> TokenizedSample:
    """This row's prompt followed by another row's reply (from `reply_start`), cut at max_length."""
    prompt = row.sample.input_ids[: row.prompt_length]
    ids = [*prompt, *reply.input_ids[reply_start:]][:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + reply.labels[reply_start:])[:max_length]
    return TokenizedSample(ids, labels, row.where, row.source)
