"""`tunelab eval` on tiny runs: the loss a prompt-tuning run reported, user errors (exit 2, one line) found before
the work instead of tracebacks after it, corpus-score differences, distinct evaluation records, and JSON output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunelab.cli import app

runner = CliRunner()
PARIS = "The capital of France is Paris."
PANGRAM = "The quick brown fox jumps over the lazy dog."
QA = [{"question": f"Question {n}: what is the capital of France?", "answer": PARIS} if n % 2
      else {"question": f"Question {n}: say the pangram.", "answer": PANGRAM} for n in range(16)]
JSON_ANSWERS = [{"question": "a", "answer": '{"intent": "refund"}'}, {"question": "b", "answer": "plain text"}]
METRIC_FILE = """import os

with open(os.environ["IMPORT_LOG"], "a") as log:  # one line per import of this file
    log.write("imported\\n")
calls = []


def good(predictions, references):
    calls.append(len(predictions))
    return sum(p == r for p, r in zip(predictions, references)) / len(predictions)


def boom(predictions, references):
    raise RuntimeError("my metric broke")


def words(predictions, references):
    return "abc"


def undefined(predictions, references):
    return float("nan")
"""


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def train(config: Path, text: str) -> None:
    config.write_text(text)
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Data files and a custom metric file (whose imports are counted in import.log)."""
    root = tmp_path_factory.mktemp("eval-fixes")
    write_rows(root / "qa.jsonl", QA)
    write_rows(root / "json_answers.jsonl", JSON_ANSWERS)
    (root / "bad.jsonl").write_text('{"question": "a", "answer": "b"}\nnot json\n')
    (root / "mymetric.py").write_text(METRIC_FILE)
    return root


@pytest.fixture(scope="module")
def prompt_run(folder, tiny_model_dir) -> Path:
    """A prompt-tuning run whose held-out loss training measured on qa.jsonl."""
    config = folder / "prompt.yaml"
    train(config, f"model: {tiny_model_dir}\n"
                  f"data: {{train: {folder / 'qa.jsonl'}, eval: {folder / 'qa.jsonl'}, max_length: 64}}\n"
                  "method: {name: prompt, num_virtual_tokens: 4}\n"
                  "train: {max_steps: 2, batch_size: 4, lr: 0.01, precision: fp32}\n"
                  "eval: {before_after: false, generate_samples: 0, show_samples: 0}\n"
                  f"output_dir: {folder / 'prompt-run'}\n")
    return folder / "prompt-run"


@pytest.fixture(scope="module")
def run(folder, tiny_model_dir) -> Path:
    """A run trained until it answers the questions the way qa.jsonl does (its base model replies nothing)."""
    config = folder / "full.yaml"
    train(config, f"model: {tiny_model_dir}\n"
                  f"data: {{train: {folder / 'qa.jsonl'}, eval_split: 0.25, max_length: 64}}\n"
                  "method: {name: full}\n"
                  "train: {max_steps: 30, batch_size: 4, lr: 0.01, precision: fp32}\n"
                  "eval: {before_after: false, generate_samples: 0, show_samples: 0}\n"
                  f"output_dir: {folder / 'run'}\n")
    return folder / "run"


@pytest.fixture
def import_log(tmp_path, monkeypatch) -> Path:
    log = tmp_path / "import.log"
    monkeypatch.setenv("IMPORT_LOG", str(log))
    return log


def evaluate(*args: str):
    return runner.invoke(app, ["eval", "--max-new-tokens", "8", *map(str, args)])


def recorded_files(run: Path) -> dict[str, str]:
    """The run's recorded evaluations (RUN/evals), by file name."""
    return {p.name: p.read_text() for p in (run / "evals").glob("*.json")}


def strict_json(text: str):
    """JSON as every reader parses it: bare NaN or Infinity is refused."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_eval_loss_of_a_prompt_tuning_run_is_the_loss_training_reported(prompt_run, folder):
    result = evaluate(prompt_run, "--data", folder / "qa.jsonl", "--metrics", "loss")
    assert result.exit_code == 0, result.output
    reported = json.loads((prompt_run / "summary.json").read_text())["final_eval_loss"]
    assert json.loads(result.output)["loss"] == pytest.approx(reported, abs=1e-5)


def test_custom_metrics_that_cannot_be_used_are_named_before_any_reply_is_generated(run, folder, import_log):
    missing = evaluate(run, "--data", folder / "qa.jsonl", "--metrics", f"{folder / 'missing.py'}:good")
    assert missing.exit_code == 2 and "--metrics: custom metric file" in missing.output
    no_function = evaluate(run, "--data", folder / "qa.jsonl", "--metrics", f"{folder / 'mymetric.py'}:nope")
    assert no_function.exit_code == 2 and "has no function 'nope'" in no_function.output


@pytest.mark.parametrize(("function", "said"), [("boom", "raised RuntimeError: my metric broke"),
                                                ("words", "returned 'abc' for 'words'")])
def test_a_metric_that_raises_or_gives_no_number_is_a_user_error_naming_it(run, folder, import_log, function, said):
    name = f"{folder / 'mymetric.py'}:{function}"
    result = evaluate(run, "--data", folder / "qa.jsonl", "--metrics", name, "--limit", "2")
    assert result.exit_code == 2, result.output
    assert f"metric '{name}'" in result.output.replace("\n", "") and said in result.output.replace("\n", "")


def test_json_field_accuracy_on_plain_text_references_names_the_row(run, folder):
    result = evaluate(run, "--data", folder / "json_answers.jsonl", "--metrics", "json_field_accuracy")
    assert result.exit_code == 2
    assert "json_answers.jsonl:2: json_field_accuracy needs a JSON object" in result.output.replace("\n", "")


def test_training_refuses_unusable_metrics_before_it_trains(folder, tiny_model_dir, import_log):
    for name, metrics, eval_file, said in [
        ("no-function", f"['{folder / 'mymetric.py'}:nope']", "qa.jsonl", "eval.metrics: "),
        ("plain-json", "[json_field_accuracy]", "json_answers.jsonl", "json_answers.jsonl:2: json_field_accuracy"),
    ]:
        config = folder / f"{name}.yaml"
        config.write_text(f"model: {tiny_model_dir}\n"
                          f"data: {{train: {folder / 'qa.jsonl'}, eval: {folder / eval_file}, max_length: 64}}\n"
                          "train: {max_steps: 1, batch_size: 4, precision: fp32}\n"
                          f"eval: {{generate_samples: 2, max_new_tokens: 2, metrics: {metrics}}}\n"
                          f"output_dir: {folder / name}\n")
        result = runner.invoke(app, ["train", str(config)])
        assert result.exit_code == 2 and said in result.output.replace("\n", ""), result.output
        assert not (folder / name / "metrics.jsonl").exists()


def test_a_custom_metric_file_is_imported_once_per_comparison(run, folder, tmp_path, import_log):
    (tmp_path / "counted.py").write_text(METRIC_FILE)  # not imported by an earlier test of this process
    result = evaluate(run, "--data", folder / "qa.jsonl", "--metrics", f"{tmp_path / 'counted.py'}:good",
                      "--baseline", "base", "--limit", "4")
    assert result.exit_code == 0, result.output
    assert import_log.read_text().splitlines() == ["imported"]


@pytest.mark.parametrize("place", ["a-file", "a-file/below", "folder-holding-eval.json", "/proc/tunelab-nope"])
def test_an_output_that_cannot_be_written_is_refused_before_the_work(run, folder, tmp_path, place):
    (tmp_path / "a-file").write_text("")
    (tmp_path / "folder-holding-eval.json" / "eval.json").mkdir(parents=True)
    before = recorded_files(run)
    result = evaluate(run, "--data", folder / "qa.jsonl", "--metrics", "loss,exact_match", "-o", tmp_path / place)
    assert result.exit_code == 2 and "--output" in result.output, result.output
    assert recorded_files(run) == before  # nothing was evaluated


def test_baseline_base_of_a_model_that_is_no_run_is_refused_before_scoring(folder, tiny_model_dir, import_log):
    result = evaluate(tiny_model_dir, "--data", folder / "qa.jsonl", "--metrics", f"{folder / 'mymetric.py'}:good",
                      "--baseline", "base")
    assert result.exit_code == 2 and "--baseline base needs a tunelab run directory" in result.output
    assert not import_log.exists()  # the metric file was never needed: nothing was scored


@pytest.fixture(scope="module")
def task_folder(folder) -> Path:
    """A local lm-eval task whose data_files path is relative to `folder`."""
    tasks = folder / "tasks"
    tasks.mkdir()
    rows = [{"a": a, "b": 1, "choices": [str(a + 1), str(a + 2)], "label": 0} for a in range(4)]
    write_rows(tasks / "sums.jsonl", rows)
    (tasks / "tiny_sums.yaml").write_text(
        "task: tiny_sums\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: tasks/sums.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"what is {{a}} plus {{b}}?\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\nmetric_list:\n  - metric: acc\n")
    return tasks


def test_harness_errors_are_user_errors(run, folder, task_folder, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval is the lmeval extra")
    monkeypatch.chdir(folder)
    shots = evaluate(run, "--tasks", "tiny_sums", "--include-path", task_folder, "--num-fewshot", "200")
    assert shots.exit_code == 2 and "--num-fewshot: 200 few-shot examples" in shots.output, shots.output
    monkeypatch.chdir(task_folder)
    elsewhere = evaluate(run, "--tasks", "tiny_sums", "--include-path", task_folder)
    assert elsewhere.exit_code == 2, elsewhere.output
    assert "relative to the current folder" in elsewhere.output.replace("\n", "")


def test_bad_data_is_refused_before_the_harness_runs(run, folder, task_folder, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval is the lmeval extra")
    monkeypatch.chdir(folder)
    before = recorded_files(run)
    result = evaluate(run, "--tasks", "tiny_sums", "--include-path", task_folder, "--data", folder / "bad.jsonl")
    assert result.exit_code == 2 and "bad.jsonl:2" in result.output, result.output
    assert recorded_files(run) == before  # the harness did not run


def test_corpus_metric_difference_is_the_difference_of_the_scores_shown(run, folder):
    result = evaluate(run, "--data", folder / "qa.jsonl", "--metrics", "chrf,bleu", "--baseline", "base",
                      "--max-new-tokens", "4")  # replies cut short: partly right, more so for short references
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    for metric in ("chrf", "bleu"):
        difference = printed["comparison"]["differences"][metric]
        assert difference["difference"] == pytest.approx(printed[metric] - printed["baseline"][metric], abs=1e-9)
        assert difference["ci95_low"] <= difference["difference"] <= difference["ci95_high"]
    assert printed["chrf"] != printed["baseline"]["chrf"]


def test_evaluations_of_files_with_one_name_are_all_kept(run, folder):
    files = [folder / "a" / "test.jsonl", folder / "b" / "test.jsonl", folder / "测试.jsonl", folder / "数据.jsonl"]
    for file in files:
        write_rows(file, QA[:2])
        assert evaluate(run, "--data", file, "--metrics", "loss").exit_code == 0
    assert evaluate(run, "--data", files[0], "--metrics", "loss").exit_code == 0  # replaces its own record
    recorded = {json.loads(p.read_text())["data"]: p.name for p in (run / "evals").glob("*.json")
                if "-loss" in p.name and not p.name.startswith("qa")}
    assert sorted(recorded) == sorted(map(str, files))
    assert recorded[str(files[2])].startswith("测试") and recorded[str(files[3])].startswith("数据")


def test_a_nan_metric_is_printed_and_saved_as_null(run, folder, tmp_path, import_log):
    result = evaluate(run, "--data", folder / "qa.jsonl", "--metrics", f"{folder / 'mymetric.py'}:undefined",
                      "--limit", "2", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert strict_json(result.output)["undefined"] is None
    assert strict_json((tmp_path / "out" / "eval.json").read_text())["undefined"] is None

