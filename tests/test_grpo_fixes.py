"""GRPO rewards as TRL 1.16 treats them: None means "does not judge" (left out of its group, advantage 0), reward
functions get TRL's keyword arguments and may be async or return arrays, infinite rewards stop the run, reward_std
and frac_reward_zero_std mean what TRL's do, and reward paths resolve against the config file's folder."""

from __future__ import annotations

import math

import pytest
import torch
from test_grpo import grpo_config, write_prompts

from conftest import build_tiny_model
from tunelab.config import GrpoObjective as GrpoConfig
from tunelab.config import load_config
from tunelab.data.prompts import PromptRow
from tunelab.errors import TrainingFault
from tunelab.objectives.grpo import GrpoObjective
from tunelab.objectives.rewards import build_rewards
from tunelab.train.run import train_run

NAN = math.nan

REWARDS_PY = '''
import numpy as np
import torch


def by_position(prompts, completions, **kwargs):
    """Group 1: [1, None, 1, None]; group 2: [1, 0, 0, None]."""
    return [1.0, None, 1.0, None, 1.0, 0.0, 0.0, None][:len(completions)]


def first_group_agrees(prompts, completions, **kwargs):
    return [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0][:len(completions)]


def trl_style(prompts, completions, completion_ids, trainer_state, log_extra, log_metric, answer, **kwargs):
    trl_style.steps.append((trainer_state.global_step, trainer_state.epoch))
    log_extra("note", ["x"] * len(completions))
    log_metric("hits", 2.0)
    log_metric("hits", 4.0)
    return np.array([0.5] * len(completions))


trl_style.steps = []


async def judged(prompts, completions, **kwargs):
    return torch.tensor([0.25] * len(completions))


def too_short(prompts, completions, **kwargs):
    return np.array([0.0] * (len(completions) - 1))


def infinite(prompts, completions, **kwargs):
    return [math_inf if i == 2 else 0.0 for i in range(len(completions))]


math_inf = float("inf")
'''


@pytest.fixture
def rewards_file(tmp_path):
    path = tmp_path / "rewards.py"
    path.write_text(REWARDS_PY)
    return path


def two_prompts(tokenizer) -> list[list[list[PromptRow]]]:
    """One micro-batch of two prompt rows, tokenised as a rollout wants them."""
    rows = [PromptRow(f"p:{i}", [{"role": "user", "content": text}], text, {"answer": "2"})
            for i, text in enumerate(["what is 1 plus 1?", "what is 2 plus 0?"])]
    for row in rows:
        row.prompt_ids = tokenizer.encode(row.original)
    return [[rows]]


def rollout(tokenizer, rewards: list, step: int = 0, **overrides):
    config = GrpoConfig(name="grpo", rewards=rewards, group_size=4, max_new_tokens=3, **overrides)
    objective = GrpoObjective(config, build_rewards(config), tokenizer, seed=0, switch_off=None)
    batches, metrics = objective.rollout(build_tiny_model(len(tokenizer)), two_prompts(tokenizer), step)
    advantages = [c.advantage for rows in batches for row in rows for c in row]
    return objective, advantages, {key: value for key, (value, _) in metrics.items()}


def test_a_completion_no_reward_judges_is_left_out_of_its_group(tiny_tokenizer, rewards_file):
    _, advantages, metrics = rollout(tiny_tokenizer, [f"{rewards_file}:by_position"])
    assert advantages[:4] == [0.0, 0.0, 0.0, 0.0]  # the judged ones agree; the unjudged get 0, not -0.866
    std = torch.tensor([1.0, 0.0, 0.0]).std().item()
    assert advantages[4:] == pytest.approx([(2 / 3) / (std + 1e-4), (-1 / 3) / (std + 1e-4),
                                            (-1 / 3) / (std + 1e-4), 0.0], rel=1e-4)
    assert metrics["reward"] == pytest.approx(0.6)  # the mean of the 5 judged, not of all 8
    assert metrics["reward_std"] == pytest.approx(torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0]).std().item())
    assert metrics["frac_reward_zero_std"] == 0.5  # group 1's std is 0


def test_a_partly_judged_completion_adds_the_rewards_that_judged_it(tiny_tokenizer, rewards_file):
    config = GrpoConfig(name="grpo", rewards=[f"{rewards_file}:by_position", {"reward": "exact_match", "weight": 2}])
    objective = GrpoObjective(config, build_rewards(config), tiny_tokenizer, seed=0, switch_off=None)
    rows = two_prompts(tiny_tokenizer)[0][0]
    scores = objective.score(rows, ["2", "3"], [[1], [2]])
    from tunelab.objectives.grpo import weighted_total

    assert weighted_total(scores, [1.0, 2.0]).tolist() == [3.0, 0.0]
    only_none = weighted_total(torch.tensor([[NAN, NAN], [1.0, NAN]]), [1.0, 2.0])
    assert math.isnan(only_none[0]) and only_none[1] == 1.0


def test_reward_std_is_over_the_steps_rewards_and_zero_std_follows_the_scaling_std(tiny_tokenizer, rewards_file):
    rewards = [f"{rewards_file}:first_group_agrees"]
    _, _, metrics = rollout(tiny_tokenizer, rewards, scale_rewards="group")
    assert metrics["reward_std"] == pytest.approx(torch.tensor([1.0] * 5 + [0.0] * 3).std().item())
    assert metrics["frac_reward_zero_std"] == 0.5
    _, _, metrics = rollout(tiny_tokenizer, rewards, scale_rewards="batch")
    assert metrics["frac_reward_zero_std"] == 0.0  # the batch's std, which scales the advantages, is not 0


def test_trl_reward_functions_work_unchanged(tiny_tokenizer, rewards_file):
    objective, _, metrics = rollout(tiny_tokenizer, [f"{rewards_file}:trl_style", f"{rewards_file}:judged"],
                                    step=3)
    assert metrics["rewards/trl_style/mean"] == 0.5 and metrics["rewards/judged/mean"] == 0.25
    assert metrics["rewards/trl_style/hits"] == 3.0  # log_metric's values, averaged over the step
    calls = next(cell.cell_contents for cell in objective.rewards[0].score.__closure__
                 if hasattr(cell.cell_contents, "steps")).steps
    assert calls == [(3, None)]


def test_a_reward_of_the_wrong_length_names_itself_and_the_counts(tiny_tokenizer, rewards_file):
    with pytest.raises(TrainingFault, match=r"'too_short' failed: ValueError: returned 7 values for 8 completions"):
        rollout(tiny_tokenizer, [f"{rewards_file}:too_short"])


def test_an_infinite_reward_stops_the_run_naming_it(tiny_model_dir, tmp_path, rewards_file):
    data = write_prompts(tmp_path / "prompts.jsonl", 8)
    config = grpo_config(tiny_model_dir, data, tmp_path / "out", rewards_file, "train.max_steps=2",
                         "objective.max_new_tokens=3", "eval.before_after=false", "eval.generate_samples=0",
                         "data.eval_split=0", f"objective.rewards=[{rewards_file}:infinite]")
    with pytest.raises(TrainingFault, match=r"the reward 'infinite' returned inf for completion 2"):
        train_run(config)


def recipe_folder(tmp_path):
    recipe = tmp_path / "recipe"
    recipe.mkdir()
    (recipe / "recipe_helpers.py").write_text("def bonus():\n    return 0.75\n")
    (recipe / "scoring.py").write_text("import recipe_helpers\n\n\ndef scored(prompts, completions, **kw):\n"
                                       "    return [recipe_helpers.bonus()] * len(completions)\n")
    return recipe


def test_a_reward_file_imports_the_modules_next_to_it(tmp_path, monkeypatch):
    recipe = recipe_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    reward = build_rewards(GrpoConfig(name="grpo", rewards=[f"{recipe}/scoring.py:scored"]))[0]
    assert reward.score([PromptRow("p", [], "hi", {})], ["x"], [[1]]) == [0.75]


def test_reward_paths_resolve_beside_the_config(tmp_path, monkeypatch):
    recipe = recipe_folder(tmp_path)
    (recipe / "rm").mkdir()
    (recipe / "exact_match").mkdir()  # a folder named like a built-in does not hide the built-in
    (recipe / "c.yaml").write_text(
        "model: tiny\nobjective:\n  name: grpo\n  rewards:\n    - scoring.py:scored\n"
        "    - {reward: rm, weight: 0.5}\n    - exact_match\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    specs = load_config(recipe / "c.yaml", []).objective.reward_specs()
    assert [s.reward for s in specs] == [f"{recipe}/scoring.py:scored", f"{recipe}/rm", "exact_match"]


def test_task_metrics_read_the_answer_column_when_only_python_rewards_score(tiny_model_dir, tmp_path):
    """eval.metrics with a Python reward alone (no built-in reward names a reference column): the rows' `answer`
    column is the reference, so the before/after table has the metric instead of nothing."""
    from test_grpo import REWARDS_PY, grpo_config, write_prompts

    from tunelab.train.run import train_run

    rewards = tmp_path / "rewards.py"
    rewards.write_text(REWARDS_PY)
    data = write_prompts(tmp_path / "prompts.jsonl", count=16)
    summary = train_run(grpo_config(tiny_model_dir, data, tmp_path / "run", rewards, "train.max_steps=1",
                                    f"objective.rewards=[{rewards}:letters]"))
    assert "exact_match" in summary["metrics_before"] and "exact_match" in summary["metrics_after"]
