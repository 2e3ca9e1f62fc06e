"""Task metrics against literal examples and against sacrebleu / rouge-score called directly."""

from __future__ import annotations

import json
from collections import Counter
from importlib import resources

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from tunelab.eval.metrics import (
    METRICS,
    accuracy,
    bleu,
    chrf,
    compute_metrics,
    exact_match,
    json_field_accuracy,
    normalize_text,
    per_sample_json_field_accuracy,
    rouge,
)

PREDICTIONS = [
    "The cat sat on the mat. It was happy.",
    "A quick brown fox jumps over the lazy dog",
    "Refunds are processed within five days.",
]
REFERENCES = [
    "The cat is sitting on the mat. It looked happy.",
    "The quick brown fox jumped over the lazy dogs",
    "Refunds are usually processed within 5 business days.",
]


def test_normalize_text_options():
    assert normalize_text("  The  Answer, is: 42! ") == "the answer is 42"
    assert normalize_text("Don't", lowercase=False) == "Dont"
    assert normalize_text("a,  b", strip_punctuation=False) == "a, b"
    assert normalize_text("a  b", collapse_whitespace=False) == "a  b"


def test_exact_match_normalises_before_comparing():
    assert exact_match(["The Cat!", "dog"], ["the cat", "cat"]) == 0.5
    assert exact_match(["The Cat!", "dog"], ["the cat", "cat"], strip_punctuation=False) == 0.0
    assert exact_match(["x"], ["x"]) == 1.0


def test_metrics_reject_unpaired_inputs():
    with pytest.raises(ValueError, match="not a JSON object"):
        json_field_accuracy(['{"a": 1}'], ["plain text"])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        exact_match(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        bleu([], [])


def test_json_field_accuracy_on_messy_predictions():
    references = [
        '{"intent": "refund", "order_id": null}',
        '{"intent": "refund", "order_id": null}',
        '{"intent": "cancel_order", "order_id": "A-1"}',
        '{"intent": "cancel_order", "order_id": "A-1"}',
    ]
    predictions = [
        # surrounding prose, padded and capitalised value: both fields right
        'Sure! Here is the JSON: {"intent": "Refund ", "order_id": null} Hope it helps.',
        # the string "null" is not null
        '{"intent": "refund", "order_id": "null"}',
        # truncated JSON: nothing parses, both fields wrong
        '{"intent": "cancel_order", "order_id": "A-1"',
        # code fence, different case, an extra key: both fields right
        '```json\n{"intent": "cancel_order", "order_id": "a-1", "note": 1}\n```',
    ]
    scores = json_field_accuracy(predictions, references)
    assert scores == {
        "field_accuracy": 5 / 8,
        "json_valid": 3 / 4,
        "exact_match": 2 / 4,
        "field/intent": 3 / 4,
        "field/order_id": 2 / 4,
    }


def test_per_sample_json_field_accuracy():
    reference = '{"intent": "refund", "product": "yoga mat", "order_id": "null"}'
    assert (
        per_sample_json_field_accuracy('{"intent": "refund", "product": "Yoga Mat", "order_id": "null"}', reference)
        == 1.0
    )
    # a literal "null" string in the reference is not matched by a JSON null
    assert (
        per_sample_json_field_accuracy('{"intent": "refund", "product": "yoga mat", "order_id": null}', reference)
        == 2 / 3
    )
    # the first {...} that parses as an object is used, after one that does not
    assert per_sample_json_field_accuracy('{oops} then {"intent": "refund"}', reference) == 1 / 3
    assert per_sample_json_field_accuracy("no json here", reference) == 0.0
    assert per_sample_json_field_accuracy('["refund"]', reference) == 0.0
    # numbers compare by their text
    assert per_sample_json_field_accuracy('{"n": "5"}', '{"n": 5}') == 1.0


def test_bleu_and_chrf_match_sacrebleu():
    assert bleu(PREDICTIONS, REFERENCES) == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score)
    assert chrf(PREDICTIONS, REFERENCES) == pytest.approx(sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES]).score)
    assert bleu(REFERENCES, REFERENCES) == pytest.approx(100.0)
    assert 0.0 < bleu(PREDICTIONS, REFERENCES) < 100.0


def test_rouge_matches_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    expected = {key: 0.0 for key in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
    for prediction, reference in zip(PREDICTIONS, REFERENCES, strict=True):
        plain = scorer.score(reference, prediction)
        # rougeLsum wants one sentence per line
        per_line = scorer.score(reference.replace(". ", ".\n"), prediction.replace(". ", ".\n"))
        for key in ("rouge1", "rouge2", "rougeL"):
            expected[key] += plain[key].fmeasure / len(PREDICTIONS)
        expected["rougeLsum"] += per_line["rougeLsum"].fmeasure / len(PREDICTIONS)

    scores = rouge(PREDICTIONS, REFERENCES)
    assert scores == pytest.approx(expected)
    # rougeLsum sees sentences: reordering them costs rougeL but not rougeLsum
    swapped = rouge(["It was happy. The cat sat on the mat."], ["The cat sat on the mat. It was happy."])
    assert swapped["rougeLsum"] == pytest.approx(1.0)
    assert swapped["rougeL"] < 0.9
    assert rouge(["same text here"], ["same text here"]) == pytest.approx(dict.fromkeys(expected, 1.0))


def test_accuracy_with_a_label_set():
    labels = ["refund", "cancel_order", "shipping_delay"]
    predictions = [
        "The intent is refund.",
        "Cancel order",
        "shipping_delay, or maybe refund",  # the earliest label counts
        "no idea",
        "REFUND",
    ]
    references = ["refund", "cancel_order", "shipping_delay", "refund", "cancel_order"]
    assert accuracy(predictions, references, labels=labels) == 3 / 5
    # without labels only a normalised exact match counts ("_" still reads as a space)
    assert accuracy(predictions, references) == 1 / 5
    # labels are matched as whole words, not substrings
    assert accuracy(["refunded"], ["refund"], labels=["refund"]) == 0.0


def test_registry_returns_dicts_of_floats():
    assert set(METRICS) == {"exact_match", "json_field_accuracy", "bleu", "chrf", "rouge", "accuracy"}
    json_rows = ['{"intent": "refund"}', '{"intent": "cancel_order"}', '{"intent": "refund"}']
    for name, metric in METRICS.items():
        texts = json_rows if name == "json_field_accuracy" else REFERENCES
        scores = metric(texts, texts)
        assert scores and all(isinstance(v, float) for v in scores.values()), name
    # registry accuracy uses the distinct references as its label set
    assert METRICS["accuracy"](["it is a refund", "cancel"], ["refund", "cancel"]) == {"accuracy": 1.0}


def test_compute_metrics_merges_and_keeps_colliding_keys():
    predictions = ['{"a": 1} trailing', '{"a": 2}']
    references = ['{"a": 1}', '{"a": 3}']
    scores = compute_metrics(["exact_match", "json_field_accuracy", "bleu"], predictions, references)
    assert scores["exact_match"] == 0.0  # text exact match
    assert scores["json_field_accuracy/exact_match"] == 0.5
    assert scores["field/a"] == 0.5
    assert "bleu" in scores


def test_compute_metrics_rejects_unknown_names():
    with pytest.raises(ValueError, match="blue") as excinfo:
        compute_metrics(["bleu", "blue"], ["a"], ["a"])
    for name in METRICS:
        assert name in str(excinfo.value)


def test_shipped_support_dataset():
    path = resources.files("tunelab") / "datasets" / "support_tickets.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 600
    assert all(set(row) == {"instruction", "input", "output"} for row in rows)
    assert len({row["instruction"] for row in rows}) == 1
    assert len({row["input"] for row in rows}) == 600

    outputs = [json.loads(row["output"]) for row in rows]
    assert all(list(out) == ["intent", "product", "urgency", "order_id"] for out in outputs)
    intents = Counter(out["intent"] for out in outputs)
    assert set(intents) == {
        "refund",
        "cancel_order",
        "shipping_delay",
        "damaged_item",
        "billing_error",
        "account_access",
        "product_question",
        "change_address",
    }
    assert min(intents.values()) >= 40
    assert {out["urgency"] for out in outputs} == {"low", "medium", "high"}
    assert len({out["product"] for out in outputs}) == 12
    for row, out in zip(rows, outputs, strict=True):
        assert out["product"] in row["input"]
        assert out["order_id"] is None or out["order_id"] in row["input"]
        assert 15 <= len(row["input"].split()) <= 60
    assert 0 < sum(out["order_id"] is None for out in outputs) < 600

    targets = [row["output"] for row in rows]
    assert json_field_accuracy(targets, targets)["field_accuracy"] == 1.0
    assert json_field_accuracy(targets, targets)["exact_match"] == 1.0
