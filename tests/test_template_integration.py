"""The chat template on the real default model (SmolLM2-135M-Instruct), with multi-turn data in a format the other
fixtures never use (ShareGPT `conversations` of from/value, system turns, three assistant turns): training tokens
equal generate's prompt tokens, every assistant turn and its end-of-turn token are trained and nothing else, the
loss comes from those positions alone, and packed batches give the loss and gradients of unpacked ones."""

from __future__ import annotations

import json
import random

import pytest
import torch
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.config import load_config
from tunelab.data.batching import collate, plan_epoch
from tunelab.data.prepare import prepare_data
from tunelab.data.template import IGNORE_INDEX
from tunelab.models.load import load_tokenizer
from tunelab.models.logprobs import decoder_and_head
from tunelab.objectives.sft import sft_loss_sum

pytestmark = pytest.mark.integration

EOT = "<|im_end|>"
COLOURS = "amber cobalt crimson jade ochre teal umber violet".split()
ANIMALS = "otter heron lynx gecko bison ferret puffin marten".split()


def conversation(rng: random.Random, with_system: bool) -> dict:
    """Three made-up question/answer turns about an invented creature; rows without a system turn get the
    template's own default system prompt."""
    colour, animal = rng.choice(COLOURS), rng.choice(ANIMALS)
    count = rng.randint(2, 9)
    turns = [
        ("human", f"I saw a {colour} {animal}. What colour was it?"),
        ("gpt", f"It was {colour}."),
        ("human", f"And if there were {count} of them, how many legs in total?"),
        ("gpt", f"{count} {animal}s have {count * 4} legs."),
        ("human", "Spell the animal backwards."),
        ("gpt", animal[::-1].upper()),
    ]
    convo = [{"from": "system", "value": "You answer in one short sentence."}] if with_system else []
    return {"conversations": convo + [{"from": who, "value": text} for who, text in turns]}


def replies(row: dict) -> list[str]:
    return [turn["value"] for turn in row["conversations"] if turn["from"] == "gpt"]


@pytest.fixture(scope="module")
def sharegpt_rows() -> list[dict]:
    rng = random.Random(3)
    return [conversation(rng, with_system=i % 3 != 0) for i in range(16)]


@pytest.fixture()
def sharegpt_file(tmp_path, sharegpt_rows):
    path = tmp_path / "dialogues.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in sharegpt_rows))
    return path


def trained_runs(ids: list[int], trained: list[bool]) -> list[list[int]]:
    """Maximal runs of consecutive trained tokens."""
    runs, current = [], []
    for token, on in zip(ids, trained, strict=True):
        if on:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_check_template_and_inspect_agree_on_multi_turn_sharegpt(default_model_dir, sharegpt_file, sharegpt_rows):
    runner = CliRunner()
    result = runner.invoke(app, ["data", "check-template", str(sharegpt_file), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] and report["stop_tokens"] == [EOT] and report["template"] == "tokenizer's own"
    assert (report["checked"], report["replies"]) == (16, 48)
    assert {c["status"] for c in report["checks"].values()} == {"pass"}
    last = json.loads(
        runner.invoke(
            app, ["data", "check-template", str(sharegpt_file), "--json", "--train-on", "last_assistant"]
        ).output
    )
    assert last["ok"] and last["replies"] == 16

    inspected = runner.invoke(app, ["data", "inspect", str(sharegpt_file), "--json", "--samples", "16"])
    assert inspected.exit_code == 0, inspected.output
    shown = json.loads(inspected.output)["samples"]
    by_line = {int(s["where"].rsplit(":", 1)[1]): s for s in shown}
    assert sorted(by_line) == list(range(1, 17))
    for line, sample in by_line.items():
        trained = [seg["text"] for seg in sample["segments"] if seg["trained"]]
        assert trained == [reply + EOT for reply in replies(sharegpt_rows[line - 1])]
        untrained = "".join(seg["text"] for seg in sample["segments"] if not seg["trained"])
        assert "<|im_start|>system\n" in untrained  # the default system prompt is rendered but not trained


def test_a_short_run_trains_every_assistant_turn_and_its_end_of_turn_token_and_nothing_else(
    default_model_dir, sharegpt_file, sharegpt_rows, tmp_path
):
    from tunelab.infer.load import load_for_inference
    from tunelab.train.run import train_run

    out = tmp_path / "run"
    config = load_config(
        None,
        [
            "model=smollm2-135m-instruct",
            f"data.train={sharegpt_file}",
            "data.eval_split=0",
            "data.packing=true",
            "data.max_length=256",
            "train.batch_size=2",
            "train.max_steps=2",
            "train.lr=1e-3",
            "eval.before_after=false",
            "eval.generate_samples=0",
            f"output_dir={out}",
        ],
    )
    summary = train_run(config)
    assert summary["status"] == "completed"
    tokenizer = load_tokenizer(default_model_dir)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    # Every reply and its end-of-turn token, counted on their own, are all the run trained on.
    expected = sum(count(reply) + 1 for row in sharegpt_rows for reply in replies(row))
    assert summary["data"]["trainable_tokens"] == expected

    # The run's batches (epoch 0), rebuilt by the code the run used: each trained run of targets is one reply + EOT,
    # in order, for every sample of every packed row.
    data = prepare_data(config.data, tokenizer, config.train.seed)
    plan = plan_epoch(
        data.train,
        batch_size=config.train.batch_size,
        seed=config.train.seed,
        epoch=0,
        shuffle=config.data.shuffle,
        group_by_length=config.train.group_by_length,
        packing=True,
        max_length=config.data.max_length,
    )
    first_batch = None
    for batch_rows in plan.batches:
        rows = [[data.train[i] for i in row] for row in batch_rows]
        batch = collate(rows, tokenizer.pad_token_id, packed=True)
        first_batch = first_batch or batch
        for b, row in enumerate(rows):
            wanted = [
                reply + EOT
                for sample in row
                for reply in replies(sharegpt_rows[int(sample.where.rsplit(":", 1)[1]) - 1])
            ]
            targets = batch["targets"][b].tolist()
            got = [tokenizer.decode(run) for run in trained_runs(targets, [t != IGNORE_INDEX for t in targets])]
            assert got == wanted

    # The loss of the trained model depends on the final hidden state of exactly the trained positions.
    loaded = load_for_inference(out, device="cpu")
    decoder, head = decoder_and_head(loaded.model)
    captured = {}

    def make_leaf(module, inputs, output):
        captured["hidden"] = output.detach().requires_grad_()
        return captured["hidden"]

    handle = decoder.norm.register_forward_hook(make_leaf)
    try:
        loss_sum, tokens = sft_loss_sum(loaded.model, first_batch)
        loss_sum.backward()
    finally:
        handle.remove()
    contributes = captured["hidden"].grad.abs().sum(-1) > 0
    assert torch.equal(contributes, first_batch["targets"] != IGNORE_INDEX)
    assert tokens == int(contributes.sum())
    # And it is the plain sum of their cross-entropies.
    with torch.no_grad():
        logits = head(captured["hidden"]).float()
    per_position = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), first_batch["targets"].flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    assert float(per_position.sum()) == pytest.approx(float(loss_sum.detach()), rel=1e-5)


def test_packed_multi_turn_batch_equals_unpacked_on_the_default_model(default_model_dir, sharegpt_file):
    """fp32, every parameter's gradient. The loss must agree to 1e-5 (measured: bit-identical). Gradients are
    sums over every token and, for early layers, over the backward pass through all 30 layers, and the packed row
    (~300 tokens) runs matmuls of other shapes than the ~100-token rows, so fp32 rounding (eps 1.2e-7) is
    reassociated: each tensor must agree to 1e-5 relative in norm (measured <= 4.3e-6) and elementwise to
    atol 2e-5 + rtol 1e-4 (measured max 5.7e-6, on layer 0's input norm weight, whose gradient reaches 0.5)."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(default_model_dir)
    config = load_config(None, [f"data.train={sharegpt_file}", "data.eval_split=0"])
    samples = prepare_data(config.data, tokenizer, seed=0).train[:6]
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)

    def loss_and_grads(batch):
        model.zero_grad()
        loss_sum, tokens = sft_loss_sum(model, batch)
        (loss_sum / tokens).backward()
        return float(loss_sum.detach() / tokens), {n: p.grad.clone() for n, p in model.named_parameters()}

    packed = collate([samples[:3], samples[3:]], pad_token_id=tokenizer.pad_token_id, packed=True)
    unpacked = collate([[s] for s in samples], pad_token_id=tokenizer.pad_token_id, packed=False)
    assert packed["input_ids"].shape[0] == 2 and "attention_mask" not in packed
    loss_p, grads_p = loss_and_grads(packed)
    loss_u, grads_u = loss_and_grads(unpacked)
    assert abs(loss_p - loss_u) < 1e-5
    for name, grad in grads_u.items():
        assert float((grads_p[name] - grad).norm() / grad.norm()) < 1e-5, name
        torch.testing.assert_close(grads_p[name], grad, atol=2e-5, rtol=1e-4)
