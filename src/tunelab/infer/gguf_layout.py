"""Where transformers' Llama tensors go in a GGUF file and back: llama.cpp's tensor names, and the q/k row
permutation into llama.cpp's rotary layout (as its converter does) with its inverse (what the export check uses to
put a file's weights back)."""

from __future__ import annotations

import numpy as np

LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def tensor_name(hf_name: str) -> str | None:
    """llama.cpp's name for a transformers Llama tensor."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":  # an untied head
        return "output.weight"
    parts = hf_name.split(".")
    if hf_name.startswith("model.layers.") and parts[-1] == "weight":
        short = LAYER_NAMES.get(".".join(parts[3:-1]))
        return f"blk.{parts[2]}.{short}.weight" if short else None
    return None


def unpermute(weights: np.ndarray, heads: int, kv_heads: int) -> np.ndarray:
    """The inverse of permute: llama.cpp's interleaved rotary rows back to transformers' halves."""
    groups = kv_heads if kv_heads != heads else heads
    shape = weights.shape
    return weights.reshape(groups, shape[0] // groups // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def permute(weights: np.ndarray, heads: int, kv_heads: int) -> np.ndarray:
    """Rows of a q or k projection from transformers' rotary layout (halves) to llama.cpp's (interleaved pairs),
    as llama.cpp's converter permutes them."""
    groups = kv_heads if kv_heads != heads else heads
    shape = weights.shape
    return weights.reshape(groups, 2, shape[0] // groups // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
