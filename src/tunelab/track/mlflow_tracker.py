"""MLflow: a file store in RUN/mlruns unless `track.mlflow_uri` names another store or server.

Uses `MlflowClient`, not the fluent `mlflow.start_run`, so a caller's own active MLflow run is never
touched. MLflow 3 keeps its file store behind MLFLOW_ALLOW_FILE_STORE (it recommends sqlite, which needs
the full `mlflow` package); tunelab opts in for the file store it was asked to write, and `mlflow ui`
needs the same variable to read it.

MLflow cannot delete metric points, so a resumed run does not log again the steps MLflow already holds (those an
interrupted or crashed attempt logged past its checkpoint): each step keeps one point, as TensorBoard's purge gives.
"""

from __future__ import annotations

import os

# MLflow 3 sends usage telemetry from the moment it is imported; a local file store should make no network
# call. Set MLFLOW_DISABLE_TELEMETRY=false to let it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from mlflow.entities import Metric, Param, RunStatus  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from tunelab.config import RunConfig
from tunelab.track.fanout import flatten_params

STORE_DIR = "mlruns"
RUN_STATUS = {"completed": RunStatus.FINISHED, "failed": RunStatus.FAILED, "interrupted": RunStatus.KILLED}
BATCH = 100  # MLflow's limit of params per log_batch call (metrics: 1000)


def tracking_uri(config: RunConfig, run_dir: Path) -> str:
    """A URI from `track.mlflow_uri`: a plain path becomes a file: URI; absent means RUN/mlruns."""
    uri = config.track.mlflow_uri
    if uri is None:
        return (run_dir / STORE_DIR).resolve().as_uri()
    return uri if "://" in uri or uri.startswith(("file:", "sqlite:", "databricks")) else Path(uri).resolve().as_uri()


class MlflowTracker:
    name = "mlflow"

    def __init__(self, config: RunConfig, run_dir: Path, hparams: dict, resumed_at: int | None, saved: dict):
        uri = tracking_uri(config, run_dir)
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        self.logged_through: int | None = None
        """The last step MLflow already holds for this run: steps up to it are not logged again."""
        if resumed_at is not None and saved.get("run_id"):
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            self.logged_through = self._last_logged_step()
            return
        experiment = self.client.get_experiment_by_name(config.track.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(config.track.project)
        run = self.client.create_run(
            experiment_id,
            run_name=config.track.run_name or run_dir.resolve().name,
            tags={"tunelab.run_dir": str(run_dir.resolve())},
        )
        self.run_id = run.info.run_id
        params = [Param(key, str(value)[:6000]) for key, value in flatten_params(hparams).items()]
        for start in range(0, len(params), BATCH):
            self.client.log_batch(self.run_id, params=params[start : start + BATCH])

    def _last_logged_step(self) -> int | None:
        keys = [key for key in self.client.get_run(self.run_id).data.metrics if not key.startswith("summary/")]
        return max((point.step for key in keys for point in self.client.get_metric_history(self.run_id, key)),
                   default=None)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if self.logged_through is None or step > self.logged_through:
            self._log_batch(step, scalars)

    def _log_batch(self, step: int, scalars: dict[str, float], prefix: str = "") -> None:
        now = int(time.time() * 1000)
        metrics = [Metric(f"{prefix}{key}", value, now, step) for key, value in scalars.items()]
        for start in range(0, len(metrics), 10 * BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 10 * BATCH])

    def close(self, status: str, summary: dict[str, float], last_step: int) -> None:
        try:
            self._log_batch(last_step, summary, prefix="summary/")
            self.client.set_tag(self.run_id, "tunelab.status", status)
        finally:
            self.client.set_terminated(self.run_id, RunStatus.to_string(RUN_STATUS.get(status, RunStatus.FAILED)))

    def resume_state(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "uri": self.uri}


def open_tracker(config: RunConfig, run_dir: Path, hparams: dict, resumed_at: int | None, saved: dict):
    return MlflowTracker(config, run_dir, hparams, resumed_at, saved)
