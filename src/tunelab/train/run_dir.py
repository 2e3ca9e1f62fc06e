"""Whether a run may write its output directory: a fresh run needs an empty one (or --overwrite), --resume one that
holds a run with a complete checkpoint, and neither may touch a directory another live process is training."""

from __future__ import annotations

import shutil
from pathlib import Path

from tunelab.errors import ConfigError
from tunelab.track.jsonl import MetricsLog
from tunelab.train.checkpoint import incomplete_checkpoints, latest_checkpoint
from tunelab.train.live import training_process


def check_output_dir(output_dir: Path, *, resume: bool, overwrite: bool) -> None:
    check_not_training(output_dir)
    if resume:
        if not (output_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume: {output_dir} holds no run to continue (no config.yaml: it stopped before "
                              "training began, or never ran); start it without --resume", where="output_dir")
        if latest_checkpoint(output_dir) is None:
            ignored = "".join(f"; {path.name} ignored: {why}" for path, why in incomplete_checkpoints(output_dir))
            raise ConfigError(f"--resume: no complete checkpoint under {output_dir}/checkpoints{ignored}",
                              where="output_dir")
        return
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise ConfigError(
            f"{output_dir} already holds files; pass --overwrite to replace it or --resume to continue it",
            where="output_dir",
        )


def check_not_training(output_dir: Path) -> None:
    """Refuse a run directory another process is training now: --overwrite would delete its files under it and
    --resume would interleave two writers' checkpoints and metrics."""
    pid = training_process(output_dir) if output_dir.is_dir() else None
    if pid is not None:
        raise ConfigError(f"{output_dir} is being trained now by process {pid}; stop it first (Ctrl-C there, or "
                          f"kill {pid}; --resume continues it later) or choose another output_dir",
                          where="output_dir")


def remove_untrained_run(run_dir: Path, keep_folder: bool) -> None:
    """Remove what a fresh run wrote when a user error stopped it before it trained a step (a tracker that cannot
    start, a setting the base model's evaluation refutes): the message says what to fix, and the corrected rerun
    then finds the folder free, not "already holds files". A run that trained keeps its files."""
    trained = any(record.get("step", 0) > 0 for record in MetricsLog(run_dir / "metrics.jsonl").read())
    if trained or latest_checkpoint(run_dir) is not None:
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    if keep_folder:
        run_dir.mkdir(parents=True, exist_ok=True)
