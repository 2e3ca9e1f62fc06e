"""Attention for training on CPU: plain matmuls with float32 scores (`train.attention: matmul`); and for
decoding, a single query's attention by matmuls (`decode_attention`).

PyTorch's CPU flash-attention kernel (what `sdpa` picks) has a slow backward at the short lengths of
instruction data: on the default model, batch 8 x ~140 tokens, it took a fifth of a LoRA step, and two
matmuls and a softmax cut the step by 12-20%. The B x heads x T x T probabilities kept for backward grow with
the square of the length, so `auto` takes this path only while they stay small (see training_attention).
Scores are computed and normalised in float32 (bf16 scores cost 0.5% of the loss in a test against float32;
these cost 0.2%, like sdpa's).

Training batches on this path are padding-free (train/loop.py): the samples of a micro-batch sit back to back
in one row, and attention lays each out in its own slot (Segments), so only attention sees padding. On the
default model (batch 8, ~10% padding) that made LoRA steps 12% faster, with the same loss to the last bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from tunelab.models.varlen import VARLEN, boundaries_from_positions, varlen_attention

MATMUL = "tunelab_matmul"
DECODE = "tunelab_decode"


class _MatmulAttention(torch.autograd.Function):
    """softmax(Q K^T * scaling + mask) V with float32 scores, keeping only the probabilities in V's dtype
    (bf16 under autocast) for backward: a third of what autograd would keep (float32 softmax output plus
    its bf16 copy), which is what makes this path affordable at all.

    Queries [B, heads, T, D] attend to keys and values [B, kv_heads, T, D] as they are: the query heads that
    share a key/value head are one matrix of `heads // kv_heads * T` rows against it (heads are grouped
    kv-head-major, as transformers' repeat_kv orders them), so keys and values are never copied per query head
    and their gradients come out of the matmuls already summed over the group."""

    @staticmethod
    def forward(ctx, query, key, value, mask, scaling):
        batch, heads, length, dim = query.shape
        kv_heads = key.shape[1]
        groups = heads // kv_heads
        with torch.autocast(query.device.type, enabled=False):
            grouped = query.float().reshape(batch, kv_heads, groups * length, dim)
            scores = torch.matmul(grouped, key.float().transpose(2, 3)).mul_(scaling)
            if mask is not None:  # [B or 1, 1, T, keys], the same for every head of a group
                # Sizes spelled out: with a -1 here torch.compile's softmax loop indexed through symbolic
                # divisions, 1.9 s of a 2 s LoRA step.
                per_head = scores.view(batch, kv_heads, groups, length, key.shape[2])
                scores = (per_head + mask[:, :, None]).view(scores.shape)
            probs = torch.softmax(scores, dim=-1).to(value.dtype)  # [B, kv_heads, groups * T, keys]
            output = torch.matmul(probs, value)
        ctx.save_for_backward(query, key, value, probs)
        ctx.scaling = scaling
        return output.view(batch, heads, length, value.shape[-1])

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, probs = ctx.saved_tensors
        batch, heads, length, dim = query.shape
        kv_heads = key.shape[1]
        groups = heads // kv_heads
        with torch.autocast(query.device.type, enabled=False):
            grad_output = grad_output.to(value.dtype).reshape(batch, kv_heads, groups * length, value.shape[-1])
            grad_value = torch.matmul(probs.transpose(2, 3), grad_output)
            grad_probs = torch.matmul(grad_output, value.transpose(2, 3))
            # softmax's backward, p * (g - sum(g * p)), as one kernel (float32 inside, rounded once): on bf16
            # [8, 9, 131, 131] 0.4 ms against 9.2 op by op in float32, a LoRA step 0.983x eager (AMD EPYC, 2 cores)
            grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype).mul_(ctx.scaling)
            grad_query = torch.matmul(grad_scores, key.to(value.dtype)).view(query.shape).to(query.dtype)
            grouped = query.to(value.dtype).reshape(batch, kv_heads, groups * length, dim)
            grad_key = torch.matmul(grad_scores.transpose(2, 3), grouped).to(key.dtype)
        return grad_query, grad_key, grad_value, None, None


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
    result that `inverse` does not read has a zero gradient, as in attention's slots (see _to_slots), except the
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


def _to_slots(states: torch.Tensor, slots: Slots) -> torch.Tensor:
    """[rows, heads, width, dim] -> [count, heads, length, dim]. Pad slots copy token 0 and carry no gradient (as
    keys they are masked out, as queries their outputs are never read: _from_slots), so the backward gathers each
    token's gradient from the slot that holds it, plus (keys and values) those of its copies."""
    rows, heads, width, dim = states.shape
    flat = states.transpose(1, 2).reshape(rows * width, heads, dim)
    laid = _Rearrange.apply(flat, slots.gather, slots.scatter, None, slots.copy_slots, slots.copied_tokens)
    return laid.view(slots.count, slots.length, heads, dim).transpose(1, 2)


def _from_slots(output: torch.Tensor, slots: Slots, rows: int, width: int) -> torch.Tensor:
    """[count, heads, length, dim] -> [rows, width, heads, dim]; pad slots get a zero gradient."""
    count, heads, length, dim = output.shape
    flat = output.transpose(1, 2).reshape(count * length, heads, dim)
    return _Rearrange.apply(flat, slots.scatter, slots.gather, slots.real).view(rows, width, heads, dim)


def matmul_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' attention-function signature: [B, H, T, D] inputs, [B, T, H, D] output.

    With `tunelab_segments` (training batches, see segment_inputs) each sample attends within itself, laid out
    in its own slot; otherwise the 4D mask transformers built decides."""
    if dropout and module.training:
        raise ValueError("the matmul attention path has no attention dropout; set train.attention: sdpa")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"{query.shape[1]} query heads cannot share {key.shape[1]} key/value heads")
    segments = kwargs.get("tunelab_segments")
    if segments is not None:
        rows, width = query.shape[0], query.shape[2]
        query = _to_slots(query, segments.queries)
        key, value = (_to_slots(states, segments.keys) for states in (key, value))
        attention_mask = segments.mask
    if torch.is_autocast_enabled(query.device.type):
        value = value.to(torch.get_autocast_dtype(query.device.type))
    output = _MatmulAttention.apply(query, key, value, attention_mask, scaling)
    if segments is not None:
        return _from_slots(output, segments.queries, rows, width), None
    return output.transpose(1, 2).contiguous(), None


def decode_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention for decoding (`tunelab_decode`): one new token per row by two matmuls over the key/value heads
    (no repeated keys), on CPU; prompts, and every query on other devices, by transformers' sdpa. PyTorch's CPU
    flash kernel is slow for a single query: on the default model (60 rows, ~130 cached positions, bf16, AMD EPYC)
    1.24 ms a layer against 0.90 (0.27 of them the query-key matmul, on infer/kv_cache.py's transposed keys)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, dim = query.shape
    plain = (length == 1 and query.device.type == "cpu" and not dropout
             and all(kwargs.get(k) is None for k in ("softcap", "position_bias", "s_aux")))
    if not plain or heads % key.shape[1]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return single_query_attention(query, key, value, scaling, attention_mask).reshape(batch, 1, heads, -1), None


def single_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                           mask: torch.Tensor | None = None) -> torch.Tensor:
    """[batch, heads, dim]: one query a row ([batch, heads, 1, dim]) over keys and values [batch, kv_heads,
    length, dim] by two matmuls over the key/value heads (keys are not repeated per query head), scores and
    softmax in float32. `mask` [batch, 1, 1, length]: bool (True attends) or added to the scores."""
    batch, heads, _, dim = query.shape
    grouped = query.reshape(batch, key.shape[1], heads // key.shape[1], dim)
    scores = torch.matmul(grouped, key.transpose(2, 3)).float().mul_(scaling)
    if mask is not None:
        scores = scores.masked_fill_(~mask, float("-inf")) if mask.dtype == torch.bool else scores.add_(mask)
    output = torch.matmul(torch.softmax(scores, dim=-1).to(value.dtype), value)
    return output.reshape(batch, heads, value.shape[-1])


def segment_inputs(model, batch: dict[str, torch.Tensor]) -> dict:
    """Extra forward arguments for a training batch laid out with position ids (padding-free or packed): its
    Segments for tunelab's matmul attention, its sample boundaries for the varlen one."""
    implementation = getattr(base_config(model), "_attn_implementation", None)
    if "position_ids" not in batch or implementation not in (MATMUL, VARLEN):
        return {}
    if implementation == VARLEN:
        return {"tunelab_boundaries": boundaries_from_positions(batch["position_ids"])}
    return {"tunelab_segments": segments_from_positions(batch["position_ids"])}


def register() -> None:
    """Make `tunelab_matmul` (with an explicit 4D mask, like eager) and `tunelab_decode` (sdpa's masks) names
    transformers models accept."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    AttentionInterface.register(MATMUL, matmul_attention)
    AttentionMaskInterface.register(MATMUL, eager_mask)
    AttentionInterface.register(DECODE, decode_attention)
    AttentionMaskInterface.register(DECODE, sdpa_mask)
    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, sdpa_mask)  # for padded batches (eval, generation): sdpa decides


MATMUL_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
"""Models whose attention is plain scaled dot-product (no soft-capping, sinks or attention dropout by default)."""
MATMUL_PROBS_BUDGET = 512 * 2**20
"""Bytes of bf16 probabilities the matmul path may keep for backward, over all layers, before auto declines."""


def training_attention(
    setting: str, device: torch.device, precision: str, max_length: int, model, batch_size: int = 8
) -> str | None:
    """The attention implementation training should use, or None to keep the model's own.

    `auto` takes the matmul path on CPU for llama-style models when the probabilities it keeps for backward
    (batch x heads x max_length^2 per layer) fit MATMUL_PROBS_BUDGET: on the default model (batch 8, rows of
    ~140 tokens, two threads, bf16), alternating with sdpa step by step in one process, a LoRA step took
    2.49 s against 2.92 s; PyTorch's CPU flash-attention backward spends ~0.75 s a step at these lengths.
    Long rows keep the model's own (flash attention stores no T x T matrix)."""
    if setting == "sdpa":
        return "sdpa"
    if setting == "matmul":
        return MATMUL
    if setting == "varlen":
        return VARLEN
    config = base_config(model)
    if device.type != "cpu" or config is None or getattr(config, "model_type", None) not in MATMUL_MODEL_TYPES:
        return None
    if getattr(config, "attention_dropout", 0.0) or getattr(config, "attn_logit_softcapping", None):
        return None
    layers = getattr(config, "num_hidden_layers", 0)
    heads = getattr(config, "num_attention_heads", 0)
    element = 2 if precision == "bf16" else 4
    kept = batch_size * heads * max_length**2 * element * layers
    return MATMUL if 0 < kept <= MATMUL_PROBS_BUDGET else None


def shares_prefixes(model, attention: str | None, enabled: bool) -> bool:
    """Whether padding-free training batches should hold the prefix their samples share once (data/batching.py's
    shared_layout): only this module's matmul attention reads that layout (Segments), and not while dropout draws
    masks (LoRA's or the model's): a prefix computed once would share one mask among the samples that read it."""
    return enabled and attention == MATMUL and not any(
        isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def avoid_per_shape_attention_plans(device: torch.device) -> None:
    """Keep PyTorch's scaled_dot_product_attention off cuDNN on CUDA, for the whole process.

    cuDNN's attention builds an execution plan for every new shape, and fine-tuning (each batch padded to its own
    longest row) and generation (a longer cache every token) meet a new shape nearly every call. On an H200 (torch
    2.11, cuDNN 9.19, bench/sdpa_backends.py) a ~1B Llama's attention forward + backward took 139 ms at a new
    length against 0.4 ms with the flash kernel, which PyTorch otherwise ranks below cuDNN there. At a shape it
    has seen, cuDNN's was 0.27 ms against flash's 0.33, a small loss for packed (fixed-shape) batches against a
    plan per shape for all others. Flash, memory-efficient and math kernels remain."""
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


@contextmanager
def attention_implementation(model, name: str | None) -> Iterator[None]:
    """Run a block with `name` as the model's attention (and mask) implementation, then put the old one back,
    so evaluation and generation after training use the same path as a reloaded model."""
    config = base_config(model)
    if name is None or config is None:
        yield
        return
    if name in (MATMUL, DECODE, VARLEN):
        register()
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def base_config(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "config", None)
