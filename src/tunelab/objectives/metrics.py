"""What objectives log: each metric as (sum, count) per batch, added over micro-batches and evaluation batches,
and logged as sum / count."""

from __future__ import annotations

import torch

Metrics = dict[str, tuple[float, int]]
"""Each logged metric as (sum, count): the loop adds them over micro-batches and logs sum / count."""


class MetricTotals:
    """Sums and counts of logged metrics over micro-batches or eval batches; `means()` is what gets logged."""

    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = {}

    def add(self, metrics: Metrics) -> None:
        for name, (total, count) in metrics.items():
            entry = self.totals.setdefault(name, [0.0, 0])
            entry[0] += total
            entry[1] += count

    def means(self, prefix: str = "") -> dict[str, float]:
        return {prefix + name: total / count for name, (total, count) in self.totals.items() if count}


def mean_metrics(named: dict[str, torch.Tensor]) -> Metrics:
    """Per-row values as (sum, count) metrics."""
    return {name: (float(values.detach().float().sum()), int(values.numel())) for name, values in named.items()}
