"""Held-out evaluation of a preference objective: its loss and every metric it logs, on the eval rows. For pairs
these include `preference_accuracy` (how often the model's summed log-probability of the chosen reply is above
the rejected one's) and `logps/margins` (the mean difference): they need no reference, so the base model has
them too, and they are a preference run's before/after numbers."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tunelab.models.attention import MATMUL, attention_implementation
from tunelab.models.logprobs import sequence_logprobs
from tunelab.objectives.metrics import MetricTotals
from tunelab.objectives.pairs import collate_sequences
from tunelab.train.precision import autocast


@torch.no_grad()
def evaluate_objective(model, objective, rows: Sequence, *, pad_token_id: int, precision: str,
                       batch_size: int = 8) -> dict[str, float]:
    """eval_loss (the objective's, per pair or row) and eval_<metric> for each metric it logs. Batches are laid
    out as the objective's training batches are when it shares prompts (its share_prefix, set by a run on the
    matmul attention path: padding-free, each pair's prompt held once, under that attention), else padded."""
    if not rows:
        return {}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_total, count = 0.0, 0
    totals = MetricTotals()
    shared = bool(getattr(objective, "share_prefix", False))
    with attention_implementation(model, MATMUL if shared else None):
        for start in range(0, len(rows), batch_size):
            chunk = [[row] for row in rows[start : start + batch_size]]
            batch = {k: v.to(device) for k, v in objective.collate(chunk, pad_token_id, shared).items()}
            with autocast(precision, device):
                loss_sum, metrics = objective.loss_sum(model, batch)
            loss_total += float(loss_sum)
            count += objective.count(batch)
            totals.add(metrics)
    model.train(was_training)
    return {"eval_loss": loss_total / max(1, count), **totals.means("eval_")}


@torch.no_grad()
def pair_margins(model, pairs: Sequence, *, pad_token_id: int, precision: str, batch_size: int = 8) -> list[float]:
    """Summed log-probability of each chosen reply minus the rejected one's, under the model alone: positive
    where the model prefers the chosen reply (what `tunelab eval --metrics preference_accuracy` counts)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    margins: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        sequences = [p.chosen for p in chunk] + [p.rejected for p in chunk]
        batch = {k: v.to(device) for k, v in collate_sequences(sequences, pad_token_id, False).items()}
        with autocast(precision, device):
            sums, _ = sequence_logprobs(model, batch)
        margins += (sums[: len(chunk)] - sums[len(chunk) :]).float().tolist()
    model.train(was_training)
    return margins
