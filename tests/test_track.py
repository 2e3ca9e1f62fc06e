"""Trackers on a real short run of the tiny model: what TensorBoard, W&B (offline) and MLflow (file store)
hold, read back with each tool's own reader, equals metrics.jsonl; they close on success, failure and
interruption; bad names and missing packages stop the run before anything is written."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, metadata
from typer.testing import CliRunner

from conftest import interrupted_at_step
from tunelab.cli import app
from tunelab.config import load_config
from tunelab.errors import UserError
from tunelab.track.fanout import RunLog, flatten_scalars
from tunelab.train.loop import TrainingFault
from tunelab.train.run import train_run

QA = [{"question": f"what is {a} plus {b}?", "answer": f"{a + b}"} for a in range(6) for b in range(6)]
ALL = "track=[tensorboard,wandb,mlflow]"


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch):
    """No network and no login prompt, whatever the developer's own W&B settings are."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def run_config(model_dir, data, out, *overrides):
    return load_config(
        None,
        [
            f"model={model_dir}",
            f"data.train={data}",
            "data.eval_split=0.2",
            "data.max_length=64",
            f"output_dir={out}",
            "train.batch_size=4",
            "train.precision=fp32",
            "train.lr=3e-3",
            "eval.generate_samples=4",
            "eval.max_new_tokens=4",
            "eval.show_samples=0",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("track-data") / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in QA))
    return path


@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir, qa_file, tmp_path_factory):
    """One run with all three trackers: 6 steps, eval every 2."""
    out = tmp_path_factory.mktemp("track") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        summary = train_run(
            run_config(
                tiny_model_dir, qa_file, out, ALL, "train.max_steps=6", "train.eval_every=2", "track.project=tl-test"
            )
        )
    return out, summary


def jsonl_series(out: Path, key: str) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in records if r.get(key) is not None]


def tensorboard_series(out: Path, key: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(key)]


def mlflow_run(out: Path, project: str = "tl-test"):
    from tunelab.track.mlflow_tracker import MlflowClient  # imported through tunelab: MLflow's telemetry stays off

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name(project)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def mlflow_series(out: Path, key: str) -> list[tuple[int, float]]:
    client, run = mlflow_run(out)
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def wandb_records(out: Path) -> list:
    """Every record of the offline runs' .wandb files, in order (W&B's LevelDB-style log of Record protos;
    wandb 0.31 ships no Python reader, so this follows its format: a 7-byte ':W&B' header, 32 KiB blocks,
    each chunk a 7-byte header of crc, length and type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto.wandb_internal_pb2 import Record

    records = []
    for path in sorted(out.glob("wandb/offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B"
        offset, block, pending = 7, 32768, b""
        while offset + 7 <= len(data):
            left_in_block = block - offset % block
            if left_in_block < 7:
                offset += left_in_block
                continue
            _, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
            if length == 0 and kind == 0:
                break
            chunk = data[offset + 7 : offset + 7 + length]
            offset += 7 + length
            pending = chunk if kind in (1, 2) else pending + chunk
            if kind in (1, 4):
                record = Record()
                record.ParseFromString(pending)
                records.append(record)
    return records


def wandb_series(out: Path, key: str) -> list[tuple[int, float]]:
    series = []
    for record in wandb_records(out):
        if record.WhichOneof("record_type") == "history":
            values = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item
            }
            if key in values:
                series.append((record.history.step.num, values[key]))
    return series


@pytest.mark.parametrize("key", ["loss", "eval_loss", "lr"])
def test_every_tracker_holds_the_series_in_metrics_jsonl(tracked_run, key):
    out, _ = tracked_run
    expected = jsonl_series(out, key)
    assert len(expected) >= (6 if key != "eval_loss" else 4)
    steps = [step for step, _ in expected]
    for read in (tensorboard_series, wandb_series, mlflow_series):
        got = read(out, key)
        assert [step for step, _ in got] == steps, read.__name__
        # TensorBoard stores float32; W&B (JSON) and MLflow keep the float64 exactly
        assert [value for _, value in got] == pytest.approx([value for _, value in expected], rel=1e-6), read.__name__


def test_trackers_hold_the_config_and_the_final_summary(tracked_run):
    out, summary = tracked_run
    assert summary["status"] == "completed"
    final = summary["final_eval_loss"]

    client, run = mlflow_run(out)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert (
        float(run.data.params["train.lr"]) == 3e-3
        and run.data.params["track.to"] == '["tensorboard", "wandb", "mlflow"]'
    )
    assert run.data.metrics["summary/final_eval_loss"] == final
    assert run.data.tags["tunelab.status"] == "completed"

    assert tensorboard_series(out, "summary/final_eval_loss") == [(6, pytest.approx(final, rel=1e-6))]
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert "config/text_summary" in events.Tags()["tensors"]
    hparams = events.PluginTagToContent("hparams")
    start = metadata.parse_session_start_info_plugin_data(hparams["_hparams_/session_start_info"])
    assert start.hparams["train.lr"].number_value == 3e-3 and start.hparams["method.name"].string_value == "lora"
    end = metadata.parse_session_end_info_plugin_data(hparams["_hparams_/session_end_info"])
    assert end.status == api_pb2.STATUS_SUCCESS

    kinds = {}
    for record in wandb_records(out):
        kinds.setdefault(record.WhichOneof("record_type"), []).append(record)
    config = {item.key: json.loads(item.value_json) for item in kinds["run"][0].run.config.update}
    assert config["train"]["lr"] == 3e-3 and config["method"]["name"] == "lora"
    wandb_summary = {
        item.key or "/".join(item.nested_key): json.loads(item.value_json)
        for record in kinds["summary"]
        for item in record.summary.update
    }
    assert wandb_summary["summary/final_eval_loss"] == final and wandb_summary["status"] == "completed"
    assert kinds["exit"][-1].exit.exit_code == 0
    assert kinds["run"][0].run.project == "tl-test" and kinds["run"][0].run.display_name == "run"


def test_no_wandb_process_outlives_the_run(tracked_run):
    if not Path("/proc").is_dir():
        pytest.skip("needs /proc")
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            children.append((stat.parent / "comm").read_text().strip())
    assert not [name for name in children if "wandb" in name], children


def test_interrupted_run_closes_its_trackers_and_resume_continues_them(tiny_model_dir, qa_file, tmp_path):
    out = tmp_path / "resumed"
    base = [
        "train.max_steps=6",
        "train.save_every=2",
        "eval.before_after=false",
        "track=[tensorboard,mlflow,wandb]",
        "track.project=tl-test",
    ]
    with interrupted_at_step(5):
        train_run(run_config(tiny_model_dir, qa_file, out, *base))
    client, run = mlflow_run(out)
    assert run.info.status == "KILLED" and run.data.tags["tunelab.status"] == "interrupted"
    assert wandb_records(out)[-1].WhichOneof("record_type") == "exit"
    assert [r.exit.exit_code for r in wandb_records(out) if r.WhichOneof("record_type") == "exit"] == [130]

    train_run(run_config(tiny_model_dir, qa_file, out, *base), resume=True)
    client, resumed = mlflow_run(out)  # the same MLflow run, finished now
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    losses = jsonl_series(out, "loss")
    assert [step for step, _ in losses] == [1, 2, 3, 4, 5, 6]
    # TensorBoard dropped the steps past the checkpoint (step 4) that the interrupted run had logged
    assert tensorboard_series(out, "loss") == [(s, pytest.approx(v, rel=1e-6)) for s, v in losses]
    assert {
        run_id for run_id in [r.run.run_id for r in wandb_records(out) if r.WhichOneof("record_type") == "run"]
    } == {json.loads((out / "trackers.json").read_text())["wandb"]["id"]}


def test_failed_run_marks_its_trackers_failed(tiny_model_dir, qa_file, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(TrainingFault):
        train_run(
            run_config(
                tiny_model_dir,
                qa_file,
                out,
                "train.lr=1e30",
                "method.name=full",
                "train.max_grad_norm=null",
                "train.max_steps=20",
                "eval.before_after=false",
                "track=[mlflow,wandb]",
                "track.project=tl-test",
            )
        )
    _, run = mlflow_run(out)
    assert run.info.status == "FAILED" and run.data.tags["tunelab.status"] == "failed"
    assert [r.exit.exit_code for r in wandb_records(out) if r.WhichOneof("record_type") == "exit"] == [1]


def test_unknown_tracker_exits_2_naming_the_key(tmp_path):
    out = tmp_path / "out"
    config = tmp_path / "c.yaml"
    config.write_text(f"track: [tensorboard, neptune]\noutput_dir: {out}\n")
    result = CliRunner().invoke(app, ["train", str(config)])
    assert result.exit_code == 2
    assert "track.to" in result.output and "unknown tracker(s) neptune" in result.output
    assert not out.exists()


def test_missing_tracker_package_names_the_extra_before_anything_is_written(
    tiny_model_dir, qa_file, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without wandb imports
    monkeypatch.delitem(sys.modules, "tunelab.track.wandb_tracker", raising=False)  # as in a fresh process
    with pytest.raises(UserError, match=r"wandb is not installed.*pip install 'tunelab\[track\]'") as err:
        train_run(run_config(tiny_model_dir, qa_file, out, "track=[tensorboard,wandb]"))
    assert err.value.where == "track.to"
    assert not out.exists()


class _BrokenTracker:
    """A tracker whose backend goes away mid-run (a lost server, a full disk)."""

    name = "broken"

    def __init__(self):
        self.logged, self.closed = [], None

    def log(self, step, scalars):
        if step == 2:
            raise OSError("server went away")
        self.logged.append(step)

    def close(self, status, summary, last_step):
        self.closed = status


def test_a_tracker_that_fails_is_dropped_and_metrics_jsonl_keeps_every_record(tmp_path):
    log = RunLog(tmp_path / "metrics.jsonl")
    broken = _BrokenTracker()
    log.trackers.append(broken)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0 / step})
    assert [r["step"] for r in log.read()] == [1, 2, 3]
    assert broken.logged == [1] and broken.closed == "failed" and log.trackers == []


def test_scalars_are_the_numeric_leaves_flattened():
    record = {
        "step": 3,
        "loss": 1.5,
        "grad_norm": None,
        "tokens": 40,
        "ok": True,
        "note": "x",
        "metrics": {"exact_match": 0.25, "per_field": {"name": 1}},
    }
    assert flatten_scalars(record) == {
        "loss": 1.5,
        "tokens": 40.0,
        "metrics/exact_match": 0.25,
        "metrics/per_field/name": 1.0,
    }
