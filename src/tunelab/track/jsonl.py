"""metrics.jsonl: one JSON object per logged step, appended and flushed so a crash loses nothing."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


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
        self.path.write_text("".join(f"{line}\n" for line in kept))

    def clear(self) -> None:
        """Start the log afresh (a new run in an overwritten directory)."""
        self.path.unlink(missing_ok=True)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(finite_or_null(record), allow_nan=False) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]
