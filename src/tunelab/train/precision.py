"""Which compute dtype a run uses: bf16 autocast where the hardware runs bf16 matmuls fast."""

from __future__ import annotations

from functools import lru_cache

import torch

BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
"""CPU flags of bf16 matrix instructions (AMX runs bf16 matmuls ~5x faster than AVX512-BF16)."""


@lru_cache(maxsize=1)
def cpu_info() -> tuple[str, frozenset[str]]:
    """(model name, flags) of this machine's CPU, from /proc/cpuinfo ('unknown' and none elsewhere)."""
    name, flags = "unknown", frozenset()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name") and name == "unknown":
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return name, flags


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX or AVX512-BF16 (bf16 matmuls run 2-7x faster than fp32 there)."""
    return bool(cpu_info()[1] & BF16_FLAGS)


def resolve_precision(requested: str, device: torch.device) -> str:
    """'bf16' or 'fp32' for `requested` in auto | bf16 | fp32."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def autocast(precision: str, device: torch.device):
    """The autocast context for a forward pass (weights stay fp32 masters)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
