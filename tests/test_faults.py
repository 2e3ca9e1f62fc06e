"""Numerical faults on a tiny real model: a bad step is skipped, repeated ones roll back with a lower learning
rate, a run that keeps diverging stops with the reason, and a loss spike is flagged."""

from __future__ import annotations

import json
import math

import pytest
from safetensors.torch import load_file
from test_train import QA, run_config

from tunelab.errors import TrainingFault
from tunelab.objectives.sft import SftObjective
from tunelab.train.run import train_run


@pytest.fixture
def qa_file(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in QA))
    return path


@pytest.fixture
def inject(monkeypatch):
    """inject({call: factor}): the n-th training micro-batch's loss (counted over the whole test, replays included)
    is multiplied by factor; evaluation passes are not counted."""
    real = SftObjective.loss_sum

    def arm(factors: dict[int, float]) -> None:
        calls = {"n": 0}

        def loss_sum(self, model, batch):
            loss, metrics = real(self, model, batch)
            if not model.training:
                return loss, metrics
            calls["n"] += 1
            return loss * factors.get(calls["n"], 1.0), metrics

        monkeypatch.setattr(SftObjective, "loss_sum", loss_sum)

    return arm


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_nan_batch_is_skipped_and_a_spike_is_flagged(tiny_model_dir, qa_file, tmp_path, inject):
    inject({4: math.nan, 20: 50.0})
    out = tmp_path / "run"
    summary = train_run(run_config(tiny_model_dir, qa_file, out, "train.max_steps=22", "eval.before_after=false"))
    assert summary["status"] == "completed" and summary["steps"] == 22
    assert summary["trainer_state"]["extra"]["skipped_steps"] == 1
    by_step = {r["step"]: r for r in records(out) if "lr" in r}
    assert by_step[4]["skipped"] == "loss nan" and by_step[4]["loss"] is None
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    for line in (out / "metrics.jsonl").read_text().splitlines():  # strict JSON: no bare NaN for jq or browsers
        json.loads(line, parse_constant=refuse)
    assert [step for step, r in by_step.items() if r.get("loss_spike")] == [20]
    assert all(math.isfinite(float(t.abs().max())) for t in load_file(out / "adapter_model.safetensors").values())


def test_repeated_faults_roll_back_to_the_last_checkpoint_with_half_the_learning_rate(
        tiny_model_dir, qa_file, tmp_path, inject):
    inject({5: math.inf, 6: math.nan})  # steps 5 and 6 on the first pass; their replay after the rollback is clean
    out = tmp_path / "run"
    summary = train_run(run_config(tiny_model_dir, qa_file, out, "train.max_steps=8", "train.save_every=2",
                                   "train.max_bad_steps=1", "train.scheduler=constant", "train.warmup_ratio=0",
                                   "train.lr=1e-3", "eval.before_after=false"))
    assert summary["status"] == "completed" and summary["steps"] == 8
    assert summary["trainer_state"]["extra"]["rollbacks"] == 1
    logged = records(out)
    rollback = [r for r in logged if "rollback_from" in r]
    assert rollback == [{"step": 4, "rollback_from": 6, "bad_steps": 2, "lr": pytest.approx(5e-4)}]
    steps = [r for r in logged if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))  # the bad steps' records dropped with the rollback
    assert [r["lr"] for r in steps] == pytest.approx([1e-3] * 4 + [5e-4] * 4)
    assert not any("skipped" in r for r in steps)


def test_each_rollback_to_the_same_checkpoint_halves_the_rate_again(tiny_model_dir, qa_file, tmp_path, inject):
    """Faults right after a rollback send the run back to the same checkpoint, whose schedule knows nothing of the
    first halving: the second rollback trains on at a quarter of the rate, not half again of the checkpoint's."""
    inject({5: math.inf, 6: math.nan, 7: math.inf, 8: math.nan})  # steps 5-6, then their replay, fail
    out = tmp_path / "run"
    summary = train_run(run_config(tiny_model_dir, qa_file, out, "train.max_steps=8", "train.save_every=4",
                                   "train.max_bad_steps=1", "train.scheduler=constant", "train.warmup_ratio=0",
                                   "train.lr=1e-3", "eval.before_after=false"))
    assert summary["status"] == "completed" and summary["trainer_state"]["extra"]["rollbacks"] == 2
    logged = records(out)
    assert [r["lr"] for r in logged if "rollback_from" in r] == pytest.approx([5e-4, 2.5e-4])
    assert [r["lr"] for r in logged if "loss" in r] == pytest.approx([1e-3] * 4 + [2.5e-4] * 4)


def test_a_run_that_keeps_diverging_stops_with_the_reason_and_its_last_checkpoint(tiny_model_dir, qa_file, tmp_path):
    out = tmp_path / "diverges"
    with pytest.raises(TrainingFault, match=r"non-finite loss or gradient norm, after 1 rollback"):
        train_run(run_config(tiny_model_dir, qa_file, out, "train.lr=1e30", "method.name=full",
                             "train.max_grad_norm=null", "train.max_steps=20", "train.save_every=1",
                             "train.max_rollbacks=1", "eval.before_after=false"))
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"
    assert any("rollback_from" in r for r in records(out))

    with pytest.raises(TrainingFault, match=r"no checkpoint to roll back to \(set train.save_every"):
        train_run(run_config(tiny_model_dir, qa_file, tmp_path / "no-checkpoint", "train.lr=1e30",
                             "method.name=full", "train.max_grad_norm=null", "train.max_steps=20",
                             "eval.before_after=false"))
    with pytest.raises(TrainingFault, match=r"no checkpoint to roll back to \(the first checkpoint is due at step 10"):
        train_run(run_config(tiny_model_dir, qa_file, tmp_path / "not-yet", "train.lr=1e30", "method.name=full",
                             "train.max_grad_norm=null", "train.max_steps=20", "train.save_every=10",
                             "eval.before_after=false"))
