"""Lookup decoding (infer/lookup.py and decode's single-row loop): drafts come from the latest matching n-gram,
the request's own tokens before earlier replies; a reply decoded with drafts is token for token the reply decoded
without them (float32, greedy and seeded sampling), in fewer passes; rejected drafts leave the KV cache as if they
had never been written."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig

from tunelab.infer.decode import Sampling, decode, drafts_possible, stream
from tunelab.infer.generate import decoding_model, stop_token_ids
from tunelab.infer.kv_cache import ReservedLayer, reserved_cache, rewind
from tunelab.infer.lookup import LONGEST_NGRAM, History, NgramIndex, draft
from tunelab.models.lean_decoder import LeanDecoder
from tunelab.models.load import load_model, load_tokenizer


def test_drafts_follow_the_latest_longest_ngram_own_tokens_first():
    own = NgramIndex([5, 1, 2, 7, 7, 1, 2, 8, 9, 4, 1, 2])
    assert draft(own, None, 3) == [8, 9, 4]  # (1, 2) last occurred before 8, not before 7
    assert draft(NgramIndex([1, 2, 3, 4, 9, 2, 3, 5, 1, 2, 3]), None, 2) == [4, 9]  # 3-gram (1,2,3) beats (2,3)
    assert draft(NgramIndex([1, 2, 3]), None, 4) == []  # nothing ending the text occurred before
    history = History()
    history.add([3, 6, 6, 1])
    history.add([3, 7, 7])
    assert draft(NgramIndex([9, 3]), history, 4) == [7, 7]  # the newest reply; a draft ends with its reply
    assert draft(NgramIndex([3, 4, 9, 3]), history, 4) == [4, 9, 3]  # the request's own tokens first
    assert draft(NgramIndex([8, 6]), history, 4) == [1]  # a 1-gram (its latest occurrence) when no longer one matches


def scanned_draft(tokens: list[int], earlier: list[list[int]], count: int) -> list[int]:
    """What `draft` promises, by scanning backwards: after the longest (up to LONGEST_NGRAM) n-gram ending `tokens`
    that occurred before, in `tokens` first, then in the earlier replies (newest first, never across two)."""
    for n in range(min(LONGEST_NGRAM, len(tokens)), 0, -1):
        tail = tokens[-n:]
        for sequence in [tokens, *reversed(earlier)]:
            for start in range(len(sequence) - n - 1, -1, -1):  # occurrences some token follows
                if sequence[start:start + n] == tail:
                    return sequence[start + n:start + n + count]
    return []


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(tokens=st.lists(st.integers(0, 5), max_size=40), earlier=st.lists(st.lists(st.integers(0, 5), max_size=12),
                                                                            max_size=4),
       count=st.integers(1, 8))
def test_indexed_drafts_are_what_a_backward_scan_finds(tokens, earlier, count):
    history = History()
    for reply in earlier:
        history.add(reply)
    assert draft(NgramIndex(tokens), history, count) == scanned_draft(tokens, earlier, count)


def test_history_keeps_the_newest_replies_within_its_limit():
    history = History(limit=20)
    for start in range(0, 60, 6):
        history.add(list(range(start, start + 5)))
    assert len(history.index.tokens) <= 20
    assert draft(NgramIndex([54]), history, 3) == [55, 56, 57]
    assert draft(NgramIndex([0]), history, 3) == []  # the oldest replies are forgotten


def test_rewind_forgets_positions_and_zeroes_them():
    layer = ReservedLayer(16)
    keys, values = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    layer.update(keys, values)
    layer.rewind(3)
    assert layer.get_seq_length() == 3 and torch.equal(layer.keys, keys[:, :, :3])
    padded_keys, padded_values = layer.padded(8)
    assert not padded_keys[:, :, 3:].any() and not padded_values[:, :, 3:].any()
    layer.update(keys[:, :, :1], values[:, :, :1])  # the next write lands right after what was kept
    assert torch.equal(layer.keys[:, :, 3], keys[:, :, 0])
    cache = reserved_cache(LlamaConfig(num_hidden_layers=2), 8)
    for each in cache.layers:
        each.update(keys, values)
    rewind(cache, 2)
    assert [each.get_seq_length() for each in cache.layers] == [2, 2]


PROMPTS = ["Extract the fields as JSON: intent, product, urgency, order_id. My desk arrived broken, order 0123.",
           "What is the capital of France? The capital of France is",
           "Repeat after me: the quick brown fox, the quick brown fox, the quick brown fox,"]


@pytest.fixture(scope="module")
def default_model(default_model_dir):
    tokenizer = load_tokenizer(default_model_dir)
    with decoding_model(load_model(default_model_dir, device="cpu"), "fp32") as model:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)["input_ids"] for p in PROMPTS]
        yield model, prompts, stop_token_ids(model, tokenizer)


@pytest.mark.parametrize("sampling", [None, Sampling(temperature=0.8, top_p=0.95, seed=3)], ids=["greedy", "sampled"])
def test_lookup_gives_the_reply_without_drafts_in_fewer_passes(default_model, monkeypatch, sampling):
    model, prompts, stops = default_model
    plain = decode(model, prompts, max_new_tokens=40, stop_ids=stops, pad_id=0, batch_size=1, lookup=False,
                   sampling=sampling)
    widths: list[int] = []  # of every pass after a prompt's (its cache holds the prompt)
    forward = LeanDecoder.__call__

    def counted(self, input_ids, attention_mask, position_ids, cache, **kwargs):
        if cache.get_seq_length():
            widths.append(input_ids.shape[1])
        return forward(self, input_ids, attention_mask, position_ids, cache, **kwargs)

    monkeypatch.setattr(LeanDecoder, "__call__", counted)
    drafted = decode(model, prompts, max_new_tokens=40, stop_ids=stops, pad_id=0, batch_size=1, lookup=True,
                     sampling=sampling)
    assert drafted.tokens == plain.tokens and drafted.truncated == plain.truncated
    produced = sum(len(tokens) for tokens in drafted.tokens)
    # one token a pass would take produced - 1 passes a reply (the first token comes from the prompt's pass)
    assert max(widths) > 1 and len(widths) < produced - len(prompts)  # drafts were checked, and some kept
    streamed = list(stream(model, prompts[2], max_new_tokens=40, stop_ids=stops, sampling=sampling))
    alone = decode(model, prompts[2:], max_new_tokens=40, stop_ids=stops, pad_id=0, lookup=False, sampling=sampling)
    assert streamed == alone.tokens[0]  # (decode's draws for prompt 2 came after the other prompts')


def test_a_sliding_window_model_decodes_alone_with_drafts_as_generate_does():
    from test_lean_decoder import random_model

    model = random_model("mistral", sliding_window=8)  # a reserved cache keeps every position; masks apply the window
    assert drafts_possible(model)
    prompt = [5, 17, 33, 2, 60, 7, 7, 41, 9, 12, 3]
    decoded = decode(model, [prompt], max_new_tokens=16, stop_ids=[0], pad_id=0)
    ids = torch.tensor([prompt])
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                              eos_token_id=0, pad_token_id=0)[0, len(prompt):].tolist()
    assert decoded.tokens[0] == (expected[:expected.index(0) + 1] if 0 in expected else expected)
