"""Preference objectives: each loss against its closed form, the reference against the base model, per-sequence
log-probabilities against the batch layout, and whole runs that learn, log TRL's metric names and resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import build_tiny_model, interrupted_at_step
from tunelab.config import DpoObjective, KtoObjective, OrpoObjective, SimpoObjective, load_config
from tunelab.data.pairs import PreferencePair
from tunelab.data.preference import TokenizedPair, tokenize_pair
from tunelab.data.template import ChatRenderer
from tunelab.methods import METHODS
from tunelab.models.attention import MATMUL, attention_implementation
from tunelab.models.logprobs import sequence_logprobs
from tunelab.objectives import build_objective
from tunelab.objectives.dpo import dpo_losses
from tunelab.objectives.kto import kto_losses
from tunelab.objectives.orpo import orpo_losses
from tunelab.objectives.pairs import PairLogps, collate_sequences, collate_shared_prompts, collate_shared_sequences
from tunelab.objectives.reference import precompute_reference
from tunelab.objectives.simpo import simpo_losses
from tunelab.train.run import train_run

LOGPS = PairLogps(
    chosen=torch.tensor([-12.0, -30.5, -4.25]),
    rejected=torch.tensor([-15.0, -22.0, -9.0]),
    chosen_tokens=torch.tensor([4, 10, 2]),
    rejected_tokens=torch.tensor([5, 6, 3]),
)
REFERENCE = PairLogps(
    chosen=torch.tensor([-13.0, -29.0, -5.0]),
    rejected=torch.tensor([-14.5, -23.0, -8.0]),
    chosen_tokens=LOGPS.chosen_tokens,
    rejected_tokens=LOGPS.rejected_tokens,
)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def pairs(p: PairLogps) -> list[tuple[float, float, int, int]]:
    return list(zip(p.chosen.tolist(), p.rejected.tolist(), p.chosen_tokens.tolist(), p.rejected_tokens.tolist(),
                    strict=True))


def expected_dpo(loss_type: str, beta: float, smoothing: float, sft_weight: float = 0.0) -> list[float]:
    out = []
    for (pc, pr, nc, nr), (rc, rr, _, _) in zip(pairs(LOGPS), pairs(REFERENCE), strict=True):
        averaged = loss_type in ("ipo", "sigmoid_norm")
        chosen, rejected = ((pc - rc) / nc, (pr - rr) / nr) if averaged else (pc - rc, pr - rr)
        margin = chosen - rejected
        z, c, r = beta * margin, beta * chosen, beta * rejected
        if loss_type == "sigmoid":
            loss = -(1 - smoothing) * log_sigmoid(beta * margin) - smoothing * log_sigmoid(-beta * margin)
        elif loss_type == "robust":
            loss = (-(1 - smoothing) * log_sigmoid(beta * margin) + smoothing * log_sigmoid(-beta * margin)) / (
                1 - 2 * smoothing)
        elif loss_type == "hinge":
            loss = max(0.0, 1 - beta * margin)
        elif loss_type == "ipo":
            loss = (margin - 1 / (2 * beta)) ** 2
        elif loss_type == "sigmoid_norm":
            loss = -log_sigmoid(z)
        elif loss_type == "exo_pair":  # KL between the pair's softmax and (1 - eps, eps)
            q = 1 / (1 + math.exp(-z))
            loss = q * math.log(q / (1 - smoothing)) + (1 - q) * math.log((1 - q) / smoothing)
        elif loss_type == "nca_pair":
            loss = -log_sigmoid(c) - 0.5 * log_sigmoid(-c) - 0.5 * log_sigmoid(-r)
        elif loss_type == "bco_pair":
            loss = -log_sigmoid(c) - log_sigmoid(-r)
        elif loss_type == "sppo_hard":
            loss = (chosen - 1 / (2 * beta)) ** 2 + (rejected + 1 / (2 * beta)) ** 2
        elif loss_type == "apo_zero":
            loss = 1 - sigmoid(c) + sigmoid(r)
        elif loss_type == "apo_down":
            loss = sigmoid(c) + 1 - sigmoid(z)
        else:  # discopop, tau 0.05
            blend = sigmoid(z / 0.05)
            loss = -log_sigmoid(z) * (1 - blend) + math.exp(-z) * blend
        out.append(loss - sft_weight * pc / nc)
    return out


DPO_LOSS_TYPES = ["sigmoid", "robust", "hinge", "ipo", "sigmoid_norm", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
                  "apo_zero", "apo_down", "discopop"]


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_losses_equal_their_closed_forms(loss_type):
    config = DpoObjective(name="dpo", beta=0.2, loss_type=loss_type, label_smoothing=0.1, sft_weight=0.5)
    got = dpo_losses(LOGPS, REFERENCE, config)
    assert got.losses.tolist() == pytest.approx(expected_dpo(loss_type, 0.2, 0.1, 0.5), rel=1e-5)
    averaged = loss_type in ("ipo", "sigmoid_norm")
    divide = (LOGPS.chosen_tokens, LOGPS.rejected_tokens) if averaged else (1, 1)
    assert got.chosen_rewards.tolist() == pytest.approx(
        (0.2 * (LOGPS.chosen - REFERENCE.chosen) / divide[0]).tolist(), rel=1e-5)
    assert got.rejected_rewards.tolist() == pytest.approx(
        (0.2 * (LOGPS.rejected - REFERENCE.rejected) / divide[1]).tolist(), rel=1e-5)


def test_every_dpo_loss_type_is_its_own_loss():
    values = {t: dpo_losses(LOGPS, REFERENCE, DpoObjective(name="dpo", loss_type=t, label_smoothing=0.1)).losses
              for t in DPO_LOSS_TYPES}
    for a in values:
        for b in values:
            if a < b:
                assert not torch.allclose(values[a], values[b]), (a, b)


def test_orpo_and_simpo_equal_their_closed_forms():
    orpo = orpo_losses(LOGPS, None, OrpoObjective(name="orpo", beta=0.3)).losses.tolist()
    simpo = simpo_losses(LOGPS, None, SimpoObjective(name="simpo", beta=2.0, gamma=0.7)).losses.tolist()
    for (pc, pr, nc, nr), got_orpo, got_simpo in zip(pairs(LOGPS), orpo, simpo, strict=True):
        a, b = pc / nc, pr / nr
        odds = math.log(math.exp(a) / (1 - math.exp(a))) - math.log(math.exp(b) / (1 - math.exp(b)))
        assert got_orpo == pytest.approx(-a - 0.3 * log_sigmoid(odds), rel=1e-5)
        assert got_simpo == pytest.approx(-log_sigmoid(2.0 * (a - b) - 0.7), rel=1e-5)


def test_kto_losses_equal_their_closed_form():
    config = KtoObjective(name="kto", beta=0.5, desirable_weight=2.0, undesirable_weight=0.5)
    policy, reference = torch.tensor([-3.0, -8.0, -1.0]), torch.tensor([-4.0, -6.0, -1.5])
    desirable = torch.tensor([True, False, False])
    losses, rewards = kto_losses(policy, reference, desirable, torch.tensor(0.3), config)
    expected = []
    for p, r, good in zip(policy.tolist(), reference.tolist(), desirable.tolist(), strict=True):
        ratio = p - r
        sigmoid = 1 / (1 + math.exp(-0.5 * ((ratio - 0.3) if good else (0.3 - ratio))))
        expected.append((2.0 if good else 0.5) * (1 - sigmoid))
    assert losses.tolist() == pytest.approx(expected, rel=1e-5)
    assert rewards.tolist() == pytest.approx((0.5 * (policy - reference)).tolist())


ROWS = [
    {"prompt": "What is the capital of France?", "chosen": "The capital of France is Paris.", "rejected": "Lyon."},
    {"prompt": "hello world", "chosen": "hello", "rejected": "The quick brown fox jumps over the lazy dog."},
    {"prompt": "Extract the fields as JSON", "chosen": '{"intent": "refund"}', "rejected": "0123456789"},
]


def tokenized_pairs(tokenizer) -> list[TokenizedPair]:
    renderer = ChatRenderer(tokenizer)
    return [tokenize_pair(PreferencePair(f"r:{i}", [{"role": "user", "content": r["prompt"]}], r["chosen"],
                                         r["rejected"]), renderer) for i, r in enumerate(ROWS)]


def lora_model(tokenizer, **method):
    from tunelab.config import LoraMethod

    return METHODS["lora"].apply(build_tiny_model(len(tokenizer)), LoraMethod(name="lora", **method))


def perturb_trainable(model, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)


def test_sequence_logprobs_do_not_depend_on_the_batch_layout(tiny_tokenizer):
    model = build_tiny_model(len(tiny_tokenizer)).eval()
    items = tokenized_pairs(tiny_tokenizer)
    sequences = [p.chosen for p in items] + [p.rejected for p in items]
    pad = tiny_tokenizer.pad_token_id
    with torch.no_grad():
        padded, counts = sequence_logprobs(model, collate_sequences(sequences, pad, padding_free=False))
        free, _ = sequence_logprobs(model, collate_sequences(sequences, pad, padding_free=True))
        with attention_implementation(model, MATMUL):  # a prompt's tokens held once
            shared_batch = collate_shared_sequences([sequences[0], sequences[3]])  # the first pair's two replies
            shared, _ = sequence_logprobs(model, shared_batch)
            by_pair, _ = sequence_logprobs(model, collate_shared_prompts(sequences[:3], sequences[3:]))
        alone = torch.cat([sequence_logprobs(model, collate_sequences([s], pad, False))[0] for s in sequences])
        reversed_order, _ = sequence_logprobs(model, collate_sequences(sequences[::-1], pad, False))
    assert counts.tolist() == [s.trainable_tokens for s in sequences]
    assert int(shared_batch["shared_tokens"]) >= 8
    for other in (free, alone, reversed_order.flip(0), by_pair):
        torch.testing.assert_close(padded, other, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(padded[[0, 3]], shared, rtol=1e-5, atol=1e-4)


def test_dpo_with_each_pairs_prompt_held_once_has_the_same_loss_and_gradients(tiny_tokenizer):
    """The rejected reply attends to the chosen one's copy of their prompt (matmul attention's slots): the loss,
    its metrics and every gradient of the batch holding both sequences whole."""
    model = lora_model(tiny_tokenizer)
    perturb_trainable(model)
    objective = build_objective(DpoObjective(name="dpo"), "lora", packing=False)
    rows = [[p] for p in tokenized_pairs(tiny_tokenizer)]
    results = []
    for share in (False, True):
        objective.share_prefix = share
        batch = objective.collate(rows, tiny_tokenizer.pad_token_id, True)
        model.zero_grad()
        with attention_implementation(model, MATMUL):
            loss, metrics = objective.loss_sum(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((batch, float(loss.detach()), metrics, grads))
    (whole, loss, metrics, grads), (shared, shared_loss, shared_metrics, shared_grads) = results
    assert int(shared["shared_tokens"]) >= 8 * len(rows)  # every pair's prompt held once
    assert shared["input_ids"].shape[1] == whole["input_ids"].shape[1] - int(shared["shared_tokens"])
    assert shared_loss == pytest.approx(loss, rel=1e-6) and abs(loss - 3 * math.log(2)) > 1e-3
    assert shared_metrics["rewards/margins"][0] == pytest.approx(metrics["rewards/margins"][0], rel=1e-5)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-6, rtol=1e-4)


def test_held_out_dpo_evaluation_with_shared_prompts_equals_the_padded_one(tiny_tokenizer):
    from tunelab.eval.preference import evaluate_objective

    model = lora_model(tiny_tokenizer)
    perturb_trainable(model)
    objective = build_objective(DpoObjective(name="dpo"), "lora", packing=False)
    rows = tokenized_pairs(tiny_tokenizer)
    results = []
    for share in (False, True):
        objective.share_prefix = share
        results.append(evaluate_objective(model, objective, rows, pad_token_id=tiny_tokenizer.pad_token_id,
                                          precision="fp32", batch_size=2))
    padded, shared = results
    assert abs(padded["eval_loss"] - math.log(2)) > 1e-3
    assert shared == pytest.approx(padded, rel=1e-5, abs=1e-6)
    assert model.config._attn_implementation != MATMUL  # as it was


def test_dpo_starts_at_ln2_with_zero_rewards(tiny_tokenizer):
    model = lora_model(tiny_tokenizer)
    objective = build_objective(DpoObjective(name="dpo"), "lora", packing=False)
    batch = objective.collate([[p] for p in tokenized_pairs(tiny_tokenizer)], tiny_tokenizer.pad_token_id, False)
    loss_sum, metrics = objective.loss_sum(model, batch)
    assert float(loss_sum.detach()) / objective.count(batch) == pytest.approx(math.log(2), abs=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        total, count = metrics[name]
        assert count == 3 and total == pytest.approx(0.0, abs=1e-6), name


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_precomputed_and_live_reference_give_the_same_loss(tiny_tokenizer, loss_type):
    model = lora_model(tiny_tokenizer)
    items = tokenized_pairs(tiny_tokenizer)
    config = DpoObjective(name="dpo", loss_type=loss_type)
    live = build_objective(config, "lora", packing=False)
    stored = build_objective(config.model_copy(update={"reference": "precompute"}), "lora", packing=False)
    assert not live.reference.precomputed and stored.reference.precomputed
    precompute_reference(model, stored, [items], pad_token_id=tiny_tokenizer.pad_token_id, precision="fp32",
                         batch_size=2)
    shared_items = tokenized_pairs(tiny_tokenizer)  # precomputed with each pair's prompt held once: the same
    stored.share_prefix = True
    precompute_reference(model, stored, [shared_items], pad_token_id=tiny_tokenizer.pad_token_id,
                         precision="fp32", batch_size=2)
    stored.share_prefix = False
    for padded_row, shared_row in zip(items, shared_items, strict=True):
        assert shared_row.reference_logps == pytest.approx(padded_row.reference_logps, rel=1e-5)
    perturb_trainable(model)  # the policy moves away; both references must still be the starting model
    rows = [[p] for p in items]
    pad = tiny_tokenizer.pad_token_id
    live_loss, live_metrics = live.loss_sum(model, live.collate(rows, pad, False))
    stored_loss, stored_metrics = stored.loss_sum(model, stored.collate(rows, pad, True))
    assert abs(float(live_loss.detach()) - 3 * math.log(2)) > 1e-3  # the policy did move
    assert float(stored_loss) == pytest.approx(float(live_loss), rel=1e-5)
    assert stored_metrics["rewards/margins"][0] == pytest.approx(live_metrics["rewards/margins"][0], rel=1e-4)


@pytest.mark.parametrize("method", ["lora", "adapter", "ia3"])
def test_the_switched_off_adapter_is_the_base_model_not_the_policy(tiny_tokenizer, method):
    from tunelab.config import AdapterMethod, IA3Method, LoraMethod
    from tunelab.methods.fused_lora import fuse_lora_layers

    config = {"lora": LoraMethod(name="lora"), "adapter": AdapterMethod(name="adapter"),
              "ia3": IA3Method(name="ia3")}[method]
    base = build_tiny_model(len(tiny_tokenizer)).eval()
    model = METHODS[method].apply(build_tiny_model(len(tiny_tokenizer)), config)
    fuse_lora_layers(model)
    perturb_trainable(model)
    items = tokenized_pairs(tiny_tokenizer)
    batch = collate_sequences([p.chosen for p in items], tiny_tokenizer.pad_token_id, False)
    with torch.no_grad():
        expected, _ = sequence_logprobs(base, batch)
        policy, _ = sequence_logprobs(model, batch)
        with METHODS[method].without_adapter(model):
            reference, _ = sequence_logprobs(model, batch)
        policy_again, _ = sequence_logprobs(model, batch)
    torch.testing.assert_close(reference, expected, rtol=1e-5, atol=1e-5)
    assert (policy - expected).abs().max() > 1e-3
    torch.testing.assert_close(policy_again, policy)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PAIRS = [{"prompt": f"what is {a} plus {b}?", "chosen": f"the answer is {a + b}", "rejected": f"{a * b}"}
         for a in range(6) for b in range(6)]


def run_config(model_dir, data, out, *overrides):
    return load_config(None, [
        f"model={model_dir}", f"data.train={data}", "data.eval_split=0.25", "data.max_length=64",
        f"output_dir={out}", "train.batch_size=4", "train.precision=fp32", "eval.generate_samples=2",
        "eval.max_new_tokens=4", "eval.show_samples=0", *overrides])


def test_dpo_with_lora_turns_the_models_preference_and_logs_trls_names(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "dpo"
    summary = train_run(run_config(tiny_model_dir, data, out, "objective=dpo", "train.epochs=3", "train.lr=3e-3"))
    before, after = summary["eval_before"], summary["eval_after"]
    assert before["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert before["eval_preference_accuracy"] < 0.3  # a random model prefers the shorter, rejected reply
    assert after["eval_rewards/accuracies"] > 0.9 and after["eval_rewards/margins"] > 0.5
    assert after["eval_logps/margins"] > before["eval_logps/margins"] + 5  # nats moved towards the chosen reply
    assert after["eval_loss"] < before["eval_loss"] - 0.2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trl_names = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected"}
    assert trl_names <= set(records[1]) and records[1]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert records[-1]["rewards/margins"] > 0
    assert summary["objective"] == "dpo" and (out / "adapter_model.safetensors").is_file()
    assert (out / "plots" / "objective.png").is_file()
    assert "preference_accuracy" in (out / "report.html").read_text()

    from tunelab.eval.command import evaluate_model
    from tunelab.infer.generate import GenerationOptions

    scores = evaluate_model(str(out), data, ["preference_accuracy", "reward_margin"], options=GenerationOptions(),
                            baseline="base")
    assert scores["samples"] == len(PAIRS)
    gained = scores["comparison"]["differences"]["reward_margin"]
    assert gained["difference"] == pytest.approx(scores["reward_margin"] - scores["baseline"]["reward_margin"])
    assert gained["ci95_low"] > 5  # the fine-tuned run's margins moved by more than 5 nats on every resample
    assert scores["baseline"]["reward_margin"] == pytest.approx(before["eval_logps/margins"], abs=3)
    assert list((out / "evals").glob("*.json"))
    from tunelab.errors import ConfigError

    with pytest.raises(ConfigError, match="holds preference pairs; score them with --metrics preference_accuracy"):
        evaluate_model(str(out), data, ["loss", "exact_match"], options=GenerationOptions())


@pytest.mark.parametrize("loss_type", ["apo_zero", "nca_pair"])
def test_other_dpo_loss_types_learn_the_preference_in_a_run(tiny_model_dir, tmp_path, loss_type):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    summary = train_run(run_config(tiny_model_dir, data, tmp_path / loss_type, "objective.name=dpo",
                                   f"objective.loss_type={loss_type}", "train.epochs=3", "train.lr=3e-3",
                                   "eval.generate_samples=0"))
    before, after = summary["eval_before"], summary["eval_after"]
    assert after["eval_rewards/accuracies"] > 0.9 > before["eval_preference_accuracy"] + 0.5
    assert after["eval_loss"] < before["eval_loss"]


def test_dpo_with_full_fine_tuning_uses_a_precomputed_reference(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    summary = train_run(run_config(tiny_model_dir, data, tmp_path / "full", "objective=dpo", "method=full",
                                   "train.max_steps=6", "train.lr=1e-3"))
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # reference == starting weights
    assert summary["eval_after"]["eval_logps/margins"] > summary["eval_before"]["eval_logps/margins"] + 1


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_reference_free_objectives_learn_the_preference(tiny_model_dir, tmp_path, objective):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    summary = train_run(run_config(tiny_model_dir, data, tmp_path / objective, f"objective={objective}",
                                   "train.epochs=3", "train.lr=3e-3"))
    assert summary["final_eval_loss"] < summary["base_eval_loss"]
    assert summary["eval_after"]["eval_logps/margins"] > summary["eval_before"]["eval_logps/margins"] + 5


def test_kto_learns_from_unpaired_feedback(tiny_model_dir, tmp_path):
    rows = [{"prompt": p["prompt"], "completion": p["chosen"] if i % 2 else p["rejected"], "label": bool(i % 2)}
            for i, p in enumerate(PAIRS)]
    data = write_jsonl(tmp_path / "feedback.jsonl", rows)
    out = tmp_path / "kto"
    summary = train_run(run_config(tiny_model_dir, data, out, "objective=kto", "train.epochs=3", "train.lr=3e-3"))
    assert summary["base_eval_loss"] == pytest.approx(0.5, abs=1e-5)  # log-ratios 0 and KL 0: 1 - sigmoid(0)
    assert summary["final_eval_loss"] < 0.5
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "kl" in records[-1] and records[-1]["rewards/chosen"] > records[-1]["rewards/rejected"]
    from tunelab.eval.report import before_after_rows, read_run

    shown = {name: (base, tuned) for name, base, tuned, _ in before_after_rows(read_run(out))}
    assert shown["rewards/chosen"][1] > shown["rewards/rejected"][1]  # the table shows what KTO moved


def test_dpo_resumes_exactly(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    base = ["objective=dpo", "train.max_steps=6", "train.save_every=2", "train.lr=3e-3", "eval.before_after=false"]
    straight = train_run(run_config(tiny_model_dir, data, tmp_path / "straight", *base))
    with interrupted_at_step(4):
        train_run(run_config(tiny_model_dir, data, tmp_path / "resumed", *base))
    resumed = train_run(run_config(tiny_model_dir, data, tmp_path / "resumed", *base), resume=True)
    assert resumed["steps"] == 6
    assert resumed["final_train_loss"] == pytest.approx(straight["final_train_loss"], rel=1e-5)
    assert resumed["final_eval_loss"] == pytest.approx(straight["final_eval_loss"], rel=1e-5)


def test_objective_and_data_that_do_not_fit_exit_2_naming_both(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from tunelab.cli import app

    sft = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}] * 4)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:4])
    runner = CliRunner()
    cases = [
        ([f"data.train={sft}", "objective=dpo"], "'dpo' trains on preference pairs"),
        ([f"data.train={pairs}", "objective=kto"], "'kto' trains on feedback rows"),
        ([f"data.train={pairs}", "objective=dpo", "data.packing=true"], "cannot use data.packing"),
        ([f"data.train={pairs}", "objective=dpo", "method=full", "objective.reference=adapter"],
         "objective.reference=adapter needs an adapter method"),
        ([f"data.train={pairs}", "objective=dpo", "objective.loss=ipo"], "unknown key 'objective.loss'"),
    ]
    for overrides, message in cases:
        out = tmp_path / "out"
        config = tmp_path / "c.yaml"
        config.write_text(f"model: {tiny_model_dir}\noutput_dir: {out}\n")
        result = runner.invoke(app, ["train", str(config), *overrides])
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split()), result.output
        assert not out.exists()


def test_a_previous_run_is_the_next_stages_model_and_reference(tiny_model_dir, tmp_path, monkeypatch):
    from tunelab.infer.load import load_for_inference

    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))  # the folded SFT model is cached there

    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": p["prompt"], "answer": p["chosen"]} for p in PAIRS])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    sft_run = tmp_path / "sft"
    train_run(run_config(tiny_model_dir, qa, sft_run, "train.epochs=2", "train.lr=3e-3"))
    dpo = train_run(run_config(sft_run, pairs, tmp_path / "dpo", "objective=dpo", "train.max_steps=2"))

    def chosen_logps(model) -> float:
        from tunelab.data.preference import prepare_preference_data

        config = run_config(tiny_model_dir, pairs, tmp_path / "unused").data
        data = prepare_preference_data(config, load_for_inference(sft_run).tokenizer, seed=42)
        batch = collate_sequences([p.chosen for p in data.eval], 0, False)
        with torch.no_grad():
            return float(sequence_logprobs(model, batch)[0].mean())

    sft_model = load_for_inference(sft_run).model
    raw_base = load_for_inference(tiny_model_dir).model
    assert dpo["eval_before"]["eval_logps/chosen"] == pytest.approx(chosen_logps(sft_model), rel=1e-4)
    assert abs(chosen_logps(raw_base) - chosen_logps(sft_model)) > 1.0
    assert dpo["eval_before"]["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)  # reference = the SFT model


def test_early_stopping_may_follow_the_objectives_own_metrics():
    from tunelab.errors import ConfigError

    config = load_config(None, ["objective=dpo", "train.best_metric=eval_preference_accuracy",
                                "train.early_stopping_patience=2"])
    assert config.train.best_metric == "eval_preference_accuracy"
    assert load_config(None, ["objective=kto", "train.best_metric=eval_kl", "train.keep_best=true"])
    with pytest.raises(ConfigError, match="eval.during_training"):  # SFT logs no such metric
        load_config(None, ["train.best_metric=eval_preference_accuracy", "train.keep_best=true"])
