"""Training in two processes on CPU (gloo): with batch B each, DDP and FSDP2 train like one process with batch 2B,
and runs stopped and resumed (FSDP2, and GRPO mid-rollout) equal uninterrupted ones."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_train import QA

from tunelab.train.launch import free_port

BIN = Path(sys.executable).parent
TUNELAB = str(BIN / "tunelab")
ROOT = Path(__file__).resolve().parents[1]


def write_config(folder: Path, tiny_model_dir: Path, name: str, batch_size: int, before_after: bool = False,
                 **train) -> Path:
    data = folder / "qa.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(row) + "\n" for row in QA))
    config = folder / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir),
        "data": {"train": str(data), "eval_split": 0.2, "max_length": 64},
        "method": {"name": "lora", "dropout": 0.0},
        "train": {"batch_size": batch_size, "precision": "fp32", "lr": 3e-3, "max_steps": 5, **train},
        "eval": {"before_after": before_after, "generate_samples": 0},
        "output_dir": str(folder / name),
    }))
    return config


def one_thread_env() -> dict[str, str]:
    # One thread each, as torchrun gives every process, so both runs reduce in the same order on one core.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    return env


def train(config: Path, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run([TUNELAB, "train", str(config), *extra], capture_output=True, text=True,
                          env=one_thread_env(), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def train_on_two_nodes(config: Path) -> str:
    """torchrun as on two machines (one process each, their own launchers, one rendezvous): what they printed."""
    port = str(free_port())
    launchers = [subprocess.Popen([str(BIN / "torchrun"), "--nnodes", "2", "--node_rank", str(node),
                                   "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
                                   "-m", "tunelab.cli", "train", str(config)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=one_thread_env())
                 for node in (0, 1)]
    outputs = [launcher.communicate(timeout=600)[0] for launcher in launchers]
    assert [launcher.returncode for launcher in launchers] == [0, 0], "".join(outputs)[-4000:]
    return "".join(outputs)


def train_under_accelerate(config: Path, *options: str) -> str:
    """`accelerate launch` with the FSDP config tunelab ships (its multi-GPU launcher runs on CPUs too)."""
    done = subprocess.run([str(BIN / "accelerate"), "launch", "--config_file",
                           str(ROOT / "examples" / "accelerate" / "fsdp.yaml"), *options,
                           "--main_process_port", str(free_port()), "-m", "tunelab.cli", "train", str(config)],
                          capture_output=True, text=True, env=one_thread_env(), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


def grad_norms(run: Path) -> list[float]:
    return [json.loads(line)["grad_norm"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"grad_norm"' in line]


def test_two_processes_train_like_one_with_twice_the_batch_and_resume_exactly(tiny_model_dir, tmp_path):
    # Two micro-batches a step: the first accumulates without synchronising, the second synchronises. A constant
    # schedule, so a run cut short at step 3 has trained steps 1-2 exactly as the 5-step run did.
    common = {"grad_accum": 2, "scheduler": "constant", "warmup_ratio": 0.0}
    train(write_config(tmp_path, tiny_model_dir, "one", 4, **common))
    single = load_file(tmp_path / "one" / "adapter_model.safetensors")
    single_summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert len(losses(tmp_path / "one")) == 5
    # Each strategy under another launcher: DDP as on two machines (torchrun), FSDP2 by tunelab's own --nproc,
    # and ZeRO-2-like FSDP2 as accelerate's FSDP config asks (the config itself does not name a strategy).
    for strategy in ("ddp", "fsdp", "zero2"):
        # zero2 after a base-model evaluation, which leaves its blocks gathered (clipping once saw no gradients)
        config = write_config(tmp_path, tiny_model_dir, strategy, 2, before_after=strategy == "zero2", save_every=2,
                              **common, **({"distributed": "fsdp"} if strategy == "fsdp" else {}))
        if strategy == "ddp":
            printed = train_on_two_nodes(config)
        elif strategy == "fsdp":
            printed = train(config, "--nproc", "2").stdout
        else:
            printed = train_under_accelerate(config, "--fsdp_reshard_after_forward", "false")
            assert "accelerate launch asked for FSDP, not resharding after forward" in printed
            assert yaml.safe_load((tmp_path / strategy / "config.yaml").read_text())["train"]["distributed"] == strategy
        assert printed.count("saved to") == 1  # only the main process speaks
        assert losses(tmp_path / strategy) == pytest.approx(losses(tmp_path / "one"), rel=1e-5), strategy
        assert grad_norms(tmp_path / strategy) == pytest.approx(grad_norms(tmp_path / "one"), rel=1e-4), strategy
        parallel = load_file(tmp_path / strategy / "adapter_model.safetensors")
        assert sorted(parallel) == sorted(single)
        for name, tensor in single.items():
            # Relative to the whole tensor: Adam turns rounding-level gradients near 0 into full-size steps, so
            # a single element may differ more.
            assert float((parallel[name] - tensor).norm() / tensor.norm()) < 1e-5, (strategy, name)
        summary = json.loads((tmp_path / strategy / "summary.json").read_text())
        assert summary["train_tokens"] == single_summary["train_tokens"]  # every process's tokens counted once
        assert summary["final_eval_loss"] == pytest.approx(single_summary["final_eval_loss"], rel=1e-5)
        # one process wrote the run; its checkpoints hold both processes' random states and whole tensors
        checkpoint = tmp_path / strategy / "checkpoints" / "step-000004"
        assert "rng-rank1/torch" in load_file(checkpoint / "optimizer.safetensors")
        assert {name.replace(".default", ""): tensor.shape
                for name, tensor in load_file(checkpoint / "trainable.safetensors").items()} == {
            name: tensor.shape for name, tensor in single.items()}  # whole tensors, not one process's shards

    # LoRA + FSDP2 resumed from its step-2 checkpoint (the run as a kill after step 3 would leave it: the newer
    # checkpoint and the final weights gone) equals the uninterrupted FSDP2 run, bit for bit.
    shutil.copytree(tmp_path / "fsdp", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-000004")
    for name in ("adapter_model.safetensors", "summary.json"):
        (tmp_path / "resumed" / name).unlink()
    config = yaml.safe_load((tmp_path / "fsdp.yaml").read_text())
    resumed = tmp_path / "resumed.yaml"
    resumed.write_text(yaml.safe_dump({**config, "output_dir": str(tmp_path / "resumed")}))
    train(resumed, "--nproc", "2", "--resume")
    assert losses(tmp_path / "resumed") == losses(tmp_path / "fsdp")
    resumed_weights = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    for name, tensor in load_file(tmp_path / "fsdp" / "adapter_model.safetensors").items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("overrides, named", [
    (["method.name=qlora", "train.distributed=fsdp"], "trl#1723"),
    (["method.name=prefix", "train.distributed=fsdp"], "prompt methods"),
    (["train.keep_best=true", "train.distributed=fsdp"], "train.keep_best"),
    (["objective.name=grpo", "objective.rewards=[exact_match]", "train.distributed=fsdp"],
     "objective.name=grpo cannot shard"),
])
def test_what_cannot_train_in_several_processes_is_refused_with_the_reason(overrides, named, tmp_path):
    from tunelab.config import load_config
    from tunelab.errors import ConfigError
    from tunelab.train.distributed import Ranks
    from tunelab.train.sharding import check_several_processes

    config = load_config(None, [f"output_dir={tmp_path}", *overrides])
    check_several_processes(config, Ranks())  # one process: anything goes
    with pytest.raises(ConfigError, match=named):
        check_several_processes(config, Ranks(rank=0, world_size=2))


def test_grpo_in_two_processes_resumes_exactly_in_the_middle_of_a_rollout(tiny_model_dir, tmp_path):
    """Each process samples completions for its own prompts and keeps its own rollout for the next update; a
    checkpoint between a rollout's two updates holds both processes' rollouts."""
    rows = [{"prompt": f"what is {a} plus {b}?", "answer": str(a + b)} for a in range(6) for b in range(6)]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    rewards = tmp_path / "rewards.py"
    rewards.write_text("def letters(prompts, completions, **columns):\n"
                       "    return [sum(c.isalpha() for c in text) / max(1, len(text)) for text in completions]\n")
    config = tmp_path / "grpo.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "data": {"train": str(data), "eval_split": 0.25, "max_length": 64},
        "objective": {"name": "grpo", "rewards": [f"{rewards}:letters"], "group_size": 4, "max_new_tokens": 8,
                      "updates_per_rollout": 2},
        "train": {"max_steps": 6, "batch_size": 2, "precision": "fp32", "lr": 1e-2, "save_every": 3},
        "eval": {"before_after": False, "generate_samples": 0}, "output_dir": str(tmp_path / "grpo"),
    }))
    train(config, "--nproc", "2")
    run = tmp_path / "grpo"
    straight = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    weights = load_file(run / "adapter_model.safetensors")
    assert {"step-000003", "step-000006"} <= {p.name for p in (run / "checkpoints").iterdir()}
    assert (run / "checkpoints" / "step-000003" / "objective-rank1.safetensors").is_file()  # rank 1's rollout
    shutil.rmtree(run / "checkpoints" / "step-000006")
    train(config, "--nproc", "2", "--resume")  # from step 3: step 4 updates on both processes' saved rollouts
    resumed = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"], r.get("reward")) for r in resumed if "loss" in r] == [
        (r["step"], r["loss"], r.get("reward")) for r in straight if "loss" in r]
    for name, tensor in load_file(run / "adapter_model.safetensors").items():
        torch.testing.assert_close(tensor, weights[name], rtol=0, atol=0)


def test_each_process_takes_a_contiguous_share_and_a_short_batch_leaves_the_last_ones_empty():
    from tunelab.train.distributed import Ranks

    rows = list(range(5))
    assert [Ranks(rank, 2).share(rows) for rank in range(2)] == [[0, 1, 2], [3, 4]]
    assert [Ranks(rank, 3).share(rows) for rank in range(3)] == [[0, 1], [2, 3], [4]]
    # one row for two processes: the second computes a 0-weighted stand-in (a 2-process run with such a last
    # batch logged the single process's losses, checked by hand: 5.994213 / 5.754302 / 5.559972 / 5.428735)
    assert [Ranks(rank, 2).share([7]) for rank in range(2)] == [[7], []]


@pytest.mark.parametrize("environ, strategy", [
    ({}, None),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_RESHARD_AFTER_FORWARD": "true"}, "fsdp"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_RESHARD_AFTER_FORWARD": "false"}, "zero2"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_RESHARD_AFTER_FORWARD": "SHARD_GRAD_OP"}, "zero2"),  # an FSDP1 config
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "fsdp"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, "zero2"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "0"}, "ddp"),
])
def test_what_accelerate_launch_asked_for_becomes_a_strategy(environ, strategy):
    from tunelab.config import TrainConfig
    from tunelab.train.launcher_env import apply_launcher_sharding

    train_config, notice = apply_launcher_sharding(TrainConfig(), environ)
    assert train_config.distributed == (strategy or "ddp")
    assert (notice is None) == (strategy is None)
    if environ.get("ACCELERATE_USE_DEEPSPEED"):
        assert "DeepSpeed's engine is not used" in notice


def test_accelerate_settings_tunelab_cannot_honour_are_refused(tmp_path):
    from tunelab.config import TrainConfig
    from tunelab.errors import ConfigError
    from tunelab.train.launcher_env import apply_launcher_sharding

    zero3 = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
    with pytest.raises(ConfigError, match="train.distributed=ddp but accelerate launch asked for DeepSpeed ZeRO-3"):
        apply_launcher_sharding(TrainConfig(distributed="ddp"), zero3)  # chosen in the config: not overridden
    with pytest.raises(ConfigError, match="offloads optimizer to CPU memory"):
        apply_launcher_sharding(TrainConfig(), {**zero3, "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"})
    with pytest.raises(ConfigError, match="fsdp_offload_params"):
        apply_launcher_sharding(TrainConfig(), {"ACCELERATE_USE_FSDP": "true", "FSDP_OFFLOAD_PARAMS": "true"})
    ds_json = tmp_path / "ds.json"  # a DeepSpeed JSON file named by the accelerate config wins over its fields
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}))
    with pytest.raises(ConfigError, match="offloads param"):
        apply_launcher_sharding(TrainConfig(), {**zero3, "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds_json)})
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert apply_launcher_sharding(TrainConfig(), {**zero3, "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds_json)}
                                   )[0].distributed == "zero2"
