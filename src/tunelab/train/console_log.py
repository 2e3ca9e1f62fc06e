"""RUN/train.log: what a run prints, as plain text in its directory, so a run started from a terminal can be read
later (and in the web app) like one the app started. Live progress bars stay on the terminal only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

LOG_FILE = "train.log"


class RunConsole(Console):
    """A console whose `print`s also go to RUN/train.log: held back until the run directory exists (`attach`),
    then written as they come, without colour."""

    def __init__(self, base: Console) -> None:
        super().__init__(file=base.file, force_terminal=base.is_terminal, width=base.width, quiet=base.quiet,
                         no_color=base.no_color, highlight=False)
        self._pending: list[tuple[tuple, dict]] = []
        self._copy: Console | None = None
        self._handle = None

    def print(self, *objects: Any, **kwargs: Any) -> None:  # noqa: A003 - Console's own name
        super().print(*objects, **kwargs)
        if self._copy is not None:
            self._copy.print(*objects, **kwargs)
        else:
            self._pending.append((objects, kwargs))

    def to_log_only(self, text: str) -> None:
        """A line for train.log alone (the terminal gets the same news from the CLI's error message)."""
        if self._copy is not None:
            self._copy.print(text, markup=False)

    def attach(self, run_dir: Path) -> None:
        """Start writing run_dir/train.log (appended to: a resumed run continues it), earlier lines first."""
        self._handle = open(Path(run_dir) / LOG_FILE, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        self._copy = Console(file=self._handle, no_color=True, width=120, force_terminal=False, highlight=False,
                             soft_wrap=True)
        for objects, kwargs in self._pending:
            self._copy.print(*objects, **kwargs)
        self._pending = []

    def detach(self) -> None:
        self._copy = None
        if self._handle is not None:
            self._handle.close()
            self._handle = None
