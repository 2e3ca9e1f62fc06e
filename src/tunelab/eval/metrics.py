"""Task metrics: pure functions from predictions and references to numbers.

Every metric takes two equally long lists of strings. The corpus metrics (BLEU, chrF, ROUGE) delegate to
sacrebleu and rouge-score so that numbers match what papers and leaderboards report, scales included: BLEU and
chrF run 0-100 (sacrebleu's), every other built-in (ROUGE's F-measures, accuracies, shares) 0-1 (metric_scale).
"""

from __future__ import annotations

import importlib.util
import json
import re
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import sacrebleu

from tunelab.errors import ConfigError, DataError, UserError

__all__ = [
    "LABEL_METRICS",
    "METRICS",
    "accuracy",
    "add_scores",
    "bleu",
    "check_custom_metrics",
    "check_references",
    "chrf",
    "compute_metrics",
    "exact_match",
    "field_hits",
    "json_field_accuracy",
    "json_field_scores",
    "metric_scale",
    "normalize_text",
    "per_sample_json_field_accuracy",
    "rouge",
]

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def normalize_text(
    s: str, *, lowercase: bool = True, strip_punctuation: bool = True, collapse_whitespace: bool = True
) -> str:
    """Returns s in the form two answers are compared in, so "The answer." equals "the answer".

    Punctuation is any Unicode punctuation character and is deleted, not replaced ("don't" -> "dont").
    Collapsing whitespace also strips it from both ends.
    """
    if lowercase:
        s = s.lower()
    if strip_punctuation:
        s = "".join(ch for ch in s if not unicodedata.category(ch).startswith("P"))
    if collapse_whitespace:
        s = " ".join(s.split())
    return s


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    # A silent zip over unequal lists would score the wrong pairs.
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")


def exact_match(predictions: Sequence[str], references: Sequence[str], **normalize_options: bool) -> float:
    """Returns the fraction of predictions equal to their reference after normalize_text(**options)."""
    _check_pairs(predictions, references)
    hits = [
        normalize_text(p, **normalize_options) == normalize_text(r, **normalize_options)
        for p, r in zip(predictions, references, strict=True)
    ]
    return sum(hits) / len(hits)


def _first_json_object(text: str) -> dict[str, Any] | None:
    """Returns the first JSON object in text, or None; models often wrap JSON in prose or code fences."""
    try:
        whole = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        whole = None
    if isinstance(whole, dict):
        return whole
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def _same_value(predicted: Any, expected: Any) -> bool:
    # null only equals null: a model writing the string "null" has not learned the schema.
    if predicted is None or expected is None:
        return predicted is None and expected is None
    return str(predicted).strip().lower() == str(expected).strip().lower()


FieldHits = tuple[dict[str, Any] | None, dict[str, bool]]
"""One sample's parsed prediction (None: no JSON object) and, per reference field, whether it got it right."""


def field_hits(prediction: str, reference: str) -> FieldHits:
    """Returns the parsed prediction and, per reference field, whether the prediction got it right."""
    try:
        expected = json.loads(reference)
    except json.JSONDecodeError:
        expected = None
    if not isinstance(expected, dict):
        raise ValueError(f"reference is not a JSON object: {reference!r}")
    predicted = _first_json_object(prediction)
    hits = {
        key: predicted is not None and key in predicted and _same_value(predicted[key], value)
        for key, value in expected.items()
    }
    return predicted, hits


def per_sample_json_field_accuracy(prediction: str, reference: str) -> float:
    """Returns the fraction of the reference's fields that the prediction's JSON object gets right.

    A reference with no fields scores 1.0; an unparseable prediction scores 0.0 otherwise.
    """
    _, hits = field_hits(prediction, reference)
    return sum(hits.values()) / len(hits) if hits else 1.0


def json_field_accuracy(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Returns field-level scores of predicted JSON objects against reference JSON objects.

    Keys: "field_accuracy" (correct fields / all reference fields, over all samples), "json_valid"
    (fraction of predictions holding a JSON object), "exact_match" (fraction with every reference field
    right; extra predicted keys are ignored) and "field/<name>" per reference field.
    Values compare after str().strip().lower(), so 5 equals "5"; None equals only None.
    """
    _check_pairs(predictions, references)
    return json_field_scores([field_hits(p, r) for p, r in zip(predictions, references, strict=True)])


def json_field_scores(samples: Sequence[FieldHits]) -> dict[str, float]:
    """json_field_accuracy's scores from each sample's field hits: what a bootstrap re-aggregates per resample."""
    n_valid = n_all_right = 0
    correct: dict[str, int] = {}
    total: dict[str, int] = {}
    for predicted, hits in samples:
        n_valid += predicted is not None
        n_all_right += all(hits.values())
        for key, hit in hits.items():
            correct[key] = correct.get(key, 0) + hit
            total[key] = total.get(key, 0) + 1
    n_fields = sum(total.values())
    scores = {
        "field_accuracy": sum(correct.values()) / n_fields if n_fields else 1.0,
        "json_valid": n_valid / len(samples),
        "exact_match": n_all_right / len(samples),
    }
    scores.update({f"field/{key}": correct[key] / total[key] for key in total})
    return scores


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Returns sacrebleu's corpus BLEU (0-100) with one reference per prediction."""
    _check_pairs(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Returns sacrebleu's corpus chrF (0-100) with one reference per prediction."""
    _check_pairs(predictions, references)
    return float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score)


def _one_sentence_per_line(text: str) -> str:
    """Returns text with each sentence on its own line, the form rouge-score's rougeLsum splits on."""
    return "\n".join(
        sentence for line in text.splitlines() for sentence in _SENTENCE_END.split(line.strip()) if sentence
    )


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Returns mean ROUGE F-measures (0-1) keyed rouge1, rouge2, rougeL, rougeLsum, with Porter stemming.

    For rougeLsum, sentences are split at newlines and after ".", "!" or "?" followed by whitespace.
    """
    _check_pairs(predictions, references)
    from rouge_score import rouge_scorer  # imports nltk (and scipy where installed): ~2 s, only when asked for

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    sums = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)
        summary_scores = scorer.score(_one_sentence_per_line(reference), _one_sentence_per_line(prediction))
        for rouge_type in ROUGE_TYPES:
            source = summary_scores if rouge_type == "rougeLsum" else scores
            sums[rouge_type] += source[rouge_type].fmeasure
    return {rouge_type: total / len(predictions) for rouge_type, total in sums.items()}


def _label_form(text: str) -> str:
    # "cancel_order", "cancel-order" and "Cancel order" all name the same label.
    return normalize_text(re.sub(r"[_\-]", " ", text))


def _find_label(prediction: str, labels: Sequence[str]) -> str | None:
    """Returns the label (in label form) appearing earliest in the prediction; longest wins a tie."""
    text = f" {_label_form(prediction)} "
    found = [(text.find(f" {label} "), -len(label), label) for label in map(_label_form, labels)]
    found = [hit for hit in found if hit[0] >= 0 and hit[2]]
    return min(found)[2] if found else None


def accuracy(predictions: Sequence[str], references: Sequence[str], labels: Sequence[str] | None = None) -> float:
    """Returns classification accuracy; "_" and "-" read as spaces, so "Cancel order" is cancel_order.

    With labels, each prediction counts as the label that appears earliest in it as whole words
    ("I think it is a refund." -> refund) and is right if that label is the reference; a prediction
    naming no label is wrong. Without labels, the normalised prediction must equal the reference.
    """
    _check_pairs(predictions, references)
    if labels is None:
        hits = [_label_form(p) == _label_form(r) for p, r in zip(predictions, references, strict=True)]
    else:
        hits = [_find_label(p, labels) == _label_form(r) for p, r in zip(predictions, references, strict=True)]
    return sum(hits) / len(hits)


def _accuracy_over_reference_labels(predictions: Sequence[str], references: Sequence[str]) -> float:
    # Called by name from a config, accuracy has no label list: the distinct references are the labels.
    return accuracy(predictions, references, labels=list(dict.fromkeys(references)))


MetricFn = Callable[[Sequence[str], Sequence[str]], dict[str, float]]

METRICS: dict[str, MetricFn] = {
    "exact_match": lambda p, r: {"exact_match": exact_match(p, r)},
    "json_field_accuracy": json_field_accuracy,
    "bleu": lambda p, r: {"bleu": bleu(p, r)},
    "chrf": lambda p, r: {"chrf": chrf(p, r)},
    "rouge": rouge,
    "accuracy": lambda p, r: {"accuracy": _accuracy_over_reference_labels(p, r)},
}


LABEL_METRICS = ("label_accuracy",)
"""Scored from label likelihoods, not from generated replies (see eval/labels.py)."""

PERCENT_KEYS = ("bleu", "chrf")
"""Scores on a 0-100 scale, as sacrebleu, papers and leaderboards give them."""
SHARE_KEYS = ("exact_match", "accuracy", "label_accuracy", *ROUGE_TYPES, "field_accuracy", "json_valid")
"""Scores on a 0-1 scale (json_field_accuracy's field/<name> too)."""


def metric_scale(key: str) -> str | None:
    """`0-100` or `0-1`: the scale of a built-in metric's score `key` (as results and metrics.jsonl name it, with
    or without eval_); None for a user's own metric, whose scale is its own."""
    name = key.removeprefix("eval_").removeprefix("json_field_accuracy/")
    if name in PERCENT_KEYS:
        return "0-100"
    return "0-1" if name in SHARE_KEYS or name.startswith("field/") else None


def is_custom_metric(name: str) -> bool:
    """`path/to/file.py:function` names a user's own metric."""
    path, _, function = name.rpartition(":")
    return path.endswith(".py") and bool(function)


_MODULES: dict[tuple[str, int], ModuleType] = {}
"""Custom metric files already imported, by resolved path and modification time: a file is imported once per
process (scoring every sample of a comparison alone must not reset its module state), again only once edited."""


def _metric_module(path: Path, where: str) -> ModuleType:
    """The module of a custom metric file, imported on first use; ConfigError when importing it fails."""
    key = (str(path.resolve()), path.stat().st_mtime_ns)
    if key not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"tunelab_metric_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as err:  # noqa: BLE001 - a user's file: report whatever it raised
            from tunelab.objectives.rewards import raised_at  # rewards reuse this module's JSON helpers

            raise ConfigError(f"{path} could not be imported: {type(err).__name__}: {err}{raised_at(err)}",
                              where=where) from None
        _MODULES[key] = module
    return _MODULES[key]


def _custom_function(name: str, where: str) -> Callable:
    """The function a `file.py:function` metric names; ConfigError when the file or the function is missing."""
    path, _, function = name.rpartition(":")
    if not Path(path).is_file():
        raise ConfigError(f"custom metric file {path} does not exist (a path relative to the current folder, "
                          f"{Path.cwd()}, or an absolute one)", where=where)
    fn = getattr(_metric_module(Path(path), where), function, None)
    if not callable(fn):
        raise ConfigError(f"{path} has no function '{function}'", where=where)
    return fn


def check_custom_metrics(names: Sequence[str], where: str) -> None:
    """Raise ConfigError, naming `where`, for a `file.py:function` metric whose file or function is missing:
    before the generation it would otherwise follow."""
    for name in names:
        if is_custom_metric(name):
            _custom_function(name, where)


def _as_number(value: Any) -> float | None:
    """`value` as a float, or None when it is not a number (a string, a list, None)."""
    if isinstance(value, (str, bytes)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _custom_scores(name: str, value: Any) -> dict[str, float]:
    """A custom metric's return value as scores: a number (keyed by the function's name) or a dict of numbers."""
    function = name.rpartition(":")[2]
    scores = value if isinstance(value, dict) else {function: value}
    numbers = {str(key): _as_number(item) for key, item in scores.items()}
    wrong = [key for key, number in numbers.items() if number is None]
    if wrong:
        got = repr(scores[wrong[0]])[:60]
        raise UserError(f"returned {got} for '{wrong[0]}'; a metric returns a number or a dict of numbers",
                        where=f"metric '{name}'")
    return numbers


def load_custom_metric(name: str, where: str = "eval.metrics") -> MetricFn:
    """The function `fn` of `file.py:fn`, called as fn(predictions, references) -> float or dict of floats.
    What it raises, or a result that is not a number, becomes a UserError naming the metric."""
    fn = _custom_function(name, where)

    def scored(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
        try:
            value = fn(list(predictions), list(references))
        except Exception as err:  # noqa: BLE001 - a user's function: report whatever it raised
            from tunelab.objectives.rewards import raised_at  # rewards reuse this module's JSON helpers

            raise UserError(f"raised {type(err).__name__}: {err}{raised_at(err)}", where=f"metric '{name}'") from None
        return _custom_scores(name, value)

    return scored


def check_references(names: Sequence[str], references: Sequence[str], wheres: Sequence[str]) -> None:
    """Raise DataError naming the first row whose reference reply a metric in `names` cannot score:
    json_field_accuracy compares fields, so each reference must be a JSON object."""
    if "json_field_accuracy" not in names:
        return
    bad = [(where, ref) for where, ref in zip(wheres, references, strict=True) if not _is_json_object(ref)]
    if bad:
        where, reference = bad[0]
        others = f" ({len(bad) - 1} more rows like it)" if len(bad) > 1 else ""
        raise DataError(f"json_field_accuracy needs a JSON object as the reference reply, not {reference[:60]!r}"
                        f"{others}; score these rows with another metric", where=where)


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def add_scores(results: dict[str, float], name: str, scores: dict[str, float]) -> None:
    """Add metric `name`'s scores to `results`; a key an earlier metric already gave becomes "<name>/<key>"."""
    for key, value in scores.items():
        results[f"{name}/{key}" if key in results else key] = value


def compute_metrics(names: Sequence[str], predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Returns the union of the named metrics' scores (built-in names or `file.py:function`).

    A key already produced by an earlier metric is written as "<metric>/<key>" instead of overwriting it
    (json_field_accuracy's "exact_match" next to the exact_match metric).
    """
    unknown = [name for name in names if name not in METRICS and not is_custom_metric(name)]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known metrics: {sorted(METRICS)} or file.py:function")
    results: dict[str, float] = {}
    for name in dict.fromkeys(names):
        metric = METRICS[name] if name in METRICS else load_custom_metric(name)
        add_scores(results, name, metric(predictions, references))
    return results
