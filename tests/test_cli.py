"""The `tunelab` command: user errors exit 2 with one clear message; a saved run generates, chats and merges
exactly like the model did in process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tunelab.cli import app

runner = CliRunner()
QA = [{"question": f"what is {a} plus {b}?", "answer": f"{a + b}"} for a in range(6) for b in range(6)]


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    """A LoRA run on the tiny model, trained once through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    data = root / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in QA))
    config = root / "run.yaml"
    config.write_text(
        f"model: {tiny_model_dir}\n"
        f"data: {{train: {data}, eval_split: 0.25, max_length: 64}}\n"
        "method: {name: lora, r: 8}\n"
        "train: {epochs: 2, batch_size: 4, lr: 0.003, precision: fp32}\n"
        "eval: {generate_samples: 6, max_new_tokens: 5, show_samples: 1}\n"
        f"output_dir: {root / 'run'}\n"
    )
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 0, result.output
    return root / "run", data, config


def test_unknown_config_key_names_the_nearest_one(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  learning_rate: 0.1\n")
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 2
    assert "unknown key 'train.learning_rate'; did you mean 'lr'?" in result.output
    assert not (tmp_path / "runs").exists()


def test_bad_override_value_exits_2(tmp_path):
    config = tmp_path / "ok.yaml"
    config.write_text("train:\n  epochs: 1\n")
    result = runner.invoke(app, ["train", str(config), "train.batch_size=0"])
    assert result.exit_code == 2 and "train.batch_size" in result.output


def test_missing_model_path_exits_2_and_writes_nothing(tmp_path):
    config = tmp_path / "c.yaml"
    out = tmp_path / "out"
    config.write_text(f"model: ./no/such/model\noutput_dir: {out}\n")
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 2
    assert "./no/such/model: model path does not exist" in result.output
    assert not out.exists()


def test_bad_data_row_exits_2_naming_file_and_line(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "a?", "answer": "b"}\n{"question": "c?"}\n')
    out = tmp_path / "out"
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata: {{train: {data}}}\noutput_dir: {out}\n")
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 2
    assert f"{data}:2: missing field 'answer'" in result.output
    assert not out.exists()


def test_generate_gives_the_same_replies_as_in_process(trained_run, tmp_path):
    run, _, _ = trained_run
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": s["prompt"]}) + "\n" for s in samples))
    out = tmp_path / "replies.jsonl"
    result = runner.invoke(app, ["generate", str(run), "-i", str(prompts), "-o", str(out), "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
    replies = [json.loads(line)["reply"] for line in out.read_text().splitlines()]
    assert replies == [s["fine_tuned"] for s in samples]


def test_generate_rejects_a_bad_prompt_file_before_loading(trained_run, tmp_path):
    run, _, _ = trained_run
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n{"nothing": 1}\n')
    result = runner.invoke(app, ["generate", str(run), "-i", str(prompts), "-o", str(tmp_path / "o.jsonl")])
    assert result.exit_code == 2 and "p.jsonl:2: no prompt found" in result.output
    assert not (tmp_path / "o.jsonl").exists()


def test_chat_streams_a_reply_and_exits(trained_run):
    run, _, _ = trained_run
    result = runner.invoke(app, ["chat", str(run), "--max-new-tokens", "4"], input="what is 1 plus 2?\n/exit\n")
    assert result.exit_code == 0, result.output
    assert "assistant>" in result.output


def test_chat_with_compile_says_when_a_model_decodes_eagerly(trained_run):
    """--compile compiles only bf16 decoding on CPU; this run trained (and so decodes) in float32."""
    run, _, _ = trained_run
    result = runner.invoke(app, ["chat", str(run), "--max-new-tokens", "4", "--compile"], input="hi\n/exit\n")
    assert result.exit_code == 0, result.output
    assert "decoding eagerly" in result.output and "bf16" in result.output and "assistant>" in result.output


def test_merged_model_equals_base_plus_adapter(trained_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from tunelab.infer.load import load_for_inference

    run, _, _ = trained_run
    merged_dir = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(run), "--output", str(merged_dir)])
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    unmerged = load_for_inference(run).model
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, unmerged(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    # The merged folder is a plain model: it trains or generates as `model:` with no tunelab run around it.
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()


def test_resume_needs_a_checkpoint(trained_run):
    _, _, config = trained_run
    result = runner.invoke(app, ["train", str(config), "--resume", "output_dir=/nonexistent/run"])
    assert result.exit_code == 2 and "holds no run to continue" in " ".join(result.output.split())
    started = config.parent / "started"  # began training (config.yaml written), stopped before a checkpoint
    started.mkdir()
    (started / "config.yaml").write_text(config.read_text())
    result = runner.invoke(app, ["train", str(config), "--resume", f"output_dir={started}"])
    assert result.exit_code == 2 and "no complete checkpoint" in " ".join(result.output.split())


def test_models_list_shows_the_default_preset():
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0
    assert "smollm2-135m-instruct" in result.output


EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_recipe_validates(example):
    from tunelab.config import load_config

    config = load_config(example)
    named = {"lora", "qlora", "full", "dpo", "orpo", "kto", "reward", "grpo", "simpo"}
    if example.stem in named:  # a recipe named after a method or an objective uses it
        assert example.stem in (config.method.name, config.objective.name)


def test_eval_reports_loss_and_metrics_as_json(trained_run, tmp_path):
    run, data, _ = trained_run
    out = tmp_path / "eval"
    result = runner.invoke(
        app, ["eval", str(run), "--data", str(data), "--metrics", "loss,perplexity,exact_match,bleu",
              "--limit", "6", "--max-new-tokens", "4", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    assert scores["samples"] == 6 and scores["perplexity"] == pytest.approx(2.718281828 ** scores["loss"], rel=1e-6)
    assert 0 <= scores["exact_match"] <= 1 and "bleu" in scores
    assert len((out / "eval_samples.jsonl").read_text().splitlines()) == 6
    assert json.loads((out / "eval.json").read_text()) == scores


def test_eval_loss_runs_padding_free_as_the_runs_own_held_out_loss_does(trained_run, monkeypatch):
    from tunelab.eval import command, evaluate

    run, data, _ = trained_run
    args = ["eval", str(run), "--data", str(data), "--metrics", "loss", "--limit", "6"]
    rows = []
    real = evaluate.collate_shared_prefix
    monkeypatch.setattr(evaluate, "collate_shared_prefix", lambda samples, pad: rows.append(len(samples)) or real(
        samples, pad))
    padding_free = json.loads(runner.invoke(app, args).output)
    assert sum(rows) == 6  # every sample in padding-free batches, under the matmul attention (a CPU, a llama)
    monkeypatch.setattr(command, "_padding_free_loss", lambda *args: False)
    padded = json.loads(runner.invoke(app, args).output)
    assert sum(rows) == 6 and padding_free["loss"] == pytest.approx(padded["loss"], rel=1e-5)


def test_eval_rejects_an_unknown_metric(trained_run):
    run, data, _ = trained_run
    result = runner.invoke(app, ["eval", str(run), "--data", str(data), "--metrics", "loss,blue"])
    assert result.exit_code == 2 and "unknown metric(s) blue" in result.output


def test_data_inspect_marks_trained_tokens_and_writes_json(tiny_model_dir, tmp_path):
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]}] * 3
    data.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"messages": []}\n')
    result = runner.invoke(app, ["data", "inspect", str(data), "--model", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output
    assert "[[world<|im_end|>]]" in result.output
    result = runner.invoke(app, ["data", "inspect", str(data), "--model", str(tiny_model_dir), "--json",
                                 "--histogram", str(tmp_path / "h.png")])
    report = json.loads(result.output)
    assert report["rows"] == 4 and report["invalid_rows"] == 1 and report["duplicates"]["rows"] >= 2
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_rebuilds_and_compares_runs(trained_run, tmp_path):
    run, _, _ = trained_run
    assert (run / "report.html").is_file()  # written by every run
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["report", str(run), str(run), "-o", str(tmp_path / "cmp.html")])
    assert result.exit_code == 0 and (tmp_path / "cmp.html").stat().st_size > 1000


def test_eval_runs_a_custom_metric_from_a_python_file(trained_run, tmp_path):
    run, data, _ = trained_run
    metric = tmp_path / "my_metric.py"
    metric.write_text("def digits(predictions, references):\n"
                      "    return sum(p.strip().isdigit() for p in predictions) / len(predictions)\n")
    result = runner.invoke(app, ["eval", str(run), "--data", str(data), "--metrics", f"exact_match,{metric}:digits",
                                 "--limit", "4", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert 0 <= json.loads(result.output)["digits"] <= 1


def test_eval_against_the_base_model_reports_differences(trained_run, tiny_model_dir):
    run, data, _ = trained_run
    args = ["--data", str(data), "--metrics", "loss,exact_match", "--limit", "6", "--max-new-tokens", "4"]
    result = runner.invoke(app, ["eval", str(run), *args, "--baseline", "base"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    base_alone = json.loads(runner.invoke(app, ["eval", str(tiny_model_dir), *args]).output)
    # The baseline is scored in the run's precision (fp32 here); the base model alone in `auto` (bf16 here).
    assert scores["baseline"]["loss"] == pytest.approx(base_alone["loss"], rel=1e-3)
    assert scores["baseline"]["exact_match"] == base_alone["exact_match"]
    difference = scores["comparison"]["differences"]["exact_match"]
    assert difference["difference"] == pytest.approx(scores["exact_match"] - base_alone["exact_match"])
    assert difference["ci95_low"] <= difference["difference"] <= difference["ci95_high"]
    assert scores["comparison"]["differences"]["loss"]["difference"] < 0


def test_out_of_range_options_and_unusable_outputs_exit_2_before_any_work(tmp_path, tiny_model_dir):
    """Counts below 1, a port that is taken, an output path under a file, one run given --output, no method to
    compare: each is refused with exit 2, naming the option, before a model or any data is loaded."""
    import socket

    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "q", "answer": "a"}\n')
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        refused = {
            ("eval", str(tiny_model_dir), "--data", str(data), "--batch-size", "0"): "--batch-size",
            ("eval", str(tiny_model_dir), "--data", str(data), "--limit", "0"): "--limit",
            ("data", "inspect", str(data), "--max-length", "0"): "--max-length",
            ("data", "inspect", str(data), "--histogram", str(a_file / "h.png")): "--histogram",
            ("compare-methods", str(tmp_path / "c.yaml"), "--methods", ","): "no method named",
            ("report", str(tmp_path), "-o", str(tmp_path / "page.html")): "--output",
            ("ui", "--runs", str(a_file)): "is a file, not a runs folder",
            ("ui", "--runs", str(tmp_path / "runs"), "--port", port): f"cannot listen on 127.0.0.1:{port}",
            ("serve", str(tiny_model_dir), "--port", port): f"cannot listen on 127.0.0.1:{port}",
        }
        (tmp_path / "c.yaml").write_text(f"model: {tiny_model_dir}\ndata: {{train: {data}}}\n")
        for args, said in refused.items():
            result = runner.invoke(app, list(args))
            assert result.exit_code == 2 and said in " ".join(result.output.split()), (args, result.output)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "page.html").exists()
