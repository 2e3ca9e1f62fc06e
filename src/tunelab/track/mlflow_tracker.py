"""MLflow: a file store in RUN/mlruns unless `track.mlflow_uri` names another store or server.

Uses `MlflowClient`, not the fluent `mlflow.start_run`, so a caller's own active MLflow run is never
touched. MLflow 3 keeps its file store behind MLFLOW_ALLOW_FILE_STORE (it recommends sqlite, which needs
the full `mlflow` package); tunelab opts in for the file store it was asked to write, and `mlflow ui`
needs the same variable to read it.

A tracking server is asked one question before the run loads anything (`check`): MLflow's client retries a
request 7 times with backoff (about 4 minutes, its defence against rate limits) before an unreachable server fails
it, so tunelab's own check does not retry and waits at most CHECK_TIMEOUT seconds, unless the user set MLflow's
variables for that.

MLflow cannot delete metric points, so a resumed run does not log again the steps MLflow already holds (those an
interrupted or crashed attempt logged past its checkpoint): each step keeps one point, as TensorBoard's purge gives.
"""

from __future__ import annotations

import os

# MLflow 3 sends usage telemetry from the moment it is imported; a local file store should make no network
# call. Set MLFLOW_DISABLE_TELEMETRY=false to let it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import time  # noqa: E402
from collections.abc import Iterator, Mapping  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from mlflow.entities import Metric, Param, RunStatus  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from tunelab.config import RunConfig, TrackConfig
from tunelab.errors import ConfigError
from tunelab.track.fanout import flatten_params

STORE_DIR = "mlruns"
RUN_STATUS = {"completed": RunStatus.FINISHED, "failed": RunStatus.FAILED, "interrupted": RunStatus.KILLED}
BATCH = 100  # MLflow's limit of params per log_batch call (metrics: 1000)
CHECK_TIMEOUT = 10
"""Seconds the check waits for a tracking server's answer (MLflow's own default: 120, then retries)."""


def tracking_uri(config: RunConfig, run_dir: Path) -> str:
    """A URI from `track.mlflow_uri`: a plain path becomes a file: URI; absent means RUN/mlruns."""
    uri = config.track.mlflow_uri
    if uri is None:
        return (run_dir / STORE_DIR).resolve().as_uri()
    return uri if "://" in uri or uri.startswith(("file:", "sqlite:", "databricks")) else Path(uri).resolve().as_uri()


def check(track: TrackConfig) -> None:
    """Refuse an `mlflow_uri` server that cannot be reached or does not answer as MLflow, naming the URI: in
    seconds, before the model is loaded or anything is written (see the module's docstring)."""
    uri = track.mlflow_uri
    if not uri or not uri.startswith(("http://", "https://")):
        return
    fail_fast = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(CHECK_TIMEOUT)}
    with _unless_set(fail_fast):
        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as err:
            raise ConfigError(f"cannot use the MLflow tracking server {uri}: {_reason(err)}; start it, or correct "
                              "track.mlflow_uri (without it, MLflow logs to RUN/mlruns)",
                              where="track.mlflow_uri") from None


@contextmanager
def _unless_set(variables: Mapping[str, str]) -> Iterator[None]:
    """Environment variables for the block, each only where the user did not set it; removed afterwards."""
    added = [name for name in variables if name not in os.environ]
    os.environ.update({name: variables[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _reason(err: Exception) -> str:
    """What went wrong in a few words: the operating system's reason for a failed connection (refused, name not
    known, timed out), else MLflow's own message (an HTTP error status)."""
    cause: BaseException = err
    while cause.__cause__ or cause.__context__:
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError):
        return (cause.strerror or str(cause) or type(cause).__name__).lower()
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= 300 else text[:300] + "..."


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
