"""Streamed, cached data preparation: the same rows as the in-memory pipeline, tokenised once per content,
tokenizer and settings, nothing cached for bad data."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from tunelab.config import DataConfig, DataSource
from tunelab.data import arrow_store, cache
from tunelab.data.cache import cache_root
from tunelab.data.prepare import load_samples, prepare_data, split_samples
from tunelab.data.template import ChatRenderer
from tunelab.data.tokenize import tokenize_sample
from tunelab.errors import DataError

WORDS = "the quick brown fox jumps over lazy dog what is capital of France Paris question answer hello world".split()


def words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


@pytest.fixture
def files(tmp_path):
    """Three sources of different formats: qa rows, chat rows, and raw text long enough to be chunked."""
    rng = random.Random(5)
    qa = tmp_path / "qa.jsonl"
    qa.write_text(
        "".join(json.dumps({"question": words(rng, 2, 12), "answer": words(rng, 1, 40)}) + "\n" for _ in range(57))
    )
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": words(rng, 3, 6)},
                        {"role": "assistant", "content": words(rng, 1, 30)},
                    ]
                }
            )
            + "\n"
            for _ in range(23)
        )
    )
    text = tmp_path / "docs.txt"
    text.write_text("".join(words(rng, 3, 80) + "\n\n" for _ in range(9)))
    return qa, chat, text


def mix(files, **settings) -> DataConfig:
    qa, chat, text = files
    sources = [DataSource(path=qa, weight=1.5), DataSource(path=chat, weight=0.5), DataSource(path=text, weight=2.0)]
    return DataConfig(**{"train": sources, "eval_split": 0.2, "max_length": 56, **settings})


def rows(samples) -> list[tuple]:
    return [(s.where, s.source, list(s.input_ids), list(s.labels)) for s in samples]


def in_memory(config: DataConfig, tokenizer, seed: int):
    """The pipeline as tunelab ran it before streaming: every row a Python object, split, weighted, tokenised."""
    renderer = ChatRenderer(tokenizer, config.chat_template)
    train, held = [], []
    for source in config.train:
        samples, _, _, _ = load_samples(source.path, config.format, config.system_prompt, [])
        part, eval_part = split_samples(samples, config.eval_split, seed)
        whole, fraction = divmod(source.weight, 1)
        train += part * int(whole) + random.Random(seed + 1).sample(part, round(len(part) * fraction))
        held += eval_part
    tokenize = lambda samples: [u for s in samples for u in tokenize_sample(s, renderer, config).units]  # noqa: E731
    return tokenize(train), tokenize(held), [s for s in held if s.messages]


def test_streamed_pipeline_matches_the_in_memory_one_in_small_chunks(files, home, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(arrow_store, "CHUNK_ROWS", 4)  # many record batches per file: the streamed path
    config = mix(files)
    data = prepare_data(config, tiny_tokenizer, seed=7)
    train, held, held_samples = in_memory(config, tiny_tokenizer, seed=7)
    assert rows(data.train) == rows(train) and len(train) > 90
    assert rows(data.eval) == rows(held)
    assert [(s.where, s.messages) for s in data.eval_samples] == [(s.where, s.messages) for s in held_samples]
    assert any("(chunk 2)" in s.where for s in data.train)  # raw text was chunked
    assert data.stats["train_tokens"] == sum(len(s.input_ids) for s in train)
    assert data.stats["trainable_tokens"] == sum(s.trainable_tokens for s in train)
    entry = next(p for p in cache_root().iterdir() if json.loads((p / "meta.json").read_text())["rows"] == 57)
    with open(entry / "units.arrow", "rb") as handle:
        import pyarrow as pa

        assert pa.ipc.open_file(handle).num_record_batches == 15  # 57 rows, 4 a batch


def test_second_run_reads_the_cache_and_tokenises_nothing(files, home, tiny_tokenizer, monkeypatch):
    calls = {"n": 0}
    real = cache.tokenize_sample

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(cache, "tokenize_sample", counting)
    first = prepare_data(mix(files), tiny_tokenizer, seed=7)
    assert first.stats["tokenized_cache"] == "miss" and calls["n"] == 57 + 23 + 9
    calls["n"] = 0
    second = prepare_data(mix(files), tiny_tokenizer, seed=7)
    assert second.stats["tokenized_cache"] == "hit" and calls["n"] == 0
    assert rows(second.train) == rows(first.train) and rows(second.eval) == rows(first.eval)
    assert second.fingerprint == first.fingerprint
    # Split, seed and weights act on the cached rows: still no tokenising, other rows picked.
    reseeded = prepare_data(mix(files, eval_split=0.3), tiny_tokenizer, seed=8)
    assert reseeded.stats["tokenized_cache"] == "hit" and calls["n"] == 0
    assert rows(reseeded.eval) != rows(first.eval) and reseeded.fingerprint != first.fingerprint
    assert len(list(cache_root().iterdir())) == 3


@pytest.mark.parametrize(
    "change",
    ["max_length", "chat_template", "system_prompt", "train_on", "file content", "tokenizer"],
)
def test_a_change_that_changes_tokens_misses_the_cache(change, files, home, tiny_tokenizer):
    from conftest import build_tokenizer

    prepare_data(mix(files), tiny_tokenizer, seed=7)
    tokenizer, settings = tiny_tokenizer, {}
    if change == "file content":
        qa = files[0]
        qa.write_text(qa.read_text().replace("Paris", "Lyon", 1))
    elif change == "tokenizer":
        tokenizer = build_tokenizer()
        tokenizer.add_tokens(["<extra>"])
    else:
        settings = {
            "max_length": 72,
            "chat_template": "tunelab",
            "system_prompt": "Be brief.",
            "train_on": "last_assistant",
        }
        settings = {change: settings[change]}
    again = prepare_data(mix(files, **settings), tokenizer, seed=7)
    expected_misses = {str(files[0])} if change == "file content" else {str(f) for f in files}
    assert {path for path, status in again.cache.items() if status == "miss"} == expected_misses
    assert again.stats["tokenized_cache"] == "miss"


def test_cache_off_writes_nothing_and_gives_the_same_rows(files, home, tiny_tokenizer):
    off = prepare_data(mix(files, cache=False), tiny_tokenizer, seed=7)
    assert off.stats["tokenized_cache"] == "off" and not home.exists()
    cached = prepare_data(mix(files), tiny_tokenizer, seed=7)
    assert rows(off.train) == rows(cached.train) and rows(off.eval) == rows(cached.eval)
    assert off.fingerprint == cached.fingerprint


def test_invalid_rows_are_all_reported_and_nothing_is_cached(tmp_path, home, tiny_tokenizer):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps({"question": f"q{i}", "answer": "a"}) for i in range(30)]
    for i in range(3, 30, 2):
        lines[i] = json.dumps({"question": f"q{i}"})
    lines[5] = "{not json"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as caught:
        prepare_data(DataConfig(train=path), tiny_tokenizer, seed=0)
    message = str(caught.value)
    assert message.startswith("14 invalid row(s):")  # rows 4, 6 (bad JSON), 8, ..., 30
    assert f"{path}:6: not valid JSON" in message and f"{path}:4: missing field 'answer'" in message
    assert "... and 4 more" in message
    assert not any(cache_root().iterdir())  # no entry, no scratch folder left behind


def test_a_moved_file_reuses_the_cache_under_its_new_name(files, home, tiny_tokenizer, tmp_path):
    qa = files[0]
    first = prepare_data(DataConfig(train=qa, eval_split=0), tiny_tokenizer, seed=0)
    moved = tmp_path / "renamed.jsonl"
    qa.rename(moved)
    second = prepare_data(DataConfig(train=moved, eval_split=0), tiny_tokenizer, seed=0)
    assert second.stats["tokenized_cache"] == "hit"
    assert [s.where for s in second.train] == [s.where.replace(str(qa), str(moved)) for s in first.train]
    assert {s.source for s in second.train} == {"renamed"}


def test_an_unreadable_entry_is_rebuilt(files, home, tiny_tokenizer):
    config = DataConfig(train=files[1], eval_split=0)
    first = rows(prepare_data(config, tiny_tokenizer, seed=0).train)
    (entry,) = cache_root().iterdir()
    (entry / "units.arrow").unlink()  # a new file, not the mapped one rewritten in place (entries are immutable)
    (entry / "units.arrow").write_bytes(b"not arrow")
    again = prepare_data(config, tiny_tokenizer, seed=0)
    assert again.stats["tokenized_cache"] == "miss" and rows(again.train) == first


def test_lengths_come_from_arrays_not_rows(files, home, tiny_tokenizer):
    data = prepare_data(mix(files), tiny_tokenizer, seed=7)
    assert isinstance(data.train.lengths, np.ndarray)
    assert data.train.lengths.tolist() == [len(s.input_ids) for s in data.train]
    assert data.train[-1].where == list(data.train)[-1].where and data.train[1:3] == [data.train[1], data.train[2]]


def test_an_unwritable_cache_is_one_clear_error(files, tmp_path, monkeypatch, tiny_tokenizer):
    from tunelab.errors import UserError

    home = tmp_path / "home"
    home.write_text("a file where the cache folder should be")
    monkeypatch.setenv("TUNELAB_HOME", str(home))
    with pytest.raises(UserError, match="data.cache: false"):
        prepare_data(DataConfig(train=files[0]), tiny_tokenizer, seed=0)
    assert prepare_data(DataConfig(train=files[0], cache=False), tiny_tokenizer, seed=0).train
