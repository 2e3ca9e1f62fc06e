"""Before/after on the same samples: per-metric difference with a paired bootstrap confidence interval,
and the samples that got better or worse."""

from __future__ import annotations

import random
from collections.abc import Sequence

from tunelab.eval.metrics import compute_metrics


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


def compare_replies(names: Sequence[str], references: Sequence[str], after: Sequence[str], before: Sequence[str],
                    wheres: Sequence[str], *, listed: int = 10) -> dict:
    """Per-metric differences (after - before) with intervals, and the samples whose first metric moved."""
    scores_after = per_sample_scores(names, after, references)
    scores_before = per_sample_scores(names, before, references)
    differences = {key: bootstrap_difference(scores_after[key], scores_before[key]) for key in scores_after}
    primary = next(iter(scores_after))
    moved = [
        {"where": where, "reference": ref, "before": b, "after": a, "change": sa - sb}
        for where, ref, a, b, sa, sb in zip(wheres, references, after, before, scores_after[primary],
                                            scores_before[primary], strict=True)
        if sa != sb
    ]
    return {
        "differences": differences,
        "ranked_by": primary,
        "better": sorted((m for m in moved if m["change"] > 0), key=lambda m: -m["change"])[:listed],
        "worse": sorted((m for m in moved if m["change"] < 0), key=lambda m: m["change"])[:listed],
    }
