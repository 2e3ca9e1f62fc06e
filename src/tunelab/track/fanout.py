"""One log for a run: metrics.jsonl always, plus the trackers `track.to` names.

The loop and the run write records here exactly as they wrote to metrics.jsonl; each tracker gets the
record's numeric scalars (nested dicts flattened with `/`), the resolved config when it opens and the
run's summary when it closes. metrics.jsonl stays the record of truth: a tracker that fails mid-run is
dropped with a warning rather than ending hours of training.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console

from tunelab.config import RunConfig, TrackConfig
from tunelab.errors import UserError
from tunelab.track.jsonl import MetricsLog

# tracker name -> (tunelab's module for it, the pip package that module imports)
_TRACKERS = {
    "tensorboard": ("tunelab.track.tensorboard_tracker", "tensorboard"),
    "wandb": ("tunelab.track.wandb_tracker", "wandb"),
    "mlflow": ("tunelab.track.mlflow_tracker", "mlflow-skinny"),
}
STATUS_FILE = "trackers.json"
"""Each tracker's run id, so a resumed training continues the same tracker run."""


class Tracker(Protocol):
    name: str

    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self, status: str, summary: dict[str, float], last_step: int) -> None: ...

    def resume_state(self) -> dict[str, Any]: ...


def check_trackers(track: TrackConfig) -> None:
    """Import what each named tracker needs, and run its module's `check(track)` where it has one (MLflow: that its
    server answers), so a missing package or an unusable setting stops the run before anything is written."""
    for name in track.to:
        module, package = _TRACKERS[name]
        try:
            imported = importlib.import_module(module)
        except ImportError as err:
            raise UserError(
                f"{name} is not installed ({err}); install tunelab's tracking extra: pip install 'tunelab[track]' "
                f"(or just pip install {package})",
                where="track.to",
            ) from None
        if hasattr(imported, "check"):
            imported.check(track)


def flatten_scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of `record` keyed `a/b`; None, text, booleans and the step itself are left out."""
    scalars: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            scalars.update(flatten_scalars(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step":
            scalars[name] = float(value)
    return scalars


def flatten_params(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The config as `section.key` -> value (lists and None as text), what hyper-parameter tables want."""
    params: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            params.update(flatten_params(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            params[name] = value
        else:
            params[name] = json.dumps(value)
    return params


class RunLog(MetricsLog):
    """metrics.jsonl plus the configured trackers (opened by `start`, closed by `close`)."""

    def __init__(self, path: Path, console: Console | None = None) -> None:
        super().__init__(path)
        self.console = console or Console(quiet=True)
        self.trackers: list[Tracker] = []
        self.last_step = 0
        self.started = False
        self._old_summary: int | None = None

    def start(self, config: RunConfig, *, resumed_at: int | None = None) -> None:
        """Open every tracker in `config.track.to` under the run directory; ids are kept for --resume."""
        run_dir = self.path.parent
        self.started = True
        summary = run_dir / "summary.json"
        self._old_summary = summary.stat().st_mtime_ns if summary.exists() else None
        self.last_step = resumed_at or 0
        saved = _read_status(run_dir) if resumed_at is not None else {}
        hparams = config.model_dump(mode="json")
        for name in config.track.to:
            module = importlib.import_module(_TRACKERS[name][0])
            try:
                tracker = module.open_tracker(config, run_dir, hparams, resumed_at, saved.get(name, {}))
            except Exception as err:
                self.close("failed")
                raise UserError(f"could not start {name}: {err}", where="track.to") from err
            self.trackers.append(tracker)
            self.console.print(f"tracking to {name}")
        if self.trackers:
            (run_dir / STATUS_FILE).write_text(json.dumps({t.name: t.resume_state() for t in self.trackers}))

    def write(self, record: dict) -> None:
        super().write(record)
        if not self.trackers:
            return
        step = int(record.get("step", self.last_step))
        self.last_step = max(self.last_step, step)
        scalars = flatten_scalars(record)
        for tracker in list(self.trackers):
            try:
                tracker.log(step, scalars)
            except Exception as err:  # metrics.jsonl has the record; keep training
                self.console.print(f"[yellow]{tracker.name} failed ({err}); it gets no more metrics this run[/]")
                self.trackers.remove(tracker)
                with contextlib.suppress(Exception):
                    tracker.close("failed", {}, self.last_step)

    def close(self, status: str) -> None:
        """Hand each tracker the summary this run wrote (if any) and close it; safe to call twice."""
        summary = self._fresh_summary()
        scalars = flatten_scalars({k: v for k, v in summary.items() if k != "trainer_state"})
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            try:
                tracker.close(status, scalars, self.last_step)
            except Exception as err:
                self.console.print(f"[yellow]{tracker.name} did not close cleanly: {err}[/]")

    def _fresh_summary(self) -> dict[str, Any]:
        """summary.json when this run wrote it (not one left by the run a --resume continues)."""
        path = self.path.parent / "summary.json"
        if not self.started or not path.exists() or path.stat().st_mtime_ns == self._old_summary:
            return {}
        summary = json.loads(path.read_text())
        return summary if isinstance(summary, dict) else {}


def _read_status(run_dir: Path) -> dict[str, dict]:
    path = run_dir / STATUS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


class NullLog(RunLog):
    """What the other processes of a data-parallel run log to: nothing (the main process writes the run's log).
    Every method that would touch `path` is a no-op."""

    def __init__(self) -> None:
        super().__init__(Path(os.devnull))

    def clear(self) -> None:
        pass

    def read(self) -> list[dict]:
        return []

    def start(self, config: RunConfig, *, resumed_at: int | None = None) -> None:
        pass

    def write(self, record: dict) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass

    def close(self, status: str) -> None:
        pass
