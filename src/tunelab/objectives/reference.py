"""Reference log-probabilities computed once, before training, by the starting model: for objectives whose
reference cannot be had by switching an adapter off (full and freeze fine-tuning), or when asked
(`objective.reference: precompute`, which also saves the reference pass in every step)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch

from tunelab.data.row_table import RowView
from tunelab.models.attention import MATMUL, attention_implementation
from tunelab.models.logprobs import sequence_logprobs
from tunelab.objectives.pairs import collate_sequences, collate_shared_prompts
from tunelab.train.precision import autocast


@torch.no_grad()
def precompute_reference(model, objective, collections: Sequence[Sequence], *, pad_token_id: int, precision: str,
                         batch_size: int) -> None:
    """Give every row of each collection (a RowView, or a list of rows) its two sequences' summed
    log-probabilities under `model` as it is now (`row.reference_logps` from then on). Rows repeated by a
    weighted mix are scored once."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    shared = bool(getattr(objective, "share_prefix", False))  # a run on the matmul path: as training lays it out
    with attention_implementation(model, MATMUL if shared else None):
        for rows in collections:
            distinct = _distinct(rows)
            for start in range(0, len(distinct), batch_size):
                chunk = distinct[start : start + batch_size]
                pairs = [objective.sequences(row) for row, _ in chunk]
                firsts, seconds = [first for first, _ in pairs], [second for _, second in pairs]
                tensors = (collate_shared_prompts(firsts, seconds) if shared
                           else collate_sequences(firsts + seconds, pad_token_id, False))
                batch = {k: v.to(device) for k, v in tensors.items()}
                with autocast(precision, device):
                    sums, _ = sequence_logprobs(model, batch)
                values = sums.float().tolist()
                for index, (_, store) in enumerate(chunk):
                    store((values[index], values[len(chunk) + index]))
    model.train(was_training)


def _distinct(rows: Sequence) -> list[tuple[object, Callable[[tuple[float, float]], None]]]:
    """(row, how to keep its reference values) for each distinct row: in a RowView the view keeps them (its rows
    are built on every access); a listed row keeps them itself."""
    if isinstance(rows, RowView):
        return [(rows[int(p)], partial(rows.set_reference, int(p))) for p in rows.distinct_positions()]
    unique = list({id(row): row for row in rows}.values())
    return [(row, partial(setattr, row, "reference_logps")) for row in unique]
