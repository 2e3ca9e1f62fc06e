"""What `data inspect` reports on a file whose format it cannot tell: its rows and columns (types, fill rates),
the rows it could not read, and the column mappings it would accept, as commands to run. Inspection should
never leave someone with only an error: this is the starting point for `data.columns`."""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunelab.data.sources import read_records

SUGGESTIONS = 3


@dataclass
class ColumnProfile:
    name: str
    filled: int
    """Rows where the column holds a non-empty value."""
    types: dict[str, int] = field(default_factory=dict)
    """How many values of each type (text, number, list, object, true/false)."""
    mean_text_length: float = 0.0
    distinct: int = 0


@dataclass
class FileProfile:
    path: str
    rows: int
    """Readable rows (those that could not be read are in `problems`)."""
    columns: list[ColumnProfile]
    problems: list[str]
    reason: str
    """Why no format was detected."""
    suggestions: list[dict[str, str]]
    """data.columns mappings that would make the file readable, most likely first."""

    def commands(self) -> list[str]:
        return [" ".join(["tunelab data inspect", shlex.quote(self.path),
                          *(f"--column {shlex.quote(f'{field}={column}')}" for field, column in mapping.items())])
                for mapping in self.suggestions]

    def to_json(self) -> dict:
        return {**asdict(self), "format": None, "commands": self.commands()}


def _kind(value) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "text", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def profile_file(path: Path | str, reason: str) -> FileProfile:
    """Profile every column of a readable file (rows that cannot be read are listed, not fatal)."""
    problems: list[str] = []
    records = read_records(path, problems)
    names = list(dict.fromkeys(key for record in records for key in record.row))
    columns = []
    for name in names:
        values = [r.row.get(name) for r in records if r.row.get(name) not in (None, "")]
        texts = [v for v in values if isinstance(v, str)]
        types: dict[str, int] = {}
        for value in values:
            types[_kind(value)] = types.get(_kind(value), 0) + 1
        columns.append(ColumnProfile(name, len(values), types, sum(map(len, texts)) / len(texts) if texts else 0.0,
                                     len({repr(v) for v in values})))
    return FileProfile(str(path), len(records), columns, problems, reason, suggest_mappings(columns, len(records)))


def suggest_mappings(columns: list[ColumnProfile], rows: int) -> list[dict[str, str]]:
    """The longest mostly-filled text column as the prompt with each other text column as the completion (the
    fullest first), then the longest alone as raw text."""
    text = [c for c in columns if c.types.get("text", 0) + c.types.get("number", 0) >= max(1, c.filled // 2)
            and c.filled >= max(1, rows // 2)]
    if not text:
        return []
    longest = max(text, key=lambda c: c.mean_text_length)
    others = sorted((c for c in text if c is not longest), key=lambda c: (-c.filled, c.distinct))
    pairs = [{"prompt": longest.name, "completion": other.name} for other in others[:SUGGESTIONS - 1]]
    return [*pairs, {"text": longest.name}]


def render_profile(profile: FileProfile) -> str:
    lines = [f"{profile.path}: format not recognised ({profile.reason.split(';')[0]})",
             f"{profile.rows} readable rows, {len(profile.columns)} columns:"]
    width = max((len(c.name) for c in profile.columns), default=6)
    for column in profile.columns:
        share = column.filled / profile.rows if profile.rows else 0.0
        types = ", ".join(f"{kind} {count}" for kind, count in column.types.items()) or "empty"
        length = f", mean length {column.mean_text_length:.0f} chars" if column.mean_text_length else ""
        lines.append(f"  {column.name:<{width}}  filled {100 * share:5.1f}%  ({types}; {column.distinct} distinct"
                     f"{length})")
    if profile.problems:
        lines.append(f"{len(profile.problems)} row(s) could not be read:")
        lines.extend(f"  {problem}" for problem in profile.problems[:10])
    if profile.suggestions:
        lines.append("read it with a column mapping (data.columns in a config), e.g.:")
        lines.extend(f"  {command}" for command in profile.commands())
    return "\n".join(lines)
