"""Attention for training on CPU: plain matmuls with float32 scores (`train.attention: matmul`); and for
decoding, a single query's attention by matmuls (`decode_attention`).

PyTorch's CPU flash-attention kernel (what `sdpa` picks) has a slow backward at the short lengths of
instruction data: on the default model, batch 8 x ~140 tokens, it took a fifth of a LoRA step, and two
matmuls and a softmax cut the step by 12-20%. The B x heads x T x T probabilities kept for backward grow with
the square of the length, so `auto` takes this path only while they stay small (see training_attention).
Scores are computed and normalised in float32 (bf16 scores cost 0.5% of the loss in a test against float32;
these cost 0.2%, like sdpa's).

Training batches on this path are padding-free (train/loop.py): the samples of a micro-batch sit back to back
in one row, and attention lays each out in its own slot (models/segments.py), so only attention sees padding.
On the default model (batch 8, ~10% padding) that made LoRA steps 12% faster, with the same loss to the last bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from tunelab.errors import ConfigError
from tunelab.models.segments import from_slots, segments_from_positions, to_slots
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
        query = to_slots(query, segments.queries)
        key, value = (to_slots(states, segments.keys) for states in (key, value))
        attention_mask = segments.mask
    if torch.is_autocast_enabled(query.device.type):
        value = value.to(torch.get_autocast_dtype(query.device.type))
    output = _MatmulAttention.apply(query, key, value, attention_mask, scaling)
    if segments is not None:
        return from_slots(output, segments.queries, rows, width), None
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
    config = base_config(model)
    window = _binding_window(config, max_length)
    if setting in ("matmul", "varlen") and window:
        raise ConfigError(f"{setting} attention does not apply the model's sliding window of {window} positions, "
                          f"which rows of up to {max_length} tokens reach; use auto or sdpa",
                          where="train.attention")
    if setting == "sdpa":
        return "sdpa"
    if setting == "matmul":
        return MATMUL
    if setting == "varlen":
        return VARLEN
    if device.type != "cpu" or config is None or getattr(config, "model_type", None) not in MATMUL_MODEL_TYPES:
        return None
    if window:  # transformers' masks apply it; the matmul path's segments are causal only
        return None
    if getattr(config, "attention_dropout", 0.0) or getattr(config, "attn_logit_softcapping", None):
        return None
    layers = getattr(config, "num_hidden_layers", 0)
    heads = getattr(config, "num_attention_heads", 0)
    element = 2 if precision == "bf16" else 4
    kept = batch_size * heads * max_length**2 * element * layers
    return MATMUL if 0 < kept <= MATMUL_PROBS_BUDGET else None


def _binding_window(config, max_length: int) -> int | None:
    """The model's sliding window where rows of `max_length` tokens are longer than it, else None."""
    from tunelab.infer.kv_cache import windowed

    window = getattr(config, "sliding_window", None) if config is not None else None
    return window if window and max_length > window and windowed(config) else None


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
