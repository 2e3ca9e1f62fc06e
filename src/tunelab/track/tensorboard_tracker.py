"""TensorBoard: event files under RUN/tensorboard (`tensorboard --logdir RUN/tensorboard`).

The config goes in as HParams (with the loss series as its metrics, and the run's end status) and as
text; the summary as `summary/*` scalars at the last step. A resumed run purges the events past its checkpoint, so the
curves have no doubled steps.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from tunelab.config import RunConfig
from tunelab.track.fanout import flatten_params

LOG_DIR = "tensorboard"
SESSION_STATUS = {
    "completed": api_pb2.STATUS_SUCCESS,
    "failed": api_pb2.STATUS_FAILURE,
    "interrupted": api_pb2.STATUS_UNKNOWN,
}  # HParams has no "aborted"


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, log_dir: Path, config: dict[str, Any], resumed_at: int | None) -> None:
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=None if resumed_at is None else resumed_at + 1)
        if resumed_at is None:
            params = flatten_params(config)
            experiment, session_start, _ = hparams_summaries(params, {"loss": None, "eval_loss": None})
            self.writer.file_writer.add_summary(experiment)
            self.writer.file_writer.add_summary(session_start)
            text = yaml.safe_dump(config, sort_keys=False)
            self.writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()), 0)
        self.writer.flush()

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a crash loses no finished step

    def close(self, status: str, summary: dict[str, float], last_step: int) -> None:
        for key, value in summary.items():
            self.writer.add_scalar(f"summary/{key}", value, last_step)
        self.writer.add_text("status", status, last_step)
        self.writer.file_writer.add_summary(_session_end(status))
        self.writer.close()

    def resume_state(self) -> dict[str, Any]:
        return {}


def _session_end(status: str):
    """The HParams session-end summary with the run's real status (torch's helper always says success)."""
    summary = hparams_summaries({}, {})[2]
    plugin = summary.value[0].metadata.plugin_data
    data = plugin_data_pb2.HParamsPluginData.FromString(plugin.content)
    data.session_end_info.status = SESSION_STATUS.get(status, api_pb2.STATUS_FAILURE)
    data.session_end_info.end_time_secs = time.time()
    plugin.content = data.SerializeToString()
    return summary


def open_tracker(config: RunConfig, run_dir: Path, hparams: dict, resumed_at: int | None, saved: dict):
    return TensorBoardTracker(run_dir / LOG_DIR, hparams, resumed_at)
