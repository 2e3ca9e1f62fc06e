"""tunelab on a CUDA device: training picks the GPU and learns in bf16, evaluation's decoding loop gives
transformers' greedy tokens there, the lean decoding forward matches the model's own, GRPO samples and
updates on it, and Liger's kernels (where installed) train like plain PyTorch. Marked `gpu` and skipped where
torch sees no CUDA device; scripts/gpu_check.sh runs them on a lent GPU machine. `TUNELAB_TEST_DEVICE=cpu` runs
them on the CPU instead, to check the tests themselves."""

from __future__ import annotations

import json
import os
from importlib.util import find_spec

import pytest
import torch
from test_lean_decoder import MODELS, random_model, run_both
from test_train import run_config

from tunelab.infer.decode import decode
from tunelab.models.lean_decoder import lean_decoder
from tunelab.train.run import train_run

DEVICE = os.environ.get("TUNELAB_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]

QA = [{"question": f"what is {a} plus {b}?", "answer": f"{a + b}"} for a in range(6) for b in range(6)]


@pytest.fixture
def qa_file(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in QA))
    return path


@pytest.fixture(autouse=True)
def on_device(monkeypatch):
    """Training runs where DEVICE says (it picks CUDA by itself when there is one)."""
    if DEVICE == "cpu":
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
        monkeypatch.setenv("ACCELERATE_USE_CPU", "1")


@pytest.mark.parametrize("method", ["lora", "full"])
def test_training_runs_on_the_device_in_bf16_and_learns(tiny_model_dir, qa_file, tmp_path, method):
    out = tmp_path / "run"
    summary = train_run(run_config(tiny_model_dir, qa_file, out, f"method.name={method}", "train.epochs=4",
                                   "train.lr=3e-3" if method == "lora" else "train.lr=1e-3",
                                   "train.precision=bf16", "train.profile_steps=1"))
    assert summary["device"].startswith(DEVICE) and summary["precision"] == "bf16"
    assert summary["final_eval_loss"] < summary["base_eval_loss"] - 0.5
    written = json.loads((out / "summary.json").read_text())
    assert (written["hardware"]["gpu"] is not None) == (DEVICE == "cuda")
    assert 0 < written["mfu"] < 1 and written["step_breakdown"]["share"]["matmul"] > 0
    # kernels and idle time together are the steps' wall time (the profiler's step spans are not kernels)
    assert sum(written["step_breakdown"]["share"].values()) == pytest.approx(1, abs=0.01)
    assert written["step_breakdown"]["device_time"] == (DEVICE == "cuda")
    assert ("device idle" in (out / "profile.txt").read_text()) == (DEVICE == "cuda")
    assert [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_greedy_decoding_on_the_device_gives_generates_tokens(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).to(DEVICE).eval()
    prompts = [tiny_tokenizer(text)["input_ids"] for text in
               ("what is 3 plus 4?", "The quick brown fox", "capital of France", "hello")]
    stop = tiny_tokenizer.eos_token_id
    decoded = decode(model, prompts, max_new_tokens=12, stop_ids=[stop], pad_id=0, batch_size=3)
    for prompt, tokens in zip(prompts, decoded.tokens, strict=True):
        ids = torch.tensor([prompt], device=DEVICE)
        new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             eos_token_id=stop, pad_token_id=0)[0, len(prompt):].tolist()
        assert tokens == (new[:new.index(stop) + 1] if stop in new else new)


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_lean_forward_on_the_device_equals_the_models_own(model_type):
    model = random_model(model_type).to(DEVICE)
    lean = lean_decoder(model)
    assert lean is not None
    for got, expected in run_both(model, lean):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)  # TF32 off by default: float32 matmuls


def test_grpo_samples_and_updates_on_the_device_in_bf16(tiny_model_dir, tmp_path):
    from test_grpo import REWARDS_PY, grpo_config, write_prompts

    rewards = tmp_path / "rewards.py"
    rewards.write_text(REWARDS_PY)
    out = tmp_path / "grpo"
    summary = train_run(grpo_config(tiny_model_dir, write_prompts(tmp_path / "prompts.jsonl"), out, rewards,
                                    "train.max_steps=20", "train.precision=bf16",
                                    f"objective.rewards=[{rewards}:letters, exact_match]"))
    assert summary["device"].startswith(DEVICE) and summary["precision"] == "bf16"
    before, after = summary["eval_before"], summary["eval_after"]
    assert after["eval_rewards/letters/mean"] > before["eval_rewards/letters/mean"] + 0.3


@pytest.mark.skipif(DEVICE != "cuda" or find_spec("liger_kernel") is None, reason="needs CUDA and liger-kernel")
def test_liger_kernels_train_like_plain_pytorch(tiny_model_dir, qa_file, tmp_path):
    runs = {kernels: train_run(run_config(tiny_model_dir, qa_file, tmp_path / kernels, "train.epochs=2",
                                          "train.lr=3e-3", "train.precision=bf16", f"train.kernels={kernels}"))
            for kernels in ("none", "liger")}
    assert json.loads((tmp_path / "liger" / "summary.json").read_text())["kernels"] == "liger"
    assert runs["liger"]["final_eval_loss"] == pytest.approx(runs["none"]["final_eval_loss"], rel=0.03)
    assert runs["liger"]["final_eval_loss"] < runs["liger"]["base_eval_loss"] - 0.5


@pytest.mark.skipif(DEVICE != "cuda", reason="cuDNN attention is CUDA's")
def test_models_loaded_on_the_device_run_attention_without_per_shape_plans(tiny_model_dir):
    """cuDNN's attention builds a plan for every new shape (139 ms for a ~1B Llama's layer on an H200, against
    0.4 ms with flash), and training meets a new length every batch: load_model keeps attention off cuDNN."""
    from tunelab.models.load import load_model
    from tunelab.train.precision import autocast

    model = load_model(tiny_model_dir, device=DEVICE)
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profiler, autocast("bf16", torch.device(DEVICE)):
        for length in (37, 53):
            ids = torch.randint(3, 100, (2, length), device=DEVICE)
            mask = torch.ones_like(ids)
            mask[1, length // 2:] = 0
            model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        torch.cuda.synchronize()
    kernels = [event.name.lower() for event in profiler.events()
               if event.device_type == torch.autograd.DeviceType.CUDA and not event.is_user_annotation]
    assert any(word in name for name in kernels for word in ("fmha", "flash", "attention", "softmax"))
    assert not [name for name in kernels if "cudnn" in name]


@pytest.mark.skipif(DEVICE != "cuda", reason="flash attention's varlen kernels are CUDA's")
def test_varlen_attention_on_a_padding_free_batch_equals_sdpa_on_the_padded_one(tiny_model_dir):
    from test_attention import loss_and_grads, samples

    from tunelab.data.batching import collate
    from tunelab.models.load import load_model
    from tunelab.models.varlen import VARLEN
    from tunelab.train.precision import autocast

    model = load_model(tiny_model_dir, device=DEVICE).train()
    group = samples([20, 13, 7, 17])
    padded = {k: v.to(DEVICE) for k, v in collate([[s] for s in group], pad_token_id=0, packed=False).items()}
    padding_free = {k: v.to(DEVICE) for k, v in collate([group], pad_token_id=0, packed=True).items()}
    with autocast("bf16", torch.device(DEVICE)):
        reference_loss, reference_grads = loss_and_grads(model, padded, "sdpa")
        loss, grads = loss_and_grads(model, padding_free, VARLEN)
    assert loss == pytest.approx(reference_loss, rel=2e-2)  # bf16 kernels on both sides, different sums
    for name, grad in grads.items():
        assert torch.nn.functional.cosine_similarity(grad.flatten(), reference_grads[name].flatten(), dim=0) > 0.98


@pytest.mark.skipif(DEVICE != "cuda", reason="flash attention's varlen kernels are CUDA's")
def test_training_with_varlen_attention_computes_no_padding_and_learns(tiny_model_dir, qa_file, tmp_path):
    runs = {attention: train_run(run_config(tiny_model_dir, qa_file, tmp_path / attention, "train.epochs=4",
                                            "train.lr=3e-3", "train.precision=bf16", "train.kernels=none",
                                            f"train.attention={attention}"))
            for attention in ("sdpa", "varlen")}
    assert runs["varlen"]["non_padding_fraction"] == 1.0 and runs["sdpa"]["non_padding_fraction"] < 1.0
    assert runs["varlen"]["final_eval_loss"] < runs["varlen"]["base_eval_loss"] - 0.5
    assert runs["varlen"]["final_eval_loss"] == pytest.approx(runs["sdpa"]["final_eval_loss"], rel=0.05)


@pytest.mark.parametrize("objective", ["dpo", "reward"])
def test_preference_objectives_learn_on_the_device_in_bf16(tiny_model_dir, tmp_path, objective):
    """The objective seam (DPO's switched-off-adapter reference, the reward model's scalar head) in bf16 on the
    device, with its attention and kernels as auto picks them there."""
    from test_objectives import PAIRS, run_config, write_jsonl

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    summary = train_run(run_config(tiny_model_dir, data, tmp_path / objective, f"objective={objective}",
                                   "train.epochs=3", "train.lr=3e-3", "train.precision=bf16"))
    assert summary["device"].startswith(DEVICE) and summary["precision"] == "bf16"
    before, after = summary["eval_before"], summary["eval_after"]
    assert after["eval_rewards/accuracies"] > 0.9
    assert summary["final_eval_loss"] < summary["base_eval_loss"] - 0.2
    if objective == "dpo":
        assert after["eval_logps/margins"] > before["eval_logps/margins"] + 5


def test_serving_on_the_device_answers_as_generate_does(tiny_model_dir, tmp_path):
    """`tunelab serve`'s engine and OpenAI-compatible app on the device: each reply, alone or among concurrent
    requests, is the one generate_replies gives for the same prompt."""
    import openai
    from test_serve import KEY, PROMPTS, LiveServer, train_tiny_run

    from tunelab.infer.generate import GenerationOptions, generate_replies
    from tunelab.infer.serve import create_app, load_served

    run = train_tiny_run(tiny_model_dir, tmp_path, "run", "the answer is 42", 3e-2)
    served = load_served(str(run), max_batch=4, max_waiting=64)
    live = LiveServer(create_app(served, api_key=KEY))
    try:
        assert next(served.engine.model.parameters()).device.type == DEVICE
        renderer = served.models["run"].renderer
        conversations = [[{"role": "user", "content": p}] for p in PROMPTS[:6]]
        expected = generate_replies(served.engine.model, renderer, conversations, GenerationOptions(max_new_tokens=10))
        assert any(expected)
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0)

        def ask(conversation):
            return client.chat.completions.create(model="run", messages=conversation, temperature=0,
                                                  max_tokens=10).choices[0].message.content.strip()

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(6) as pool:
            assert list(pool.map(ask, conversations)) == expected
    finally:
        live.stop()
        served.engine.close()
