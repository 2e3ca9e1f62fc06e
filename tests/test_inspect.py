"""`tunelab data inspect`: formats, invalid rows, token statistics, masks, duplicates and overlap of a data file."""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
import time

import pytest

from tunelab.config import DataConfig
from tunelab.data.inspect import inspect_data, render_text, write_length_histogram
from tunelab.data.template import ChatRenderer


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def trained_marks(text: str) -> list[str]:
    return re.findall(r"\[\[(.*?)\]\]", text, flags=re.DOTALL)


def chat(*turns: str) -> dict:
    roles = ["user", "assistant"] * len(turns)
    return {"messages": [{"role": role, "content": content} for role, content in zip(roles, turns, strict=False)]}


def test_marked_rendering_shows_exactly_the_assistant_turns_as_trained(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [chat("hello", "the fox", "and?", "the dog")])
    report = inspect_data(path, tokenizer=tiny_tokenizer, data_config=DataConfig(eval_split=0))
    assert report.files[0].format == "chat" and "messages" in report.files[0].format_reason
    text = render_text(report, color=False)
    assert trained_marks(text) == ["the fox<|im_end|>", "the dog<|im_end|>"]
    # Unmarked, the rendering is the templated conversation itself.
    full = ChatRenderer(tiny_tokenizer).render(chat("hello", "the fox", "and?", "the dog")["messages"])
    assert full.rstrip("\n") in text.replace("[[", "").replace("]]", "")
    assert "\x1b[" not in text
    coloured = render_text(report, color=True)
    assert "\x1b[1;32mthe fox<|im_end|>\x1b[0m" in coloured and "[[" not in coloured


def test_invalid_rows_are_listed_with_file_and_line_and_the_rest_still_counted(tmp_path, tiny_tokenizer):
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"instruction": "ok", "output": "fine"},
            {"instruction": "no output"},
            '{"instruction": oops}',
            {"instruction": "empty", "output": "   "},
            {"instruction": "ok again", "output": "fine indeed"},
        ],
    )
    report = inspect_data(path, tokenizer=tiny_tokenizer, data_config=DataConfig(eval_split=0))
    assert report.rows == 5 and report.invalid_rows == 3
    assert f"{path}:2: missing field 'output'" in report.problems
    assert f"{path}:4: field 'output' is empty" in report.problems
    assert any(p.startswith(f"{path}:3: not valid JSON") for p in report.problems)
    assert len(report.lengths) == 2
    assert report.completion_tokens.max == len(tiny_tokenizer("fine indeed<|im_end|>")["input_ids"])
    assert f"{path}:2: missing field 'output'" in render_text(report)


def test_length_statistics_equal_an_independent_count(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "word " * n, "completion": "yes " * (n % 5 + 1)} for n in range(1, 30)]
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    report = inspect_data(path, tokenizer=tiny_tokenizer, data_config=DataConfig(eval_split=0))

    def count(text: str) -> int:
        return len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])

    # ChatML by hand: the prompt is everything through the assistant header; the reply trains with <|im_end|>.
    prompts = [count(f"<|im_start|>user\n{r['prompt']}<|im_end|>\n<|im_start|>assistant\n") for r in rows]
    completions = [count(f"{r['completion']}<|im_end|>") for r in rows]
    totals = [count(f"<|im_start|>user\n{r['prompt']}<|im_end|>\n<|im_start|>assistant\n{r['completion']}<|im_end|>\n")
              for r in rows]
    prompts = [t - c for t, c in zip(totals, completions, strict=True)]  # the trailing newline is untrained
    for stats, values in ((report.prompt_tokens, prompts), (report.completion_tokens, completions),
                          (report.total_tokens, totals)):
        ordered = sorted(values)
        assert stats.min == ordered[0] and stats.max == ordered[-1] and stats.total == sum(values)
        assert stats.median == statistics.median(values)
        assert stats.p95 == ordered[math.ceil(0.95 * len(ordered)) - 1]
    assert report.trainable_fraction == pytest.approx(sum(completions) / sum(totals))


def test_truncation_counts_for_a_small_max_length(tmp_path, tiny_tokenizer):
    rows = [
        {"prompt": "short", "completion": "yes"},
        {"prompt": "word " * 200, "completion": "no"},  # the reply lies beyond max_length
        {"prompt": "hi", "completion": "fox " * 100},  # cut, but part of the reply stays
    ]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    report = inspect_data(path, tokenizer=tiny_tokenizer, data_config=DataConfig(eval_split=0, max_length=64),
                          samples_to_show=3)
    assert report.longer_than_max_length == [f"{path}:2", f"{path}:3"]
    assert report.no_trainable_token_left == [f"{path}:2"]
    assert report.to_json()["max_length"]["no_trainable_token_left"] == 1
    assert report.samples[1].cut_tokens == report.samples[1].tokens - 64
    assert "more token(s) beyond data.max_length=64" in render_text(report)


def test_duplicates_and_train_eval_overlap_are_found(tmp_path, tiny_tokenizer):
    train = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"question": "what?", "answer": "that"},
            {"question": "why?", "answer": "because"},
            {"question": "what?", "answer": "that"},  # exact duplicate of line 1
            {"question": "why?", "answer": "another reason"},  # same prompt, other answer: not a duplicate
            {"question": "who?", "answer": "me"},
        ],
    )
    evals = write_jsonl(
        tmp_path / "eval.jsonl", [{"question": "why?", "answer": "x"}, {"question": "new?", "answer": "y"}]
    )
    report = inspect_data(train, tokenizer=tiny_tokenizer, data_config=DataConfig(eval=evals))
    assert report.duplicates == [[f"{train}:1", f"{train}:3"]] and report.duplicate_rows == 1
    assert report.eval_source == str(evals) and report.eval_samples == 2
    assert report.eval_overlap == [(f"{evals}:1", f"{train}:2")]
    assert [f.role for f in report.files] == ["train", "eval"]


def test_seeded_eval_split_overlap_matches_the_training_split(tmp_path, tiny_tokenizer):
    from tunelab.data.prepare import prepare_data

    rows = [{"question": f"q{i % 10}", "answer": f"a{i}"} for i in range(40)]  # every prompt four times
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    config = DataConfig(train=path, eval_split=0.25)
    report = inspect_data(path, tokenizer=tiny_tokenizer, data_config=config, seed=3)
    prepared = prepare_data(config, tiny_tokenizer, seed=3)
    assert report.eval_samples == len(prepared.eval_samples) == 10
    assert sorted(e for e, _ in report.eval_overlap) == sorted(s.where for s in prepared.eval_samples)
    assert report.eval_source == "data.eval_split=0.25, seed 3"


def test_run_config_inspects_each_training_source(tmp_path, tiny_tokenizer):
    write_jsonl(tmp_path / "a.jsonl", [{"question": "what?", "answer": "that"}])
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "why?", "completion": "because"}, {"prompt": "x"}])
    config = tmp_path / "run.yaml"
    config.write_text("data:\n  train:\n    - path: a.jsonl\n    - path: b.jsonl\n      weight: 2\n  max_length: 100\n")
    report = inspect_data(config, tokenizer=tiny_tokenizer)
    assert [(f.format, f.rows, f.invalid_rows) for f in report.files] == [("qa", 1, 0), ("prompt_completion", 2, 1)]
    assert report.max_length == 100 and len(report.lengths) == 2


def test_histogram_is_a_png(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q " * n, "answer": "a"} for n in range(1, 20)])
    report = inspect_data(path, tokenizer=tiny_tokenizer)
    png = write_length_histogram(report, tmp_path / "plots" / "lengths.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) > 1000


def test_wide_csv_of_thousands_of_rows_is_quick_and_json_round_trips(tmp_path, tiny_tokenizer):
    path = tmp_path / "wide.csv"
    extra = [f"extra_{i}" for i in range(10)]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question", "answer", *extra])
        for n in range(3000):
            answer = "" if n % 500 == 7 else f"The capital number {n} is Paris."
            question = f"What is the capital of France, case {n % 2900}?"
            writer.writerow([question, answer, *(f"v{n}-{i}" for i in range(10))])
    start = time.perf_counter()
    report = inspect_data(path, tokenizer=tiny_tokenizer, data_config=DataConfig(max_length=24))
    elapsed = time.perf_counter() - start
    print(f"inspected 3000-row CSV in {elapsed:.2f}s")
    assert elapsed < 60
    assert report.files[0].format == "qa" and report.rows == 3000 and report.invalid_rows == 6
    assert report.problems[0] == f"{path}:9: missing field 'answer'"
    assert len(report.lengths) == 2994 and report.eval_samples == 299
    assert report.longer_than_max_length  # the prompts alone are longer than 24 tokens
    encoded = json.dumps(report.to_json())
    assert json.loads(encoded) == report.to_json()
    assert set(report.to_json()) == {
        "target", "files", "rows", "invalid_rows", "problems", "tokens", "trainable_fraction", "max_length",
        "duplicates", "eval_overlap", "samples",
    }
