"""llama.cpp's k-quants (Q4_K, Q5_K, Q6_K) and its q4_k_m, q5_k_m and q6_k mixes, computed here, so that
`tunelab export --quant q4_k_m` (Ollama's and LM Studio's usual choice) needs no llama.cpp build.

The block layouts and the search for each block's scales follow ggml's reference quantisers
(`quantize_row_q{4,5,6}_K_ref`: what `llama-quantize` runs without an importance matrix), vectorised over all
blocks of a tensor with torch in float32: a super-block of 256 weights holds 8 sub-blocks of 32 (Q4_K, Q5_K:
each with a 6-bit scale and a 6-bit minimum, found by a weighted least-squares search over candidate scales) or
16 of 16 (Q6_K: signed 6-bit levels, an 8-bit scale each), and one float16 scale (and minimum) for the
super-block. Which tensor gets which type is llama.cpp's rule for each mix (`llama_tensor_get_type`): the output
(or the tied embedding) in Q6_K, about 40% of the attn_v and ffn_down layers in Q6_K for the _m mixes, types of
32-weight blocks where a row is not a multiple of 256 wide (the default model's 576-wide rows: Q4_K -> Q5_0,
Q5_K -> Q5_1, Q6_K -> Q8_0).

Checked against gguf's own dequantisers (the layout) and, where llama-cpp-python is installed, against
llama.cpp's quantiser on the same weights (tests/test_gguf_kquants.py).
"""

from __future__ import annotations

import numpy as np
import torch

QK_K = 256
"""Weights in a k-quant super-block."""
GROUP_MAX_EPS = 1e-15
"""ggml's threshold under which a group of weights counts as all zero."""

MIXES = {"q4_k_m": "Q4_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K"}
"""The mixes written here, by their default tensor type (ggml's names)."""
FILE_TYPES = {"q4_k_m": "MOSTLY_Q4_K_M", "q5_k_m": "MOSTLY_Q5_K_M", "q6_k": "MOSTLY_Q6_K"}
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
"""A type of 32-weight blocks for rows that are not a multiple of QK_K wide (llama.cpp's tensor_type_fallback)."""
_ROWS_PER_CHUNK = 1 << 14
"""Quantise at most this many 256-weight blocks (4M weights) at once, to bound the float32 temporaries."""


def tensor_type(mix: str, name: str, columns: int, layers: int, has_output: bool) -> str:
    """ggml's type name for tensor `name` (GGUF naming, `columns` weights a row) in `mix`: llama.cpp's choice for
    a dense Llama model without an importance matrix."""
    chosen = MIXES[mix]
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    more_bits = mix in ("q4_k_m", "q5_k_m") and _use_more_bits(layer, layers)
    if name == "output.weight" or (name == "token_embd.weight" and not has_output):
        chosen = "Q8_0" if columns % QK_K else "Q6_K"
    elif (name.endswith(".attn_v.weight") or name.endswith(".ffn_down.weight")) and more_bits:
        chosen = "Q6_K"
    if columns % QK_K and chosen in _FALLBACK:
        chosen = _FALLBACK[chosen]
    return "F16" if columns % 32 else chosen


def _use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's pick of the layers that get more bits: the first and last eighth, and every third between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def quantize(weights: np.ndarray, type_name: str) -> np.ndarray:
    """`weights` [rows, columns] (float32) as GGUF bytes [rows, bytes a row] of `type_name` (Q4_K, Q5_K or Q6_K
    here; ggml's other types through the gguf package's quantisers)."""
    import gguf

    quantizers = {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
    if type_name not in quantizers:
        return gguf.quants.quantize(weights, gguf.GGMLQuantizationType[type_name])
    rows, columns = weights.shape
    blocks = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)).reshape(-1, QK_K)
    parts = [quantizers[type_name](blocks[start:start + _ROWS_PER_CHUNK])
             for start in range(0, blocks.shape[0], _ROWS_PER_CHUNK)]
    return np.concatenate(parts).reshape(rows, -1)


def _nearest(values: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int (adding 1.5 * 2**23 in float32: round half to even), as int32."""
    return torch.round(values).to(torch.int32)


def _ordered_sum(values: torch.Tensor) -> torch.Tensor:
    """Each row's sum, added left to right as ggml's loops do: choices between candidate scales compare sums that
    can tie to the last bit, and a tree-ordered sum picked differently in ~3% of Q6_K blocks."""
    total = values[:, 0].clone()
    for column in range(1, values.shape[1]):
        total += values[:, column]
    return total


def _f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def _affine_levels(x: torch.Tensor, weights: torch.Tensor, top: int, rmin: float, rdelta: float,
                   steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's make_qkx2_quants on every row of `x` [groups, n]: (scale, minimum to subtract, levels 0..top)
    minimising the weighted squared error of scale * level - minimum, over the scales that map the row's range
    onto top + rmin + rdelta * step levels, each refined by least squares."""
    low = x.min(dim=1).values.clamp(max=0)
    high = x.max(dim=1).values
    sum_w, sum_x = _ordered_sum(weights), _ordered_sum(weights * x)
    flat = high == low
    inverse = _f32(top) / torch.where(flat, torch.ones_like(high), high - low)
    scale = 1 / inverse
    levels = _nearest(inverse[:, None] * (x - low[:, None])).clamp(0, top).float()
    best = _ordered_sum(weights * (scale[:, None] * levels + low[:, None] - x).square())
    for step in range(steps + 1):  # the span follows the best minimum so far, as in ggml
        span = torch.where(flat, torch.ones_like(high), high - low)
        inverse = (_f32(rmin) + _f32(rdelta) * step + top) / span
        trial = _nearest(inverse[:, None] * (x - low[:, None])).clamp(0, top).float()
        sum_l = _ordered_sum(weights * trial)
        sum_l2 = _ordered_sum(weights * trial * trial)
        sum_xl = _ordered_sum(weights * trial * x)
        determinant = sum_w * sum_l2 - sum_l * sum_l
        trial_scale = (sum_w * sum_xl - sum_x * sum_l) / determinant
        trial_min = (sum_l2 * sum_x - sum_l * sum_xl) / determinant
        positive = trial_min > 0
        trial_min = torch.where(positive, torch.zeros_like(trial_min), trial_min)
        trial_scale = torch.where(positive, sum_xl / sum_l2, trial_scale)
        error = _ordered_sum(weights * (trial_scale[:, None] * trial + trial_min[:, None] - x).square())
        better = (determinant > 0) & (error < best)
        levels = torch.where(better[:, None], trial, levels)
        best = torch.where(better, error, best)
        scale = torch.where(better, trial_scale, scale)
        low = torch.where(better, trial_min, low)
    levels = torch.where(flat[:, None], torch.zeros_like(levels), levels)
    return torch.where(flat, torch.zeros_like(scale), scale), -low, levels.to(torch.int32)


def _symmetric_levels(x: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qx_quants (weights x**2) on every row of `x` [groups, n]: (scale, levels 0..2*top-1 standing
    for -top..top-1), the scale the best of 19 around the one that maps the largest magnitude to -top."""
    peak = x.gather(1, x.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    zero = peak.abs() < GROUP_MAX_EPS
    peak = torch.where(zero, torch.ones_like(peak), peak)
    weights = x * x

    def attempt(inverse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        levels = _nearest(inverse[:, None] * x).clamp(-top, top - 1).float()
        return levels, _ordered_sum(weights * x * levels), _ordered_sum(weights * levels * levels)

    levels, sum_lx, sum_l2 = attempt(_f32(-top) / peak)
    scale = torch.where(sum_l2 != 0, sum_lx / sum_l2, torch.zeros_like(sum_l2))
    best = scale * sum_lx
    for step in [*range(-9, 0), *range(1, 10)]:
        trial, trial_lx, trial_l2 = attempt(-(top + _f32(0.1) * step) / peak)
        better = (trial_l2 > 0) & (trial_lx * trial_lx > best * trial_l2)
        levels = torch.where(better[:, None], trial, levels)
        scale = torch.where(better, trial_lx / trial_l2, scale)
        best = torch.where(better, scale * trial_lx, best)
    levels = torch.where(zero[:, None], torch.full_like(levels, -top), levels)
    return torch.where(zero, torch.zeros_like(scale), scale), levels.to(torch.int32) + top


def _scales_and_mins(x: torch.Tensor, top: int, rmin: float, steps: int):
    """Q4_K/Q5_K's common part for blocks `x` [blocks, 256]: (d, dmin as float16, 12 packed scale bytes, levels
    [blocks, 256] 0..top)."""
    blocks = x.shape[0]
    groups = x.reshape(-1, 32)
    spread = _ordered_sum(groups * groups).div(32).sqrt()
    scales, mins, levels = _affine_levels(groups, spread[:, None] + groups.abs(), top, rmin, 0.1, steps)
    scales, mins = scales.reshape(blocks, 8), mins.reshape(blocks, 8)
    max_scale = scales.max(dim=1).values.clamp(min=0)
    max_min = mins.max(dim=1).values.clamp(min=0)
    inverse_scale = torch.where(max_scale > 0, 63 / max_scale, torch.zeros_like(max_scale))
    inverse_min = torch.where(max_min > 0, 63 / max_min, torch.zeros_like(max_min))
    quantized_scales = _nearest(inverse_scale[:, None] * scales).remainder(256).clamp(max=63)
    quantized_mins = _nearest(inverse_min[:, None] * mins).remainder(256).clamp(max=63)
    d, dmin = (max_scale / 63).half(), (max_min / 63).half()
    group_d = d.float()[:, None] * quantized_scales
    group_min = dmin.float()[:, None] * quantized_mins
    values = x.reshape(blocks, 8, 32)
    requantized = _nearest((values + group_min[..., None]) / group_d[..., None]).clamp(0, top)
    levels = torch.where(group_d[..., None] != 0, requantized, levels.reshape(blocks, 8, 32))
    low, high = quantized_scales[:, :4], quantized_scales[:, 4:]
    low_min, high_min = quantized_mins[:, :4], quantized_mins[:, 4:]
    packed = torch.cat([low | ((high >> 4) << 6), low_min | ((high_min >> 4) << 6),
                        (high & 0xF) | ((high_min & 0xF) << 4)], dim=1)
    return d, dmin, packed, levels.reshape(blocks, QK_K)


def _q4_k(x: torch.Tensor) -> np.ndarray:
    """Blocks [blocks, 256] as Q4_K: d, dmin (float16), 12 scale bytes, 128 bytes of 4-bit levels."""
    d, dmin, scales, levels = _scales_and_mins(x, 15, -1.0, 20)
    pairs = levels.reshape(-1, 4, 2, 32)
    quants = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    return _bytes(d, dmin, scales, quants)


def _q5_k(x: torch.Tensor) -> np.ndarray:
    """Blocks [blocks, 256] as Q5_K: d, dmin, 12 scale bytes, 32 bytes of fifth bits, 128 bytes of low 4 bits."""
    d, dmin, scales, levels = _scales_and_mins(x, 31, -0.5, 15)
    pairs = levels.reshape(-1, 4, 2, 32)
    quants = ((pairs[:, :, 0] & 0xF) | ((pairs[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    shifts = torch.arange(8, dtype=torch.int32).reshape(1, 4, 2, 1)
    high_bits = ((pairs >> 4) << shifts).sum(dim=(1, 2))
    return _bytes(d, dmin, scales, high_bits, quants)


def _q6_k(x: torch.Tensor) -> np.ndarray:
    """Blocks [blocks, 256] as Q6_K: 128 bytes of low 4 bits, 64 of high 2 bits, 16 signed 8-bit scales, d."""
    blocks = x.shape[0]
    scales, levels = _symmetric_levels(x.reshape(-1, 16), 32)
    scales, levels = scales.reshape(blocks, 16), levels.reshape(blocks, 16, 16)
    peak = scales.gather(1, scales.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    zero = peak.abs() < GROUP_MAX_EPS
    inverse = _f32(-128) / torch.where(zero, torch.ones_like(peak), peak)
    d = (1 / inverse).half()
    quantized_scales = _nearest(inverse[:, None] * scales).clamp(max=127)
    group_d = d.float()[:, None] * quantized_scales
    requantized = _nearest(x.reshape(blocks, 16, 16) / group_d[..., None]).clamp(-32, 31) + 32
    levels = torch.where(group_d[..., None] != 0, requantized, levels).reshape(blocks, 2, 4, 32)
    first, second, third, fourth = levels.unbind(dim=2)
    low = torch.stack([(first & 0xF) | ((third & 0xF) << 4), (second & 0xF) | ((fourth & 0xF) << 4)], dim=2)
    high = (first >> 4) | ((second >> 4) << 2) | ((third >> 4) << 4) | ((fourth >> 4) << 6)
    quantized_scales = torch.where(zero[:, None], torch.zeros_like(quantized_scales), quantized_scales)
    packed = _bytes(low.reshape(blocks, 128), high.reshape(blocks, 64), quantized_scales.remainder(256),
                    torch.where(zero, torch.zeros_like(d), d))
    packed[zero.numpy()] = 0
    return packed


def _bytes(*parts: torch.Tensor) -> np.ndarray:
    """Each block's fields side by side as bytes: float16 fields as their two little-endian bytes, integer fields
    (0..255) one byte each."""
    columns = []
    for part in parts:
        if part.dtype == torch.float16:
            columns.append(part.numpy().astype("<f2").view(np.uint8).reshape(-1, 2))
        else:
            columns.append(part.to(torch.uint8).numpy().reshape(part.shape[0], -1))
    return np.concatenate(columns, axis=1)
