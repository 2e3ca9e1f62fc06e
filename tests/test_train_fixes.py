"""Runs that change, stop or fail part-way, on the tiny model: a resume measures the base model with the eval
settings it reports, refuses a step budget that breaks its schedule, and logs each step once to MLflow; a failed
start leaves no half-written run folder; compare-methods survives Ctrl-C, a method a setting excludes and a failed
last evaluation; several processes print once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_train import QA, run_config
from typer.testing import CliRunner

from conftest import interrupted_at_step
from tunelab.cli import app
from tunelab.errors import ConfigError, UserError
from tunelab.train.run import train_run
from tunelab.train.run_dir import check_output_dir

TUNELAB = str(Path(sys.executable).parent / "tunelab")


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fixes-data") / "qa.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in QA))
    return path


def child_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    return env


def test_resume_measures_the_base_model_again_when_the_eval_settings_changed(tiny_model_dir, qa_file, tmp_path):
    out = tmp_path / "run"
    base = ["train.max_steps=4", "train.save_every=2", "train.lr=3e-3", "eval.generate_samples=3",
            "eval.metrics=[exact_match]"]
    with interrupted_at_step(3):
        train_run(run_config(tiny_model_dir, qa_file, out, *base))
    first_base_loss = json.loads((out / "summary.json").read_text())["base_eval_loss"]

    resumed = train_run(run_config(tiny_model_dir, qa_file, out, *base, "eval.generate_samples=6",
                                   "eval.metrics=[chrf]"), resume=True)
    assert set(resumed["metrics_before"]) == set(resumed["metrics_after"]) == {"chrf"}
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all(row.get("base") is not None for row in samples)
    # measured on the base weights, before the checkpoint's trained ones were loaded
    assert resumed["base_eval_loss"] == pytest.approx(first_base_loss, rel=1e-6)


def test_resume_refuses_a_step_budget_that_ends_before_the_checkpoint_or_changes_the_schedule(
        tiny_model_dir, qa_file, tmp_path):
    out = tmp_path / "run"
    base = ["train.save_every=2", "eval.before_after=false", "eval.generate_samples=0"]
    with interrupted_at_step(3):
        train_run(run_config(tiny_model_dir, qa_file, out, *base, "train.max_steps=6"))
    saved = (out / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"saved at step 3, but train\.max_steps 2 ends before it"):
        train_run(run_config(tiny_model_dir, qa_file, out, *base, "train.max_steps=2"), resume=True)
    with pytest.raises(ConfigError, match=r"cosine learning-rate schedule of 6 steps .* train\.max_steps 9"):
        train_run(run_config(tiny_model_dir, qa_file, out, *base, "train.max_steps=9"), resume=True)
    assert (out / "config.yaml").read_text() == saved

    # A constant rate without warmup has no length: such a run may go on longer.
    constant = tmp_path / "constant"
    flat = [*base, "train.scheduler=constant", "train.warmup_ratio=0"]
    with interrupted_at_step(3):
        train_run(run_config(tiny_model_dir, qa_file, constant, *flat, "train.max_steps=4"))
    resumed = train_run(run_config(tiny_model_dir, qa_file, constant, *flat, "train.max_steps=5"), resume=True)
    assert resumed["steps"] == 5 and resumed["status"] == "completed"


def test_a_tracker_that_cannot_start_leaves_no_run_folder(tiny_model_dir, qa_file, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # nothing listens on port 9: fail at once
    out = tmp_path / "run"
    config = run_config(tiny_model_dir, qa_file, out, "train.max_steps=2", "track.to=[tensorboard,mlflow]",
                        "track.mlflow_uri=http://127.0.0.1:9")
    with pytest.raises(UserError, match="cannot use the MLflow tracking server http://127.0.0.1:9"):
        train_run(config)
    assert not out.exists()
    check_output_dir(out, resume=False, overwrite=False)  # the corrected rerun is not refused


def test_a_best_metric_no_evaluation_logs_is_refused_before_the_first_step(tiny_model_dir, qa_file, tmp_path):
    metric = tmp_path / "my_metric.py"
    metric.write_text("def score(predictions, references):\n"
                      "    return {'match': sum(p == r for p, r in zip(predictions, references)) / len(predictions)}\n")
    out = tmp_path / "run"
    trained = []
    config = run_config(tiny_model_dir, qa_file, out, "train.max_steps=3", "train.best_metric=eval_foo",
                        "eval.during_training=true", "eval.during_training_samples=2", f"eval.metrics=[{metric}:score]")
    with pytest.raises(ConfigError, match=r"eval_foo is not among .* logged eval_loss, eval_match"):
        train_run(config, on_batches=lambda step, batches: trained.append(step))
    assert trained == [] and not out.exists()


def test_with_two_processes_only_the_main_one_prints(tiny_model_dir, qa_file, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "data": {"train": str(qa_file), "eval_split": 0.2, "max_length": 64},
        "method": {"name": "lora"}, "train": {"batch_size": 2, "precision": "fp32", "max_steps": 2},
        "eval": {"generate_samples": 0}, "output_dir": str(tmp_path / "run"),
    }))
    plan = subprocess.run([TUNELAB, "train", str(config), "--nproc", "2", "--dry-run", "--json"], capture_output=True,
                          text=True, env=child_env(), timeout=300)
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert json.loads(plan.stdout)["steps_planned"] == 2  # one JSON document, not one per process

    refused = subprocess.run([TUNELAB, "train", str(config), "--nproc", "2", "train.best_metric=eval_foo"],
                             capture_output=True, text=True, env=child_env(), timeout=300)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.count("error:") == 1 and "eval_foo" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "run").exists()


def test_a_resumed_run_logs_each_step_once_to_mlflow(tiny_model_dir, qa_file, tmp_path):
    from test_track import mlflow_series

    out = tmp_path / "run"
    base = ["train.max_steps=7", "train.save_every=3", "eval.before_after=false", "eval.generate_samples=0",
            "track.to=[mlflow]", "track.project=tl-test"]
    with interrupted_at_step(6, at_once=True):  # steps 4 and 5 are logged, the checkpoint holds step 3
        train_run(run_config(tiny_model_dir, qa_file, out, *base))
    train_run(run_config(tiny_model_dir, qa_file, out, *base), resume=True)
    logged = mlflow_series(out, "loss")
    assert [step for step, _ in logged] == [1, 2, 3, 4, 5, 6, 7]
    jsonl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [value for _, value in logged] == pytest.approx([r["loss"] for r in jsonl if "loss" in r], rel=1e-5)


def compare_config(tmp_path: Path, tiny_model_dir: Path, qa_file: Path, **train) -> Path:
    config = tmp_path / "compare.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "data": {"train": str(qa_file), "eval_split": 0.2, "max_length": 64},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "train": {"batch_size": 4, "precision": "fp32", **train},
        "eval": {"generate_samples": 3, "max_new_tokens": 4, "show_samples": 0},
    }))
    return config


def test_compare_methods_names_the_method_a_shared_setting_excludes(tiny_model_dir, qa_file, tmp_path):
    config = compare_config(tmp_path, tiny_model_dir, qa_file, max_steps=2)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compare-methods", str(config), "data.packing=true", "--methods", "lora,prompt",
                                      "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert "prompt cannot train with this config" in result.output and "data.packing" in result.output
    assert not out.exists()


def test_compare_methods_keeps_the_metric_before_when_the_first_methods_last_evaluation_fails(
        tiny_model_dir, qa_file, tmp_path):
    metric = tmp_path / "second_call_fails.py"  # the base model's evaluation passes, lora's last one fails
    metric.write_text(
        "import os\nfrom pathlib import Path\n\n"
        "def score(predictions, references):\n"
        f"    called = Path({str(tmp_path)!r}) / f'called-{{os.getpid()}}'\n"
        "    if called.exists():\n"
        "        raise RuntimeError('the metric broke')\n"
        "    called.touch()\n"
        "    return {'match': sum(p == r for p, r in zip(predictions, references)) / len(predictions)}\n")
    config = compare_config(tmp_path, tiny_model_dir, qa_file, max_steps=2)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compare-methods", str(config), f"eval.metrics=[{metric}:score]", "--methods",
                                      "lora,ia3", "-o", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "compare.json").read_text())
    assert rows[0]["status"].startswith("failed") and rows[1]["status"] == "completed"
    assert [row["metric"] for row in rows] == ["match", "match"]
    assert rows[0]["metric_before"] is not None and rows[1]["metric_before"] == rows[0]["metric_before"]


def test_ctrl_c_during_compare_methods_lets_the_training_stop_and_save(tiny_model_dir, qa_file, tmp_path):
    config = compare_config(tmp_path, tiny_model_dir, qa_file, max_steps=5000, save_every=1000)
    out = tmp_path / "out"
    # Its own process group, as a terminal's foreground job: Ctrl-C signals the whole group.
    compare = subprocess.Popen([TUNELAB, "compare-methods", str(config), "eval.before_after=false", "--methods",
                                "lora,ia3", "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=child_env(), start_new_session=True)
    metrics = out / "lora" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and '"loss"' in metrics.read_text()):
        assert compare.poll() is None and time.monotonic() < deadline, compare.communicate()
        time.sleep(0.3)
    os.killpg(compare.pid, signal.SIGINT)
    _, stderr = compare.communicate(timeout=240)
    assert compare.returncode == 130
    assert "interrupted while training lora" in stderr and "--resume" in stderr
    status = json.loads((out / "lora" / "status.json").read_text())
    assert status["status"] == "interrupted"
    assert list((out / "lora" / "checkpoints").glob("step-*"))  # saved at the step boundary
    rows = json.loads((out / "compare.json").read_text())
    assert [row["method"] for row in rows] == ["lora"] and rows[0]["status"].startswith("interrupted")
    assert not (out / "ia3").exists()
