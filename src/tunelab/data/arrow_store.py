"""Tokenised data files as Arrow IPC tables, written in chunks and read memory-mapped.

A data file becomes two tables: `samples` (one row per valid sample: where it came from, its messages as JSON
for generation-based evaluation) and `units` (one row per token row training sees: the sample it came from,
input_ids, which tokens are trained, where). Written chunk by chunk, so building one never holds a whole
file; read zero-copy from a memory map, so training from one keeps only what the OS pages in. Rows become
Python objects (TokenizedSample) one at a time, when a batch asks for them.

`where` is stored without the file name (`:12`, `[3]`, `:4 (chunk 2)`) and the name is put back on reading, so a
renamed or moved file with the same content reuses its table.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tunelab.data.formats import Sample
from tunelab.data.sources import source_name
from tunelab.data.template import IGNORE_INDEX, TokenizedSample

CHUNK_ROWS = 2048
"""Samples (and token rows) buffered in Python before they are written as one Arrow record batch."""

UNITS_SCHEMA = pa.schema(
    [
        ("sample", pa.int32()),
        ("input_ids", pa.list_(pa.int32())),
        ("trained", pa.list_(pa.bool_())),
        ("n_trained", pa.int32()),
        ("where", pa.string()),
    ]
)
SAMPLES_SCHEMA = pa.schema([("where", pa.string()), ("messages", pa.string())])


class _IpcSink:
    """An Arrow IPC file being written: on disk when given a path, else in memory."""

    def __init__(self, path: Path | None, schema: pa.Schema) -> None:
        self.path = path
        self.schema = schema
        self.stream = pa.OSFile(str(path), "wb") if path else pa.BufferOutputStream()
        self.writer = pa.ipc.new_file(self.stream, schema)

    def write(self, arrays: list[pa.Array]) -> None:
        self.writer.write_batch(pa.record_batch(arrays, schema=self.schema))

    def finish(self) -> Path | pa.Buffer:
        self.writer.close()
        if self.path is not None:
            self.stream.close()
            return self.path
        return self.stream.getvalue()


class TableWriter:
    """Appends one file's samples and token rows, flushing every CHUNK_ROWS, and hashes the tokens as it goes
    (the digest identifies what training will see, whatever cache version wrote it)."""

    def __init__(self, name: str, folder: Path | None) -> None:
        self.name = name
        self.units = _IpcSink(folder / "units.arrow" if folder else None, UNITS_SCHEMA)
        self.samples = _IpcSink(folder / "samples.arrow" if folder else None, SAMPLES_SCHEMA)
        self.digest = hashlib.sha256()
        self.num_samples = 0
        self.num_units = 0
        self._units: list[tuple[int, TokenizedSample]] = []
        self._samples: list[tuple[str, str | None]] = []

    def add(self, sample: Sample, units: list[TokenizedSample]) -> None:
        messages = json.dumps(sample.messages, ensure_ascii=False) if sample.messages else None
        self._samples.append((self._suffix(sample.where), messages))
        self._units += [(self.num_samples, unit) for unit in units]
        self.num_samples += 1
        self.num_units += len(units)
        if len(self._samples) >= CHUNK_ROWS:
            self._flush_samples()
        if len(self._units) >= CHUNK_ROWS:
            self._flush_units()

    def finish(self) -> tuple[Path | pa.Buffer, Path | pa.Buffer]:
        self._flush_samples()
        self._flush_units()
        return self.units.finish(), self.samples.finish()

    def _suffix(self, where: str) -> str:
        if not where.startswith(self.name):
            raise ValueError(f"row location {where!r} does not start with the file name {self.name!r}")
        return where[len(self.name) :]

    def _flush_samples(self) -> None:
        if self._samples:
            wheres, messages = zip(*self._samples, strict=True)
            self.samples.write([pa.array(wheres, pa.string()), pa.array(messages, pa.string())])
            self._samples = []

    def _flush_units(self) -> None:
        if not self._units:
            return
        rows = [unit for _, unit in self._units]
        lengths = np.fromiter((len(u.input_ids) for u in rows), np.int32, count=len(rows))
        offsets = np.zeros(len(rows) + 1, np.int32)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.fromiter(itertools.chain.from_iterable(u.input_ids for u in rows), np.int32, count=int(offsets[-1]))
        labels = np.fromiter(itertools.chain.from_iterable(u.labels for u in rows), np.int64, count=int(offsets[-1]))
        trained = labels != IGNORE_INDEX
        running = np.concatenate([[0], np.cumsum(trained)])
        n_trained = (running[offsets[1:]] - running[offsets[:-1]]).astype(np.int32)
        for array in (lengths, ids, trained):
            self.digest.update(array.tobytes())
        pa_offsets = pa.array(offsets, pa.int32())
        self.units.write(
            [
                pa.array(np.fromiter((s for s, _ in self._units), np.int32, count=len(rows)), pa.int32()),
                pa.ListArray.from_arrays(pa_offsets, pa.array(ids, pa.int32())),
                pa.ListArray.from_arrays(pa_offsets, pa.array(trained, pa.bool_())),
                pa.array(n_trained, pa.int32()),
                pa.array([self._suffix(u.where) for u in rows], pa.string()),
            ]
        )
        self._units = []


def _read_ipc(source: Path | pa.Buffer) -> pa.Table:
    handle = pa.memory_map(str(source), "r") if isinstance(source, Path) else pa.BufferReader(source)
    return pa.ipc.open_file(handle).read_all()


class TokenTable:
    """One tokenised data file, read zero-copy; `meta` holds what reading it learned (format, notes, counts)."""

    def __init__(self, units: Path | pa.Buffer, samples: Path | pa.Buffer, meta: dict, name: str) -> None:
        self.units = _read_ipc(units)
        self.samples = _read_ipc(samples)
        self.meta = meta
        self.name = name
        self.source = source_name(name)
        self._ids = self.units.column("input_ids")
        self._trained = self.units.column("trained")
        self._unit_where = self.units.column("where")
        self._lengths: np.ndarray | None = None
        self._unit_sample: np.ndarray | None = None

    @property
    def num_units(self) -> int:
        return self.units.num_rows

    @property
    def num_samples(self) -> int:
        return self.samples.num_rows

    @property
    def lengths(self) -> np.ndarray:
        if self._lengths is None:
            self._lengths = _numpy(pc.list_value_length(self._ids), np.int64)
        return self._lengths

    @property
    def trained_counts(self) -> np.ndarray:
        return _numpy(self.units.column("n_trained"), np.int64)

    def notes(self, kind: str) -> list[str]:
        """The first truncated / dropped notes, with this file's name."""
        return [self.name + note for note in self.meta[f"{kind}_notes"]]

    def unit(self, index: int) -> TokenizedSample:
        ids = self._ids[index].values.to_numpy()
        trained = self._trained[index].values.to_numpy(zero_copy_only=False)
        labels = np.where(trained, ids, IGNORE_INDEX)
        where = self.name + self._unit_where[index].as_py()
        return TokenizedSample(ids.tolist(), labels.tolist(), where, self.source)

    def sample(self, index: int) -> Sample:
        """A sample with messages, for generation-based evaluation (raw text is not kept)."""
        messages = self.samples.column("messages")[index].as_py()
        where = self.name + self.samples.column("where")[index].as_py()
        return Sample(where, json.loads(messages) if messages else [], source=self.source)

    def units_of(self, sample_ids: np.ndarray) -> np.ndarray:
        """The token rows of `sample_ids`, in that order (repeats repeated; a chunked document's rows together)."""
        if self._unit_sample is None:
            self._unit_sample = _numpy(self.units.column("sample"), np.int64)
        sample_ids = np.asarray(sample_ids, np.int64)
        starts = np.searchsorted(self._unit_sample, sample_ids, "left")
        counts = np.searchsorted(self._unit_sample, sample_ids, "right") - starts
        firsts = np.repeat(np.cumsum(counts) - counts, counts)
        return np.repeat(starts, counts) + (np.arange(int(counts.sum())) - firsts)

    def with_messages(self, sample_ids: np.ndarray) -> np.ndarray:
        valid = _numpy(self.samples.column("messages").is_valid(), bool)
        return sample_ids[valid[sample_ids]]


def _numpy(column: pa.ChunkedArray, dtype) -> np.ndarray:
    return np.asarray(column.to_numpy(), dtype)


class _Parts:
    """Rows picked from several tables: (table number, local ids) parts flattened to one global index."""

    def __init__(self, tables: list[TokenTable], parts: list[tuple[int, np.ndarray]], size) -> None:
        self.tables = tables
        sizes = [size(t) for t in tables]
        self.starts = [0, *itertools.accumulate(sizes)]
        pieces = [np.asarray(ids, np.int64) + self.starts[t] for t, ids in parts]
        self.index = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)

    def locate(self, position: int) -> tuple[TokenTable, int]:
        global_id = int(self.index[position])
        table = bisect.bisect_right(self.starts, global_id) - 1
        return self.tables[table], global_id - self.starts[table]

    def gather(self, per_table) -> np.ndarray:
        """A per-row array (e.g. lengths) of every table, picked by the index."""
        if not self.tables:
            return np.zeros(0, np.int64)
        return np.concatenate([per_table(t) for t in self.tables])[self.index]


class _PartsView(Sequence):
    """A read-only list over rows of several tables in a given order; subclasses build one row."""

    _parts: _Parts

    def __len__(self) -> int:
        return len(self._parts.index)

    def __getitem__(self, position):
        if isinstance(position, slice):
            return [self[i] for i in range(*position.indices(len(self)))]
        if position < 0:
            position += len(self)
        if not 0 <= position < len(self):
            raise IndexError(position)
        return self._at(position)

    def _at(self, position: int):
        table, local = self._parts.locate(position)
        return self._row(table, local)

    def _row(self, table: TokenTable, local: int):
        raise NotImplementedError


class TokenizedView(_PartsView):
    """Token rows of several tables in training order: a read-only list of TokenizedSample for callers, plain
    arrays (`lengths`, `trained_counts`) for the batch planner and statistics."""

    def __init__(self, tables: list[TokenTable], parts: list[tuple[int, np.ndarray]]) -> None:
        self._parts = _Parts(tables, parts, lambda t: t.num_units)
        self._lengths: np.ndarray | None = None

    def _row(self, table: TokenTable, local: int) -> TokenizedSample:
        return table.unit(local)

    @property
    def lengths(self) -> np.ndarray:
        if self._lengths is None:
            self._lengths = self._parts.gather(lambda t: t.lengths)
        return self._lengths

    @property
    def trained_counts(self) -> np.ndarray:
        return self._parts.gather(lambda t: t.trained_counts)

    def digest(self) -> str:
        """Identifies the exact token rows, in order: each table's token digest and the index."""
        digest = hashlib.sha256()
        for table in self._parts.tables:
            digest.update(table.meta["tokens_sha256"].encode())
        digest.update(self._parts.index.tobytes())
        return digest.hexdigest()


class SampleView(_PartsView):
    """Held-out samples (those with messages) of several tables, built one at a time when asked for."""

    def __init__(self, tables: list[TokenTable], parts: list[tuple[int, np.ndarray]]) -> None:
        self._parts = _Parts(tables, parts, lambda t: t.num_samples)

    def _row(self, table: TokenTable, local: int) -> Sample:
        return table.sample(local)
