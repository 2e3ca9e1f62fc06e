"""`data.columns`: read a file whose columns have their own names (a CSV export, say) as one of tunelab's formats.

Real datasets rarely name their columns `prompt` and `completion`; a CFPB complaint export has "Consumer complaint
narrative" and "Product". Rather than asking people to rewrite the file, `data.columns` says which column holds
which field ({prompt: "Consumer complaint narrative", completion: Product}); rows are renamed as they are read, so
format detection, validation, inspection and training all see tunelab's field names, and error messages name the
file's own column alongside the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from tunelab.data.sources import Record
from tunelab.errors import DataError

FIELDS = (
    "messages",
    "conversations",
    "instruction",
    "input",
    "output",
    "system",
    "prompt",
    "completion",
    "question",
    "answer",
    "text",
    "chosen",
    "rejected",
    "label",
)
"""Every field name a format reads (see formats.py), so a mapping to any other name is a mistake."""


def rename_columns(records: list[Record], columns: Mapping[str, str] | None, path: Path | str) -> list[Record]:
    """`records` with each mapped column renamed to its field (other columns kept). Rows without the column are left
    as they are, so one mapping serves several files; a column that no row of a file holds, in a file that lacks the
    field as well, is a DataError naming data.columns.FIELD and the file's columns."""
    if not columns or not records:
        return records
    seen = set().union(*(r.row for r in records))
    for field, column in columns.items():
        if column not in seen and field not in seen:
            raise DataError(
                f"data.columns.{field} names column '{column}', which this file does not have "
                f"(its columns: {', '.join(sorted(seen))})",
                where=str(path),
            )
    renamed = []
    for record in records:
        mapped = set(columns.values()) & set(record.row)
        if not mapped:
            renamed.append(record)
            continue
        row = {k: v for k, v in record.row.items() if k not in mapped}
        row.update({field: record.row[column] for field, column in columns.items() if column in record.row})
        renamed.append(Record(row, record.where))
    return renamed


def explain(message: str, columns: Mapping[str, str] | None) -> str:
    """A row error about field 'prompt' also names the file's column that data.columns maps to it."""
    for field, column in (columns or {}).items():
        if f"'{field}'" in message:
            return f"{message} (column '{column}', data.columns.{field})"
    return message


def parse_column_options(options: list[str] | None) -> dict[str, str]:
    """`--column prompt=Consumer complaint narrative` options as a data.columns mapping. Raises DataError."""
    columns: dict[str, str] = {}
    for option in options or []:
        field, sep, column = option.partition("=")
        if not sep or not field.strip() or not column:
            raise DataError(f"'{option}' must look like FIELD=COLUMN, e.g. prompt=text", where="--column")
        columns[field.strip()] = column
    check_fields(columns, where="--column")
    return columns


def check_fields(columns: Mapping[str, str], where: str = "data.columns") -> None:
    unknown = [f for f in columns if f not in FIELDS]
    if unknown:
        raise DataError(f"unknown field(s) {', '.join(unknown)}; fields: {', '.join(FIELDS)}", where=where)
