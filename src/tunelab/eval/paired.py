"""Before/after on the same samples: per-metric difference with a paired bootstrap confidence interval,
and the samples that got better or worse.

A metric's difference is that of the two corpus scores shown (BLEU and chrF are corpus statistics, not means of
sentence scores), and its interval comes from recomputing both models' corpus scores on the same resampled corpora.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import numpy as np

from tunelab.eval.metrics import (
    accuracy,
    add_scores,
    compute_metrics,
    field_hits,
    json_field_scores,
)

CORPUS_RESAMPLES = 1000
"""Resampled corpora per corpus-metric interval (sacrebleu's paired bootstrap draws as many)."""

CorpusScorer = Callable[[list[int]], dict[str, float]]
"""A metric's scores on the corpus drawn by sample indices (an index may repeat)."""

MEAN_METRICS = {"exact_match", "rouge"}
"""Metrics whose corpus score is the mean of the samples' own scores."""


def per_sample_scores(names: Sequence[str], replies: Sequence[str], references: Sequence[str]) -> dict[str, list]:
    """Each metric key scored on every sample alone (sentence-level for BLEU and chrF)."""
    scores: dict[str, list[float]] = {}
    for reply, reference in zip(replies, references, strict=True):
        for key, value in compute_metrics(names, [reply], [reference]).items():
            scores.setdefault(key, []).append(float(value))
    return scores


def bootstrap_difference(after: Sequence[float], before: Sequence[float], *, resamples: int = 2000,
                         seed: int = 0) -> dict[str, float]:
    """Mean of after - before over samples, with a 95% paired bootstrap interval."""
    differences = [a - b for a, b in zip(after, before, strict=True)]
    n = len(differences)
    rng = random.Random(seed)
    means = sorted(sum(differences[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return {
        "difference": sum(differences) / n,
        "ci95_low": means[int(0.025 * resamples)],
        "ci95_high": means[int(0.975 * resamples) - 1],
    }


def corpus_scorer(names: Sequence[str], replies: Sequence[str], references: Sequence[str]) -> CorpusScorer:
    """compute_metrics(names) of any resample of (replies, references), with each sample's share prepared once:
    summed sacrebleu statistics for BLEU and chrF, per-sample scores for means, the metric rerun otherwise."""
    scorers = [(name, _metric_scorer(name, list(replies), list(references))) for name in dict.fromkeys(names)]

    def score(indices: list[int]) -> dict[str, float]:
        results: dict[str, float] = {}
        for name, scorer in scorers:
            add_scores(results, name, scorer(indices))
        return results

    return score


def _metric_scorer(name: str, replies: list[str], references: list[str]) -> CorpusScorer:
    if name in ("bleu", "chrf"):
        return _sacrebleu_scorer(name, replies, references)
    if name in MEAN_METRICS:
        per_sample = {key: np.array(values) for key, values in per_sample_scores([name], replies, references).items()}
        return lambda indices: {key: float(values[indices].mean()) for key, values in per_sample.items()}
    if name == "accuracy":  # its labels are the distinct references of the whole corpus, in every resample too
        labels = list(dict.fromkeys(references))
        hits = np.array([accuracy([r], [ref], labels=labels) for r, ref in zip(replies, references, strict=True)])
        return lambda indices: {"accuracy": float(hits[indices].mean())}
    if name == "json_field_accuracy":
        samples = [field_hits(r, ref) for r, ref in zip(replies, references, strict=True)]
        return lambda indices: json_field_scores([samples[i] for i in indices])
    return lambda indices: compute_metrics([name], [replies[i] for i in indices], [references[i] for i in indices])


def _sacrebleu_scorer(name: str, replies: list[str], references: list[str]) -> CorpusScorer:
    """BLEU or chrF of a resample from the sum of its sentences' statistics, as sacrebleu's own paired bootstrap
    (sacrebleu.significance) computes it: the same number as corpus_bleu / corpus_chrf, without re-tokenising."""
    from sacrebleu.metrics import BLEU, CHRF

    metric = BLEU() if name == "bleu" else CHRF()
    stats = np.array(metric._extract_corpus_statistics(replies, [references]))  # [samples, statistics]
    return lambda indices: {name: float(metric._compute_score_from_stats(stats[indices].sum(0)).score)}


def bootstrap_corpus_difference(after: CorpusScorer, before: CorpusScorer, n: int, *,
                                resamples: int = CORPUS_RESAMPLES, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per metric key: after's corpus score - before's on all `n` samples, with a 95% interval from both scores
    recomputed on the same resampled corpora."""
    everything = list(range(n))
    whole_after, whole_before = after(everything), before(everything)
    rng = random.Random(seed)
    drawn: dict[str, list[float]] = {key: [] for key in whole_after}
    for _ in range(resamples):
        indices = [rng.randrange(n) for _ in range(n)]
        scores_after, scores_before = after(indices), before(indices)
        for key, values in drawn.items():
            difference = scores_after.get(key, math.nan) - scores_before.get(key, math.nan)
            if math.isfinite(difference):  # a field no resampled reference holds, a metric's NaN
                values.append(difference)
    return {key: _interval(whole_after[key] - whole_before.get(key, math.nan), sorted(values))
            for key, values in drawn.items()}


def _interval(difference: float, ordered: list[float]) -> dict[str, float]:
    if not ordered:
        return {"difference": difference, "ci95_low": math.nan, "ci95_high": math.nan}
    return {"difference": difference, "ci95_low": ordered[int(0.025 * len(ordered))],
            "ci95_high": ordered[max(0, int(0.975 * len(ordered)) - 1)]}


def compare_replies(names: Sequence[str], references: Sequence[str], after: Sequence[str], before: Sequence[str],
                    wheres: Sequence[str], *, listed: int = 10) -> dict:
    """Per-metric differences (after - before) of the corpus scores with intervals, and the samples whose first
    metric moved (scored on each sample alone)."""
    differences = bootstrap_corpus_difference(corpus_scorer(names, after, references),
                                              corpus_scorer(names, before, references), len(references))
    ranking_after = per_sample_scores(names[:1], after, references)
    ranking_before = per_sample_scores(names[:1], before, references)
    primary = next(iter(ranking_after))
    moved = [
        {"where": where, "reference": ref, "before": b, "after": a, "change": sa - sb}
        for where, ref, a, b, sa, sb in zip(wheres, references, after, before, ranking_after[primary],
                                            ranking_before[primary], strict=True)
        if sa != sb
    ]
    return {
        "differences": differences,
        "ranked_by": primary,
        "better": sorted((m for m in moved if m["change"] > 0), key=lambda m: -m["change"])[:listed],
        "worse": sorted((m for m in moved if m["change"] < 0), key=lambda m: m["change"])[:listed],
    }
