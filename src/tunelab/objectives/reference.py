"""Reference log-probabilities computed once, before training, by the starting model: for objectives whose
reference cannot be had by switching an adapter off (full and freeze fine-tuning), or when asked
(`objective.reference: precompute`, which also saves the reference pass in every step)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tunelab.models.logprobs import sequence_logprobs
from tunelab.objectives.pairs import collate_sequences
from tunelab.train.precision import autocast


@torch.no_grad()
def precompute_reference(model, objective, rows: Sequence, *, pad_token_id: int, precision: str,
                         batch_size: int) -> None:
    """Store on every row its two sequences' summed log-probabilities under `model` as it is now
    (`row.reference_logps`). Rows repeated by a weighted mix are scored once."""
    distinct = list({id(row): row for row in rows}.values())
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for start in range(0, len(distinct), batch_size):
        chunk = distinct[start : start + batch_size]
        pairs = [objective.sequences(row) for row in chunk]
        sequences = [first for first, _ in pairs] + [second for _, second in pairs]
        batch = {k: v.to(device) for k, v in collate_sequences(sequences, pad_token_id, False).items()}
        with autocast(precision, device):
            sums, _ = sequence_logprobs(model, batch)
        values = sums.float().tolist()
        for index, row in enumerate(chunk):
            row.reference_logps = (values[index], values[len(chunk) + index])
    model.train(was_training)
