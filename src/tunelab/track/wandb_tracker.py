"""Weights & Biases: offline by default, into RUN/wandb (upload later with `wandb sync RUN/wandb/offline-run-*`).

Offline makes no network call and never asks for a login. The run does not capture the terminal (tunelab
draws its own progress) and is finished, and W&B's background service stopped, when the run ends, so no
process outlives training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import wandb

from tunelab.config import RunConfig

EXIT_CODES = {"completed": 0, "failed": 1, "interrupted": 130}


class WandbTracker:
    name = "wandb"

    def __init__(self, config: RunConfig, run_dir: Path, hparams: dict, resumed_at: int | None, saved: dict):
        track = config.track
        settings = wandb.Settings(console="off", silent=True, reinit="create_new")
        self.run = wandb.init(
            project=track.project,
            name=track.run_name or run_dir.resolve().name,
            dir=str(run_dir),
            mode=track.wandb_mode,
            config=hparams,
            id=saved.get("id") if resumed_at is not None else None,
            resume="allow" if resumed_at is not None and saved.get("id") else None,
            settings=settings,
        )

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self, status: str, summary: dict[str, float], last_step: int) -> None:
        try:
            self.run.summary.update({f"summary/{key}": value for key, value in summary.items()})
            self.run.summary["status"] = status
            self.run.finish(exit_code=EXIT_CODES.get(status, 1))
        finally:
            if wandb.run is None:  # no run of the caller's own still needs the service
                wandb.teardown()

    def resume_state(self) -> dict[str, Any]:
        return {"id": self.run.id}


def open_tracker(config: RunConfig, run_dir: Path, hparams: dict, resumed_at: int | None, saved: dict):
    return WandbTracker(config, run_dir, hparams, resumed_at, saved)
