"""Preference, feedback and prompt rows through the streamed, cached pipeline: tokenised once per content,
tokenizer and settings, read back memory-mapped as the very rows that were built, split and weighted as SFT
data is."""

from __future__ import annotations

import json

import pytest

from tunelab.config import DataConfig, DataSource
from tunelab.data import row_cache
from tunelab.data.cache import cache_root
from tunelab.data.preference import prepare_preference_data
from tunelab.data.prompts import prepare_prompt_data


@pytest.fixture
def counted(monkeypatch):
    """How many rows were tokenised (not read from the cache)."""
    calls = {"n": 0}
    real = row_cache._build

    def counting(path, fmt, kind, config, problems, folder):
        built = real(path, fmt, kind, config, problems, folder)
        calls["n"] += built[1]["rows"] if built else 0
        return built

    monkeypatch.setattr(row_cache, "_build", counting)
    return calls


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pairs_and_feedback(tmp_path):
    pairs = write(tmp_path / "pairs.jsonl", [
        {"prompt": f"question {i}?", "chosen": f"right answer {i}", "rejected": f"wrong {i} " * (i % 4 + 1),
         **({"margin": i / 10} if i % 2 else {})} for i in range(23)])
    feedback = write(tmp_path / "feedback.jsonl", [
        {"prompt": f"ask {i}", "completion": f"reply {i} " * (i % 3 + 1), "label": i % 3 != 0} for i in range(17)])
    return pairs, feedback


def snapshot(rows) -> list:
    out = []
    for row in rows:
        sequences = [row.chosen, row.rejected] if hasattr(row, "chosen") else [row.sample, row.mismatched]
        out.append((row.where, row.source, row.prompt_length, getattr(row, "margin", getattr(row, "label", None)),
                    [(s.input_ids, s.labels) for s in sequences]))
    return out


@pytest.mark.parametrize("kind", ["preference", "feedback"])
def test_pair_rows_are_tokenised_once_and_read_back_the_same(kind, tmp_path, home, counted, tiny_tokenizer):
    pairs, feedback = pairs_and_feedback(tmp_path)
    path = pairs if kind == "preference" else feedback
    config = DataConfig(train=[DataSource(path=path, weight=1.5)], eval_split=0.2, max_length=24,
                        overlong="truncate")
    first = prepare_preference_data(config, tiny_tokenizer, seed=3)
    assert first.stats["tokenized_cache"] == "miss" and counted["n"] == (23 if kind == "preference" else 17)
    counted["n"] = 0
    second = prepare_preference_data(config, tiny_tokenizer, seed=3)
    assert second.stats["tokenized_cache"] == "hit" and counted["n"] == 0
    off = prepare_preference_data(config.model_copy(update={"cache": False}), tiny_tokenizer, seed=3)
    assert off.stats["tokenized_cache"] == "off"
    for prepared in (second, off):
        assert snapshot(prepared.train) == snapshot(first.train) and snapshot(prepared.eval) == snapshot(first.eval)
        assert prepared.fingerprint == first.fingerprint
        assert prepared.stats == {**first.stats, "tokenized_cache": prepared.stats["tokenized_cache"]}
    assert len(first.train) > len(first.train.distinct_positions())  # weight 1.5 repeats rows
    assert first.stats["truncated_rows"] > 0 and first.truncated[0].startswith(f"{path}:")
    if kind == "preference":
        assert {row.margin is None for row in first.train} == {True, False}  # margins kept, None too
    # A value computed after reading (the reference log-probs) sticks to the row, in each of its repeats.
    repeated = first.train.global_ids[0]
    first.train.set_reference(0, (-1.5, -2.5))
    assert all(first.train[int(p)].reference_logps == (-1.5, -2.5)
               for p in (first.train.global_ids == repeated).nonzero()[0])
    assert len(list(cache_root().iterdir())) == 1


def test_prompt_rows_miss_the_cache_when_what_decides_them_changes(tmp_path, home, counted, tiny_tokenizer):
    path = write(tmp_path / "prompts.jsonl", [{"prompt": "word " * (i * 3), "answer": str(i), "extra": {"n": i}}
                                              for i in range(1, 13)])
    config = DataConfig(train=str(path), eval_split=0.25, max_length=40, overlong="drop")

    def prepare(completion_tokens=8, check_key="", **changes):
        return prepare_prompt_data(config.model_copy(update=changes), tiny_tokenizer, 0,
                                   completion_tokens=completion_tokens, check_key=check_key,
                                   reference_column="answer")

    first = prepare()
    again = prepare()
    assert (first.stats["tokenized_cache"], again.stats["tokenized_cache"]) == ("miss", "hit")
    assert [(r.where, r.prompt_ids, r.columns, r.original) for r in again.train] == \
        [(r.where, r.prompt_ids, r.columns, r.original) for r in first.train]
    assert again.train[0].columns["extra"] == {"n": int(again.train[0].columns["answer"])}
    assert first.stats["dropped_rows"] == again.stats["dropped_rows"] > 0
    assert list(again.train.lengths) == [len(r.prompt_ids) + 8 for r in again.train]
    for changed in (prepare(completion_tokens=4), prepare(check_key="json_field_accuracy"), prepare(max_length=64)):
        assert changed.stats["tokenized_cache"] == "miss"
    assert prepare(completion_tokens=4).stats["dropped_rows"] < first.stats["dropped_rows"]
