"""Preference pairs (prompt/chosen/rejected, text or chat) and unpaired feedback (prompt/completion/label):
detected, validated with file:line, tokenised with the prompt exactly as `generate` builds it, split, inspected,
and refused by SFT training with the objective they need."""

from __future__ import annotations

import csv
import json
import re

import pytest
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.config import DataConfig, DataSource
from tunelab.data.formats import Sample, detect_format, prompt_messages
from tunelab.data.inspect import inspect_data, render_text
from tunelab.data.pairs import FeedbackSample, to_pair
from tunelab.data.preference import (
    TokenizedFeedback,
    TokenizedPair,
    collate_pairs,
    data_kind,
    load_pairs,
    prepare_preference_data,
    tokenize_pair,
)
from tunelab.data.prepare import prepare_data
from tunelab.data.sources import Record
from tunelab.data.template import IGNORE_INDEX, ChatRenderer, tokenize_chat
from tunelab.errors import DataError

runner = CliRunner()


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def trained_text(tokenizer, sample) -> str:
    return tokenizer.decode([t for t, label in zip(sample.input_ids, sample.labels, strict=True) if label != -100])


def generate_prompt_ids(tokenizer, row: dict, system: str | None = None) -> list[int]:
    """The prompt ids `tunelab generate` feeds the model for `row` (infer/batch.py + infer/generate.py)."""
    text = ChatRenderer(tokenizer).prompt(prompt_messages(row, system))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


PAIR = {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "London."}


def test_formats_are_detected_from_columns():
    assert detect_format([PAIR]) == ("preference", "columns 'prompt', 'chosen', 'rejected'")
    chat_pair = {
        "chosen": [msg("user", "hi"), msg("assistant", "hello")],
        "rejected": [msg("user", "hi"), msg("assistant", "go")],
    }
    assert detect_format([chat_pair])[0] == "preference"
    aliased = {"question": "q?", "response_chosen": "a", "response_rejected": "b"}
    assert detect_format([aliased]) == ("preference", "columns 'question', 'response_chosen', 'response_rejected'")
    feedback = {"prompt": "q?", "completion": "a", "label": True}
    assert detect_format([feedback]) == ("feedback", "columns 'prompt', 'completion', 'label'")
    # Without a label it stays SFT prompt/completion; question/answer stays qa.
    assert detect_format([{"prompt": "q?", "completion": "a"}])[0] == "prompt_completion"
    assert detect_format([{"question": "q?", "answer": "a"}])[0] == "qa"
    pair = to_pair(Record(aliased, "f:1"), "preference")
    assert (pair.prompt, pair.chosen, pair.rejected) == ([msg("user", "q?")], "a", "b")


def test_text_pair_masks_the_prompt_exactly_as_generate_builds_it(tiny_tokenizer):
    renderer = ChatRenderer(tiny_tokenizer)
    pair = to_pair(Record(PAIR, "f:1"), "preference")
    tokenized = tokenize_pair(pair, renderer)
    prompt_ids = generate_prompt_ids(tiny_tokenizer, PAIR)
    assert tokenized.prompt_length == len(prompt_ids)
    for sequence, reply in ((tokenized.chosen, "Paris."), (tokenized.rejected, "London.")):
        assert sequence.input_ids[: len(prompt_ids)] == prompt_ids
        assert set(sequence.labels[: len(prompt_ids)]) == {IGNORE_INDEX}
        assert trained_text(tiny_tokenizer, sequence) == f"{reply}<|im_end|>"
        # Trained tokens are one run right after the prompt; only the template's trailing newline follows.
        trained = [i for i, label in enumerate(sequence.labels) if label != IGNORE_INDEX]
        assert trained == list(range(len(prompt_ids), trained[-1] + 1))
        assert tiny_tokenizer.decode(sequence.input_ids[trained[-1] + 1 :]) == "\n"
        # Same ids and mask as SFT on the conversation that ends with this reply.
        sft = tokenize_chat(Sample("f:1", messages=[*pair.prompt, msg("assistant", reply)]), renderer)
        assert (sequence.input_ids, sequence.labels) == (sft.input_ids, sft.labels)


def test_chat_style_pairs_share_their_prompt_turns(tiny_tokenizer):
    turns = [msg("user", "hello"), msg("assistant", "hi there"), msg("user", "what is 2 plus 2?")]
    without_prompt = {"chosen": [*turns, msg("assistant", "4")], "rejected": [*turns, msg("assistant", "5")]}
    with_prompt = {"prompt": turns, "chosen": [msg("assistant", "4")], "rejected": [msg("assistant", "5")]}
    full_with_prompt = {"prompt": turns, "chosen": [*turns, msg("assistant", "4")], "rejected": "5"}
    renderer = ChatRenderer(tiny_tokenizer)
    tokenized = []
    for row in (without_prompt, with_prompt, full_with_prompt):
        pair = to_pair(Record(row, "f:1"), "preference")
        assert (pair.prompt, pair.chosen, pair.rejected) == (turns, "4", "5")
        assert prompt_messages(row) == turns  # what `generate` answers for this row
        tokenized.append(tokenize_pair(pair, renderer))
        # The earlier assistant turn belongs to the prompt: untrained.
        assert trained_text(tiny_tokenizer, tokenized[-1].chosen) == "4<|im_end|>"
        assert tokenized[-1].chosen.input_ids[: tokenized[-1].prompt_length] == generate_prompt_ids(tiny_tokenizer, row)
    assert all(t.chosen.input_ids == tokenized[0].chosen.input_ids for t in tokenized)
    # A configured system prompt joins the prompt, as it does for generation.
    pair = to_pair(Record(with_prompt, "f:1"), "preference", system_prompt="Be brief.")
    assert pair.prompt == [msg("system", "Be brief."), *turns]
    tokenized = tokenize_pair(pair, renderer)
    assert tokenized.rejected.input_ids[: tokenized.prompt_length] == generate_prompt_ids(
        tiny_tokenizer, with_prompt, "Be brief."
    )


def test_each_invalid_row_is_reported_with_file_and_line(tmp_path, tiny_tokenizer):
    hi = [msg("user", "hi")]
    rows = [
        PAIR,  # 1: valid
        {"prompt": "q", "rejected": "b", "chosen": None},  # 2
        {"prompt": "q", "chosen": "a", "rejected": "  "},  # 3
        {"chosen": [*hi, msg("assistant", "a")], "rejected": [msg("user", "hey"), msg("assistant", "b")]},  # 4
        {"prompt": "hi", "chosen": [msg("user", "other"), msg("assistant", "a")], "rejected": "b"},  # 5
        {"chosen": [*hi, msg("robot", "a")], "rejected": [*hi, msg("assistant", "b")]},  # 6
        {"chosen": [*hi, msg("user", "a")], "rejected": [*hi, msg("assistant", "b")]},  # 7
        {
            "chosen": [msg("assistant", "x"), msg("assistant", "a")],
            "rejected": [msg("assistant", "x"), msg("assistant", "b")],
        },  # 8
        {"chosen": "a", "rejected": "b", "response_chosen": "c"},  # 9: text replies, no prompt
        {"prompt": [msg("user", "q"), msg("assistant", "a")], "chosen": "a", "rejected": "b"},  # 10
        {"prompt": "q", "chosen": [*hi, msg("assistant", "")], "rejected": "b"},  # 11
        {"prompt": "q", "chosen": {"text": "a"}, "rejected": "b"},  # 12
        {"prompt": "q", "chosen": "same", "rejected": "same "},  # 13: identical, reported separately
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    problems: list[str] = []
    pairs, fmt, _, count = load_pairs(path, "auto", None, problems)
    assert (fmt, count) == ("preference", 13)
    assert problems == [
        f"{path}:2: missing field 'chosen'",
        f"{path}:3: field 'rejected' is empty",
        f"{path}:4: 'chosen' and 'rejected' have different prompt turns (first at message 0)",
        f"{path}:5: the prompt turns in 'chosen' differ from 'prompt' (first at message 0)",
        f"{path}:6: 'chosen': message 1 has role 'robot'; expected one of system, user, assistant",
        f"{path}:7: 'chosen' must end with an assistant turn (the reply); it ends with 'user'",
        f"{path}:8: message 0 has role 'assistant' where 'user' was expected",
        f"{path}:9: missing field 'prompt' ('chosen' holds only the reply, so the prompt must be given)",
        f"{path}:10: 'prompt' must end with a user turn to be answered; it ends with 'assistant'",
        f"{path}:11: 'chosen': message 1 (assistant) has empty content",
        f"{path}:12: 'chosen' must be text or a list of {{role, content}} messages, not an object",
    ]
    assert [p.where for p in pairs] == [f"{path}:1", f"{path}:13"] and pairs[1].identical
    with pytest.raises(DataError) as err:
        prepare_preference_data(DataConfig(train=path, eval_split=0), tiny_tokenizer, seed=0)
    assert "11 invalid row(s)" in str(err.value) and f"{path}:2: missing field 'chosen'" in str(err.value)


def test_identical_pairs_are_left_out_and_listed(tmp_path, tiny_tokenizer):
    rows = [PAIR, {"prompt": "q", "chosen": "same", "rejected": " same"}, {**PAIR, "rejected": "Lyon."}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    prepared = prepare_preference_data(DataConfig(train=path, eval_split=0), tiny_tokenizer, seed=0)
    assert prepared.kind == "preference" and [p.where for p in prepared.train] == [f"{path}:1", f"{path}:3"]
    assert prepared.identical == [f"{path}:2: chosen and rejected are identical; left out"]
    assert all(isinstance(p, TokenizedPair) for p in prepared.train)
    assert prepared.stats["identical_pairs"] == 1 and prepared.stats["train_rows"] == 2
    # a file of nothing else says so, row by row, instead of only that no rows are left
    path = write_jsonl(tmp_path / "same.jsonl", [rows[1]] * 4)
    with pytest.raises(DataError, match="no training rows left after validation: 4 left out as identical") as err:
        prepare_preference_data(DataConfig(train=path, eval_split=0), tiny_tokenizer, seed=0)
    assert f"{path}:1: chosen and rejected are identical" in str(err.value)


def test_feedback_labels_in_every_spelling(tmp_path, tiny_tokenizer):
    labels = [True, False, 1, 0, "true", "FALSE", "good", "Bad", 1.0, "yes"]
    rows = [{"prompt": f"q{i}", "completion": f"a{i}", "label": label} for i, label in enumerate(labels)]
    rows += [
        {"prompt": "q", "completion": "a", "label": "maybe"},
        {"prompt": "q", "completion": "a", "label": 2},
        {"prompt": "q", "completion": "a"},
        {"prompt": [msg("user", "hi")], "completion": [msg("assistant", "hello")], "label": 1},
        {"prompt": "q", "completion": [msg("user", "x"), msg("assistant", "a")], "label": 1},
    ]
    path = write_jsonl(tmp_path / "fb.jsonl", rows)
    problems: list[str] = []
    samples, fmt, _, _ = load_pairs(path, "feedback", None, problems)
    assert fmt == "feedback" and all(isinstance(s, FeedbackSample) for s in samples)
    assert [s.label for s in samples] == [True, False, True, False, True, False, True, False, True, True, True]
    assert samples[-1].prompt == [msg("user", "hi")] and samples[-1].completion == "hello"
    assert problems == [
        f"{path}:11: label 'maybe' is not a yes/no value; use true/false, 1/0 or good/bad",
        f"{path}:12: label 2 is not a yes/no value; use true/false, 1/0 or good/bad",
        f"{path}:13: missing field 'label'",
        f"{path}:15: the prompt turns in 'completion' differ from 'prompt' (first at message 0)",
    ]
    # A CSV's labels arrive as text.
    table = tmp_path / "fb.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerows([["prompt", "completion", "label"], ["q1", "a1", "1"], ["q2", "a2", "0"], ["q3", "a3", "0"]])
    prepared = prepare_preference_data(DataConfig(train=table, eval_split=0), tiny_tokenizer, seed=0)
    assert prepared.kind == "feedback" and [r.label for r in prepared.train] == [True, False, False]
    assert isinstance(prepared.train[0], TokenizedFeedback)
    assert trained_text(tiny_tokenizer, prepared.train[0].sample) == "a1<|im_end|>"
    assert prepared.train[0].sample.input_ids[: prepared.train[0].prompt_length] == generate_prompt_ids(
        tiny_tokenizer, {"prompt": "q1"}
    )
    assert (prepared.stats["good"], prepared.stats["bad"]) == (1, 2)


def test_overlong_pairs_truncate_the_reply_end_drop_or_fail(tmp_path, tiny_tokenizer):
    rows = [
        {"prompt": "hi", "chosen": "fox " * 40, "rejected": "dog"},  # 1: the chosen reply is cut
        {"prompt": "word " * 60, "chosen": "a", "rejected": "b"},  # 2: the prompt alone is too long
        PAIR,  # 3: fits
    ]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    config = DataConfig(train=path, eval_split=0, max_length=32)
    with pytest.raises(DataError) as err:
        prepare_preference_data(config, tiny_tokenizer, seed=0)
    assert f"{path}:2: the prompt alone has" in str(err.value) and "data.max_length=32" in str(err.value)
    assert f"{path}:1" not in str(err.value)

    write_jsonl(path, [rows[0], rows[2]])
    prepared = prepare_preference_data(config, tiny_tokenizer, seed=0)
    cut = prepared.train[0]
    whole = tokenize_pair(to_pair(Record(rows[0], ""), "preference"), ChatRenderer(tiny_tokenizer))
    assert len(cut.chosen.input_ids) == 32 and cut.chosen.input_ids == whole.chosen.input_ids[:32]
    assert cut.rejected.input_ids == whole.rejected.input_ids  # the short side is untouched
    assert cut.prompt_length == whole.prompt_length and cut.chosen.trainable_tokens == 32 - cut.prompt_length
    assert prepared.truncated == [
        f"{path}:1: has {len(whole.chosen.input_ids)} tokens, more than "
        f"data.max_length=32; reply cut to {32 - whole.prompt_length} tokens"
    ]

    dropped = prepare_preference_data(config.model_copy(update={"overlong": "drop"}), tiny_tokenizer, seed=0)
    assert [p.where for p in dropped.train] == [f"{path}:2"] and dropped.dropped[0].startswith(f"{path}:1: has")
    with pytest.raises(DataError, match=re.escape(f"{path}:1: has")):
        prepare_preference_data(config.model_copy(update={"overlong": "error"}), tiny_tokenizer, seed=0)


def test_the_seeded_split_holds_out_the_same_rows_as_sft(tmp_path, tiny_tokenizer):
    pairs = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(30)]
    sft = [{"prompt": f"q{i}", "completion": f"good {i}"} for i in range(30)]
    pair_path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    sft_path = write_jsonl(tmp_path / "sft.jsonl", sft)
    prepared = prepare_preference_data(DataConfig(train=pair_path, eval_split=0.2), tiny_tokenizer, seed=7)
    reference = prepare_data(DataConfig(train=sft_path, eval_split=0.2), tiny_tokenizer, seed=7)
    line = re.compile(r":(\d+)$")
    assert [line.search(r.where)[1] for r in prepared.eval_rows] == [
        line.search(s.where)[1] for s in reference.eval_samples
    ]
    assert len(prepared.train) == 24 and len(prepared.eval) == 6
    assert [r.where for r in prepared.eval_rows] == [r.where for r in prepared.eval]
    # Weighted sources repeat rows, as for SFT.
    weighted = DataConfig(train=[DataSource(path=pair_path, weight=2)], eval_split=0.2)
    assert len(prepare_preference_data(weighted, tiny_tokenizer, seed=7).train) == 48


def test_collated_pairs_put_chosen_then_rejected_rows(tiny_tokenizer):
    renderer = ChatRenderer(tiny_tokenizer)
    rows = [PAIR, {"prompt": "hello", "chosen": "world", "rejected": "the quick brown fox jumps"}]
    pairs = [tokenize_pair(to_pair(Record(r, ""), "preference"), renderer) for r in rows]
    batch = collate_pairs(pairs, tiny_tokenizer.pad_token_id)
    order = [pairs[0].chosen, pairs[1].chosen, pairs[0].rejected, pairs[1].rejected]
    assert batch["input_ids"].shape == (4, max(len(s.input_ids) for s in order))
    for row, sequence in enumerate(order):
        n = len(sequence.input_ids)
        assert batch["input_ids"][row, :n].tolist() == sequence.input_ids
        assert batch["attention_mask"][row].sum() == n
        assert batch["targets"][row, : n - 1].tolist() == sequence.labels[1:]


def test_data_kind_refuses_mixed_objectives(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [PAIR])
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"question": "q", "answer": "a"}])
    assert data_kind(DataConfig(train=pairs)) == "preference"
    assert data_kind(DataConfig(train=sft)) == "sft"
    assert data_kind(DataConfig(train=pairs, format="preference_chosen")) == "sft"
    with pytest.raises(DataError, match="different objectives") as err:
        data_kind(DataConfig(train=[DataSource(path=pairs), DataSource(path=sft)]))
    assert err.value.where == "data.train"
    with pytest.raises(DataError, match="different objectives") as err:  # the eval file is the odd one out
        data_kind(DataConfig(train=pairs, eval=sft))
    assert err.value.where == "data.eval"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="file holds no rows") as err:  # not "the data holds SFT rows"
        data_kind(DataConfig(train=pairs, eval=empty))
    assert err.value.where == str(empty)
    unreadable = tmp_path / "unreadable.jsonl"
    unreadable.write_text("hello\nworld\n")  # its kind is not told here: its readers list its bad lines
    assert data_kind(DataConfig(train=unreadable)) == "sft"
    assert data_kind(DataConfig(train=pairs, eval=unreadable)) == "preference"


def test_sft_training_on_preference_or_feedback_data_names_the_objective(tiny_model_dir, tmp_path):
    for name, rows, needs in (
        ("pairs", [PAIR], "set objective.name: dpo"),
        ("feedback", [{"prompt": "q", "completion": "a", "label": "good"}], "set objective.name: kto"),
    ):
        data = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        out = tmp_path / f"out-{name}"
        config = tmp_path / f"{name}.yaml"
        config.write_text(f"model: {tiny_model_dir}\ndata: {{train: {data}}}\noutput_dir: {out}\n")
        result = runner.invoke(app, ["train", str(config)])
        assert result.exit_code == 2, result.output
        assert f"{data}: rows hold" in result.output and needs in result.output
        assert not out.exists()


def test_preference_chosen_trains_sft_on_the_chosen_replies(tiny_model_dir, tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"what is {a} plus {a}?", "chosen": f"{2 * a}", "rejected": f"{a}"} for a in range(8)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    prepared = prepare_data(DataConfig(train=data, eval_split=0, format="preference_chosen"), tiny_tokenizer, 0)
    assert [trained_text(tiny_tokenizer, s) for s in prepared.train] == [f"{2 * a}<|im_end|>" for a in range(8)]
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {tiny_model_dir}\ndata: {{train: {data}, format: preference_chosen, eval_split: 0.25}}\n"
        "train: {max_steps: 2, batch_size: 4, precision: fp32}\n"
        f"eval: {{before_after: false, generate_samples: 0, show_samples: 0}}\noutput_dir: {out}\n"
    )
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_eval_loss"] > 0 and (out / "metrics.jsonl").exists()


def test_inspect_reports_pairs_with_marked_replies(tmp_path, tiny_model_dir, tiny_tokenizer):
    rows = [
        PAIR,
        {"prompt": "hello", "chosen": "same", "rejected": "same"},
        {"prompt": "hello", "rejected": "x"},
        PAIR,
        {
            "chosen": [msg("user", "hi"), msg("assistant", "hello")],
            "rejected": [msg("user", "hi"), msg("assistant", "go away")],
        },
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    report = inspect_data(path, tokenizer=tiny_tokenizer, data_config=DataConfig(eval_split=0), samples_to_show=3)
    assert report.kind == "preference" and report.files[0].format == "preference"
    assert report.problems == [f"{path}:3: missing field 'chosen'"]
    assert report.identical == [f"{path}:2"] and report.duplicates == [[f"{path}:1", f"{path}:4"]]
    assert report.measured_rows == 3 and report.labels is None

    def count(text: str) -> int:
        return len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])

    prompts = [count("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")] * 2
    prompts.append(count("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"))
    assert report.tokens["prompt"].total == sum(prompts)
    assert report.tokens["chosen"].total == 2 * count("Paris.<|im_end|>") + count("hello<|im_end|>")
    assert report.tokens["rejected"].max == count("go away<|im_end|>")

    result = runner.invoke(app, ["data", "inspect", str(path), "--model", str(tiny_model_dir), "--samples", "3"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert f"{path} (train): preference (columns 'prompt', 'chosen', 'rejected'), 5 rows, 1 invalid" in text
    assert f"{path}:3: missing field 'chosen'" in text and "identical pairs: 1" in text
    assert re.findall(r"\[\[(.*?)\]\]", text) == ["Paris.<|im_end|>", "London.<|im_end|>"] * 2 + [
        "hello<|im_end|>",
        "go away<|im_end|>",
    ]
    # The CLI renders the same report as the library, here with the default seeded 10% eval split.
    assert text == render_text(inspect_data(path, tokenizer=tiny_tokenizer, samples_to_show=3)) + "\n"
    assert f"1 of 1 eval prompt(s) also in training\n  {path}:4 (eval) = {path}:1 (train)" in text

    result = runner.invoke(app, ["data", "inspect", str(path), "--model", str(tiny_model_dir), "--json"])
    data = json.loads(result.output)
    assert data["kind"] == "preference" and data["rows"] == 5 and data["invalid_rows"] == 1
    assert data["identical_pairs"] == {"rows": 1, "examples": [f"{path}:2"]}
    assert data["duplicates"]["rows"] == 1 and data["labels"] is None
    assert set(data["tokens"]) == {"rows", "prompt", "chosen", "rejected", "total"}
    shown = data["samples"][0]
    assert [r["name"] for r in shown["replies"]] == ["chosen", "rejected"]
    assert shown["prompt"].endswith("<|im_start|>assistant\n")
    assert [s["text"] for s in shown["replies"][0]["segments"] if s["trained"]] == ["Paris.<|im_end|>"]


def test_inspect_reports_feedback_label_balance(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}", "label": i % 3 == 0} for i in range(9)]
    rows.append({"prompt": "q", "completion": "a", "label": "perhaps"})
    path = write_jsonl(tmp_path / "fb.jsonl", rows)
    result = runner.invoke(
        app, ["data", "inspect", str(path), "--model", str(tiny_model_dir), "--json", "--max-length", "10"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["kind"] == "feedback" and data["labels"] == {"good": 3, "bad": 6}
    assert data["problems"] == [f"{path}:10: label 'perhaps' is not a yes/no value; use true/false, 1/0 or good/bad"]
    assert set(data["tokens"]) == {"rows", "prompt", "completion", "total"}
    assert data["max_length"]["longer_rows"] == 9 and data["max_length"]["no_room_for_reply"] == 9
    assert data["eval_overlap"]["eval_rows"] == 1  # 10% of the 9 valid rows, seeded as training splits
    result = runner.invoke(app, ["data", "inspect", str(path), "--model", str(tiny_model_dir)])
    assert "labels: 3 good, 6 bad (33% good)" in result.output
    assert "[[a0<|im_end|>]]" in result.output and "completion (good)" in result.output
    assert "identical pairs" not in result.output
