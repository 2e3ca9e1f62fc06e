"""Read rows from data files, remembering where each came from (file and line) for error messages."""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from tunelab.data.hf_datasets import dataset_identity, iter_dataset_records, parse_dataset_ref
from tunelab.errors import DataError
from tunelab.textio import file_digest, read_utf8

BUNDLED_PREFIX = "tunelab:"
TABLE_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet"}
TEXT_SUFFIXES = {".txt", ".md"}


@dataclass(frozen=True)
class Record:
    """One raw row and where it came from: `where` reads like `data.jsonl:12`."""

    row: dict[str, Any]
    where: str


def source_name(path: Path | str) -> str:
    """A short name for a data source (mix weights, per-source metrics): the file's stem, or the dataset's name."""
    ref = parse_dataset_ref(str(path))
    return ref.name if ref is not None else Path(str(path)).stem


def source_identity(path: Path | str) -> dict | None:
    """What decides a source's rows, for the tokenised-rows cache key: a file's SHA-256 and suffix (which reader),
    or a dataset's (see hf_datasets.dataset_identity). None: the source cannot be pinned and is not cached."""
    ref = parse_dataset_ref(str(path))
    if ref is not None:
        return dataset_identity(ref)
    file = resolve_data_path(path)
    return {"file_sha256": file_digest(file), "suffix": file.suffix.lower()}


def resolve_data_path(path: Path | str) -> Path:
    """A real file path for `path`; `tunelab:NAME` names a dataset bundled with tunelab."""
    text = str(path)
    if text.startswith(BUNDLED_PREFIX):
        name = text[len(BUNDLED_PREFIX) :]
        bundled = resources.files("tunelab") / "datasets" / f"{name}.jsonl"
        if not bundled.is_file():
            raise DataError(f"no bundled dataset '{name}'", where=text)
        return Path(str(bundled))
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise DataError("data file does not exist (a file, a save_to_disk folder, hf:NAME or tunelab:NAME)",
                        where=text)
    return resolved


def read_records(path: Path | str, problems: list[str] | None = None) -> list[Record]:
    """All rows of a data file. Raw text files give one row {"text": ...} per blank-line-separated block.

    Unreadable rows raise one DataError listing them all, or, when `problems` is given, are appended to it
    (file:line: why) and skipped, as `data inspect` wants."""
    bad: list[str] = []
    records = list(iter_records(path, bad))
    if bad and problems is None:
        raise DataError(_summarise(bad, str(path)))
    if problems is not None:
        problems.extend(bad)
    return records


def iter_records(path: Path | str, problems) -> Iterator[Record]:
    """The rows of a data file one at a time, so a file larger than memory can be read (.json files excepted:
    one JSON document is parsed whole). Unreadable rows are appended to `problems` (file:line: why) and skipped."""
    name = str(path)
    ref = parse_dataset_ref(name)
    if ref is not None:
        for row, where in iter_dataset_records(ref):
            yield Record(row, where)
        return
    file = resolve_data_path(path)
    suffix = file.suffix.lower()
    if suffix == ".jsonl":
        yield from _iter_jsonl(file, name, problems)
    elif suffix == ".json":
        yield from _read_json(file, name, problems)
    elif suffix == ".csv":
        yield from _iter_csv(file, name, problems)
    elif suffix == ".parquet":
        yield from _iter_parquet(file, name)
    elif suffix in TEXT_SUFFIXES:
        yield from _iter_text(file, name)
    else:
        known = ", ".join(sorted(TABLE_SUFFIXES | TEXT_SUFFIXES))
        raise DataError(f"unsupported file type '{suffix}' (expected one of {known})", where=name)


def _lines(file: Path, name: str, bad: list[str] | None = None) -> Iterator[tuple[int, str]]:
    """(line number, text) of each physical line, decoded as UTF-8; a leading byte-order mark (Excel and Notepad
    write one) is dropped. A line that is not UTF-8 is reported in `bad` and skipped, or, without `bad`, stops the
    read with a DataError naming it."""
    with open(file, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                problem = (f"{name}:{number}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                           "save the file as UTF-8")
                if bad is None:
                    raise DataError(problem) from None
                bad.append(problem)
                continue
            yield number, text


def _iter_jsonl(file: Path, name: str, bad) -> Iterator[Record]:
    for number, line in _lines(file, name, bad):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            bad.append(f"{name}:{number}: not valid JSON ({err.msg})")
            continue
        if not isinstance(row, dict):
            bad.append(f"{name}:{number}: expected a JSON object, got {type(row).__name__}")
            continue
        yield Record(row, f"{name}:{number}")


def _read_json(file: Path, name: str, bad) -> list[Record]:
    text = read_utf8(file, name, DataError)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"not valid JSON ({err.msg} at line {err.lineno})", where=name) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError("expected a JSON list of objects", where=name)
    bad.extend(f"{name}[{i}]: expected an object" for i, row in enumerate(data) if not isinstance(row, dict))
    return [Record(row, f"{name}[{i}]") for i, row in enumerate(data) if isinstance(row, dict)]


def _iter_csv(file: Path, name: str, bad) -> Iterator[Record]:
    """Rows named by the line they start on (quoted fields may span lines). A row with more fields than the header
    names, and one whose quoted field never closes (the csv module would read the rest of the file into it), are
    reported in `bad` rather than read."""
    taken: list[tuple[int, str]] = []  # the physical lines the reader consumed since its last row

    def lines() -> Iterator[str]:
        for number, line in _lines(file, name, bad):
            taken.append((number, line))
            yield line

    reader = csv.DictReader(lines())
    header = reader.fieldnames or []
    taken.clear()
    for row in reader:
        consumed, taken[:] = list(taken), []
        start = next((number for number, text in consumed if text.strip()), consumed[0][0])
        where = f"{name}:{start}"
        extra = row.pop(None, None)
        if len(consumed) > 1 and sum(text.count('"') for _, text in consumed) % 2:
            bad.append(f"{where}: a quoted field that opens here runs to line {consumed[-1][0]} without closing")
        elif extra:
            bad.append(f"{where}: {len(header) + len(extra)} fields, but the header names {len(header)}")
        else:
            yield Record({k: v for k, v in row.items() if v not in (None, "")}, where)


def _iter_parquet(file: Path, name: str) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(file).iter_batches(batch_size=1024)
        number = 0
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                yield Record(row, f"{name}:row {number}")
    except (OSError, ValueError, pa.ArrowException) as err:
        raise DataError(f"cannot read parquet file ({err})", where=name) from None


def _iter_text(file: Path, name: str) -> Iterator[Record]:
    """Blocks separated by blank lines become documents; each remembers the line it starts on. Lines are
    numbered as str.splitlines numbers them (form feeds and the like end a line too)."""
    block: list[str] = []
    start = number = 0
    for _, physical in _lines(file, name):
        for line in physical.splitlines():
            number += 1
            if line.strip():
                if not block:
                    start = number
                block.append(line)
            elif block:
                yield Record({"text": "\n".join(block)}, f"{name}:{start}")
                block = []
    if block:
        yield Record({"text": "\n".join(block)}, f"{name}:{start}")


def _summarise(problems: list[str], name: str, limit: int = 10) -> str:
    shown = "\n  ".join(problems[:limit])
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{name}: {len(problems)} invalid row(s):\n  {shown}{more}"
