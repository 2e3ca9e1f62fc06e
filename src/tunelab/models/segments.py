"""Where each sample of a padding-free batch lies, for attention one sample at a time (models/attention.py's
matmul path): samples laid out as slots, a shared prefix's keys and values copied into the slots of the samples
that continue it, and the rearrangements in and out of slots whose backward gathers instead of scattering."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Slots:
    """Tokens laid out as slots [count, length] for attention one segment at a time."""

    gather: torch.Tensor
    """[count * length] flat token index of each slot (pad slots read token 0)."""
    scatter: torch.Tensor
    """[rows * width] the slot that holds each token itself (not a copy)."""
    real: torch.Tensor
    """[count * length] float32 1.0 where a slot holds a token itself, 0.0 for pad slots and copies."""
    count: int
    length: int
    copy_slots: torch.Tensor | None = None
    """[copies] slots holding a copy of another segment's token (keys and values of a shared prefix), and"""
    copied_tokens: torch.Tensor | None = None
    """[copies] that token: gradients in those slots are summed into it. None: no copies."""


@dataclass(frozen=True)
class Segments:
    """Where each sample of a padding-free (or packed) batch lies, for attention one sample at a time.

    Samples are laid out as slots [count, length] (padded to the longest sample), so attention costs what it
    costs on a padded batch while every other layer runs on real tokens only. A sample may continue another's
    leading tokens instead of holding them (a shared prefix, data/batching.py's shared_layout: a template's
    system prompt, a pair's prompt): its query slot holds its own tokens, its key/value slot the prefix's keys
    and values, then its own. When that is cheaper, the sample holding the prefix is split in two segments, the
    prefix and the rest, so that no query slot is as long as prefix + reply (the main job: 9 x 86 query rows
    against 8 x 131)."""

    queries: Slots
    keys: Slots
    """Keys' and values' slots [count, key length]: the same segments as the queries', each preceded by the
    prefix it continues."""
    mask: torch.Tensor
    """[count, 1, length, key length] additive float32 mask: causal, pad slots never keys."""


def segments_from_positions(position_ids: torch.Tensor) -> Segments:
    """A sample starts wherever position ids do not count on from the previous token (collate's packed layout,
    padding included as its own sample). A sample starting at position 0 holds all its tokens; one starting at
    p > 0 continues the first p tokens of the latest sample before it that started at 0."""
    flat = position_ids.reshape(-1)
    follows = torch.zeros_like(flat, dtype=torch.bool)
    follows[1:] = flat[1:] == flat[:-1] + 1
    starts = (~follows).nonzero().squeeze(1)
    offsets = flat[starts]  # [count]: 0, or how many leading tokens the sample continues
    lengths = torch.diff(starts, append=starts.new_tensor([flat.numel()]))
    index = torch.arange(starts.numel(), device=flat.device)
    holder = torch.cummax(torch.where(offsets == 0, index, 0), dim=0).values  # whose tokens a sample continues
    if bool((offsets > lengths[holder]).any()) or int(offsets[0]) != 0:
        raise ValueError("a sample continues more leading tokens than the sample it shares them with holds")
    prefix_start, prefix_length = starts[holder], offsets  # the keys a segment reads before its own tokens
    split = _split_points(offsets, holder, lengths)
    if split is not None:  # holders of a prefix become two segments: the prefix, then the rest reading it
        cut = split > 0
        starts = torch.cat([starts, starts[cut] + split[cut]])
        prefix_start = torch.cat([prefix_start, starts[:len(cut)][cut]])
        prefix_length = torch.cat([prefix_length, split[cut]])
        lengths = torch.cat([torch.where(cut, split, lengths), (lengths - split)[cut]])
    return _segments(starts, lengths, prefix_start, prefix_length, flat.numel())


def _split_points(offsets: torch.Tensor, holder: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor | None:
    """[count]: where to split each sample (0: not), or None when splitting would not shrink the query slots.
    A holder splits at its sharers' offset when they all share the same number of its tokens."""
    sharing = offsets > 0
    if not bool(sharing.any()):
        return None
    split = torch.zeros_like(offsets).scatter_reduce_(0, holder[sharing], offsets[sharing], "amax")
    least = torch.full_like(offsets, int(offsets.max())).scatter_reduce_(0, holder[sharing], offsets[sharing], "amin")
    split = torch.where(split == least, split, 0)
    whole = int(lengths.max()) * len(offsets)
    own = torch.where(sharing, lengths, lengths - split)
    cut = int((split > 0).sum())
    pieces = max(int(own.max()), int(split.max())) * (len(offsets) + cut)
    return split if cut and pieces < whole else None


def _segments(starts: torch.Tensor, lengths: torch.Tensor, prefix_start: torch.Tensor, prefix_length: torch.Tensor,
              tokens: int) -> Segments:
    """Segments whose queries are tokens starts..starts + lengths and whose keys are prefix_length tokens from
    prefix_start, then those."""
    device = starts.device
    count = int(starts.numel())
    length = int(lengths.max())
    key_length = int((prefix_length + lengths).max())
    queries = _slots(starts, lengths, length, tokens)
    slot = torch.arange(key_length, device=device)[None, :]
    key_valid = slot < (prefix_length + lengths)[:, None]
    keys = queries  # nothing shared: keys and values sit in the queries' slots
    if bool(prefix_length.any()):
        copy = slot < prefix_length[:, None]
        gather = torch.where(copy, prefix_start[:, None] + slot, starts[:, None] + slot - prefix_length[:, None])
        gather = torch.where(key_valid, gather, 0).reshape(-1)
        owner = (~copy & key_valid).reshape(-1)
        copies = copy.reshape(-1).nonzero().squeeze(1)
        keys = Slots(gather, _holding_slots(gather, owner, tokens), owner.float(), count, key_length, copies,
                     gather[copies])
    row = torch.arange(length, device=device)[:, None]
    allowed = (slot <= prefix_length[:, None, None] + row) & key_valid[:, None, :]  # [count, length, key_length]
    mask = torch.zeros(allowed.shape, dtype=torch.float32, device=device)
    mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)
    return Segments(queries, keys, mask[:, None])


def _slots(starts: torch.Tensor, lengths: torch.Tensor, length: int, tokens: int) -> Slots:
    """Each segment's own tokens in its slot, padded to `length`."""
    slot = torch.arange(length, device=starts.device)[None, :]
    valid = slot < lengths[:, None]
    gather = torch.where(valid, starts[:, None] + slot, 0).reshape(-1)
    flat_valid = valid.reshape(-1)
    return Slots(gather, _holding_slots(gather, flat_valid, tokens), flat_valid.float(), int(starts.numel()), length)


def _holding_slots(gather: torch.Tensor, holds: torch.Tensor, tokens: int) -> torch.Tensor:
    """[tokens] the slot that holds each token, from the slots' token indices and which slots hold theirs."""
    scatter = torch.empty(tokens, dtype=torch.long, device=gather.device)
    scatter[gather[holds]] = holds.nonzero().squeeze(1)
    return scatter


@torch.library.custom_op("tunelab::add_copies", mutates_args=())
def add_copies(result: torch.Tensor, grad: torch.Tensor, copy_slots: torch.Tensor,
               copied_tokens: torch.Tensor) -> torch.Tensor:
    """`result` with `grad`'s rows `copy_slots` added into its rows `copied_tokens`, in float32, rounded once.
    An op of its own so that compiled graphs call ATen's index_add: inductor's CPU code runs an index_add as a
    loop of atomic adds (35 ms of a 1.5 s compiled LoRA step on the default model, AMD EPYC), and a gather of
    each token's copies summed instead was vectorised over the few copies (21 ms)."""
    summed = result.to(torch.float32, copy=True).index_add_(0, copied_tokens, grad.index_select(0, copy_slots).float())
    return summed.to(result.dtype)


@add_copies.register_fake
def _(result, grad, copy_slots, copied_tokens):
    return torch.empty_like(result)


class _Rearrange(torch.autograd.Function):
    """`source.index_select(0, index)` whose gradient is gathered back by `inverse` (times `keep`, when given)
    instead of index_select's own backward, an index_add into zeros: compiled by inductor on CPU that is a loop of
    atomic adds, 63 ms of a 2.2 s LoRA step on the default model (AMD EPYC, 2 cores). Exact where every row of the
    result that `inverse` does not read has a zero gradient, as in attention's slots (see to_slots), except the
    rows `copy_slots` names, whose gradients are added to the `copied_tokens` they copy (keys and values of a
    shared prefix), in float32."""

    @staticmethod
    def forward(ctx, source, index, inverse, keep, copy_slots=None, copied_tokens=None):
        ctx.save_for_backward(inverse, keep, copy_slots, copied_tokens)
        return source.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        inverse, keep, copy_slots, copied_tokens = ctx.saved_tensors
        result = grad.index_select(0, inverse)
        if copy_slots is not None:  # summed in float32 and rounded once, as a matmul over the copies would
            result = add_copies(result, grad, copy_slots, copied_tokens)
        if keep is not None:
            result = result * keep.to(result.dtype).view(-1, *[1] * (result.dim() - 1))
        return result, None, None, None, None, None


def to_slots(states: torch.Tensor, slots: Slots) -> torch.Tensor:
    """[rows, heads, width, dim] -> [count, heads, length, dim]. Pad slots copy token 0 and carry no gradient (as
    keys they are masked out, as queries their outputs are never read: from_slots), so the backward gathers each
    token's gradient from the slot that holds it, plus (keys and values) those of its copies."""
    rows, heads, width, dim = states.shape
    flat = states.transpose(1, 2).reshape(rows * width, heads, dim)
    laid = _Rearrange.apply(flat, slots.gather, slots.scatter, None, slots.copy_slots, slots.copied_tokens)
    return laid.view(slots.count, slots.length, heads, dim).transpose(1, 2)


def from_slots(output: torch.Tensor, slots: Slots, rows: int, width: int) -> torch.Tensor:
    """[count, heads, length, dim] -> [rows, width, heads, dim]; pad slots get a zero gradient."""
    count, heads, length, dim = output.shape
    flat = output.transpose(1, 2).reshape(count * length, heads, dim)
    return _Rearrange.apply(flat, slots.scatter, slots.gather, slots.real).view(rows, width, heads, dim)
