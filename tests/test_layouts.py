"""Public datasets' column layouts are read without data.columns, saying which columns were used and ignored."""

from __future__ import annotations

import csv
import json

import pytest

from tunelab.data.prepare import load_samples
from tunelab.errors import DataError


def write_csv(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read(path):
    samples, fmt, why, rows = load_samples(path, "auto", None, [])
    return samples, fmt, why


def test_dolly_layout_reads_the_context_as_the_instructions_input(tmp_path):
    path = write_csv(tmp_path / "dolly.csv", [{"instruction": "When did it open?", "context": "It opened in 1901.",
                                               "response": "In 1901.", "category": "closed_qa"}])
    samples, fmt, why = read(path)
    assert fmt == "alpaca"
    assert why == "columns 'instruction' as the instruction, 'context' as its input, 'response' as the reply; " \
                  "ignored: category"
    assert samples[0].messages == [{"role": "user", "content": "When did it open?\n\nIt opened in 1901."},
                                   {"role": "assistant", "content": "In 1901."}]


@pytest.mark.parametrize("row, prompt, reply, ignored", [
    ({"flags": "B", "instruction": "cancel my order", "category": "ORDER", "intent": "cancel_order",
      "response": "Open your account."}, "cancel my order", "Open your account.", "category, flags, intent"),
    ({"query": "capital of France?", "response": "Paris"}, "capital of France?", "Paris", ""),
    ({"input": "translate: chat", "target": "cat"}, "translate: chat", "cat", ""),
    ({"question": "Who wrote it?", "answer": "Ann", "context": "Ann wrote it."}, "Who wrote it?\n\nAnn wrote it.",
     "Ann", ""),
])
def test_common_layouts_are_recognised(tmp_path, row, prompt, reply, ignored):
    samples, fmt, why = read(write_jsonl(tmp_path / "data.jsonl", [row]))
    assert samples[0].messages == [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
    assert why.endswith(f"ignored: {ignored}") if ignored else "ignored" not in why


def test_two_possible_reply_columns_stop_with_both_choices(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"query": "q", "response": "r", "answer": "a"}])
    with pytest.raises(DataError, match=r"'response', 'answer' could each be the reply.*"
                                        r"\{instruction: query, output: response\} or "
                                        r"data.columns: \{instruction: query, output: answer\}"):
        read(path)
    samples, fmt, why, rows = load_samples(path, "auto", None, [], columns={"instruction": "query",
                                                                            "output": "answer"})
    assert samples[0].messages[-1]["content"] == "a" and why.endswith("ignored: response")


def test_tunelab_formats_and_prompt_only_rows_are_unchanged(tmp_path):
    _, fmt, why = read(write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a", "id": 3}]))
    assert (fmt, why) == ("qa", "columns 'question', 'answer'; ignored: id")
    from tunelab.config import DataConfig
    from tunelab.data.preference import data_kind

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "p", "answer": "a"}])  # GRPO's rows, not SFT
    assert data_kind(DataConfig(train=prompts)) == "prompts"


def test_inspect_of_an_unknown_layout_reports_columns_and_the_mappings_that_work(tmp_path, tiny_model_dir):
    import shlex

    from typer.testing import CliRunner

    from tunelab.cli import app

    rows = [{"Date received": f"2024-01-{i % 28 + 1:02d}", "Product": ["Mortgage", "Credit card"][i % 2],
             "Consumer complaint narrative": f"My bank lost payment {i} and will not answer my letters.",
             "Tags": "" if i % 2 else "Older American"} for i in range(20)]
    path = write_csv(tmp_path / "complaints.csv", rows)
    with open(path, "ab") as handle:
        handle.write(b"\xff,x\n")  # a last line that is not UTF-8
    result = CliRunner().invoke(app, ["data", "inspect", str(path), "--model", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output  # a report, not an error
    assert "20 readable rows, 4 columns" in result.output
    assert "Tags" in result.output and "filled  50.0%" in result.output
    assert f"{path}:22: not valid UTF-8" in result.output
    command = f"tunelab data inspect {path} --column 'prompt=Consumer complaint narrative' --column completion=Product"
    assert command in result.output
    applied = CliRunner().invoke(app, [*shlex.split(command)[1:], "--model", str(tiny_model_dir)])
    assert applied.exit_code == 0 and "prompt_completion" in applied.output, applied.output
    as_json = CliRunner().invoke(app, ["data", "inspect", str(path), "--model", str(tiny_model_dir), "--json"])
    assert json.loads(as_json.output)["commands"][0] == command
