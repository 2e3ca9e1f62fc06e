"""Padding-free attention on CUDA (`train.attention: varlen`).

The samples of a micro-batch sit back to back in one row (the padding-free batches of the matmul path, or packed
rows), and PyTorch's variable-length flash attention (`torch.nn.attention.varlen`, torch 2.10+) attends within
each sample from their cumulative lengths: no layer computes padding and no T x T mask is built. Flash kernels
take bf16 or fp16 only, so the path needs bf16 training. transformers' own padding-free route
(`flash_attention_2`) needs the flash-attn package, which the GPU images we had did not hold.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch

VARLEN = "tunelab_varlen"


@dataclass(frozen=True)
class Boundaries:
    """Where each sample of a padding-free (or packed) batch starts, as flash attention's varlen kernels take it."""

    cumulative: torch.Tensor
    """[count + 1] int32: 0, end of sample 1, end of sample 2, ..., total tokens."""
    longest: int


def boundaries_from_positions(position_ids: torch.Tensor) -> Boundaries:
    """Samples start where position ids restart at 0, over the batch's rows read one after another."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().squeeze(1)
    cumulative = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    return Boundaries(cumulative, int(torch.diff(cumulative).max()))


def varlen_unavailable(device: torch.device, precision: str) -> str | None:
    """Why the varlen path cannot train on `device` in `precision`, or None."""
    if device.type != "cuda":
        return "needs a CUDA device (flash attention's variable-length kernels)"
    if precision != "bf16":
        return "needs train.precision bf16 (flash attention computes in bf16 or fp16)"
    try:
        import torch.nn.attention.varlen  # noqa: F401
    except ImportError:
        return f"needs torch 2.10 or later (torch.nn.attention.varlen), not {torch.__version__}"
    return None


def varlen_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' attention-function signature: [B, H, T, D] inputs, [B, T, H, D] output.

    With `tunelab_boundaries` (training batches, see attention.segment_inputs) every token attends to the earlier
    tokens of its own sample; without them (a batch laid out in padded rows) transformers' sdpa decides with
    the mask it built."""
    boundaries: Boundaries | None = kwargs.get("tunelab_boundaries")
    if boundaries is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout and module.training:
        raise ValueError("the varlen attention path has no attention dropout; set train.attention: sdpa")
    batch, heads, length, dim = query.shape
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else value.dtype
    query, key, value = (states.transpose(1, 2).reshape(batch * length, -1, dim).to(dtype)
                         for states in (query, key, value))
    output = _causal_varlen(query, key, value, boundaries, scaling)
    return output.view(batch, length, heads, -1), None


def _causal_varlen(query, key, value, boundaries: Boundaries, scaling: float) -> torch.Tensor:
    """varlen_attn, causal, over [tokens, heads, dim] inputs, for each signature torch has had: torch 2.10's took
    `is_causal` and no `scale` or `enable_gqa`; later ones take `window_size`, `scale` and `enable_gqa`."""
    from torch.nn.attention.varlen import varlen_attn

    accepts = _parameters(varlen_attn)
    options: dict = {}
    if "window_size" in accepts:
        options["window_size"] = (-1, 0)  # causal
    else:
        options["is_causal"] = True
    if "scale" in accepts:
        options["scale"] = scaling
    elif abs(scaling * query.shape[-1] ** 0.5 - 1) > 1e-6:  # the kernel's own scale is dim ** -0.5
        query = query * (scaling * query.shape[-1] ** 0.5)
    heads, kv_heads = query.shape[1], key.shape[1]
    if kv_heads != heads:
        if "enable_gqa" in accepts:
            options["enable_gqa"] = True
        else:  # kv-head-major, as transformers' repeat_kv orders the query heads
            key, value = (states.repeat_interleave(heads // kv_heads, dim=1) for states in (key, value))
    cumulative, longest = boundaries.cumulative, boundaries.longest
    return varlen_attn(query, key, value, cumulative, cumulative, longest, longest, **options)


@functools.cache
def _parameters(function) -> frozenset[str]:
    """The names `function` takes, read once: this runs in every layer's forward, where inspect.signature's
    ~15 us a call would add to a GPU step that already waits on the host."""
    return frozenset(inspect.signature(function).parameters)
