"""metrics.jsonl: one JSON object per logged step, appended and flushed so a crash loses nothing; rewritten
(on resume) only by replacing the whole file, so a crash mid-rewrite leaves the old one whole."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tunelab.textio import replace_text


def finite_or_null(value: Any) -> Any:
    """`value` with every NaN or infinite float made None (JSON's null): bare NaN is not JSON, and jq, browsers and
    most readers refuse the whole line."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_null(item) for item in value]
    return value


class MetricsLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (a resumed run re-logs them)."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        self._replace(kept)

    def replace_baseline(self, record: dict | None) -> None:
        """Make the base model's step-0 line `record` (None: no such line), in place of the one logged before: a
        resumed run that measured the base model again. The line goes first, where a fresh run logs it."""
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        new = [] if record is None else [_line(record)]
        old = [line for line in lines if line and _is_baseline(json.loads(line))]
        if old == new and lines[:len(new)] == new:
            return
        self._replace(new + [line for line in lines if line and line not in old])

    def _replace(self, lines: list[str]) -> None:
        replace_text(self.path, "".join(f"{line}\n" for line in lines))

    def clear(self) -> None:
        """Start the log afresh (a new run in an overwritten directory)."""
        self.path.unlink(missing_ok=True)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(_line(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


def _line(record: dict) -> str:
    return json.dumps(finite_or_null(record), allow_nan=False)


def _is_baseline(record: dict) -> bool:
    """The base model's line: step 0 and nothing but eval_ values (a rollback to step 0 logs other keys)."""
    return record.get("step") == 0 and all(key == "step" or key.startswith("eval_") for key in record)
