"""Online DPO: the pair ranking and loss against a straightforward implementation of TRL 1.16's OnlineDPOTrainer
arithmetic, a rollout on the tiny real model (unscored pairs left out, the reference's log-probabilities carried on
each pair), and whole runs that raise the held-out reward, resume exactly, refuse bad config and plan the example."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_grpo import REWARDS_PY, read_records, write_prompts
from typer.testing import CliRunner

from conftest import interrupted_at_step
from tunelab.cli import app
from tunelab.config import OnlineDpoObjective as OnlineDpoConfig
from tunelab.config import load_config
from tunelab.objectives.online_dpo import dpo_config, pair_losses, ranked_pairs
from tunelab.objectives.pairs import PairLogps
from tunelab.train.run import train_run

EXAMPLE = Path(__file__).parent.parent / "examples" / "online_dpo.yaml"


def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _trl_online_dpo(rewards: list[float], eos: list[bool], logps: list[float], ref_logps: list[float], beta: float,
                    loss_type: str, penalty: float | None) -> dict[str, list[float]]:
    """TRL's OnlineDPOTrainer.training_step from the rewards on: its batch holds every prompt's first sample, then
    every prompt's second (`rewards`, `eos`, summed `logps` and `ref_logps` in that layout)."""
    rewards = [r - penalty if penalty is not None and not e else r for r, e in zip(rewards, eos, strict=True)]
    half = len(rewards) // 2
    out: dict[str, list[float]] = {"losses": [], "chosen_rewards": [], "rejected_rewards": [], "scores_margin": []}
    for i in range(half):
        mask = rewards[i] >= rewards[i + half]
        chosen, rejected = (i, i + half) if mask else (i + half, i)
        logits = (logps[chosen] - logps[rejected]) - (ref_logps[chosen] - ref_logps[rejected])
        if loss_type == "sigmoid":
            out["losses"].append(-_logsigmoid(beta * logits))
        else:
            out["losses"].append((logits - 1 / (2 * beta)) ** 2)
        out["chosen_rewards"].append(beta * (logps[chosen] - ref_logps[chosen]))
        out["rejected_rewards"].append(beta * (logps[rejected] - ref_logps[rejected]))
        out["scores_margin"].append(rewards[chosen] - rewards[rejected])
    return out


@pytest.mark.parametrize(("loss_type", "penalty"), [("sigmoid", None), ("sigmoid", 1.0), ("ipo", None), ("ipo", 0.5)])
def test_the_pair_loss_is_trls(loss_type, penalty):
    # four prompts, TRL's layout: first samples, then second samples; prompt 1 ties, prompt 2's first sample is cut
    rewards = [0.25, 0.75, 0.75, 0.125, 0.5, 0.75, 0.25, 0.375]  # exact in float32: ties stay ties
    eos = [True, True, False, True, True, True, True, False]
    logps = [-5.0, -3.5, -7.25, -2.0, -4.0, -6.5, -6.0, -9.0]
    ref_logps = [-5.5, -3.0, -7.0, -2.5, -3.0, -6.0, -6.5, -8.0]
    beta = 0.1
    expected = _trl_online_dpo(rewards, eos, logps, ref_logps, beta, loss_type, penalty)

    interleaved = [rewards[i // 2 + (i % 2) * 4] for i in range(8)]  # tunelab's: a prompt's two side by side
    cut = [not eos[i // 2 + (i % 2) * 4] for i in range(8)]
    first_chosen, scores = ranked_pairs(torch.tensor(interleaved), cut, penalty)
    policy, reference = [], []
    for prompt, first in enumerate(first_chosen.tolist()):
        order = (prompt, prompt + 4) if first else (prompt + 4, prompt)
        policy.append([logps[i] for i in order])
        reference.append([ref_logps[i] for i in order])
    policy_t, reference_t = torch.tensor(policy, dtype=torch.float64), torch.tensor(reference, dtype=torch.float64)
    tokens = torch.tensor([3, 9, 4, 12])  # summed, not averaged: token counts must not matter
    config = OnlineDpoConfig(name="online_dpo", rewards=["exact_match"], beta=beta, loss_type=loss_type)
    got = pair_losses(PairLogps(policy_t[:, 0], policy_t[:, 1], tokens, tokens + 1),
                      PairLogps(reference_t[:, 0], reference_t[:, 1], tokens, tokens + 1), dpo_config(config))
    assert got.losses.tolist() == pytest.approx(expected["losses"], rel=1e-9)
    assert got.chosen_rewards.tolist() == pytest.approx(expected["chosen_rewards"], rel=1e-9)
    assert got.rejected_rewards.tolist() == pytest.approx(expected["rejected_rewards"], rel=1e-9)
    assert (scores[:, 0] - scores[:, 1]).tolist() == pytest.approx(expected["scores_margin"], abs=1e-6)
    # a tie picks the first sample (prompt 1; prompt 2 under the 0.5 penalty); the penalty on a cut sample flips
    # prompt 2 (0.75 - 1.0 < 0.25) and prompt 3 (0.125 > 0.375 - penalty)
    assert first_chosen.tolist() == [False, True, penalty != 1.0, penalty is not None]


def test_a_rollout_ranks_each_pair_leaves_unscored_ones_out_and_carries_the_reference(tiny_tokenizer, tmp_path):
    from conftest import build_tiny_model
    from tunelab.config import LoraMethod
    from tunelab.data.prompts import PromptRow
    from tunelab.methods import METHODS
    from tunelab.models.logprobs import sequence_logprobs
    from tunelab.objectives import build_objective

    rewards = tmp_path / "rewards.py"
    rewards.write_text("def length(prompts, completions, completion_ids, **columns):\n"
                       "    return [None if i == 2 else float(len(ids)) for i, ids in enumerate(completion_ids)]\n")
    config = OnlineDpoConfig(name="online_dpo", rewards=[f"{rewards}:length"], max_new_tokens=6)
    tokenizer = tiny_tokenizer
    model = METHODS["lora"].apply(build_tiny_model(len(tokenizer)), LoraMethod(name="lora", r=4))
    objective = build_objective(config, "lora", False, tokenizer=tokenizer, seed=3)
    objective.prepare(model)
    prompts = [PromptRow(f"p:{i}", [{"role": "user", "content": text}], text, {"answer": "4"},
                         prompt_ids=tokenizer(text)["input_ids"]) for i, text in enumerate(["two plus two", "hi"] * 2)]
    batches, metrics = objective.rollout(model, [[[prompts[0]], [prompts[1]]], [[prompts[2]], [prompts[3]]]], step=0)
    pairs = [row[0] for rows in batches for row in rows]
    assert [pair.counted for pair in pairs] == [True, False, True, True]  # completion 2 (pair 1's first) unscored
    for pair in pairs:
        replies = [len(s.input_ids) - s.labels.count(-100) for s in (pair.chosen, pair.rejected)]
        if pair.counted:  # the longer reply is chosen, and its score is its length
            assert list(pair.scores) == [float(replies[0]), float(replies[1])] and replies[0] >= replies[1]
    assert metrics["objective/scores"][1] == 6 and metrics["val/contain_eos_token"][1] == 8
    batch = objective.collate(batches[0], tokenizer.pad_token_id, False)
    assert batch["pair_weights"].tolist() == [1.0, 0.0] and objective.count(batch) == 1
    with torch.no_grad(), METHODS["lora"].without_adapter(model):  # the reference: the adapter switched off
        expected, _ = sequence_logprobs(model.eval(), batch)
    assert batch["reference_logps"].tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    loss, logged = objective.loss_sum(model, batch)
    # a fresh LoRA is the reference: log-ratios 0, so the sigmoid loss is log 2 and the implied rewards 0
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-5)
    assert logged["rewards/chosen"] == (pytest.approx(0.0, abs=1e-6), 1) and logged["objective/kl"][1] == 2


@pytest.mark.parametrize("skip_ties", [False, True])
def test_tied_pairs_are_logged_and_left_out_under_skip_ties(tiny_tokenizer, tmp_path, skip_ties):
    from conftest import build_tiny_model
    from tunelab.config import LoraMethod
    from tunelab.data.prompts import PromptRow
    from tunelab.methods import METHODS
    from tunelab.objectives import build_objective

    rewards = tmp_path / "rewards.py"  # pair 0's completions both score 1 (a tie), pair 1's score 0 and 1
    rewards.write_text("def fixed(prompts, completions, **columns):\n    return [1.0, 1.0, 0.0, 1.0]\n")
    config = OnlineDpoConfig(name="online_dpo", rewards=[f"{rewards}:fixed"], max_new_tokens=4, skip_ties=skip_ties)
    model = METHODS["lora"].apply(build_tiny_model(len(tiny_tokenizer)), LoraMethod(name="lora", r=4))
    objective = build_objective(config, "lora", False, tokenizer=tiny_tokenizer, seed=3)
    objective.prepare(model)
    prompts = [PromptRow(f"p:{i}", [{"role": "user", "content": text}], text, {}, prompt_ids=tiny_tokenizer(text)[
        "input_ids"]) for i, text in enumerate(["two plus two", "hi"])]
    batches, metrics = objective.rollout(model, [[[prompts[0]], [prompts[1]]]], step=0)
    pairs = [row[0] for row in batches[0]]
    assert [pair.tied for pair in pairs] == [True, False] and pairs[1].scores == (1.0, 0.0)
    assert [pair.counted for pair in pairs] == [not skip_ties, True]  # TRL (skip_ties off) trains the tie
    assert metrics["objective/tie_ratio"] == (1, 2) and metrics["objective/scores"] == (3.0, 4)
    batch = objective.collate(batches[0], tiny_tokenizer.pad_token_id, False)
    assert objective.count(batch) == (1 if skip_ties else 2)


def online_config(model_dir, data, out, rewards_file, *overrides):
    return load_config(None, [
        f"model={model_dir}", f"data.train={data}", "data.eval_split=0.25", "data.max_length=64",
        f"output_dir={out}", "train.batch_size=2", "train.precision=fp32", "eval.generate_samples=2",
        "eval.max_new_tokens=8", "eval.show_samples=0", "eval.metrics=[exact_match]", "objective.name=online_dpo",
        f"objective.rewards=[{rewards_file}:letters]", "objective.max_new_tokens=8", "train.lr=1e-2", *overrides])


def test_online_dpo_with_lora_raises_the_held_out_reward_and_logs_what_trl_logs(tiny_model_dir, tmp_path):
    rewards = tmp_path / "rewards.py"
    rewards.write_text(REWARDS_PY)
    data = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "online"
    summary = train_run(online_config(tiny_model_dir, data, out, rewards, "train.max_steps=20", "train.seed=1",
                                      "objective.missing_eos_penalty=0.1"))
    before, after = summary["eval_before"], summary["eval_after"]
    print(f"held-out letters reward: {before['eval_rewards/letters/mean']:.3f} -> "
          f"{after['eval_rewards/letters/mean']:.3f}")
    assert after["eval_rewards/letters/mean"] > before["eval_rewards/letters/mean"] + 0.3
    assert after["eval_loss"] == pytest.approx(-after["eval_reward"])
    steps = [r for r in read_records(out) if "loss" in r]
    logged = {"objective/scores", "objective/scores_margin", "objective/kl", "objective/entropy",
              "objective/non_score_reward", "objective/rlhf_reward", "rewards/chosen", "rewards/rejected",
              "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "val/contain_eos_token",
              "beta", "rewards/letters/mean", "seconds/generate", "seconds/reference"}
    assert logged <= set(steps[0]), logged - set(steps[0])
    first = steps[0]  # LoRA starts as the reference: every log-ratio 0, the sigmoid loss log 2
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-5) and first["rewards/margins"] == pytest.approx(0.0,
                                                                                                               abs=1e-6)
    assert all(r["objective/scores_margin"] >= 0 and r["beta"] == 0.1 for r in steps)
    for r in steps:  # TRL's identities between what it logs
        assert r["objective/non_score_reward"] == pytest.approx(-0.1 * r["objective/kl"], abs=1e-6)
        assert r["objective/rlhf_reward"] == pytest.approx(r["objective/scores"] + r["objective/non_score_reward"],
                                                           abs=1e-5)
    assert max(r["rewards/margins"] for r in steps[1:]) > 0.01  # then the policy moves towards the chosen replies
    assert summary["objective"] == "online_dpo" and (out / "adapter_model.safetensors").is_file()
    result = CliRunner().invoke(app, ["eval", str(out)])  # the run's own held-out prompts, scored by its rewards
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["reward"] == pytest.approx(after["eval_reward"], abs=1e-6)


def test_online_dpo_with_full_training_resumes_exactly(tiny_model_dir, tmp_path):
    """Full training keeps a frozen copy of the starting model as the reference, taken before the checkpoint
    loads; the resumed run samples the same pairs (seeded by the step) and logs the same losses."""
    rewards = tmp_path / "rewards.py"
    rewards.write_text(REWARDS_PY)
    data = write_prompts(tmp_path / "prompts.jsonl")
    base = ["method.name=full", "train.lr=1e-3", "train.max_steps=6", "train.save_every=2", "eval.before_after=false",
            "objective.loss_type=ipo"]
    straight = train_run(online_config(tiny_model_dir, data, tmp_path / "straight", rewards, *base))
    steps = [r for r in read_records(tmp_path / "straight") if "loss" in r]
    assert steps[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # the frozen copy is the starting model
    assert any(abs(r["objective/kl"]) > 1e-4 for r in steps[1:])
    with interrupted_at_step(3):
        train_run(online_config(tiny_model_dir, data, tmp_path / "resumed", rewards, *base))
    resumed = train_run(online_config(tiny_model_dir, data, tmp_path / "resumed", rewards, *base), resume=True)
    resumed_steps = [r for r in read_records(tmp_path / "resumed") if "loss" in r]
    assert [r["step"] for r in resumed_steps] == [r["step"] for r in steps]
    for key in ("loss", "objective/kl", "objective/scores", "rewards/margins"):
        assert [r[key] for r in resumed_steps] == pytest.approx([r[key] for r in steps], rel=1e-5, abs=1e-7), key
    assert resumed["final_eval_loss"] == pytest.approx(straight["final_eval_loss"], abs=1e-6)


@pytest.mark.parametrize(("override", "key"), [
    ("objective.group_size=4", "objective.group_size"),
    ("objective.epsilon=0.3", "objective.epsilon"),
    ("objective.updates_per_rollout=2", "objective.updates_per_rollout"),
    ("objective.loss_type=hinge", "objective.loss_type"),
    ("objective.beta=0", "objective.beta"),
    ("objective.missing_eos_penalty=-1", "objective.missing_eos_penalty"),
])
def test_bad_config_exits_2_naming_the_key(tiny_model_dir, tmp_path, override, key):
    data = write_prompts(tmp_path / "prompts.jsonl")
    config = tmp_path / "online.yaml"
    out = tmp_path / "out"
    config.write_text(f"model: {tiny_model_dir}\noutput_dir: {out}\ndata: {{train: {data}}}\n"
                      "objective: {name: online_dpo, rewards: [exact_match]}\n")
    result = CliRunner().invoke(app, ["train", str(config), override])
    assert result.exit_code == 2, result.output
    assert key in result.output and not out.exists()


def test_the_example_validates_and_plans_a_dry_run(tiny_model_dir, tmp_path):
    config = load_config(EXAMPLE)
    assert config.objective.name == "online_dpo" and config.objective.group_size == 2
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["train", str(EXAMPLE), f"model={tiny_model_dir}", f"output_dir={out}",
                                      "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output[result.output.index("{"):])
    assert plan["status"] == "dry-run" and plan["steps_planned"] == config.train.max_steps and not out.exists()
