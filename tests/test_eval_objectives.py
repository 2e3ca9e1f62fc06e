"""`tunelab eval` of GRPO and KTO runs on their own kinds of rows: a GRPO run's rewards on greedy replies (the same
numbers as its own final evaluation, from a generation and rewards recomputed here by hand), a KTO run's loss as
its training logged it, and bad input refused with exit 2 naming the file and line."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.config import load_config
from tunelab.train.run import train_run

REWARDS_PY = '''
def token_sum(prompts, completions, completion_ids, **columns):
    """Any change of a reply's tokens changes its score."""
    return [sum(ids) % 13 / 12 for ids in completion_ids]
'''

PROMPTS = [{"prompt": f"what is {a} plus {b}?", "answer": str(a + b)} for a in range(6) for b in range(6)]
PAIRS = [{"prompt": f"what is {a} plus {b}?", "chosen": f"the answer is {a + b}", "rejected": f"{a * b}"}
         for a in range(6) for b in range(6)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def eval_cli(*args) -> tuple[int, str, dict | None]:
    """(exit code, output, the JSON result when it succeeded) of `tunelab eval ARGS`."""
    result = CliRunner().invoke(app, ["eval", *map(str, args)])
    return result.exit_code, result.output, json.loads(result.stdout) if result.exit_code == 0 else None


@pytest.fixture(scope="module")
def grpo_run(tiny_model_dir, tmp_path_factory):
    """A LoRA GRPO run of six steps on the tiny model, rewarded by a Python function and a built-in."""
    root = tmp_path_factory.mktemp("grpo-eval")
    rewards = root / "rewards.py"
    rewards.write_text(REWARDS_PY)
    data = write_jsonl(root / "prompts.jsonl", PROMPTS)
    out = root / "run"
    summary = train_run(load_config(None, [
        f"model={tiny_model_dir}", f"data.train={data}", "data.eval_split=0.25", "data.max_length=64",
        f"output_dir={out}", "train.batch_size=2", "train.precision=fp32", "train.lr=1e-2", "train.max_steps=6",
        "train.seed=1", "eval.generate_samples=2", "eval.max_new_tokens=8", "eval.show_samples=0",
        "eval.metrics=[exact_match]", "objective.name=grpo", "objective.group_size=4", "objective.max_new_tokens=8",
        f"objective.rewards=[{{reward: '{rewards}:token_sum', weight: 0.5}}, exact_match]"]))
    return out, summary, root


def greedy_reply_ids(run, base_dir, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """Each prompt's greedy reply by transformers' own generate on the run's merged LoRA model, one prompt at a
    time (no padding): the tokens through the first end-of-turn token, as GRPO scores them."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), run).merge_and_unload().eval()
    replies = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        replies.append(new[: new.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in new else new)
    return replies


def test_a_grpo_runs_eval_gives_its_own_final_rewards_from_real_replies(grpo_run, tiny_model_dir, tmp_path):
    run, summary, _ = grpo_run
    before, after = summary["eval_before"], summary["eval_after"]
    assert after["eval_reward"] != pytest.approx(before["eval_reward"], abs=1e-4)  # base and run tell apart

    code, output, result = eval_cli(run, "--baseline", "base", "--output", tmp_path / "out")
    assert code == 0, output
    assert result["samples"] == 9  # the run's held-out quarter of 36 prompts
    assert result["reward"] == pytest.approx(after["eval_reward"], abs=1e-6)
    for name in ("token_sum", "exact_match"):
        assert result[f"rewards/{name}/mean"] == pytest.approx(after[f"eval_rewards/{name}/mean"], abs=1e-6)
    assert result["completions/mean_length"] == pytest.approx(after["eval_completions/mean_length"])
    assert result["baseline"]["reward"] == pytest.approx(before["eval_reward"], abs=1e-6)
    gained = result["comparison"]["differences"]["reward"]
    assert gained["difference"] == pytest.approx(result["reward"] - result["baseline"]["reward"], abs=1e-6)

    # Each reply again, by transformers' generate on the merged model, scored here by hand.
    samples = [json.loads(line) for line in (tmp_path / "out" / "eval_samples.jsonl").read_text().splitlines()]
    ids = greedy_reply_ids(run, tiny_model_dir, [s["prompt"] for s in samples], max_new_tokens=8)
    token_sums = [sum(reply) % 13 / 12 for reply in ids]
    assert [s["rewards"]["token_sum"] for s in samples] == pytest.approx(token_sums, abs=1e-6)
    matches = [float(s["reply"].strip().lower() == s["reference"].lower()) for s in samples]
    assert [s["rewards"]["exact_match"] for s in samples] == matches
    assert result["reward"] == pytest.approx(sum(0.5 * t + m for t, m in zip(token_sums, matches, strict=True)) / 9,
                                             abs=1e-6)
    assert result["exact_match"] == pytest.approx(sum(matches) / 9)  # eval.metrics on the same replies
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["reward"] == result["reward"]
    assert list((run / "evals").glob("*grpo*.json"))  # kept with the run, for its report
    assert "rewards/token_sum/mean" in (run / "report.html").read_text()


def test_a_grpo_run_scores_a_prompt_file_with_its_rewards(grpo_run):
    run, _, root = grpo_run
    rows = [{"prompt": p["prompt"], "answer": p["answer"], "topic": "sums"} for p in PROMPTS[::7]]
    data = write_jsonl(root / "more_prompts.jsonl", rows)
    code, output, whole = eval_cli(run, "--data", data, "--metrics", "exact_match,chrf")
    assert code == 0, output
    assert whole["samples"] == len(rows) and whole["data"] == str(data)
    assert {"reward", "rewards/token_sum/mean", "rewards/exact_match/mean", "exact_match", "chrf"} <= set(whole)
    code, output, first = eval_cli(run, "--data", data, "--limit", 1, "--max-new-tokens", 2)
    assert code == 0, output
    assert first["samples"] == 1 and first["completions/mean_length"] <= 2


def test_bad_grpo_eval_input_exits_2_naming_file_line_or_key(grpo_run, tmp_path):
    run, _, _ = grpo_run
    recorded = sorted((run / "evals").glob("*.json")) if (run / "evals").is_dir() else []
    no_prompt = write_jsonl(tmp_path / "no_prompt.jsonl", [{"prompt": "what is 1 plus 1?", "answer": "2"},
                                                           {"answer": "3"}])
    no_answer = write_jsonl(tmp_path / "no_answer.jsonl", [{"prompt": "what is 1 plus 1?"}] * 2)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "what is 1 plus 1?", "answer": "2"}\n{"prompt": "what is\n')
    cases = [
        ([run, "--data", no_prompt], f"{no_prompt}:2: missing field 'prompt'"),
        ([run, "--data", no_answer], f"{no_answer}:1: missing column 'answer'"),
        ([run, "--data", broken], f"{broken}:2"),
        ([run, "--metrics", "loss"], "--metrics: loss cannot score a GRPO run's prompt rows"),
        ([run, "--labels", "a,b"], "--labels:"),
    ]
    for args, message in cases:
        code, output, _ = eval_cli(*args, "--output", tmp_path / "out")
        assert code == 2, output
        assert message in " ".join(output.split()), output
        assert not (tmp_path / "out").exists()
    assert (sorted((run / "evals").glob("*.json")) if (run / "evals").is_dir() else []) == recorded


@pytest.mark.parametrize("method", ["lora", "full"])  # the reference: the adapter switched off, the starting model
def test_a_kto_runs_eval_loss_is_the_one_its_training_logged(tiny_model_dir, tmp_path, method):
    rows = [{"prompt": p["prompt"], "completion": p["chosen"] if i % 2 else p["rejected"], "label": bool(i % 2)}
            for i, p in enumerate(PAIRS)]
    data = write_jsonl(tmp_path / "feedback.jsonl", rows)
    run = tmp_path / "kto"
    summary = train_run(load_config(None, [
        f"model={tiny_model_dir}", f"data.train={data}", "data.eval_split=0.25", "data.max_length=64",
        f"output_dir={run}", "train.batch_size=4", "train.precision=fp32", "train.lr=3e-3", "train.max_steps=6",
        "eval.generate_samples=0", "eval.show_samples=0", "objective=kto", f"method={method}"]))
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in logged if "eval_loss" in r][-1]
    assert final["eval_loss"] < summary["base_eval_loss"] - 1e-3  # the run moved off the reference

    code, output, result = eval_cli(run, "--baseline", "base")
    assert code == 0, output
    assert result["samples"] == 9
    assert result["loss"] == pytest.approx(final["eval_loss"], rel=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "kl"):
        assert result[name] == pytest.approx(final[f"eval_{name}"], rel=1e-4, abs=1e-6)
    assert result["baseline"]["loss"] == pytest.approx(summary["base_eval_loss"], rel=1e-5)  # 0.5: the reference
    assert result["comparison"]["differences"]["loss"]["difference"] == pytest.approx(
        result["loss"] - result["baseline"]["loss"])
    if method == "full":
        return

    # The held-out rows written to a file of their own, in the same order: the same loss from --data.
    held_out = [json.loads(line) for line in (tmp_path / "feedback.jsonl").read_text().splitlines()]
    wheres = _held_out_lines(run)
    by_line = {f"{data}:{i + 1}": row for i, row in enumerate(held_out)}
    again = write_jsonl(tmp_path / "held_out.jsonl", [by_line[where] for where in wheres])
    code, output, scored = eval_cli(run, "--data", again, "--output", tmp_path / "out")
    assert code == 0, output
    assert scored["data"] == str(again) and scored["samples"] == 9
    assert scored["loss"] == pytest.approx(result["loss"], rel=1e-5)
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["loss"] == scored["loss"]

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "what is 1 plus 1?"}] * 2)
    code, output, _ = eval_cli(run, "--data", prompts)
    assert code == 2 and "--data:" in output and "holds prompt-only rows" in " ".join(output.split()), output
    bad = write_jsonl(tmp_path / "bad_feedback.jsonl", [rows[0], {"prompt": "q", "completion": "a"}])
    code, output, _ = eval_cli(run, "--data", bad)
    assert code == 2 and f"{bad}:2" in " ".join(output.split()), output


def _held_out_lines(run) -> list[str]:
    """Where (file:line) the run's held-out feedback rows are, in the order its evaluation scored them."""
    from tunelab.data.preference import prepare_preference_data
    from tunelab.models.load import load_tokenizer

    config = load_config(run / "config.yaml")
    prepared = prepare_preference_data(config.data, load_tokenizer(run), config.train.seed)
    return [row.where for row in prepared.eval_rows]
