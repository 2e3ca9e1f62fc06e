"""Checkpoints survive kills, refuse what would run code, and a stop signal ends a run at a step boundary."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from tunelab.errors import CheckpointError, ConfigError
from tunelab.train.checkpoint import (
    COMPLETE,
    LEGACY_OPTIMIZER,
    TrainerState,
    complete_checkpoints,
    incomplete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


def trained_module(steps: int, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    for _ in range(steps):
        model(torch.randn(4, 8)).pow(2).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def test_a_checkpoint_round_trips_without_pickle(tmp_path):
    model, optimizer, scheduler = trained_module(3)
    random.seed(7)
    torch.manual_seed(7)
    path = save_checkpoint(tmp_path, model, optimizer, scheduler, TrainerState(step=3, tokens_seen=12), keep=2)
    expected_python, expected_torch = random.random(), torch.rand(3)
    assert {p.suffix for p in path.iterdir()} <= {".safetensors", ".json"}  # nothing that unpickles

    fresh, fresh_optimizer, fresh_scheduler = trained_module(0, seed=1)
    random.seed(0)
    state = load_checkpoint(path, fresh, fresh_optimizer, fresh_scheduler)
    assert state.step == 3 and state.tokens_seen == 12
    assert random.random() == expected_python and torch.equal(torch.rand(3), expected_torch)
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    saved, loaded = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert loaded["param_groups"] == saved["param_groups"]
    assert isinstance(loaded["param_groups"][0]["betas"], tuple)
    for index, slots in saved["state"].items():
        for key, value in slots.items():
            assert torch.equal(loaded["state"][index][key], value), key
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    # the next update is the same as the original's
    for m, o, s in ((model, optimizer, scheduler), (fresh, fresh_optimizer, fresh_scheduler)):
        torch.manual_seed(3)
        m(torch.randn(4, 8)).pow(2).sum().backward()
        o.step()
        s.step()
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


def test_an_incomplete_checkpoint_is_reported_and_never_loaded(tmp_path):
    model, optimizer, scheduler = trained_module(1)
    good = save_checkpoint(tmp_path, model, optimizer, scheduler, TrainerState(step=1), keep=5)
    newer = save_checkpoint(tmp_path, model, optimizer, scheduler, TrainerState(step=2), keep=5)
    with open(newer / "trainable.safetensors", "r+b") as file:  # a disk that lost the end of a file
        file.truncate(100)
    unmarked = save_checkpoint(tmp_path, model, optimizer, scheduler, TrainerState(step=3), keep=5)
    (unmarked / COMPLETE).unlink()
    (tmp_path / "checkpoints" / ".tmp-step-000004").mkdir()

    assert latest_checkpoint(tmp_path) == good
    reasons = {path.name: why for path, why in incomplete_checkpoints(tmp_path)}
    assert sorted(reasons) == [".tmp-step-000004", "step-000002", "step-000003"]
    assert reasons[".tmp-step-000004"] == "its write never finished"
    assert reasons["step-000002"].startswith("trainable.safetensors has 100 bytes, not the")
    assert reasons["step-000003"] == f"it has no {COMPLETE} (its write never finished)"
    with pytest.raises(CheckpointError, match="has 100 bytes"):
        load_checkpoint(newer, *trained_module(0))


class _SideEffect:
    """Unpickling this writes a file: what an attacker's pickle would do, harmlessly."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_a_planted_pickle_in_a_checkpoint_is_refused_without_running(tmp_path):
    model, optimizer, scheduler = trained_module(1)
    path = save_checkpoint(tmp_path, model, optimizer, scheduler, TrainerState(step=1), keep=1)
    for name in ("optimizer.safetensors", "resume.json", COMPLETE):  # the layout of an earlier tunelab
        (path / name).unlink()
    marker = tmp_path / "pwned.txt"
    torch.save({"optimizer": _SideEffect(marker)}, path / LEGACY_OPTIMIZER)

    with pytest.raises(CheckpointError, match="could run code") as refused:
        load_checkpoint(path, *trained_module(0))
    assert LEGACY_OPTIMIZER in str(refused.value)
    assert not marker.exists()
    torch.load(path / LEGACY_OPTIMIZER, weights_only=False)  # the control: an unguarded load runs it
    assert marker.read_text() == "code ran"


KILLED_WRITER = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from tunelab.train.checkpoint import TrainerState, save_checkpoint
    model = torch.nn.Linear(1024, 1024)  # 4 MB of weights, 8 MB of moments: writes take a while
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model(torch.ones(1, 1024)).sum().backward()
    optimizer.step()
    step = int(sys.argv[2])
    while True:
        step += 1
        with torch.no_grad():
            model.weight.fill_(step)
        save_checkpoint(Path(sys.argv[1]), model, optimizer, scheduler, TrainerState(step=step), keep=2)
        print(step, flush=True)
""")


def test_sigkill_while_writing_never_leaves_a_checkpoint_that_resume_would_load_wrongly(tmp_path):
    """Kill a process that writes checkpoints back to back at random moments, again and again: every time, the
    newest complete checkpoint loads and holds exactly the weights of its step."""
    rng = random.Random(0)
    step = 0
    skipped = 0
    for _ in range(4):
        writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path), str(step)],
                                  stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline()  # at least one checkpoint written, so kills land among writes
        time.sleep(rng.uniform(0.0, 0.5))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        skipped += len(incomplete_checkpoints(tmp_path))
        latest = latest_checkpoint(tmp_path)
        model = torch.nn.Linear(1024, 1024)
        optimizer = torch.optim.AdamW(model.parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        state = load_checkpoint(latest, model, optimizer, scheduler)
        assert latest.name == f"step-{state.step:06d}" and state.step > step
        assert torch.all(model.weight == state.step)
        assert len(complete_checkpoints(tmp_path)) <= 3  # keep=2, plus one when the kill fell before the pruning
        step = state.step
    assert skipped, "no kill landed inside a write; the test proved nothing"


def test_sigterm_stops_the_cli_run_at_a_step_boundary_with_a_checkpoint(tiny_model_dir, tmp_path):
    rows = [{"question": f"what is {a} plus {b}?", "answer": str(a + b)} for a in range(5) for b in range(5)]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "data": {"train": str(data), "max_length": 64},
        "train": {"max_steps": 100000, "batch_size": 2, "precision": "fp32", "log_every": 1},
        "eval": {"before_after": False, "generate_samples": 0}, "output_dir": str(out),
    }))
    tunelab = Path(sys.executable).with_name("tunelab")
    run = subprocess.Popen([str(tunelab), "train", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, env={**os.environ, "COLUMNS": "200"})
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and '"loss"' in metrics.read_text()):
        assert run.poll() is None and time.monotonic() < deadline, run.stdout.read()
        time.sleep(0.1)
    run.send_signal(signal.SIGTERM)
    output = run.communicate(timeout=120)[0]
    assert run.returncode == 128 + signal.SIGTERM, output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 1 <= summary["steps"] < 100000
    assert latest_checkpoint(out).name == f"step-{summary['steps']:06d}"
    assert "SIGTERM: stopping after this step" in output and "--resume" in output
    from tunelab.allocator import preload_environment

    # the command restarted itself under tcmalloc where this machine has it (tunelab/allocator.py)
    tcmalloc = ("tcmalloc" in os.environ.get("LD_PRELOAD", "")  # preloaded already: the child inherits it
                or preload_environment({k: v for k, v in os.environ.items() if k != "TUNELAB_ALLOCATOR_CHECKED"}))
    assert summary["hardware"]["allocator"] == ("tcmalloc" if tcmalloc else "system")


@pytest.fixture
def file_size_limit():
    """limit(n): from now on no file may grow past n bytes (writes fail with EFBIG, as on a full disk); lifted
    when the test ends."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    yield lambda n: resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)


def test_a_full_disk_while_saving_stops_with_the_last_checkpoint_intact(tiny_model_dir, tmp_path, file_size_limit):
    from test_train import QA, run_config

    from tunelab.errors import SaveFailed
    from tunelab.train.run import train_run

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in QA))
    out = tmp_path / "run"
    base = ["train.max_steps=6", "train.save_every=2", "eval.before_after=false"]

    def fill_disk_after_step_3(step, batches):
        if step == 3:  # the adapter (~130 KB) no longer fits; metrics.jsonl and summary.json still do
            file_size_limit(64 * 1024)

    with pytest.raises(SaveFailed, match=r"could not write checkpoint step-000004 \(.*File too large.*\); "
                                         r".*step-000002 is intact"):
        train_run(run_config(tiny_model_dir, data, out, *base), on_batches=fill_disk_after_step_3)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    assert latest_checkpoint(out).name == "step-000002"
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"

    file_size_limit(2**62)  # room again
    resumed = train_run(run_config(tiny_model_dir, data, out, *base), resume=True)
    assert resumed["status"] == "completed" and resumed["steps"] == 6
    saved = (out / "config.yaml").read_text()  # another adapter shape cannot load the checkpoint: refused first
    with pytest.raises(ConfigError, match=r"trained with other method\.r than this config gives"):
        train_run(run_config(tiny_model_dir, data, out, *base, "method.r=3", "train.max_steps=8"), resume=True)
    # a new learning rate would be written to config.yaml while the restored optimizer and schedule kept the old
    with pytest.raises(ConfigError, match=r"so train\.lr .* -> 1e-05 would not take effect"):
        train_run(run_config(tiny_model_dir, data, out, *base, "train.lr=1e-5", "train.max_steps=8"), resume=True)
    assert (out / "config.yaml").read_text() == saved


def test_a_planted_pickle_in_a_model_folder_is_refused_without_running(tiny_model_dir, tmp_path):
    import shutil

    from tunelab.errors import ModelError
    from tunelab.models.load import load_model

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned.txt"
    torch.save({"model.embed_tokens.weight": _SideEffect(marker)}, folder / "pytorch_model.bin")

    with pytest.raises(ModelError, match="refused pytorch_model.bin: a pickle holding more than tensors could run"):
        load_model(folder)
    assert not marker.exists()
    torch.load(folder / "pytorch_model.bin", weights_only=False)  # the control: an unguarded load runs it
    assert marker.exists()


@pytest.mark.parametrize("fault", [KeyboardInterrupt, MemoryError])
def test_a_fault_in_the_last_evaluation_keeps_the_fine_tuned_weights(tiny_model_dir, tmp_path, monkeypatch, fault):
    """The weights are written before the last evaluation (generation can take long, or run out of memory): a run
    stopped or failing there still leaves a loadable fine-tuned model and a summary of its finished steps."""
    from test_train import QA, run_config

    from tunelab.infer.load import load_for_inference
    from tunelab.train import run as run_module

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in QA))
    out = tmp_path / "run"
    measured = run_module._measure
    calls = []

    def fail_after_training(*args):
        calls.append(1)
        if len(calls) == 2:  # the first measures the base model
            raise fault()
        return measured(*args)

    monkeypatch.setattr(run_module, "_measure", fail_after_training)
    with pytest.raises(fault):
        run_module.train_run(run_config(tiny_model_dir, data, out, "train.max_steps=3", "train.lr=1e-2"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == ("interrupted" if fault is KeyboardInterrupt else "failed")
    assert summary["steps"] == 3 and not summary.get("eval_after")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():  # the run folder loads as the fine-tuned model, not the base
        trained = load_for_inference(out).model(input_ids=ids).logits
        base = load_for_inference(tiny_model_dir).model(input_ids=ids).logits
    assert not torch.allclose(trained, base, atol=1e-4)
