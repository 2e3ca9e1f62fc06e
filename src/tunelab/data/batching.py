"""Batches: which samples go together (seeded per epoch, so a resumed run sees the same order), padding
to the longest sample of a batch, or packing several samples into one row with attention kept inside
each sample.

Every batch carries `targets`: the next-token labels already shifted per sample (targets[t] is what
position t must predict, -100 for no loss), so a packed row never learns across a sample boundary.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from tunelab.data.template import IGNORE_INDEX, TokenizedSample


@dataclass(frozen=True)
class BatchPlan:
    """How one epoch is cut into batches: each batch is a list of rows, each row a list of sample ids."""

    batches: list[list[list[int]]]


def plan_epoch(
    samples: list[TokenizedSample],
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    group_by_length: bool = False,
    packing: bool = False,
    max_length: int = 512,
) -> BatchPlan:
    """The batches of one epoch. Deterministic in (seed, epoch)."""
    rng = random.Random(seed * 1000 + epoch)
    order = list(range(len(samples)))
    if shuffle:
        rng.shuffle(order)
    if packing:
        rows = pack_samples([len(samples[i].input_ids) for i in order], max_length)
        rows = [[order[i] for i in row] for row in rows]
    else:
        if group_by_length:
            order = _group_by_length(order, samples, batch_size)
        rows = [[i] for i in order]
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    if group_by_length and shuffle and not packing:
        rng.shuffle(batches)
    return BatchPlan(batches)


def _group_by_length(order: list[int], samples: list[TokenizedSample], batch_size: int) -> list[int]:
    """Sort by length within windows of 50 batches, so batches hold similar lengths but stay random."""
    window = batch_size * 50
    grouped: list[int] = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        grouped += sorted(chunk, key=lambda i: len(samples[i].input_ids), reverse=True)
    return grouped


def pack_samples(lengths: list[int], max_length: int) -> list[list[int]]:
    """First-fit packing of samples (by position in `lengths`) into rows of at most max_length tokens."""
    rows: list[list[int]] = []
    space: list[int] = []
    for index, length in enumerate(lengths):
        length = min(length, max_length)
        for row_id, free in enumerate(space):
            if length <= free:
                rows[row_id].append(index)
                space[row_id] -= length
                break
        else:
            rows.append([index])
            space.append(max_length - length)
    return rows


def shifted_targets(labels: list[int]) -> list[int]:
    """targets[t] = labels[t + 1]; the last position of a sample predicts nothing."""
    return [*labels[1:], IGNORE_INDEX]


def collate(rows: list[list[TokenizedSample]], pad_token_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """Tensors for one batch: input_ids, targets [B, T]; attention_mask when padded, position_ids when packed.

    Packed rows get position ids that restart at 0 for each sample and no attention mask: transformers
    then confines attention to each sample (public behaviour of its masking utilities).
    """
    width = max(sum(len(s.input_ids) for s in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for sample in row:
            n = len(sample.input_ids)
            input_ids[b, at : at + n] = torch.tensor(sample.input_ids)
            targets[b, at : at + n] = torch.tensor(shifted_targets(sample.labels))
            attention[b, at : at + n] = 1
            positions[b, at : at + n] = torch.arange(n)
            at += n
        # Padding continues the position count as its own "sample" so it never joins a real one.
        positions[b, at:] = torch.arange(width - at)
    batch = {"input_ids": input_ids, "targets": targets}
    if packed:
        batch["position_ids"] = positions
    else:
        batch["attention_mask"] = attention
    return batch
