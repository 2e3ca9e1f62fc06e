"""Reward models: a scalar head trained on preference pairs, read at each sequence's last token whatever the
layout, saved so that transformers (plus PEFT) loads it and scores the same, and `tunelab score`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from conftest import build_tiny_model
from tunelab.cli import app
from tunelab.config import load_config
from tunelab.data.pairs import PreferencePair
from tunelab.data.preference import tokenize_pair
from tunelab.data.template import ChatRenderer
from tunelab.models.attention import MATMUL, attention_implementation
from tunelab.objectives.pairs import collate_sequences, collate_shared_prompts
from tunelab.objectives.reward import reward_losses, sequence_rewards
from tunelab.train.run import train_run

PAIRS = [{"prompt": f"what is {a} plus {b}?", "chosen": f"the answer is {a + b}", "rejected": f"{a * b}"}
         for a in range(6) for b in range(6)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_reward_model(tokenizer):
    from transformers import LlamaForSequenceClassification

    causal = build_tiny_model(len(tokenizer))
    config = causal.config
    config.num_labels, config.pad_token_id = 1, tokenizer.pad_token_id
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    model.model.load_state_dict(causal.model.state_dict())
    return model.eval()


def test_bradley_terry_loss_with_and_without_margin():
    chosen, rejected = torch.tensor([1.0, -0.5]), torch.tensor([0.2, 0.5])
    plain = reward_losses(chosen, rejected, None).tolist()
    margin = reward_losses(chosen, rejected, torch.tensor([0.3, 1.0])).tolist()
    for c, r, m, got, got_margin in zip([1.0, -0.5], [0.2, 0.5], [0.3, 1.0], plain, margin, strict=True):
        assert got == pytest.approx(math.log1p(math.exp(-(c - r))), rel=1e-6)
        assert got_margin == pytest.approx(math.log1p(math.exp(-(c - r - m))), rel=1e-6)


def test_a_reward_is_read_at_the_last_token_whatever_the_layout(tiny_tokenizer):
    model = tiny_reward_model(tiny_tokenizer)
    renderer = ChatRenderer(tiny_tokenizer)
    pairs = [tokenize_pair(PreferencePair(f"r:{i}", [{"role": "user", "content": p["prompt"]}], p["chosen"],
                                          p["rejected"]), renderer) for i, p in enumerate(PAIRS[:5])]
    sequences = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    pad = tiny_tokenizer.pad_token_id
    with torch.no_grad():
        padded = sequence_rewards(model, collate_sequences(sequences, pad, False))
        free = sequence_rewards(model, collate_sequences(sequences, pad, True))
        with attention_implementation(model, MATMUL):  # each rejected reply reads the chosen one's prompt
            shared_batch = collate_shared_prompts(sequences[:5], sequences[5:])
            shared = sequence_rewards(model, shared_batch)
        alone = torch.cat([sequence_rewards(model, collate_sequences([s], pad, False)) for s in sequences])
        # transformers' own forward on one unpadded sequence reads its last token too
        theirs = torch.cat([model(input_ids=torch.tensor([s.input_ids])).logits[:, 0] for s in sequences])
    assert int(shared_batch["shared_tokens"]) >= 5 * 8
    for other in (free, alone, theirs, shared):
        torch.testing.assert_close(padded, other, rtol=1e-5, atol=1e-5)
    assert padded.std() > 0  # not a constant: the test would pass vacuously otherwise


def run_config(model_dir, data, out, *overrides):
    return load_config(None, [
        f"model={model_dir}", f"data.train={data}", "data.eval_split=0.25", "data.max_length=64",
        f"output_dir={out}", "train.batch_size=4", "train.precision=fp32", "objective=reward", *overrides])


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_reward_model_learns_the_preference_and_transformers_scores_it_the_same(tiny_model_dir, tmp_path,
                                                                                  method):
    from transformers import AutoModelForSequenceClassification

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / method
    summary = train_run(run_config(tiny_model_dir, data, out, f"method={method}", "train.epochs=3",
                                   "train.lr=3e-3" if method == "lora" else "train.lr=1e-3"))
    assert summary["eval_after"]["eval_rewards/accuracies"] == 1.0
    assert summary["final_eval_loss"] < summary["base_eval_loss"] - 0.3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(records[-1])

    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": p["prompt"], "completion": p[key]}
                                                 for p in PAIRS[:4] for key in ("chosen", "rejected")])
    result = CliRunner().invoke(app, ["score", str(out), "--input", str(rows), "--output", str(tmp_path / "s.jsonl")])
    assert result.exit_code == 0, result.output
    scored = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert all(a["score"] > b["score"] for a, b in zip(scored[0::2], scored[1::2], strict=True))
    # `tunelab generate`'s output (each prompt row with its `reply`) scores as prompt/completion rows do
    replies = write_jsonl(tmp_path / "replies.jsonl", [{"prompt": p["prompt"], "reply": p[key]}
                                                       for p in PAIRS[:4] for key in ("chosen", "rejected")])
    result = CliRunner().invoke(app, ["score", str(out), "-i", str(replies), "-o", str(tmp_path / "r.jsonl")])
    assert result.exit_code == 0, result.output
    from_replies = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["score"] for r in from_replies] == pytest.approx([r["score"] for r in scored], abs=1e-5)
    result = CliRunner().invoke(app, ["score", str(out), "-i", str(data), "-o", str(tmp_path / "p.jsonl")])
    assert result.exit_code == 2 and "preference rows; score reads one reply a row" in result.output

    refused = CliRunner().invoke(app, ["generate", str(out), "--input", str(rows), "--output",
                                       str(tmp_path / "g.jsonl")])
    assert refused.exit_code == 2 and "is a reward model" in refused.output

    from tunelab.eval.command import evaluate_model
    from tunelab.infer.generate import GenerationOptions

    ranked = evaluate_model(str(out), data, ["preference_accuracy", "reward_margin"], options=GenerationOptions())
    assert ranked["preference_accuracy"] > 0.9 and ranked["reward_margin"] > 0

    if method == "full":
        theirs = AutoModelForSequenceClassification.from_pretrained(out).eval()
    else:
        from peft import PeftModel

        base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
        theirs = PeftModel.from_pretrained(base, out).eval()
    from tunelab.infer.load import load_for_inference

    models = [theirs]
    if method == "lora":  # `tunelab merge` keeps the score head: the merged folder scores alike
        from tunelab.infer.merge import merge_adapter

        models.append(AutoModelForSequenceClassification.from_pretrained(merge_adapter(out, tmp_path / "m")).eval())
    renderer = load_for_inference(out).renderer
    for row, got in zip(PAIRS[:4], scored[0::2], strict=True):
        pair = tokenize_pair(PreferencePair("r", [{"role": "user", "content": row["prompt"]}], row["chosen"], "x"),
                             renderer)
        for model in models:
            with torch.no_grad():
                expected = float(model(input_ids=torch.tensor([pair.chosen.input_ids])).logits[0, 0])
            assert got["score"] == pytest.approx(expected, abs=1e-4)


def test_score_refuses_a_run_that_is_not_a_reward_model(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": p["prompt"], "answer": p["chosen"]} for p in PAIRS])
    out = tmp_path / "sft"
    train_run(load_config(None, [f"model={tiny_model_dir}", f"data.train={data}", "train.max_steps=1",
                                 "data.max_length=64", "eval.generate_samples=0", f"output_dir={out}"]))
    result = CliRunner().invoke(app, ["score", str(out), "--input", str(data), "--output", str(tmp_path / "s.jsonl")])
    assert result.exit_code == 2 and "not a reward model" in result.output
    assert not (tmp_path / "s.jsonl").exists()
