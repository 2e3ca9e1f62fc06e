"""Data pipeline: formats, validation messages, chat templating and loss masks."""

from __future__ import annotations

import json

import pytest

from tunelab.config import DataConfig
from tunelab.data.formats import RowError, Sample, detect_format
from tunelab.data.prepare import prepare_data, split_samples
from tunelab.data.template import IGNORE_INDEX, ChatRenderer, tokenize_chat
from tunelab.errors import DataError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trained_text(tokenizer, tokenized) -> str:
    pairs = zip(tokenized.input_ids, tokenized.labels, strict=True)
    return tokenizer.decode([token for token, label in pairs if label != IGNORE_INDEX])


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"messages": []}, "chat"),
        ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
        ({"prompt": "a", "completion": "b"}, "prompt_completion"),
        ({"question": "a", "answer": "b"}, "qa"),
        ({"text": "a"}, "text"),
        ({"conversations": []}, "chat"),
    ],
)
def test_detect_format_from_columns(row, expected):
    assert detect_format([row])[0] == expected


def test_detect_format_names_the_columns_it_saw():
    with pytest.raises(RowError, match="foo"):
        detect_format([{"foo": 1}])


def test_assistant_reply_and_end_of_turn_are_the_only_trained_tokens(tiny_tokenizer):
    sample = Sample(
        where="x:1",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "world"},
        ],
    )
    tokenized = tokenize_chat(sample, ChatRenderer(tiny_tokenizer))
    assert trained_text(tiny_tokenizer, tokenized) == "world<|im_end|>"
    # The prompt part equals, token for token, what generation feeds the model.
    prompt = ChatRenderer(tiny_tokenizer).prompt(sample.messages)
    prompt_ids = tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenized.input_ids[: len(prompt_ids)] == prompt_ids
    assert all(label == IGNORE_INDEX for label in tokenized.labels[: len(prompt_ids)])


def test_every_assistant_turn_is_trained_unless_last_only_is_asked(tiny_tokenizer):
    messages = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "the fox"},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "the dog"},
    ]
    renderer = ChatRenderer(tiny_tokenizer)
    every = tokenize_chat(Sample("x", messages), renderer, "all_assistant")
    assert trained_text(tiny_tokenizer, every) == "the fox<|im_end|>the dog<|im_end|>"
    last = tokenize_chat(Sample("x", messages), renderer, "last_assistant")
    assert trained_text(tiny_tokenizer, last) == "the dog<|im_end|>"


def test_fallback_template_masks_a_model_without_a_chat_template():
    from conftest import build_tokenizer

    tokenizer = build_tokenizer(with_template=False)
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    tokenized = tokenize_chat(Sample("x", messages), ChatRenderer(tokenizer, "auto"))
    assert trained_text(tokenizer, tokenized) == "world<|im_end|>"


def test_template_without_generation_markers_still_masks(tiny_tokenizer):
    # A template with no {% generation %} markers and a different layout: masks come from rendering.
    renderer = ChatRenderer(tiny_tokenizer, "tunelab")
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    tokenized = tokenize_chat(Sample("x", messages), renderer)
    assert trained_text(tiny_tokenizer, tokenized) == "world<|im_end|>"


def test_every_bad_row_is_reported_with_file_and_line(tmp_path, tiny_tokenizer):
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"instruction": "ok", "output": "fine"},
            {"instruction": "no output"},
            {"instruction": "empty", "output": "   "},
            {"instruction": "ok again", "output": "fine"},
        ],
    )
    with pytest.raises(DataError) as caught:
        prepare_data(DataConfig(train=path, eval_split=0), tiny_tokenizer, seed=0)
    message = str(caught.value)
    assert "2 invalid row(s)" in message
    assert f"{path}:2: missing field 'output'" in message
    assert f"{path}:3: field 'output' is empty" in message


def test_wrong_role_order_and_unknown_roles_are_rejected(tmp_path, tiny_tokenizer):
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]},
            {"messages": [{"role": "wizard", "content": "hi"}]},
            {"messages": [{"role": "user", "content": "hi"}]},
        ],
    )
    with pytest.raises(DataError) as caught:
        prepare_data(DataConfig(train=path, eval_split=0), tiny_tokenizer, seed=0)
    message = str(caught.value)
    assert f"{path}:1: message 0 has role 'assistant' where 'user' was expected" in message
    assert f"{path}:2: message 0 has role 'wizard'" in message
    assert f"{path}:3: conversation does not end with an assistant turn" in message


def test_malformed_json_line_is_named(tmp_path, tiny_tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        prepare_data(DataConfig(train=path), tiny_tokenizer, seed=0)


def test_overlong_samples_truncate_drop_or_fail(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "short", "completion": "yes"}, {"prompt": "word " * 200, "completion": "no"}]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    # Truncation cuts the reply away entirely: nothing left to train is an error naming the row.
    with pytest.raises(DataError, match=r"long.jsonl:2: no trainable token left"):
        prepare_data(DataConfig(train=path, eval_split=0, max_length=64), tiny_tokenizer, seed=0)
    dropped = prepare_data(DataConfig(train=path, eval_split=0, max_length=64, overlong="drop"), tiny_tokenizer, 0)
    assert len(dropped.train) == 1 and "long.jsonl:2" in dropped.dropped[0]
    with pytest.raises(DataError, match=r"long.jsonl:2: has \d+ tokens, more than data.max_length=64"):
        prepare_data(DataConfig(train=path, eval_split=0, max_length=64, overlong="error"), tiny_tokenizer, 0)
    # every row dropped: the error says why, quoting the rows
    with pytest.raises(DataError, match=r"no training samples left after validation: 2 dropped\n.*long.jsonl:1"):
        prepare_data(DataConfig(train=path, eval_split=0, max_length=8, overlong="drop"), tiny_tokenizer, 0)


def test_raw_text_is_chunked_not_truncated(tmp_path, tiny_tokenizer):
    path = tmp_path / "domain.txt"
    path.write_text(("the quick brown fox jumps over the lazy dog " * 30) + "\n\nsecond document\n")
    data = prepare_data(DataConfig(train=path, eval_split=0, max_length=32), tiny_tokenizer, seed=0)
    first_doc = [s for s in data.train if s.where.startswith(f"{path}:1")]
    assert len(first_doc) > 1 and all(len(s.input_ids) <= 32 for s in data.train)
    assert all(s.labels == s.input_ids for s in data.train)  # every token trained
    total = sum(len(s.input_ids) for s in first_doc)
    expected = len(tiny_tokenizer("the quick brown fox jumps over the lazy dog " * 30)["input_ids"]) + 1
    assert total == expected


def test_csv_and_parquet_read_like_jsonl(tmp_path, tiny_tokenizer):
    import pandas as pd

    frame = pd.DataFrame({"question": ["what?", "why?"], "answer": ["that", "because"]})
    frame.to_csv(tmp_path / "qa.csv", index=False)
    frame.to_parquet(tmp_path / "qa.parquet")
    for name in ("qa.csv", "qa.parquet"):
        data = prepare_data(DataConfig(train=tmp_path / name, eval_split=0), tiny_tokenizer, seed=0)
        assert [trained_text(tiny_tokenizer, s) for s in data.train] == ["that<|im_end|>", "because<|im_end|>"]


def test_csv_error_names_the_line(tmp_path, tiny_tokenizer):
    (tmp_path / "qa.csv").write_text("question,answer\nwhat?,that\nwhy?,\n")
    with pytest.raises(DataError, match=r"qa.csv:3: missing field 'answer'"):
        prepare_data(DataConfig(train=tmp_path / "qa.csv", eval_split=0), tiny_tokenizer, seed=0)
    # a row with fields the header does not name, and a quote that never closes (the csv module would read the
    # rest of the file into that field), are reported at the line their row starts on
    path = tmp_path / "odd.csv"
    path.write_text('question,answer\nq1,a1\nq2,a2,extra\nq3,"a3 on\ntwo lines"\nq4,"never closed\nq5,a5\n')
    with pytest.raises(DataError) as err:
        prepare_data(DataConfig(train=path, eval_split=0), tiny_tokenizer, seed=0)
    assert f"{path}:3: 3 fields, but the header names 2" in str(err.value)
    assert f"{path}:6: a quoted field that opens here runs to line 7 without closing" in str(err.value)
    assert "2 invalid row(s)" in str(err.value)


def test_split_is_seeded_and_disjoint():
    samples = [Sample(where=str(i), text=str(i)) for i in range(50)]
    train_a, eval_a = split_samples(samples, 0.2, seed=1)
    train_b, eval_b = split_samples(samples, 0.2, seed=1)
    assert [s.where for s in eval_a] == [s.where for s in eval_b] and len(eval_a) == 10
    assert not {s.where for s in train_a} & {s.where for s in eval_a}
    assert [s.where for s in split_samples(samples, 0.2, seed=2)[1]] != [s.where for s in eval_a]


def test_missing_data_file_is_a_data_error(tiny_tokenizer):
    with pytest.raises(DataError, match="nope.jsonl: data file does not exist"):
        prepare_data(DataConfig(train="nope.jsonl"), tiny_tokenizer, seed=0)


def test_conversational_prompt_completion_rows_become_messages(tmp_path, tiny_tokenizer):
    row = {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}],
        "completion": [{"role": "assistant", "content": "world"}],
    }
    path = write_jsonl(tmp_path / "pc.jsonl", [row, {"prompt": [], "completion": "x"}])
    with pytest.raises(DataError, match=r"pc.jsonl:2: 'prompt' must be a non-empty list"):
        prepare_data(DataConfig(train=path, eval_split=0), tiny_tokenizer, seed=0)
    path = write_jsonl(tmp_path / "ok.jsonl", [row])
    data = prepare_data(DataConfig(train=path, eval_split=0), tiny_tokenizer, seed=0)
    assert trained_text(tiny_tokenizer, data.train[0]) == "world<|im_end|>"
    assert tiny_tokenizer.decode(data.train[0].input_ids).startswith("<|im_start|>system\nBe brief.")
