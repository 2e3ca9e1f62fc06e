"""Fixes on the tiny model: `tunelab eval --baseline X` refuses an X that names no model before the run's own
evaluation; `tunelab eval` of a GRPO run gives rewards the trainer_state of the run's last evaluation; a
distillation run's report shows its divergence, cross-entropy and perplexity (and runs of any objective compare,
their eval losses ranked only between runs of one objective); a KTO run's reward-model baseline is refused for what
KTO needs of it; /health says how requests are batched; BLEU's and chrF's 0-100 scale is named where ROUGE's 0-1
sits beside it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_distill import HELD_OUT, QA, write_jsonl
from test_distill import run_config as distill_config
from test_grpo import grpo_config, write_prompts
from typer.testing import CliRunner

from conftest import build_tiny_model, build_tokenizer
from tunelab.cli import app
from tunelab.config import load_config
from tunelab.train.run import train_run

runner = CliRunner()

CALL_LOG = '''import json
import os


def counted(predictions, references):
    with open(os.environ["CALL_LOG"], "a") as log:
        log.write("metric\\n")
    return 0.5


def stepped(prompts, completions, trainer_state, **columns):
    with open(os.environ["CALL_LOG"], "a") as log:
        log.write(json.dumps([trainer_state.global_step, trainer_state.epoch]) + "\\n")
    return [trainer_state.global_step + 10 * (trainer_state.epoch or 0.0) for _ in completions]
'''


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("session29")
    (root / "calls.py").write_text(CALL_LOG)
    write_jsonl(root / "qa.jsonl", QA[:12])
    write_prompts(root / "prompts.jsonl", 12)
    return root


@pytest.fixture
def call_log(tmp_path, monkeypatch) -> Path:
    """Where the metric and reward functions of calls.py write one line per call."""
    log = tmp_path / "calls.log"
    monkeypatch.setenv("CALL_LOG", str(log))
    return log


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@pytest.fixture(scope="module")
def sft_run(folder, tiny_model_dir) -> Path:
    out = folder / "sft"
    train_run(load_config(None, [f"model={tiny_model_dir}", f"data.train={folder / 'qa.jsonl'}", "data.eval_split=0.25",
                                 "data.max_length=64", f"output_dir={out}", "method=full", "train.max_steps=2",
                                 "train.precision=fp32", "eval.before_after=false", "eval.generate_samples=0"]))
    return out


def evaluate(*args) -> tuple[int, str]:
    result = runner.invoke(app, ["eval", "--max-new-tokens", "4", *map(str, args)])
    return result.exit_code, result.output


def not_a_model(root: Path) -> dict[str, str]:
    """--baseline values that name no model, by kind: what each refusal names."""
    (root / "no-config").mkdir(exist_ok=True)
    (root / "unfinished").mkdir(exist_ok=True)
    (root / "unfinished" / "config.yaml").write_text("model: x\n")  # a run stopped before any checkpoint
    return {str(root / "missing-folder"): "model path does not exist", "no-such-preset": "unknown model",
            str(root / "missing.gguf"): "GGUF file does not exist", str(root / "no-config"): "no config.json",
            str(root / "unfinished"): "before its first checkpoint", "nobody/no-such-model": "model hub"}


def test_a_baseline_that_names_no_model_is_refused_before_the_run_is_evaluated(sft_run, folder, call_log):
    for baseline, said in not_a_model(folder).items():
        code, output = evaluate(sft_run, "--data", folder / "qa.jsonl", "--metrics", f"{folder / 'calls.py'}:counted",
                                "--baseline", baseline)
        assert code == 2 and "--baseline" in output and said in output.replace("\n", ""), (baseline, output)
        assert "Traceback" not in output
    assert calls(call_log) == []  # the run's replies were never scored
    assert not (sft_run / "evals").exists()
    code, output = evaluate(sft_run, "--data", folder / "qa.jsonl", "--metrics", "loss", "--baseline", "base")
    assert code == 0, output  # a baseline that is a model is evaluated as before


def stepped_run(root: Path, model: Path, steps: int, every: int) -> Path:
    """A GRPO run whose only reward is its trainer_state's global_step + 10 x epoch, whatever the reply."""
    out = root / f"grpo-{steps}-{every}"
    if not (out / "summary.json").exists():
        train_run(grpo_config(model, root / "prompts.jsonl", out, root / "calls.py", f"train.max_steps={steps}",
                              f"objective.updates_per_rollout={every}", "objective.max_new_tokens=2",
                              "eval.generate_samples=0", "eval.before_after=false", "eval.metrics=[]",
                              f"objective.rewards=[{root / 'calls.py'}:stepped]"))
    return out


@pytest.mark.parametrize(("steps", "every", "seen"), [(4, 2, 8.0), (6, 1, 18.0)])
def test_eval_of_a_grpo_run_gives_rewards_its_last_evaluations_trainer_state(folder, tiny_model_dir, call_log,
                                                                            steps, every, seen):
    # 9 training prompts in micro-batches of 2: 5 per epoch. The final evaluation sees the steps and epochs done, as
    # TRL's evaluation reads its trainer state: (4, 2) step 4 after two rollouts' micro-batches (epoch 0.4);
    # (6, 1): step 6 after six (epoch 1.2).
    run = stepped_run(folder, tiny_model_dir, steps, every)
    final = json.loads((run / "summary.json").read_text())["eval_after"]["eval_reward"]
    assert final == pytest.approx(seen)  # what the run's rewards saw, from TRL's definition above
    code, output = evaluate(run)
    assert code == 0, output
    assert json.loads(output)["reward"] == pytest.approx(final, abs=1e-6)


def test_a_grpo_runs_baseline_that_names_no_model_is_refused_before_any_reply(folder, tiny_model_dir, call_log):
    run = stepped_run(folder, tiny_model_dir, 4, 2)
    call_log.unlink(missing_ok=True)  # the calls of its training, where this test trains it (run on its own)
    code, output = evaluate(run, "--baseline", folder / "missing-folder")
    assert code == 2 and "--baseline" in output and "model path does not exist" in output.replace("\n", "")
    assert calls(call_log) == []  # no reply was scored


@pytest.fixture(scope="module")
def kto_run(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("kto")
    rows = [{"prompt": f"what is {n} plus 1?", "completion": f"the answer is {n + 1 if n % 2 else n}",
             "label": bool(n % 2)} for n in range(12)]
    train_run(load_config(None, [f"model={tiny_model_dir}", f"data.train={write_jsonl(root / 'f.jsonl', rows)}",
                                 "data.eval_split=0.25", "data.max_length=64", f"output_dir={root / 'run'}",
                                 "objective=kto", "train.batch_size=4", "train.precision=fp32", "train.max_steps=1",
                                 "eval.before_after=false", "eval.generate_samples=0"]))
    return root / "run"


def no_model_loads(monkeypatch) -> None:
    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the baseline was checked")

    monkeypatch.setattr("tunelab.eval.kto_run.load_generator", loaded)


def test_a_kto_baseline_with_another_tokenizer_is_refused_before_any_model_loads(kto_run, tmp_path, monkeypatch):
    other = tmp_path / "other-vocab"
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    build_tiny_model(len(tokenizer)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    no_model_loads(monkeypatch)
    code, output = evaluate(kto_run, "--baseline", other)
    assert code == 2 and "--baseline" in output and "another tokenizer" in output, output


def test_a_kto_runs_reward_model_baseline_is_refused_for_its_missing_language_model_head(kto_run, sft_run, folder,
                                                                                         tiny_model_dir, tmp_path,
                                                                                         monkeypatch):
    reward = tmp_path / "reward"  # what check_baseline reads of a reward model's run directory
    reward.mkdir()
    (reward / "config.yaml").write_text(f"model: {tiny_model_dir}\ndata: {{train: pairs.jsonl}}\nobjective: reward\n")
    (reward / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    no_model_loads(monkeypatch)
    code, output = evaluate(kto_run, "--baseline", reward)
    said = " ".join(output.split())
    assert code == 2 and "--baseline" in said and "is a reward model" in said, output
    assert "no language-model head" in said and "cannot write" not in said  # KTO scores replies, it writes none
    code, output = evaluate(sft_run, "--data", folder / "qa.jsonl", "--baseline", reward)  # replies to write
    assert code == 2 and "cannot write them" in " ".join(output.split()), output


@pytest.fixture(scope="module")
def distill_run(tmp_path_factory, tiny_model_dir, tiny_tokenizer) -> Path:
    root = tmp_path_factory.mktemp("distill")
    teacher = root / "teacher"  # another random model: the student starts far from it
    build_tiny_model(len(tiny_tokenizer), seed=1).save_pretrained(teacher)
    tiny_tokenizer.save_pretrained(teacher)
    train, held_out = write_jsonl(root / "qa.jsonl", QA[:16]), write_jsonl(root / "held_out.jsonl", HELD_OUT[:4])
    train_run(distill_config(tiny_model_dir, train, held_out, root / "run", "objective.name=distill",
                             f"objective.teacher={teacher}", "objective.alpha=0.5", "method=full",
                             "train.max_steps=4", "train.eval_every=2", "train.lr=3e-3", "eval.generate_samples=0"))
    return root / "run"


def test_a_distillation_report_shows_the_divergence_cross_entropy_and_perplexity(distill_run):
    from test_report import read_page

    from tunelab.eval.report import write_report
    from tunelab.eval.report_plots import distill_figure

    records = [json.loads(line) for line in (distill_run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    rows = read_page(write_report(distill_run)).rows("before-after")
    for row, key in (("distill/divergence", "eval_distill/divergence"), ("ce", "eval_ce"),
                     ("eval perplexity", "eval_perplexity")):
        assert rows[row][:2] == [f"{evals[0][key]:.4f}", f"{evals[-1][key]:.4f}"], row
    plots = {p.name for p in (distill_run / "plots").iterdir()}
    assert "distillation.png" in plots and "task_metrics.png" not in plots  # eval_ce is no task metric
    fig = distill_figure(records)
    lines = {line.get_label(): list(line.get_ydata()) for axis in fig.axes for line in axis.get_lines()}
    assert lines["distill/divergence"] == [r["distill/divergence"] for r in records if "distill/divergence" in r]
    assert lines["eval ce"] == [r["eval_ce"] for r in evals]
    assert lines["eval perplexity (right)"] == [r["eval_perplexity"] for r in evals]


def test_runs_of_an_objective_other_than_sft_compare(distill_run, tmp_path):
    from test_report import read_page

    from tunelab.eval.report import write_comparison

    page = read_page(write_comparison([distill_run, distill_run], tmp_path / "compare.html"))
    summary = json.loads((distill_run / "summary.json").read_text())
    rows = page.rows("comparison")
    assert rows["objective"] == ["distill"] * 2
    assert rows["final eval loss (distill)"] == [f"{summary['final_eval_loss']:.4f}"] * 2
    assert rows["final eval perplexity"] == [f"{summary['eval_after']['eval_perplexity']:.4f}"] * 2


def test_eval_losses_of_different_objectives_are_not_ranked_against_each_other(sft_run, distill_run, tmp_path):
    from test_report import read_page

    from tunelab.eval.report import comparison_table, read_run, write_comparison

    stopped = tmp_path / "stopped-distill"  # without summary.json: its config.yaml says it distils
    shutil.copytree(distill_run, stopped)
    (stopped / "summary.json").unlink()
    for other in (distill_run, stopped):
        table = {name: (values, lower) for name, values, lower, _ in comparison_table([read_run(sft_run),
                                                                                      read_run(other)])}
        loss = "final eval loss (each run's objective: sft, distill)"
        assert table["objective"] == (["sft", "distill"], None)
        assert table[loss][1] is None and all(isinstance(v, float) for v in table[loss][0])  # shown, not ranked
        assert "final eval loss" not in table
        html = write_comparison([sft_run, other], tmp_path / "compare.html").read_text()
        row = html[html.index(loss.replace("'", "&#x27;")):].split("</tr>")[0]
        assert "best" not in row
        assert read_page(tmp_path / "compare.html").rows("comparison")["objective"] == ["sft", "distill"]
    same = {name: lower for name, _, lower, _ in comparison_table([read_run(sft_run), read_run(sft_run)])}
    assert same["final eval loss"] is True  # one objective: ranked as before


def test_health_says_how_requests_are_batched(tiny_model_dir):
    from fastapi.testclient import TestClient

    from tunelab.infer.serve import create_app, load_served

    served = load_served(str(tiny_model_dir), max_batch=3, start_engine=False)
    health = TestClient(create_app(served)).get("/health").json()
    assert health["batching"] == {"mode": "continuous", "max_batch": 3}


def test_metric_scales_are_named_and_decide_the_axis():
    from tunelab.eval.metrics import bleu, metric_scale, rouge
    from tunelab.eval.report_html import with_scale
    from tunelab.eval.report_plots import task_metrics_figure

    replies, references = ["the cat sat on the mat"], ["the cat sat on the mat"]
    assert bleu(replies, references) == pytest.approx(100.0) and rouge(replies, references)["rouge1"] == 1.0
    assert [metric_scale(k) for k in ("bleu", "eval_chrf", "rouge1", "eval_rougeLsum", "exact_match",
                                      "json_field_accuracy/exact_match", "field/intent", "mine")] == [
        "0-100", "0-100", "0-1", "0-1", "0-1", "0-1", "0-1", None]
    assert with_scale("bleu") == "bleu (0-100)" and with_scale("eval loss") == "eval loss"
    # A poor BLEU (0.5 of 100) is read on the 0-100 axis, not beside the 0-1 accuracy it would equal.
    fig = task_metrics_figure([{"step": 0, "eval_bleu": 0.5, "eval_exact_match": 0.5},
                               {"step": 2, "eval_bleu": 0.8, "eval_exact_match": 0.75}], None)
    left, right = fig.axes
    assert [line.get_label() for line in left.get_lines()] == ["exact_match (0-1)"]
    assert [line.get_label() for line in right.get_lines()] == ["bleu (0-100, right)"]
