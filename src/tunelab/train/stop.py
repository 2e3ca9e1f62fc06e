"""Stopping a run on request without losing or corrupting finished work.

Schedulers and `docker stop` send SIGTERM, people press Ctrl-C (SIGINT). Either one, the first time, asks the loop
to stop at the next step boundary, where weights, optimiser and data position agree and the checkpoint written
then resumes exactly. A second Ctrl-C stops at once (the newest checkpoint on disk stays the resume point).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

from rich.console import Console

from tunelab.train.distributed import Ranks

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequested(KeyboardInterrupt):
    """Raised at a step boundary after a stop signal. A KeyboardInterrupt, so code that lets Ctrl-C through lets this
    through too; `exit_code` is the shell's convention for death by that signal (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


class StopOnSignal:
    """While active, the first SIGINT or SIGTERM only records the request (`check` raises it later); a second
    SIGINT raises KeyboardInterrupt where the program is. Outside the main thread, where Python cannot take
    signals, it does nothing."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.requested = signum
        self.console.print(f"[yellow]{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                           "(Ctrl-C again stops at once)[/]")

    def check(self, ranks: Ranks | None = None) -> None:
        """Raise StopRequested if a stop signal came (to any of the processes: all stop at the same step); call
        where the training state is consistent."""
        if ranks is not None and ranks.any(self.requested is not None):
            raise StopRequested(self.requested or signal.SIGTERM)
        if self.requested is not None:
            raise StopRequested(self.requested)


class TerminateAsInterrupt:
    """While active, SIGTERM raises StopRequested where the program is, as Ctrl-C raises KeyboardInterrupt: outside
    the training loop (loading, preparing data, the last evaluation) there is no step to finish, and the run's
    `finally` blocks still record how it ended instead of the process vanishing. StopOnSignal, inside it, takes
    over during the loop and hands SIGTERM back when the loop ends."""

    def __enter__(self) -> TerminateAsInterrupt:
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    @staticmethod
    def _handle(signum: int, frame: FrameType | None) -> None:
        raise StopRequested(signum)
