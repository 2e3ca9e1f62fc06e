"""The training loop on a tiny real model: it learns, saves, resumes exactly, and fails cleanly."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import interrupted_at_step
from tunelab.config import load_config
from tunelab.data.batching import collate
from tunelab.data.template import IGNORE_INDEX, TokenizedSample
from tunelab.objectives.sft import sft_loss_sum
from tunelab.train.run import train_run

QA = [
    {"question": f"what is {a} plus {b}?", "answer": f"{a + b}"}
    for a in range(6)
    for b in range(6)
]


@pytest.fixture
def qa_file(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in QA))
    return path


def run_config(tiny_model_dir, qa_file, out, *overrides):
    return load_config(
        None,
        [
            f"model={tiny_model_dir}",
            f"data.train={qa_file}",
            "data.eval_split=0.2",
            "data.max_length=64",
            f"output_dir={out}",
            "train.batch_size=4",
            "train.precision=fp32",
            "eval.generate_samples=4",
            "eval.max_new_tokens=4",
            "eval.show_samples=0",
            *overrides,
        ],
    )


def test_lora_lowers_eval_loss_and_writes_the_run_directory(tiny_model_dir, qa_file, tmp_path):
    out = tmp_path / "run"
    summary = train_run(run_config(tiny_model_dir, qa_file, out, "train.epochs=4", "train.lr=3e-3",
                                   "train.profile_steps=2"))
    assert summary["final_eval_loss"] < summary["base_eval_loss"] - 0.5
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "adapter_model.safetensors",
                 "adapter_config.json", "tokenizer.json", "README.md", "samples.jsonl", "report.html", "profile.txt"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "eval_loss" in records[0]
    assert {"step", "loss", "lr", "tokens", "tokens_per_second"} <= set(records[1])
    written = json.loads((out / "summary.json").read_text())
    for key in ("train_tokens", "train_seconds", "tokens_per_second", "peak_memory_mb", "final_train_loss",
                "final_eval_loss", "trainable_parameters", "total_parameters"):
        assert written[key] is not None, key
    assert written["trainable_parameters"] < written["total_parameters"]
    assert 0 < written["mfu"] < 1 and written["peak_matmul_tflops"] > 0
    assert written["hardware"]["cores"] >= 1 and written["hardware"]["cpu"] != "unknown"
    # where two profiled steps' time went: every category measured, together the steps' wall time
    breakdown = written["step_breakdown"]
    assert breakdown["steps"] == 2 and sum(breakdown["share"].values()) == pytest.approx(1, abs=0.01)
    assert breakdown["share"]["matmul"] > 0 and breakdown["share"]["optimizer"] > 0
    assert breakdown["top_ops"] and "matmul" in (out / "profile.txt").read_text()
    assert breakdown["ops_per_step"] > 100 and "ops dispatched a step" in (out / "profile.txt").read_text()


def test_lora_with_activation_checkpointing_learns(tiny_model_dir, qa_file, tmp_path):
    summary = train_run(run_config(tiny_model_dir, qa_file, tmp_path / "run", "train.activation_checkpointing=1",
                                   "train.epochs=4", "train.lr=3e-3"))
    assert summary["status"] == "completed"
    assert summary["final_eval_loss"] < summary["base_eval_loss"] - 0.5


def test_full_fine_tuning_trains_every_weight(tiny_model_dir, qa_file, tmp_path):
    out = tmp_path / "full"
    summary = train_run(run_config(tiny_model_dir, qa_file, out, "method.name=full", "train.epochs=3",
                                   "train.lr=3e-3"))
    assert summary["trainable_parameters"] == summary["total_parameters"]
    assert summary["final_eval_loss"] < summary["base_eval_loss"]
    assert (out / "model.safetensors").is_file()


def _batch(samples):
    return collate([[s] for s in samples], pad_token_id=0, packed=False)


def test_accumulated_loss_weights_every_token_equally(tiny_model_dir):
    """Two micro-batches of 1 and 3 trained tokens: each token weighs 1/4, not 1/2 per micro-batch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    a = TokenizedSample([5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 8], "a")
    b = TokenizedSample([9, 10, 11, 12], [IGNORE_INDEX, 10, 11, 12], "b")
    together, n = sft_loss_sum(model, _batch([a, b]))
    assert n == 4
    sum_a, n_a = sft_loss_sum(model, _batch([a]))
    sum_b, n_b = sft_loss_sum(model, _batch([b]))
    assert (n_a, n_b) == (1, 3)
    # Reference: plain full-logits cross-entropy over the 4 trained positions.
    logits = model(input_ids=torch.tensor([a.input_ids, b.input_ids])).logits
    targets = torch.tensor([a.labels, b.labels])[:, 1:]
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                  ignore_index=IGNORE_INDEX, reduction="mean")
    torch.testing.assert_close((sum_a + sum_b) / 4, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together / n, reference, rtol=1e-5, atol=1e-6)


def test_grad_accum_matches_one_big_batch(tiny_model_dir, qa_file, tmp_path):
    big = train_run(run_config(tiny_model_dir, qa_file, tmp_path / "big", "train.max_steps=3", "train.batch_size=4",
                               "method.dropout=0", "eval.before_after=false"))
    small = train_run(run_config(tiny_model_dir, qa_file, tmp_path / "acc", "train.max_steps=3",
                                 "train.batch_size=2", "train.grad_accum=2", "method.dropout=0",
                                 "eval.before_after=false"))
    assert small["final_train_loss"] == pytest.approx(big["final_train_loss"], rel=1e-4)
    assert small["final_eval_loss"] == pytest.approx(big["final_eval_loss"], rel=1e-4)


def test_resume_reaches_the_same_final_loss(tiny_model_dir, qa_file, tmp_path):
    # Dropout on, so the resumed run only matches if the random state is restored exactly.
    base = ["train.max_steps=8", "train.save_every=3", "train.lr=3e-3", "eval.before_after=false", "method.dropout=0.1"]
    straight = train_run(run_config(tiny_model_dir, qa_file, tmp_path / "straight", *base))

    with interrupted_at_step(6):
        train_run(run_config(tiny_model_dir, qa_file, tmp_path / "resumed", *base))
    interrupted = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert interrupted["status"] == "interrupted" and interrupted["steps"] == 6
    resumed = train_run(run_config(tiny_model_dir, qa_file, tmp_path / "resumed", *base), resume=True)
    assert resumed["steps"] == 8
    assert resumed["final_train_loss"] == pytest.approx(straight["final_train_loss"], rel=1e-5)
    assert resumed["final_eval_loss"] == pytest.approx(straight["final_eval_loss"], rel=1e-5)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 8

    # A second Ctrl-C lands inside step 5's update: nothing is saved from those weights; resume starts at step 3.
    with interrupted_at_step(5, at_once=True):
        train_run(run_config(tiny_model_dir, qa_file, tmp_path / "at-once", *base))
    assert [p.name for p in (tmp_path / "at-once" / "checkpoints").iterdir()] == ["step-000003"]
    resumed = train_run(run_config(tiny_model_dir, qa_file, tmp_path / "at-once", *base), resume=True)
    assert resumed["final_train_loss"] == pytest.approx(straight["final_train_loss"], rel=1e-5)


def test_existing_output_dir_is_not_overwritten_silently(tiny_model_dir, qa_file, tmp_path):
    from tunelab.errors import ConfigError

    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="--overwrite"):
        train_run(run_config(tiny_model_dir, qa_file, out, "train.max_steps=1"))
    assert (out / "keep.txt").read_text() == "mine"


def test_a_run_another_process_trains_is_neither_overwritten_nor_resumed(tiny_model_dir, qa_file, tmp_path):
    """status.json names a live process on this host training the run: --overwrite and --resume are refused before
    anything is touched. A process that started after the run did holds a reused pid, not the run."""
    import socket
    import subprocess
    import sys
    import time

    from tunelab.errors import ConfigError
    from tunelab.train.live import STATUS_FILE, training_process

    out = tmp_path / "live"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    record = {"status": "running", "pid": trainer.pid, "host": socket.gethostname(), "started_at": time.time() + 1}
    try:
        (out / STATUS_FILE).write_text(json.dumps(record))
        for flags in ({"overwrite": True}, {"resume": True}):
            with pytest.raises(ConfigError, match=f"being trained now by process {trainer.pid}"):
                train_run(run_config(tiny_model_dir, qa_file, out, "train.max_steps=1"), **flags)
        assert (out / "keep.txt").read_text() == "mine" and training_process(out) == trainer.pid
        (out / STATUS_FILE).write_text(json.dumps({**record, "started_at": time.time() - 3600}))
        assert training_process(out) is None
        (out / STATUS_FILE).write_text(json.dumps(record))
    finally:
        trainer.kill()
        trainer.wait()
    assert training_process(out) is None


def test_a_run_that_made_the_model_worse_says_so(tiny_model_dir, qa_file, tmp_path):
    """A learning rate far too high ends `completed` without a NaN; the summary and the console warn that the
    held-out loss is worse than the base model's. A sound run carries no warning."""
    ruined = train_run(run_config(tiny_model_dir, qa_file, tmp_path / "ruined", "method.name=full", "train.lr=3",
                                  "train.max_steps=4", "eval.before_after=true"))
    assert ruined["status"] == "completed" and ruined["final_eval_loss"] > ruined["base_eval_loss"]
    assert len(ruined["warnings"]) == 1 and "train.lr is 3" in ruined["warnings"][0]
    assert "worse than the base model" in (tmp_path / "ruined" / "report.html").read_text()
    sound = train_run(run_config(tiny_model_dir, qa_file, tmp_path / "sound", "method.name=full", "train.lr=1e-3",
                                 "train.max_steps=4", "eval.before_after=true"))
    assert sound["final_eval_loss"] < sound["base_eval_loss"] and sound["warnings"] == []


def test_early_stopping_keeps_the_best_weights(tiny_model_dir, qa_file, tmp_path):
    out = tmp_path / "early"
    summary = train_run(run_config(tiny_model_dir, qa_file, out, "method.name=full", "train.lr=3e-2",
                                   "train.epochs=30", "train.eval_every=2", "train.early_stopping_patience=2",
                                   "train.scheduler=constant", "eval.before_after=false"))
    state = summary["trainer_state"]
    assert state["extra"].get("early_stopped_at") is not None
    assert summary["steps"] < 30 * 8
    assert summary["final_eval_loss"] == pytest.approx(state["best_eval_loss"], rel=1e-4)


def test_gpu_kernels_seen_on_an_h200_fall_in_their_categories():
    from tunelab.train.step_profile import kernel_category

    seen = {  # names from lora-short's CUDA profile on an H200, torch 2.11 (bench/results/20261204-170041-*)
        "nvjet_sm90_tst_128x144_64x6_2x1_v_bz_NNT": "matmul",  # cuBLAS's own kernels since CUDA 12.9
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64_1x4x1_cga1x1x1_kernel0_0":
            "attention",
        "fmha_cutlassB_bf16_aligned_64x64_k64_sm80(PyTorchMemEffAttention::AttentionBackwardKernel<...>::Params)":
            "attention",
        "void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy_kernel_cuda(...)>": "casts",
        "void at::native::elementwise_kernel<128, 2, ... MulFunctor<float> ...>": "elementwise",
    }
    assert {name: kernel_category(name) for name in seen} == seen


def test_ops_dispatched_count_each_top_level_call_once_not_what_it_calls():
    from tunelab.train.step_profile import summarise

    x, weight = torch.randn(4, 8), torch.randn(3, 8, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for _ in range(3):  # linear calls t and matmul (-> mm) inside: one dispatch from here, not three
            torch.nn.functional.linear(x, weight).sum().backward()
    found = summarise(profiler.events(), wall_seconds=1.0, steps=3, cuda=False)
    totals = dict(found.top_dispatched)  # over the 3 steps
    assert totals["aten::linear"] == 3 and totals["aten::sum"] == 3
    assert totals["aten::mm"] == 3  # backward's, which autograd's engine dispatches; forward's is linear's own
    assert found.to_json()["ops_per_step"] == round(found.ops_dispatched / 3) > 3


def test_training_flops_count_body_per_input_token_and_head_per_trained_token():
    from conftest import build_tiny_model
    from tunelab.train.flops import training_flops

    model = build_tiny_model(vocab_size=400)
    body = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    head = 400 * 64  # tied with the embedding: counted once, per trained token
    assert training_flops(model, input_tokens=10, trained_tokens=3, base_trains=True) == 3 * 2 * (
        body * 10 + head * 3)
    assert training_flops(model, input_tokens=10, trained_tokens=3, base_trains=False) == 2 * 2 * (
        body * 10 + head * 3)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_fused_adamw_trains_as_the_per_tensor_loop_does(tiny_model_dir, qa_file, tmp_path, monkeypatch, method):
    from tunelab.train import schedule

    def losses(name: str) -> list[float]:
        out = tmp_path / name
        train_run(run_config(tiny_model_dir, qa_file, out, f"method.name={method}", "train.max_steps=6",
                             "train.lr=3e-3", "train.weight_decay=0.1", "train.precision=bf16"))
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in line]

    fused = losses("fused")
    with monkeypatch.context() as patch:
        patch.setattr(schedule, "fused_supported", lambda params: False)
        loop = losses("loop")
    assert len(fused) == 6 and fused[-1] < fused[0]  # it trained
    assert fused == pytest.approx(loop, rel=1e-4)  # same algorithm; the kernel rounds in its own order


def test_the_fused_adamw_counts_its_update_in_the_parameters_versions():
    from tunelab.config import TrainConfig
    from tunelab.train.schedule import build_optimizer

    model = torch.nn.Linear(4, 3)
    optimizer, _ = build_optimizer(model, TrainConfig(), total_steps=1)
    assert optimizer.defaults["fused"]
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    before = [param._version for param in model.parameters()]
    optimizer.step()
    assert all(after > was for after, was in zip([p._version for p in model.parameters()], before, strict=True))


def test_loraplus_moves_the_b_matrices_at_ratio_times_the_rate(tiny_model_dir, qa_file, tmp_path):
    """LoRA+: one AdamW step from fresh state moves each weight by about its group's rate (Adam's first update is
    lr * sign(grad)), so the B matrices move 16x as far as the A matrices; a run with it trains and logs train.lr."""
    from transformers import AutoModelForCausalLM

    from tunelab.config import TrainConfig
    from tunelab.method_config import LoraMethod
    from tunelab.methods.lora import apply
    from tunelab.train.schedule import build_optimizer

    model = apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraMethod(name="lora", r=4))
    optimizer, _ = build_optimizer(model, TrainConfig(lr=1e-3, warmup_ratio=0), total_steps=10, b_lr_ratio=16)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    before = {name: p.detach().clone() for name, p in trainable.items()}
    for p in trainable.values():
        p.grad = torch.randn_like(p)
    optimizer.step()
    moved = {name: (p.detach() - before[name]).abs().max().item() for name, p in trainable.items()}
    assert {round(v / 1e-3) for k, v in moved.items() if ".lora_A." in k} == {1}
    assert {round(v / 1e-3) for k, v in moved.items() if ".lora_B." in k} == {16}

    out = tmp_path / "plus"
    train_run(run_config(tiny_model_dir, qa_file, out, "method.loraplus_lr_ratio=16", "train.max_steps=6",
                         "train.lr=1e-3", "train.warmup_ratio=0", "train.scheduler=constant"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] and {r["lr"] for r in records if "lr" in r} == {1e-3}


def test_an_eight_bit_optimizer_trains_keeps_8_bit_moments_and_resumes_exactly(tiny_model_dir, qa_file, tmp_path):
    """Full fine-tuning with bitsandbytes' AdamW8bit: the loss falls, the checkpoint holds one byte a moment for the
    large tensors, the estimate counts them so, and an interrupted run resumes to the uninterrupted one's losses."""
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    from tunelab.train.schedule import optimizer_state_bytes

    base = ["method.name=full", "train.optimizer=adamw_8bit", "train.max_steps=6", "train.save_every=2",
            "train.lr=1e-3", "eval.before_after=false"]
    straight = train_run(run_config(tiny_model_dir, qa_file, tmp_path / "straight", *base))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses[-1] < losses[0]
    with interrupted_at_step(3, optimizer=bnb.optim.AdamW8bit):
        train_run(run_config(tiny_model_dir, qa_file, tmp_path / "resumed", *base))
    checkpoint = max((tmp_path / "resumed" / "checkpoints").iterdir())
    tensors = {}
    for file in checkpoint.glob("*.safetensors"):
        tensors.update(load_file(file))
    moments = [t for key, t in tensors.items() if key.startswith("optimizer/") and key.endswith("/state1")]
    assert moments and any(t.dtype == torch.uint8 for t in moments)
    resumed = train_run(run_config(tiny_model_dir, qa_file, tmp_path / "resumed", *base), resume=True)
    assert resumed["final_train_loss"] == pytest.approx(straight["final_train_loss"], rel=1e-5)
    assert resumed["final_eval_loss"] == pytest.approx(straight["final_eval_loss"], rel=1e-5)

    params = [torch.empty(64, 64), torch.empty(10)]
    assert optimizer_state_bytes(params, "adamw_8bit") == 2 * 4096 + 8 * 16 + 80  # small tensors stay float32
    assert optimizer_state_bytes(params, "adamw") == 8 * 4106
    estimate = straight["memory_estimate"]["optimizer_mb"]
    trainable = sum(p.numel() for p in load_file(tmp_path / "straight" / "model.safetensors").values())
    assert estimate < 0.5 * 8 * trainable / 2**20
