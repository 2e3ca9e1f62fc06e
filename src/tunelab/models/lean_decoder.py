"""The decoding forward pass of llama-family models (llama, mistral, qwen2, qwen3) without transformers'
per-layer machinery, for tunelab's decoding loop (infer/decode.py) and server.

transformers' forward spends ~60 PyTorch ops and a stack of Python calls a layer (decorators, keyword plumbing,
mask building, attention dispatch, cache bookkeeping), which at decoding's few rows costs about what the matmuls
do: on the default model (bf16, AMD EPYC, 2 cores) a single-row step took 36-48 ms, 17.6 of them in matmuls.
This is the same computation from the same weights, ~20 ops a layer: RMSNorm as one call, q/k/v and gate/up as
one matmul each when the model is a packed decoding copy (models/packed_linear.py), rotary embedding on queries
and keys at once (cos/sin from the model's own rotary module, so every rope type it knows works), one mask for
all layers, keys and values written in place into the reserved cache (infer/kv_cache.py).

Only plain models qualify (`lean_decoder` returns None otherwise and callers keep transformers' forward): no PEFT
wrapper or adapter layers, no quantised linears, no hooks, SiLU MLPs, and every layer a full-attention layer of a
reserved cache (sliding windows keep transformers' masks). Decoding only: no gradients, no dropout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tunelab.infer.kv_cache import ReservedLayer, reserved_cache, windowed
from tunelab.models.attention import single_query_attention
from tunelab.models.packed_linear import PackedLinear

MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
_ATTRIBUTE = "_tunelab_lean_decoder"


@dataclass
class _Layer:
    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    query_norm: torch.Tensor | None
    """Per-head RMSNorm weights of queries and keys (qwen3), before the rotary embedding."""
    key_norm: torch.Tensor | None
    qkv: tuple[torch.nn.Linear, ...]
    """One fused projection, or the model's q, k and v projections."""
    output: torch.nn.Linear
    gate_up: tuple[torch.nn.Linear, ...]
    down: torch.nn.Linear


class LeanDecoder:
    """`decoder(input_ids, attention_mask, position_ids, cache)` -> the last position's logits [rows, vocab], as
    `model(..., cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]` gives them; with every_position=True
    every position's [rows, width, vocab] (lookup decoding checks drafted tokens with them)."""

    def __init__(self, model, fuse: bool):
        config = model.config
        inner = model.model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm = inner.norm.weight
        self.head = model.lm_head
        self.eps = config.rms_norm_eps
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scaling = inner.layers[0].self_attn.scaling
        self.layers = [_layer(block, fuse) for block in inner.layers]
        self.compiled = None
        """A CompiledStep (models/compiled_step.py) that runs one-token steps, once compile_decoding made one."""

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 cache, every_position: bool = False) -> torch.Tensor:
        rows, width = input_ids.shape
        if (width == 1 and not every_position and self.compiled is not None and rows <= self.compiled.max_rows
                and cache.layers[0].is_initialized):
            return self.compiled(input_ids, attention_mask, position_ids, cache)
        x = self.embed(input_ids)
        cos, sin = self.rotary(x, position_ids)  # [rows, width, head_dim]
        cos, sin = cos[:, :, None], sin[:, :, None]
        cached = cache.layers[0].get_seq_length()
        mask = attention_bias(attention_mask, width, cached)
        columns = None
        if width == 1:  # attend over whole blocks of columns: one matmul shape for several steps
            columns = cache.layers[0].padded_columns(cached + 1)
            mask = F.pad(mask, (0, columns - mask.shape[-1]), value=float("-inf"))
        for layer, kv in zip(self.layers, cache.layers, strict=True):
            x = x + self._attention(layer, F.rms_norm(x, x.shape[-1:], layer.input_norm, self.eps), cos, sin, mask,
                                    kv, columns)
            h = F.rms_norm(x, x.shape[-1:], layer.post_attention_norm, self.eps)
            if len(layer.gate_up) == 1:
                gate, up = layer.gate_up[0](h).chunk(2, dim=-1)
            else:
                gate, up = (projection(h) for projection in layer.gate_up)
            x = x + layer.down(F.silu(gate) * up)
        kept = x if every_position else x[:, -1]
        return self.head(F.rms_norm(kept, x.shape[-1:], self.norm, self.eps))

    def _attention(self, layer: _Layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   mask: torch.Tensor, kv: ReservedLayer, columns: int | None) -> torch.Tensor:
        rows, width, _ = h.shape
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        if len(layer.qkv) == 1:
            qkv = layer.qkv[0](h).view(rows, width, heads + 2 * kv_heads, dim)
        else:
            qkv = torch.cat([projection(h) for projection in layer.qkv], dim=-1).view(rows, width, -1, dim)
        qk = self.positioned(layer, qkv[:, :, :heads + kv_heads], cos, sin)
        value = qkv[:, :, heads + kv_heads:]
        query = qk[:, :, :heads].transpose(1, 2)
        keys, values = kv.update(qk[:, :, heads:].transpose(1, 2), value.transpose(1, 2))
        if columns is not None:
            keys, values = kv.padded(columns)
            out = single_query_attention(query, keys, values, self.scaling, mask)
        else:
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=self.scaling,
                                                 enable_gqa=heads != kv_heads).transpose(1, 2)
        return layer.output(out.reshape(rows, width, heads * dim))


    def positioned(self, layer: _Layer, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Queries and keys [rows, width, heads + kv_heads, dim] after the per-head norms (qwen3) and the rotary
        embedding, q and k at once (the compiled step runs this too, models/compiled_step.py)."""
        heads, dim = self.heads, self.head_dim
        if layer.query_norm is not None:
            qk = torch.cat([F.rms_norm(qk[:, :, :heads], (dim,), layer.query_norm, self.eps),
                            F.rms_norm(qk[:, :, heads:], (dim,), layer.key_norm, self.eps)], dim=2)
        return qk * cos + torch.cat([-qk[..., dim // 2:], qk[..., :dim // 2]], dim=-1) * sin


def attention_bias(attention_mask: torch.Tensor, width: int, cached: int) -> torch.Tensor:
    """What every layer's attention adds to its scores: for a single query a float32 bias [rows, 1, 1, columns]
    (0 or -inf); for several a boolean mask [rows, 1, width, columns], causal over the new positions. A padding
    query attends to itself too, so no row of the softmax is empty (its output is never read)."""
    attend = attention_mask.bool()
    if width == 1:
        return torch.zeros(attend.shape, dtype=torch.float32, device=attend.device).masked_fill_(
            ~attend, float("-inf"))[:, None, None]
    columns = torch.arange(attend.shape[1], device=attend.device)
    new = cached + torch.arange(width, device=attend.device)[:, None]
    return ((attend[:, None, :] & (columns <= new)) | (columns == new))[:, None]


def lean_decoder(model) -> LeanDecoder | None:
    """The lean forward of `model`, or None when it is not one this module computes exactly. A decoding copy
    (packed linears: its weights never change) gets fused q/k/v and gate/up projections, built once and kept on
    the model; any other model gets one that calls its own projections, so it always sees the current weights."""
    found = getattr(model, _ATTRIBUTE, None)
    if found is not None:
        return found
    if not _supported(model):
        return None
    linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    frozen = all(type(m) is PackedLinear for m in linears)
    decoder = LeanDecoder(model, fuse=frozen)
    if frozen:
        setattr(model, _ATTRIBUTE, decoder)
    return decoder


def _supported(model) -> bool:
    config = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    if config is None or getattr(config, "model_type", None) not in MODEL_TYPES or inner is None:
        return False
    if hasattr(model, "get_base_model") or getattr(config, "hidden_act", None) != "silu":
        return False
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return False
    if not all(type(m) in (torch.nn.Linear, PackedLinear) for m in inner.layers.modules()
               if isinstance(m, torch.nn.Linear) or "Linear" in type(m).__name__):
        return False
    if type(getattr(model, "lm_head", None)) not in (torch.nn.Linear, PackedLinear):
        return False
    return not windowed(config) and all(type(layer) is ReservedLayer for layer in reserved_cache(config, 1).layers)


def _layer(block, fuse: bool) -> _Layer:
    attention, mlp = block.self_attn, block.mlp
    qkv = (attention.q_proj, attention.k_proj, attention.v_proj)
    gate_up = (mlp.gate_proj, mlp.up_proj)
    if fuse:
        qkv, gate_up = (_fused(qkv),), (_fused(gate_up),)
    query_norm = getattr(attention, "q_norm", None)
    key_norm = getattr(attention, "k_norm", None)
    return _Layer(block.input_layernorm.weight, block.post_attention_layernorm.weight,
                  None if query_norm is None else query_norm.weight, None if key_norm is None else key_norm.weight,
                  qkv, attention.o_proj, gate_up, mlp.down_proj)


@torch.no_grad()
def _fused(projections: tuple[torch.nn.Linear, ...]) -> torch.nn.Linear:
    """One packed linear computing the projections' outputs side by side; each projection keeps its plain weight
    for transformers' forward but gives up its packed copy (the fused one replaces it)."""
    weight = torch.cat([p.weight for p in projections])
    biases = [p.bias for p in projections]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b if b is not None else weight.new_zeros(p.out_features) for p, b in zip(projections, biases, strict=True)])
    fused = torch.nn.utils.skip_init(torch.nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None,
                                     dtype=weight.dtype, device=weight.device)
    fused.weight.data = weight
    if bias is not None:
        fused.bias.data = bias
    fused.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight)
    fused.__class__ = PackedLinear
    for projection in projections:
        del projection.packed_weight
        projection.__class__ = torch.nn.Linear
    return fused
