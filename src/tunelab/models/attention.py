"""Attention for training on CPU: plain matmuls with float32 scores.

PyTorch's CPU flash-attention kernel (what `sdpa` picks) has a slow backward at the short lengths of
instruction data: on the default model, batch 8 x ~140 tokens, it took a fifth of each LoRA step. Two
matmuls and a softmax do the same work faster there (measured 15-20% less step time; see bench/README.md),
at the price of holding the B x heads x T x T probabilities for backward, so `auto` uses them only for
short rows. Scores are computed and normalised in float32 (bf16 scores cost 0.5% of the loss in a test
against float32; these cost 0.2%, like sdpa's).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

MATMUL = "tunelab_matmul"
SHORT_ROWS = 256
"""Longest row for which `auto` picks the matmul path (its T x T probabilities stay small)."""
PLAIN_ATTENTION_MODELS = {"llama", "mistral", "qwen2", "qwen3"}
"""Architectures whose attention is exactly softmax(QK^T * scaling + mask) V (no soft-capping, sinks or
custom scaling), so the matmul path computes what their own attention computes."""


def matmul_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' attention-function signature: [B, H, T, D] inputs, [B, T, H, D] output."""
    from transformers.models.llama.modeling_llama import repeat_kv

    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    with torch.autocast(query.device.type, enabled=False):
        scores = torch.matmul(query.float(), key.float().transpose(2, 3)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = torch.softmax(scores, dim=-1)
    if dropout and module.training:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    output = torch.matmul(probs.to(value.dtype), value)
    return output.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make `tunelab_matmul` a name transformers models accept (with an explicit 4D mask, like eager)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(MATMUL, matmul_attention)
    AttentionMaskInterface.register(MATMUL, eager_mask)


def training_attention(setting: str, device: torch.device, precision: str, max_length: int, model) -> str | None:
    """The attention implementation training should use, or None to keep the model's own."""
    if setting == "sdpa":
        return "sdpa"
    if setting == "matmul":
        return MATMUL
    config = _base_config(model)
    plain = getattr(config, "model_type", None) in PLAIN_ATTENTION_MODELS
    short_cpu_bf16 = device.type == "cpu" and precision == "bf16" and max_length <= SHORT_ROWS
    return MATMUL if plain and short_cpu_bf16 else None


@contextmanager
def attention_implementation(model, name: str | None) -> Iterator[None]:
    """Run a block with `name` as the model's attention (and mask) implementation, then put the old one back,
    so evaluation and generation after training use the same path as a reloaded model."""
    config = _base_config(model)
    if name is None or config is None:
        yield
        return
    if name == MATMUL:
        register()
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def _base_config(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "config", None)
