"""RLOO: leave-one-out advantages, the reward's KL penalty and the per-completion clipped loss against
straightforward implementations of TRL 1.16's RLOOTrainer arithmetic, and whole runs on the tiny real model that
raise the reward, fold the KL into it, reuse rollouts and resume exactly, and are evaluated by `tunelab eval`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_grpo import REWARDS_PY, read_records, write_prompts
from typer.testing import CliRunner

from conftest import interrupted_at_step
from tunelab.cli import app
from tunelab.config import RlooObjective as RlooConfig
from tunelab.config import load_config
from tunelab.objectives.rloo import leave_one_out_advantages, sequence_kl, sequence_losses
from tunelab.train.run import train_run


def _trl_leave_one_out(rewards: list[float], group_size: int, normalize: bool) -> list[float]:
    """TRL's RLOO advantages, written out one completion at a time."""
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start:start + group_size]
        for i, reward in enumerate(group):
            others = [r for j, r in enumerate(group) if j != i and not math.isnan(r)]
            out.append(math.nan if math.isnan(reward) or not others else reward - sum(others) / len(others))
    if normalize:
        judged = [a for a in out if not math.isnan(a)]
        mean = sum(judged) / len(judged)
        std = math.sqrt(sum((a - mean) ** 2 for a in judged) / (len(judged) - 1))
        out = [(a - mean) / (std + 1e-4) for a in out]
    return [0.0 if math.isnan(a) else a for a in out]


@pytest.mark.parametrize("normalize", [False, True])
def test_advantages_are_each_reward_against_the_mean_of_its_siblings(normalize):
    rewards = [1.0, 0.0, 0.5, 2.0, math.nan, 3.0, 1.0, 0.0, math.nan, math.nan, 4.0, math.nan]
    got = leave_one_out_advantages(torch.tensor(rewards), 4, normalize)
    assert got.tolist() == pytest.approx(_trl_leave_one_out(rewards, 4, normalize), abs=1e-6)
    if not normalize:  # a group's advantages add up to 0 (each is (G / (G - 1)) x its reward minus the mean)
        assert float(got[:4].sum()) == pytest.approx(0.0, abs=1e-6)
        assert got[8:].tolist() == [0.0, 0.0, 0.0, 0.0]  # a group with one judged completion teaches nothing


def test_the_loss_clips_each_completions_summed_ratio():
    config = RlooConfig(name="rloo", rewards=["exact_match"], epsilon=0.2, epsilon_high=0.28)
    owners = torch.tensor([0, 0, 1, 1, 1, 2])
    logps = torch.tensor([-1.0, -0.5, -2.0, -0.1, -0.3, -0.7])
    old = torch.tensor([-1.2, -0.6, -1.5, -0.1, -0.2, -0.7])
    advantages = torch.tensor([1.0, -0.5, 2.0])
    losses, clipped = sequence_losses(logps, old, owners, 3, advantages, config)
    expected, expected_clipped = [], []
    for sequence in range(3):
        ratio = math.exp(sum(float(logps[i] - old[i]) for i in range(6) if owners[i] == sequence))
        a = float(advantages[sequence])
        bounded = min(max(ratio, 0.8), 1.28)
        expected.append(-min(ratio * a, bounded * a))
        expected_clipped.append((ratio < 0.8 and a < 0) or (ratio > 1.28 and a > 0))
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert clipped.tolist() == expected_clipped == [True, True, False]  # exp(0.3) > 1.28, A > 0; exp(-0.6) < 0.8, A < 0
    kl = sequence_kl(logps, old, owners, 3)
    assert kl.tolist() == pytest.approx([0.3, -0.6, 0.0], abs=1e-6)  # first-order: may be negative


def test_the_rollouts_kl_leaves_out_what_mask_truncated_completions_leaves_out(tiny_tokenizer):
    """TRL zeroes a truncated completion's mask before the KL: its KL is 0 (no penalty) and its tokens not
    counted; the others' KL is their tokens' log-ratios to the reference, summed."""
    from conftest import build_tiny_model
    from tunelab.data.template import IGNORE_INDEX, TokenizedSample
    from tunelab.objectives.grpo import Completion, GrpoObjective
    from tunelab.objectives.rewards import build_rewards

    policy, reference = build_tiny_model(len(tiny_tokenizer)).eval(), build_tiny_model(len(tiny_tokenizer), 1).eval()
    prompt = tiny_tokenizer("what is 1 plus 2?")["input_ids"]
    replies = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    completions = [Completion(TokenizedSample(prompt + r, [IGNORE_INDEX] * len(prompt) + r, ""), 0.0, cut, i)
                   for i, (r, cut) in enumerate(zip(replies, [False, True, False, True], strict=True))]

    def rollout_kl(mask: bool):
        config = RlooConfig(name="rloo", rewards=["exact_match"], group_size=4, beta=0.1,
                            mask_truncated_completions=mask)
        objective = GrpoObjective(config, build_rewards(config), tiny_tokenizer, seed=0, switch_off=None)
        objective.frozen_reference = reference
        return objective._rollout_kl(policy, completions, [4])

    kept, kept_tokens = rollout_kl(False)
    masked, masked_tokens = rollout_kl(True)
    with torch.no_grad():
        expected = []
        for reply in replies:
            ids = torch.tensor([prompt + reply])
            start = len(prompt) - 1
            logp, ref = (model(ids).logits[0, start:-1].log_softmax(-1).gather(-1, ids[0, len(prompt):, None]).sum()
                         for model in (policy, reference))
            expected.append(float(logp - ref))
    assert kept.tolist() == pytest.approx(expected, abs=1e-4) and kept_tokens == 10
    assert masked.tolist() == pytest.approx([expected[0], 0.0, expected[2], 0.0], abs=1e-4) and masked_tokens == 7


def rloo_config(model_dir, data, out, rewards_file, *overrides):
    return load_config(None, [
        f"model={model_dir}", f"data.train={data}", "data.eval_split=0.25", "data.max_length=64",
        f"output_dir={out}", "train.batch_size=2", "train.precision=fp32", "eval.generate_samples=2",
        "eval.max_new_tokens=8", "eval.show_samples=0", "eval.metrics=[exact_match]", "objective.name=rloo",
        f"objective.rewards=[{rewards_file}:letters]", "objective.group_size=4", "objective.max_new_tokens=8",
        "train.lr=1e-2", *overrides])


def test_rloo_with_lora_raises_the_reward_and_folds_the_kl_into_it(tiny_model_dir, tmp_path):
    rewards = tmp_path / "rewards.py"
    rewards.write_text(REWARDS_PY)
    data = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "rloo"
    summary = train_run(rloo_config(tiny_model_dir, data, out, rewards, "train.max_steps=20", "train.seed=1"))
    before, after = summary["eval_before"], summary["eval_after"]
    assert after["eval_rewards/letters/mean"] > before["eval_rewards/letters/mean"] + 0.3
    steps = [r for r in read_records(out) if "reward" in r]
    # sampled at T=1 and not normalised (TRL's default), the sampled reward's trend is noisier than GRPO's
    assert sum(r["reward"] for r in steps[-5:]) > sum(r["reward"] for r in steps[:5]) + 0.1
    kls = [r["kl"] for r in steps]
    assert kls[0] == pytest.approx(0.0, abs=1e-6)  # LoRA starts as the base model, the reference
    assert max(abs(k) for k in kls[1:]) > 1e-4  # then the KL penalty is live
    assert summary["objective"] == "rloo" and (out / "adapter_model.safetensors").is_file()

    # `tunelab eval` scores an RLOO run as it does a GRPO run: greedy replies, the run's rewards
    result = CliRunner().invoke(app, ["eval", str(out)])
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.output[result.output.index("{"):])
    assert evaluated["objective"] == "rloo"
    assert evaluated["reward"] == pytest.approx(after["eval_reward"], abs=1e-6)


def test_rloo_without_kl_penalty_runs_no_reference_and_resumes_exactly_in_a_kept_rollout(tiny_model_dir, tmp_path):
    rewards = tmp_path / "rewards.py"
    rewards.write_text(REWARDS_PY)
    data = write_prompts(tmp_path / "prompts.jsonl")
    base = ["train.max_steps=6", "train.save_every=2", "eval.before_after=false", "objective.updates_per_rollout=2",
            "objective.beta=0", "objective.normalize_advantages=true"]
    straight = train_run(rloo_config(tiny_model_dir, data, tmp_path / "straight", rewards, *base))
    steps = [r for r in read_records(tmp_path / "straight") if "loss" in r]
    assert not any("kl" in r for r in steps)
    assert all(r["clip_ratio/region_mean"] == 0 for r in steps[0::2])  # a rollout's first update: ratio 1
    with interrupted_at_step(3):
        train_run(rloo_config(tiny_model_dir, data, tmp_path / "resumed", rewards, *base))
    resumed = train_run(rloo_config(tiny_model_dir, data, tmp_path / "resumed", rewards, *base), resume=True)
    resumed_steps = [r for r in read_records(tmp_path / "resumed") if "loss" in r]
    assert [r["loss"] for r in resumed_steps] == pytest.approx([r["loss"] for r in steps], rel=1e-5, abs=1e-7)
    assert resumed["final_eval_loss"] == pytest.approx(straight["final_eval_loss"], abs=1e-6)


def test_a_negative_kl_weight_exits_2_naming_the_key(tiny_model_dir, tmp_path):
    data = write_prompts(tmp_path / "prompts.jsonl")
    config = tmp_path / "rloo.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata: {{train: {data}}}\nmethod: {{name: full}}\n"
                      "objective: {name: rloo, rewards: [exact_match], beta: -1}\n")
    result = CliRunner().invoke(app, ["train", str(config)])
    assert result.exit_code == 2 and "objective.beta" in result.output
