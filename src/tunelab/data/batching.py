"""Batches: which samples go together (seeded per epoch, so a resumed run sees the same order), padding
to the longest sample of a batch, or packing several samples into one row with attention kept inside
each sample.

Every batch carries `targets`: the next-token labels already shifted per sample (targets[t] is what
position t must predict, -100 for no loss), so a packed row never learns across a sample boundary.

A padding-free micro-batch whose samples all begin with the same untrained tokens (a chat template's system
prompt, a fixed instruction) can hold those tokens once (collate_shared_prefix): every layer but attention then
runs on (samples - 1) x prefix fewer tokens, 32% of the main job's, with the same loss and gradients.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch

from tunelab.data.template import IGNORE_INDEX, TokenizedSample


class BatchPlan:
    """How one epoch is cut into batches: each batch is a list of rows, each row a list of sample ids.

    Kept as flat arrays (sample ids row after row, where each row starts, where each batch starts): an epoch of
    millions of samples would otherwise be millions of small Python lists. `batches` reads like the lists."""

    def __init__(self, ids: np.ndarray, row_starts: np.ndarray, batch_starts: np.ndarray) -> None:
        self.ids = ids
        self.row_starts = row_starts
        self.batch_starts = batch_starts
        self.batches = _Batches(self)

    def row(self, index: int) -> list[int]:
        return self.ids[self.row_starts[index] : self.row_starts[index + 1]].tolist()


class _Batches(Sequence[list[list[int]]]):
    def __init__(self, plan: BatchPlan) -> None:
        self._plan = plan

    def __len__(self) -> int:
        return len(self._plan.batch_starts) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        starts = self._plan.batch_starts
        return [self._plan.row(r) for r in range(int(starts[index]), int(starts[index + 1]))]

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and list(self) == list(other)

    __hash__ = None


def sample_lengths(samples: Sequence[TokenizedSample]) -> np.ndarray:
    """Token count of every sample: from the `lengths` array of a TokenizedView (no row is built), else counted."""
    lengths = getattr(samples, "lengths", None)
    if lengths is not None:
        return np.asarray(lengths, np.int64)
    return np.fromiter((len(s.input_ids) for s in samples), np.int64, count=len(samples))


def plan_epoch(
    samples: Sequence[TokenizedSample],
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    group_by_length: bool = False,
    packing: bool = False,
    max_length: int = 512,
) -> BatchPlan:
    """The batches of one epoch. Deterministic in (seed, epoch); needs only the samples' lengths."""
    lengths = sample_lengths(samples)
    rng = random.Random(seed * 1000 + epoch)
    shuffled = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(shuffled)
    order = np.asarray(shuffled, np.int64)
    del shuffled
    if packing:
        row_of = first_fit(lengths[order].tolist(), max_length)
        ids = order[np.argsort(row_of, kind="stable")]  # rows in creation order, samples in packing order
        counts = np.bincount(row_of, minlength=int(row_of.max()) + 1 if len(row_of) else 0)
    else:
        ids = _group_by_length(order, lengths, batch_size) if group_by_length else order
        counts = np.ones(len(ids), np.int64)
    row_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    num_rows = len(row_starts) - 1
    batch_starts = np.append(np.arange(0, num_rows, batch_size, dtype=np.int64), num_rows)
    if group_by_length and shuffle and not packing:  # whole batches shuffled (rows are single samples here)
        batch_order = list(range(len(batch_starts) - 1))
        rng.shuffle(batch_order)
        order_of = np.asarray(batch_order, np.int64)
        new_place = np.empty(len(order_of), np.int64)
        new_place[order_of] = np.arange(len(order_of))
        ids = ids[np.argsort(new_place[np.arange(len(ids)) // batch_size], kind="stable")]
        batch_starts = np.concatenate([[0], np.cumsum(np.diff(batch_starts)[order_of])]).astype(np.int64)
    return BatchPlan(ids, row_starts, batch_starts)


def _group_by_length(order: np.ndarray, lengths: np.ndarray, batch_size: int) -> np.ndarray:
    """Sort by length within windows of 50 batches, so batches hold similar lengths but stay random."""
    window = batch_size * 50
    pieces = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        pieces.append(chunk[np.argsort(-lengths[chunk], kind="stable")])  # longest first, ties in order
    return np.concatenate(pieces) if pieces else order


def pack_samples(lengths: list[int], max_length: int) -> list[list[int]]:
    """First-fit packing of samples (by position in `lengths`) into rows of at most max_length tokens."""
    rows: list[list[int]] = []
    for index, row in enumerate(first_fit(list(lengths), max_length).tolist()):
        if row == len(rows):
            rows.append([])
        rows[row].append(index)
    return rows


def first_fit(lengths: list[int], capacity: int) -> np.ndarray:
    """The row each sample goes to: the first row (in creation order) with room for it, else a new one.

    A max-tree over the free space of rows (rows not yet opened count as empty) finds that row in O(log n)
    rather than scanning every row: the same rows as the plain scan, in seconds for millions of samples."""
    size = 1
    while size < len(lengths):
        size *= 2
    tree = [capacity] * (2 * size)
    row_of = [0] * len(lengths)
    for index, length in enumerate(lengths):
        need = length if length < capacity else capacity
        node = 1
        while node < size:  # leftmost leaf with free >= need
            node += node
            if tree[node] < need:
                node += 1
        row_of[index] = node - size
        tree[node] -= need
        while node > 1:
            parent = node >> 1
            left, right = tree[parent + parent], tree[parent + parent + 1]
            best = left if left > right else right
            if tree[parent] == best:
                break
            tree[parent] = best
            node = parent
    return np.asarray(row_of, np.int64)


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


MIN_SHARED_PREFIX = 8
"""Fewest leading tokens worth sharing: below this the saved compute is lost in attention's bookkeeping."""


def shared_prefix_length(samples: Sequence[TokenizedSample]) -> int:
    """How many leading tokens every sample shares and no sample trains on (the position before a sample's first
    trained target predicts it, so it is not shared either); each sample keeps at least one token of its own.
    0 when under MIN_SHARED_PREFIX or fewer than two samples."""
    if len(samples) < 2:
        return 0
    first = samples[0].input_ids
    limit = min(len(s.input_ids) for s in samples) - 1
    for sample in samples:
        trained = next((i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX), len(sample.labels))
        limit = min(limit, trained - 1)
    length = 0
    while length < limit and all(s.input_ids[length] == first[length] for s in samples):
        length += 1
    return length if length >= MIN_SHARED_PREFIX else 0


def collate_shared_prefix(samples: Sequence[TokenizedSample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One padding-free row of `samples` holding their shared prefix once (see shared_layout). Without a shared
    prefix: collate's padding-free row."""
    if not shared_prefix_length(samples):
        return collate([list(samples)], pad_token_id, packed=True)
    batch, _ = shared_layout([samples])
    return batch


def shared_layout(groups: Sequence[Sequence[TokenizedSample]]) -> tuple[dict[str, torch.Tensor], list[int]]:
    """One padding-free row of every group's samples, each group's shared prefix (shared_prefix_length) held
    once: the group's first sample whole, then every other without the prefix, its position ids continuing from
    the prefix's length (which is how attention, models/segments.py's Segments, knows it attends to the group's
    first sample's copy). Returns the batch (input_ids, targets, position_ids, and shared_tokens: the tokens not
    computed) and how many tokens each sample holds in the row, in order."""
    ids: list[int] = []
    targets: list[int] = []
    positions: list[int] = []
    held: list[int] = []
    shared_total = 0
    for group in groups:
        shared = shared_prefix_length(group)
        shared_total += shared * (len(group) - 1)
        for index, sample in enumerate(group):
            start = 0 if index == 0 else shared
            ids.extend(sample.input_ids[start:])
            targets.extend(shifted_targets(sample.labels)[start:])
            positions.extend(range(start, len(sample.input_ids)))
            held.append(len(sample.input_ids) - start)
    batch = {"input_ids": torch.tensor([ids]), "targets": torch.tensor([targets]),
             "position_ids": torch.tensor([positions]), "shared_tokens": torch.tensor(shared_total)}
    return batch, held
