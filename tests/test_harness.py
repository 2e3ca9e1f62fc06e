"""Standard benchmarks through lm-evaluation-harness: a local task (YAML + local data, no network) scored through
`tunelab eval --tasks` gives what `lm_eval`'s own command gives on the same model, and before/after on a run
comes with paired intervals and lands in the run's report."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is the lmeval extra (scripts/setup.sh --dev installs it)")

from tunelab.config import load_config  # noqa: E402
from tunelab.errors import ConfigError  # noqa: E402
from tunelab.eval.harness import evaluate_tasks  # noqa: E402
from tunelab.train.run import train_run  # noqa: E402

TASK = """task: tiny_arith
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "what is {{{{a}}}} plus {{{{b}}}}?"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory) -> Path:
    """A multiple-choice arithmetic task: the sum among two near misses."""
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    rng = random.Random(0)
    rows = []
    for _ in range(24):
        a, b = rng.randint(0, 5), rng.randint(0, 5)
        choices = [str(a + b), str(a + b + 1), str(a + b + 2)]
        rng.shuffle(choices)
        rows.append({"a": a, "b": b, "choices": choices, "label": choices.index(str(a + b))})
    data = folder / "arith.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tiny_arith.yaml").write_text(TASK.format(data=data))
    return folder


def test_tunelab_eval_tasks_equals_lm_evals_own_command(task_folder, tiny_model_dir, tmp_path):
    ours = subprocess.run([sys.executable, "-m", "tunelab", "eval", str(tiny_model_dir), "--tasks", "tiny_arith",
                           "--include-path", str(task_folder)], capture_output=True, text=True, cwd=tmp_path)
    assert ours.returncode == 0, ours.stderr[-2000:]
    result = json.loads(ours.stdout)
    theirs = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                             f"pretrained={tiny_model_dir}", "--tasks", "tiny_arith", "--include_path",
                             str(task_folder), "--device", "cpu", "--output_path", str(tmp_path / "lm-eval")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert theirs.returncode == 0, theirs.stderr[-2000:]
    written = json.loads(next((tmp_path / "lm-eval").rglob("results_*.json")).read_text())
    reference = written["results"]["tiny_arith"]
    assert result["samples"] == 24
    assert result["tiny_arith/acc"] == reference["acc,none"]
    assert result["tiny_arith/acc_norm"] == reference["acc_norm,none"]


def test_before_and_after_on_a_run_with_intervals_in_its_report(task_folder, tiny_model_dir, tmp_path):
    rows = [{"question": f"what is {a} plus {b}?", "answer": str(a + b)} for a in range(6) for b in range(6)]
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    train_run(load_config(None, [f"model={tiny_model_dir}", f"data.train={data}", "data.eval_split=0",
                                 f"output_dir={run}", "train.max_steps=12", "train.lr=5e-3", "train.batch_size=6",
                                 "train.precision=fp32", "eval.before_after=false", "eval.generate_samples=0",
                                 "eval.show_samples=0"]))
    result = evaluate_tasks(str(run), ["tiny_arith"], baseline="base", include_path=task_folder)
    assert result["baseline"]["model"] == str(tiny_model_dir)
    difference = result["comparison"]["differences"]["tiny_arith/acc"]
    assert difference["difference"] == pytest.approx(result["tiny_arith/acc"] - result["baseline"]["tiny_arith/acc"])
    assert difference["ci95_low"] <= difference["difference"] <= difference["ci95_high"]
    recorded = list((run / "evals").glob("*.json"))
    assert len(recorded) == 1 and json.loads(recorded[0].read_text())["tiny_arith/acc"] == result["tiny_arith/acc"]
    report = (run / "report.html").read_text()
    assert "lm-eval:tiny_arith" in report and re.search(r"tiny_arith/acc_norm", report)


def test_unknown_tasks_and_missing_folders_are_named(task_folder, tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="unknown lm-eval task.*no_such_task"):
        evaluate_tasks(str(tiny_model_dir), ["no_such_task"], include_path=task_folder)
    with pytest.raises(ConfigError, match="not on this machine and the Hugging Face hub cannot be reached"):
        evaluate_tasks(str(tiny_model_dir), ["arc_easy"], limit=2)  # offline here (conftest sets HF_HUB_OFFLINE)
    with pytest.raises(ConfigError, match="--include-path"):
        evaluate_tasks(str(tiny_model_dir), ["tiny_arith"], include_path=tmp_path / "missing")
    done = subprocess.run([sys.executable, "-m", "tunelab", "eval", str(tiny_model_dir)], capture_output=True,
                          text=True)
    assert done.returncode == 2 and "--data FILE, --tasks TASKS" in done.stderr
