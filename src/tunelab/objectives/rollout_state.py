"""A kept rollout as checkpoint tensors and back: what GRPO's and RLOO's updates after a rollout's first one
(updates_per_rollout > 1) train on, so a resumed run reuses the very completions and old log-probabilities."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tunelab.data.template import IGNORE_INDEX, TokenizedSample
from tunelab.objectives.grpo_loss import Completion

Rollout = list[list[list[Completion]]]
"""Micro-batches of rows of one Completion each, as the loop trains them."""


def rollout_tensors(batches: Rollout, step: int, weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """The rollout of step `step` as tensors; empty when its first update never finished (the resumed run samples
    it again, from the same seed). `weights`: the loop's weight of each micro-batch (0 for a stand-in under
    --nproc), which the updates after a resume need as much as the completions."""
    flat = [c for rows in batches for row in rows for c in row]
    if any(c.old_logps is None for c in flat):
        return {}
    kept = {} if weights is None else {"micro_batch_weights": torch.tensor(list(weights), dtype=torch.float32)}
    return {
        **kept,
        "rollout_step": torch.tensor([step]),
        "micro_batch_sizes": torch.tensor([sum(len(row) for row in rows) for rows in batches]),
        "lengths": torch.tensor([len(c.sample.input_ids) for c in flat]),
        "prompt_lengths": torch.tensor([c.sample.labels.count(IGNORE_INDEX) for c in flat]),
        "input_ids": torch.tensor([t for c in flat for t in c.sample.input_ids]),
        "advantages": torch.tensor([c.advantage for c in flat], dtype=torch.float32),
        "truncated": torch.tensor([c.truncated for c in flat]),
        "old_logps": torch.tensor([v for c in flat for v in c.old_logps], dtype=torch.float32),
    }


def rollout_from_tensors(tensors: dict[str, torch.Tensor]) -> tuple[Rollout, int, list[float] | None]:
    """(the micro-batches, the rollout's step, their weights or None) from rollout_tensors' output."""
    ids = tensors["input_ids"].split(tensors["lengths"].tolist())
    completions, old_at = [], 0
    for index, (sequence, prompt_length) in enumerate(zip(ids, tensors["prompt_lengths"].tolist(), strict=True)):
        tokens = sequence.tolist()
        trained = len(tokens) - prompt_length
        completions.append(Completion(
            TokenizedSample(tokens, [IGNORE_INDEX] * prompt_length + tokens[prompt_length:], ""),
            float(tensors["advantages"][index]), bool(tensors["truncated"][index]), index,
            tensors["old_logps"][old_at : old_at + trained].tolist()))
        old_at += trained
    batches, at = [], 0
    for size in tensors["micro_batch_sizes"].tolist():
        batches.append([[c] for c in completions[at : at + size]])
        at += size
    weights = tensors.get("micro_batch_weights")
    return batches, int(tensors["rollout_step"][0]), None if weights is None else weights.tolist()
