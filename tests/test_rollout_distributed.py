"""GRPO and RLOO rollouts in several processes compute what one process holding the whole step computes: the
step-wide normalisation (scale_rewards: batch, normalize_advantages) and every logged rollout metric cover all the
processes' completions, as TRL gathers them, unjudged (None) rewards and stand-in micro-batches left out."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from test_distributed import TUNELAB, one_thread_env

from conftest import build_tiny_model, build_tokenizer
from tunelab.config import GrpoObjective as GrpoConfig
from tunelab.config import RlooObjective as RlooConfig
from tunelab.data.prompts import PromptRow
from tunelab.objectives.grpo import GrpoObjective
from tunelab.objectives.metrics import MetricTotals
from tunelab.objectives.rewards import Reward
from tunelab.train.distributed import Ranks
from tunelab.train.launch import free_port

NAN = math.nan
GROUP = 4
FIRST = {  # each prompt's group of rewards from the first reward; NaN: not judged
    "p0": [1.0, NAN, 0.0, 2.0], "p1": [NAN, NAN, NAN, NAN], "p2": [0.5, 0.5, 0.5, 0.5], "p3": [3.0, -1.0, NAN, 0.0]}
SECOND = {  # weight 0.5; logs every value it gives (log_metric)
    "p0": [0.0, 1.0, NAN, 1.0], "p1": [NAN, 2.0, NAN, NAN], "p2": [1.0, 0.0, 1.0, 0.0], "p3": [2.0, NAN, NAN, NAN]}
CONFIGS = {
    "grpo_batch": lambda: GrpoConfig(name="grpo", rewards=["x"], group_size=GROUP, max_new_tokens=3,
                                     scale_rewards="batch"),
    "grpo_group": lambda: GrpoConfig(name="grpo", rewards=["x"], group_size=GROUP, max_new_tokens=3),
    "rloo_normalized": lambda: RlooConfig(name="rloo", rewards=["x"], group_size=GROUP, max_new_tokens=3,
                                          normalize_advantages=True, beta=0.1),
}


def table_reward(name: str, weight: float, table: dict[str, list[float]], logs: bool) -> Reward:
    """A reward that gives the n-th completion of a prompt's group table[prompt][n], whatever its text."""

    def score(rows: list[PromptRow], texts: list[str], ids: list[list[int]]) -> list[float]:
        seen: dict[str, int] = {}
        values = []
        for row in rows:
            values.append(table[row.where][seen.setdefault(row.where, 0)])
            seen[row.where] += 1
        if logs:
            for value in values:
                if not math.isnan(value):
                    reward.log_metric("given", value)
        return values

    reward = Reward(name, weight, score)
    return reward


def prompt_rows(tokenizer) -> dict[str, PromptRow]:
    rows = {}
    for index, where in enumerate(FIRST):
        text = f"what is {index} plus 1?"
        rows[where] = PromptRow(where, [{"role": "user", "content": text}], text, {})
        rows[where].prompt_ids = tokenizer.encode(text)
    return rows


def run_rollouts(step_rows_of: dict[str, list], weights: list[float] | None) -> dict[str, dict]:
    """For each config: every counted completion's advantage by (prompt, place in its group), and the metrics."""
    tokenizer = build_tokenizer()
    model = build_tiny_model(len(tokenizer))
    rows = prompt_rows(tokenizer)
    step_rows = [[[rows[where]] for where in micro_batch] for micro_batch in step_rows_of["rows"]]
    results = {}
    for name, make in CONFIGS.items():
        rewards = [table_reward("first", 1.0, FIRST, False), table_reward("second", 0.5, SECOND, True)]
        ranks = Ranks(dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else Ranks()
        objective = GrpoObjective(make(), rewards, tokenizer, seed=0, switch_off=None, ranks=ranks)
        objective.prepare(model)  # RLOO's KL reference: the model itself, so every KL is exactly 0
        batches, metrics = objective.rollout(model, step_rows, step=0, weights=weights)
        advantages, seen = {}, {}
        for batch, weight in zip(batches, weights or [1.0] * len(batches), strict=True):
            for (completion,) in batch:
                where = completion.sample.where
                seen[where] = seen.get(where, -1) + 1
                if weight:
                    advantages[f"{where}/{seen[where]}"] = completion.advantage
        results[name] = {"advantages": advantages, "metrics": metrics}
    return results


def two_process_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # Micro-batch 1 is [p0, p1, p2], cut unevenly as Ranks.share does; micro-batch 2 is [p3] alone, so rank 1
        # samples a stand-in (p3 again) with weight 0, as the loop makes it.
        shares = {0: [["p0", "p1"], ["p3"]], 1: [["p2"], ["p3"]]}
        results = run_rollouts({"rows": shares[rank]}, [1.0, 1.0] if rank == 0 else [1.0, 0.0])
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def merged(*metrics: dict) -> dict[str, float]:
    """What the loop logs of the processes' metrics (train/loop.py's _merged): their sums over their counts."""
    totals = MetricTotals()
    for part in metrics:
        totals.add(part)
    return totals.means()


def test_two_processes_normalise_and_log_as_one_process_holding_the_whole_step(tmp_path):
    mp.spawn(two_process_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    alone = run_rollouts({"rows": [["p0", "p1", "p2"], ["p3"]]}, None)
    sampled = ("completions/", "seconds/", "kl")  # what depends on the sampled texts or the clock
    for name in CONFIGS:
        expected = alone[name]
        shared = {**ranks[0][name]["advantages"], **ranks[1][name]["advantages"]}
        assert len(shared) == len(ranks[0][name]["advantages"]) + len(ranks[1][name]["advantages"]) == 16
        assert shared == expected["advantages"], name  # exactly: the same arithmetic on the same rewards
        logged = merged(ranks[0][name]["metrics"], ranks[1][name]["metrics"])
        want = merged(expected["metrics"])
        assert {k: v for k, v in logged.items() if not k.startswith(sampled)} == {
            k: v for k, v in want.items() if not k.startswith(sampled)}, name
        assert logged["rewards/second/given"] == 8 / 9  # every process's values, not the stand-in's again
    # Independently: the std of the step's 12 judged totals scales every advantage (rank 1 alone holds only p2's)
    totals = torch.tensor([1.0, 0.5, 0.0, 2.5, NAN, 1.0, NAN, NAN, 1.0, 0.5, 1.0, 0.5, 4.0, -1.0, NAN, 0.0])
    judged = totals[~totals.isnan()]
    p0_last = (2.5 - totals[:4].mean()) / (judged.std() + 1e-4)
    p2_first = (1.0 - 0.75) / (judged.std() + 1e-4)
    assert ranks[0]["grpo_batch"]["advantages"]["p0/3"] == pytest.approx(float(p0_last), rel=1e-6)
    assert ranks[1]["grpo_batch"]["advantages"]["p2/0"] == pytest.approx(float(p2_first), rel=1e-6)
    assert ranks[0]["grpo_batch"]["metrics"]["reward_std"][0] == pytest.approx(float(judged.std()), rel=1e-6)
    assert ranks[0]["rloo_normalized"]["metrics"]["kl"][0] == 0.0  # the reference is the policy itself


def test_rows_gather_in_step_order_and_positions_point_at_this_process():
    """One process: the rows are returned as they are, and all of them are this process's."""
    columns = {"x": torch.tensor([1.0, 2.0, 3.0])}
    whole, mine = Ranks().gather_rows(columns, [2, 1])
    assert whole["x"] is columns["x"] and mine.tolist() == [0, 1, 2]


REWARDS_PY = '''
import json, os


def answer_and_length(prompts, completions, completion_ids, answer, trainer_state, log_metric, **columns):
    """The prompt's answer plus a tenth of the completion's length: far apart between prompts, so the step's std
    is much larger than each process's; recorded with the process, step and lengths it saw."""
    values = [float(a) + len(ids) / 10 for a, ids in zip(answer, completion_ids)]
    for value in values:
        log_metric("given", value)
    with open(os.path.join(os.environ["RECORD_DIR"], f"rank{os.environ['RANK']}.jsonl"), "a") as out:
        out.write(json.dumps({"step": trainer_state.global_step, "values": values,
                              "lengths": [len(ids) for ids in completion_ids]}) + "\\n")
    return [None if index % 3 == 2 else value for index, value in enumerate(values)]
'''


def test_grpo_in_two_processes_logs_the_metrics_of_every_processs_completions(tiny_model_dir, tmp_path):
    # 7 prompts, 2 per process: step 1 has 4 (2 + 2), step 2 the last 3 (2 + 1), cut unevenly.
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"what is {a} plus 3?", "answer": str(10 * a + 3)}) + "\n"
                            for a in range(7)))
    (tmp_path / "rewards.py").write_text(REWARDS_PY)
    records = tmp_path / "records"
    records.mkdir()
    config = tmp_path / "grpo.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "data": {"train": str(data), "eval_split": 0.0, "max_length": 64},
        "objective": {"name": "grpo", "rewards": [f"{tmp_path / 'rewards.py'}:answer_and_length"], "group_size": 2,
                      "max_new_tokens": 4, "scale_rewards": "batch"},
        "train": {"max_steps": 2, "batch_size": 2, "precision": "fp32", "lr": 1e-2},
        "eval": {"before_after": False, "generate_samples": 0}, "output_dir": str(tmp_path / "run"),
    }))
    done = subprocess.run([TUNELAB, "train", str(config), "--nproc", "2"], capture_output=True, text=True,
                          env={**one_thread_env(), "RECORD_DIR": str(records)}, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    logged = {r["step"]: r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())}
    seen = {rank: [json.loads(line) for line in (records / f"rank{rank}.jsonl").read_text().splitlines()]
            for rank in (0, 1)}
    assert [len(call["values"]) for call in seen[0]] == [4, 4] and [len(c["values"]) for c in seen[1]] == [4, 2]
    for step in (1, 2):
        calls = [call for rank in (0, 1) for call in seen[rank] if call["step"] == step - 1]
        values = [v for call in calls for v in call["values"]]
        judged = torch.tensor([v for call in calls for i, v in enumerate(call["values"]) if i % 3 != 2])
        lengths = [n for call in calls for n in call["lengths"]]
        record = logged[step]
        assert record["reward"] == pytest.approx(float(judged.mean()), rel=1e-6)
        assert record["reward_std"] == pytest.approx(float(judged.std()), rel=1e-6)
        assert record["rewards/answer_and_length/mean"] == pytest.approx(float(judged.mean()), rel=1e-6)
        assert record["rewards/answer_and_length/given"] == pytest.approx(sum(values) / len(values), rel=1e-9)
        assert record["completions/mean_length"] == pytest.approx(sum(lengths) / len(lengths), rel=1e-9)
        # not what averaging each process's own statistic gives
        own_stds = [float(torch.tensor([v for i, v in enumerate(call["values"]) if i % 3 != 2]).std())
                    for call in calls]
        assert record["reward_std"] != pytest.approx(sum(own_stds) / len(own_stds), rel=1e-3)
    uneven = [call for rank in (0, 1) for call in seen[rank] if call["step"] == 1]
    per_process = sum(sum(call["values"]) / len(call["values"]) for call in uneven) / 2
    assert logged[2]["rewards/answer_and_length/given"] != pytest.approx(per_process, rel=1e-6)


def test_a_run_resumed_into_a_kept_rollout_keeps_its_stand_in_out(tiny_model_dir, tmp_path):
    # 5 prompts, 2 per process: step 3 draws the last one, so rank 1 trains a stand-in with weight 0, and step 4
    # updates on that rollout again. Resumed from the checkpoint of step 3, step 4 must weigh it as before (the
    # loop's weights were lost with the process and counted the stand-in's tokens: loss halved).
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"what is {a} plus 3?", "answer": str(10 * a + 3)}) + "\n"
                            for a in range(5)))
    (tmp_path / "rewards.py").write_text(REWARDS_PY)
    (tmp_path / "records").mkdir()
    config = tmp_path / "grpo.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "data": {"train": str(data), "eval_split": 0.0, "max_length": 64},
        "objective": {"name": "grpo", "rewards": [f"{tmp_path / 'rewards.py'}:answer_and_length"], "group_size": 2,
                      "max_new_tokens": 4, "updates_per_rollout": 2},
        "train": {"max_steps": 4, "batch_size": 2, "precision": "fp32", "lr": 1e-2, "save_every": 3},
        "eval": {"before_after": False, "generate_samples": 0}, "output_dir": str(tmp_path / "run"),
    }))
    env = {**one_thread_env(), "RECORD_DIR": str(tmp_path / "records")}

    def train(*extra: str) -> dict[int, dict]:
        done = subprocess.run([TUNELAB, "train", str(config), "--nproc", "2", *extra], capture_output=True,
                              text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}

    straight = train()
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000004")
    resumed = train("--resume")
    for key in ("loss", "grad_norm", "tokens"):
        assert resumed[4][key] == pytest.approx(straight[4][key], rel=1e-5), key
