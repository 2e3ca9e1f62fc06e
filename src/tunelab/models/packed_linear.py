"""Linear layers whose weights are laid out once for oneDNN, for models that only run forward in bf16 on CPU.

A bf16 matmul on CPU (torch.nn.functional.linear) reorders the weight into oneDNN's blocked layout on every
call. A decoding copy's weights never change, so they are reordered once (torch.ops.mkldnn, the path
inductor's frozen CPU graphs take) and every call starts from that layout: on the default model (AMD EPYC,
avx512_bf16) the head was 1.4x and a layer's matmuls 1.1-1.6x faster at decoding's 60 rows, 1.1x at
prefill's thousands, with bit-identical results in bf16 there (float32 takes another kernel, not
bit-identical, so float32 models are left alone; in bf16 the forward is used only for decoding copies).
"""

from __future__ import annotations

import torch


class PackedLinear(torch.nn.Linear):
    """nn.Linear whose forward reads `packed_weight` (its weight, reordered); the plain weight stays for code that
    reads it (tied embeddings, dtype checks), so a packed copy holds its linear weights twice."""

    packed_weight: torch.Tensor

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dtype != self.packed_weight.dtype:
            return super().forward(input)
        return torch.ops.mkldnn._linear_pointwise(input, self.packed_weight, self.bias, "none", [], "")


def packing_available(model: torch.nn.Module) -> bool:
    """Whether `model` is a bf16 CPU model this torch can pack (built with oneDNN, on a CPU whose oneDNN runs bf16:
    AVX-512 or newer)."""
    parameter = next(model.parameters(), None)
    if parameter is None or parameter.device.type != "cpu" or parameter.dtype != torch.bfloat16:
        return False
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@torch.no_grad()
def pack_linears(model: torch.nn.Module) -> int:
    """Turn every bf16 nn.Linear of an inference-only `model` into a PackedLinear, in place; returns how many.
    The caller guarantees the weights will not change while the packed layout is in use."""
    if not packing_available(model):
        return 0
    packed = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.dtype == torch.bfloat16:
            module.packed_weight = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach())
            module.__class__ = PackedLinear
            packed += 1
    return packed
