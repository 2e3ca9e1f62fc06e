"""Data-parallel training on CPU (gloo): two processes with batch B train like one process with batch 2B."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_train import QA

TUNELAB = str(Path(sys.executable).with_name("tunelab"))


def write_config(folder: Path, tiny_model_dir: Path, name: str, batch_size: int, **train) -> Path:
    data = folder / "qa.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(row) + "\n" for row in QA))
    config = folder / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir),
        "data": {"train": str(data), "eval_split": 0.2, "max_length": 64},
        "method": {"name": "lora", "dropout": 0.0},
        "train": {"batch_size": batch_size, "precision": "fp32", "lr": 3e-3, "max_steps": 5, **train},
        "eval": {"before_after": False, "generate_samples": 0},
        "output_dir": str(folder / name),
    }))
    return config


def train(config: Path, *extra: str) -> subprocess.CompletedProcess:
    # One thread each, as torchrun gives every process, so both runs reduce in the same order on one core.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([TUNELAB, "train", str(config), *extra], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


def test_two_processes_train_like_one_with_twice_the_batch(tiny_model_dir, tmp_path):
    # Two micro-batches a step: the first accumulates without synchronising, the second synchronises.
    one = write_config(tmp_path, tiny_model_dir, "one", 4, grad_accum=2)
    two = write_config(tmp_path, tiny_model_dir, "two", 2, grad_accum=2, save_every=2)
    train(one)
    launched = train(two, "--nproc", "2")
    assert "saved to" in launched.stdout and launched.stdout.count("saved to") == 1  # only the main process speaks

    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    assert len(losses(tmp_path / "one")) == 5
    single = load_file(tmp_path / "one" / "adapter_model.safetensors")
    parallel = load_file(tmp_path / "two" / "adapter_model.safetensors")
    for name, tensor in single.items():
        # Relative to the whole tensor: Adam turns rounding-level gradients near 0 into full-size steps, so a
        # single element may differ more.
        assert float((parallel[name] - tensor).norm() / tensor.norm()) < 1e-5, name
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two")]
    assert summaries[1]["train_tokens"] == summaries[0]["train_tokens"]  # every process's tokens counted once
    assert summaries[1]["final_eval_loss"] == pytest.approx(summaries[0]["final_eval_loss"], rel=1e-5)
    # one process wrote the run; its checkpoints hold both processes' random states
    checkpoint = tmp_path / "two" / "checkpoints" / "step-000004"
    assert "rng-rank1/torch" in load_file(checkpoint / "optimizer.safetensors")


def test_two_processes_stopped_and_resumed_equal_an_uninterrupted_run(tiny_model_dir, tmp_path):
    # A constant schedule, so a run cut short at step 3 has trained steps 1-2 exactly as the 5-step run did.
    schedule = {"save_every": 2, "scheduler": "constant", "warmup_ratio": 0.0}
    straight = write_config(tmp_path, tiny_model_dir, "straight", 2, **schedule)
    train(straight, "--nproc", "2")
    resumed = write_config(tmp_path, tiny_model_dir, "resumed", 2, **schedule)
    train(resumed, "--nproc", "2", "train.max_steps=3")  # the first run stops after step 3 ...
    (tmp_path / "resumed" / "summary.json").unlink()
    train(resumed, "--nproc", "2", "--resume")  # ... and resumes from its step-2 checkpoint to step 5
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    resumed_weights = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    for name, tensor in load_file(tmp_path / "straight" / "adapter_model.safetensors").items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=0, atol=0)  # same processes: bitwise
