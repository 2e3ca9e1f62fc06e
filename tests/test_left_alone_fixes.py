"""Three fixes on the tiny model: a preference pair that truncation makes identical is left out like any identical
pair; a resume that measures the base model again rewrites metrics.jsonl's step-0 line to match baseline.json;
TRL-style GRPO rewards read trainer_state.epoch as TRL's GRPOTrainer sets it."""

from __future__ import annotations

import json

import pytest
from test_grpo import grpo_config, write_prompts
from test_train import QA, run_config
from typer.testing import CliRunner

from conftest import interrupted_at_step
from tunelab.cli import app
from tunelab.config import DataConfig
from tunelab.data.preference import prepare_preference_data
from tunelab.data.template import ChatRenderer
from tunelab.errors import DataError
from tunelab.track.jsonl import MetricsLog
from tunelab.train.run import train_run

runner = CliRunner()

PROMPT = "What is the capital of France?"
EARLY = {"prompt": PROMPT, "chosen": "Paris.", "rejected": "London."}
LATE = {"prompt": PROMPT, "chosen": "The capital of France is Paris.", "rejected": "The capital of France is Lyon."}
"""Differs only in its last words: within 20 tokens the two sequences are the same (checked below)."""
MAX_LENGTH = 20


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sequence_ids(tokenizer, prompt: str, reply: str) -> list[int]:
    """The ids a model sees for the prompt and reply, independently of tunelab's pair tokenisation."""
    text = ChatRenderer(tokenizer).prompt([{"role": "user", "content": prompt}]) + reply + "<|im_end|>\n"
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_a_pair_identical_after_truncation_is_left_out_and_listed(tmp_path, tiny_tokenizer):
    chosen, rejected = (sequence_ids(tiny_tokenizer, PROMPT, LATE[key]) for key in ("chosen", "rejected"))
    assert chosen != rejected and chosen[:MAX_LENGTH] == rejected[:MAX_LENGTH]  # the premise
    assert sequence_ids(tiny_tokenizer, PROMPT, EARLY["chosen"])[:MAX_LENGTH] != sequence_ids(
        tiny_tokenizer, PROMPT, EARLY["rejected"])[:MAX_LENGTH]

    path = write_jsonl(tmp_path / "pairs.jsonl", [EARLY, LATE])
    config = DataConfig(train=path, eval_split=0, max_length=MAX_LENGTH)
    prepared = prepare_preference_data(config, tiny_tokenizer, seed=0)
    assert [pair.where for pair in prepared.train] == [f"{path}:1"]
    assert prepared.identical == [f"{path}:2: chosen and rejected are identical within data.max_length=20 (they "
                                  "differ only beyond it); left out"]
    assert prepared.stats["identical_pairs"] == 1 and prepared.stats["train_rows"] == 1
    # with room for the difference the pair trains (the check is on what training sees, not on the text)
    longer = prepare_preference_data(DataConfig(train=path, eval_split=0, max_length=40), tiny_tokenizer, seed=0)
    assert len(longer.train) == 2 and longer.identical == []

    only = write_jsonl(tmp_path / "late.jsonl", [LATE] * 3)
    with pytest.raises(DataError, match="no training rows left after validation: 3 left out as identical") as err:
        prepare_preference_data(DataConfig(train=only, eval_split=0, max_length=MAX_LENGTH), tiny_tokenizer, seed=0)
    assert f"{only}:1: chosen and rejected are identical within data.max_length=20" in str(err.value)


def test_training_on_pairs_that_truncation_makes_identical_stops_with_exit_2(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "late.jsonl", [LATE] * 4)
    out = tmp_path / "out"
    config = tmp_path / "dpo.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata: {{train: {data}, eval_split: 0, max_length: {MAX_LENGTH}}}\n"
                      f"objective: {{name: dpo}}\noutput_dir: {out}\n")
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 2, result.output
    assert "4 left out as identical" in result.output and not out.exists()


@pytest.fixture
def qa_file(tmp_path):
    return write_jsonl(tmp_path / "qa.jsonl", QA)


def read_log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_resume_that_measures_the_base_model_again_rewrites_the_step_0_line(tiny_model_dir, qa_file, tmp_path):
    out = tmp_path / "run"
    base = ["train.max_steps=4", "train.save_every=2", "train.lr=3e-3", "eval.generate_samples=2",
            "eval.max_new_tokens=2", "eval.metrics=[exact_match]", "eval.during_training=true",
            "eval.during_training_samples=2"]
    with interrupted_at_step(3):
        train_run(run_config(tiny_model_dir, qa_file, out, *base))
    assert "eval_exact_match" in read_log(out)[0]

    train_run(run_config(tiny_model_dir, qa_file, out, *base, "eval.metrics=[chrf]"), resume=True)
    baseline = json.loads((out / "baseline.json").read_text())
    assert "eval_chrf" in baseline and "eval_exact_match" not in baseline  # measured again
    records = read_log(out)
    step_zero = [record for record in records if record["step"] == 0]
    assert step_zero == [{"step": 0, **{k: v for k, v in baseline.items() if k.startswith("eval_")}}]
    assert records[0] == step_zero[0] and [r["step"] for r in records[1:]] == [1, 2, 3, 4]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".metrics")) == []  # no scratch file left


def test_replacing_the_step_0_line_keeps_every_other_line(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    lines = [{"step": 0, "eval_loss": 2.0}, {"step": 0, "rollback_from": 3, "bad_steps": [3]},
             {"step": 1, "loss": 1.5, "eval_loss": 1.9}]
    for record in lines:
        log.write(record)
    log.replace_baseline({"step": 0, "eval_loss": 2.5, "eval_chrf": float("nan")})
    assert log.read() == [{"step": 0, "eval_loss": 2.5, "eval_chrf": None}, *lines[1:]]
    log.replace_baseline(None)  # the base model is no longer measured (eval.before_after turned off)
    assert log.read() == lines[1:]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


EPOCH_REWARD = '''
import json


def records_epoch(prompts, completions, trainer_state, **kwargs):
    with open({path!r}, "a") as handle:
        handle.write(json.dumps([trainer_state.global_step, trainer_state.epoch]) + "\\n")
    return [float(len(c)) for c in completions]
'''


@pytest.mark.parametrize("updates_per_rollout", [1, 2])
def test_a_trl_reward_reads_the_fractional_epoch(tiny_model_dir, tmp_path, updates_per_rollout):
    calls = tmp_path / "calls.jsonl"
    rewards = tmp_path / "rewards.py"
    rewards.write_text(EPOCH_REWARD.format(path=str(calls)))
    prompts, batch_size, steps = 6, 2, 6
    data = write_prompts(tmp_path / "prompts.jsonl", prompts)
    config = grpo_config(tiny_model_dir, data, tmp_path / "out", rewards, f"train.max_steps={steps}",
                         f"train.batch_size={batch_size}", "objective.max_new_tokens=2", "eval.before_after=false",
                         "eval.generate_samples=0", "data.eval_split=0", f"objective.rewards=[{rewards}:records_epoch]",
                         f"objective.updates_per_rollout={updates_per_rollout}")
    train_run(config)
    seen = [json.loads(line) for line in calls.read_text().splitlines()]
    # TRL: after each optimiser step epoch = epoch + (micro-batch + 1) / micro-batches per epoch; a rollout sees the
    # value of the step before it. With updates_per_rollout > 1 TRL's sampler repeats each batch as often, so at
    # a rollout that is still the share of the prompts sampled so far.
    steps_per_epoch = prompts // batch_size * updates_per_rollout
    sampled_at = range(0, steps, updates_per_rollout)
    assert [step for step, _ in seen] == list(sampled_at)
    assert [epoch for _, epoch in seen] == pytest.approx([step / steps_per_epoch for step in sampled_at])
    assert all(isinstance(epoch, float) for _, epoch in seen)


def test_data_inspect_lists_a_pair_that_truncation_makes_identical(tmp_path, tiny_tokenizer):
    from tunelab.data.inspect import inspect_data

    path = write_jsonl(tmp_path / "pairs.jsonl", [EARLY, LATE])
    short = inspect_data(path, tokenizer=tiny_tokenizer, data_config=DataConfig(train=path, eval_split=0,
                                                                                max_length=MAX_LENGTH))
    assert short.identical == [f"{path}:2"] and short.measured_rows == 1  # as training leaves it out
    longer = inspect_data(path, tokenizer=tiny_tokenizer, data_config=DataConfig(train=path, eval_split=0,
                                                                                 max_length=40))
    assert longer.identical == [] and longer.measured_rows == 2


def test_relative_paths_given_on_the_command_line_are_recorded_absolute(tiny_model_dir, tmp_path, monkeypatch):
    """A run's config.yaml names its data and reward files absolute, so `tunelab eval RUN` works from any folder."""
    from test_grpo import REWARDS_PY

    work = tmp_path / "work"
    work.mkdir()
    (work / "rewards.py").write_text(REWARDS_PY)
    write_prompts(work / "prompts.jsonl")
    monkeypatch.chdir(work)
    train_run(grpo_config(tiny_model_dir, "prompts.jsonl", work / "run", "rewards.py", "train.max_steps=1",
                          "eval.before_after=false", "objective.rewards=[rewards.py:letters, exact_match]"))
    saved = (work / "run" / "config.yaml").read_text()
    assert f"train: {work / 'prompts.jsonl'}" in saved and f"{work / 'rewards.py'}:letters" in saved
    assert "- exact_match" in saved  # a built-in stays a name
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["eval", str(work / "run"), "--limit", "2"])
    assert result.exit_code == 0, result.output
