"""Read rows from data files, remembering where each came from (file and line) for error messages."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from tunelab.errors import DataError

BUNDLED_PREFIX = "tunelab:"
TABLE_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet"}
TEXT_SUFFIXES = {".txt", ".md"}


@dataclass(frozen=True)
class Record:
    """One raw row and where it came from: `where` reads like `data.jsonl:12`."""

    row: dict[str, Any]
    where: str


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
        raise DataError("data file does not exist", where=text)
    return resolved


def read_records(path: Path | str, problems: list[str] | None = None) -> list[Record]:
    """All rows of a data file. Raw text files give one row {"text": ...} per blank-line-separated block.

    Unreadable rows raise one DataError listing them all, or, when `problems` is given, are appended to it
    (file:line: why) and skipped, as `data inspect` wants."""
    file = resolve_data_path(path)
    name = str(path)
    suffix = file.suffix.lower()
    if suffix in (".jsonl", ".json"):
        bad: list[str] = []
        records = _read_jsonl(file, name, bad) if suffix == ".jsonl" else _read_json(file, name, bad)
        if bad and problems is None:
            raise DataError(_summarise(bad, name))
        if problems is not None:
            problems.extend(bad)
        return records
    if suffix == ".csv":
        return _read_csv(file, name)
    if suffix == ".parquet":
        return _read_parquet(file, name)
    if suffix in TEXT_SUFFIXES:
        return _read_text(file, name)
    known = ", ".join(sorted(TABLE_SUFFIXES | TEXT_SUFFIXES))
    raise DataError(f"unsupported file type '{suffix}' (expected one of {known})", where=name)


def _read_jsonl(file: Path, name: str, bad: list[str]) -> list[Record]:
    records = []
    with open(file, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
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
            records.append(Record(row, f"{name}:{number}"))
    return records


def _read_json(file: Path, name: str, bad: list[str]) -> list[Record]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"not valid JSON ({err.msg} at line {err.lineno})", where=name) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError("expected a JSON list of objects", where=name)
    bad += [f"{name}[{i}]: expected an object" for i, row in enumerate(data) if not isinstance(row, dict)]
    return [Record(row, f"{name}[{i}]") for i, row in enumerate(data) if isinstance(row, dict)]


def _read_csv(file: Path, name: str) -> list[Record]:
    with open(file, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        records = []
        for row in reader:
            # reader.line_num is the physical line where this row ended (quoted fields may span lines)
            cleaned = {k: v for k, v in row.items() if k is not None and v not in (None, "")}
            records.append(Record(cleaned, f"{name}:{reader.line_num}"))
    return records


def _read_parquet(file: Path, name: str) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except Exception as err:
        raise DataError(f"cannot read parquet file ({err})", where=name) from None
    return [Record(row, f"{name}:row {i + 1}") for i, row in enumerate(table.to_pylist())]


def _read_text(file: Path, name: str) -> list[Record]:
    """Blocks separated by blank lines become documents; each remembers the line it starts on."""
    records = []
    block: list[str] = []
    start = 1
    lines = file.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate([*lines, ""], start=1):
        if line.strip():
            if not block:
                start = number
            block.append(line)
        elif block:
            records.append(Record({"text": "\n".join(block)}, f"{name}:{start}"))
            block = []
    return records


def _summarise(problems: list[str], name: str, limit: int = 10) -> str:
    shown = "\n  ".join(problems[:limit])
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{name}: {len(problems)} invalid row(s):\n  {shown}{more}"
