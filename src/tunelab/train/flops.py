"""Model FLOPs utilisation: achieved training FLOP/s against the measured matmul peak of this machine.

Counting (attention scores left out, so MFU is slightly understated on long sequences):
  forward  2 x N_body per input token, plus 2 x vocab x hidden per trained token (the head only runs there);
  backward the same again for activation gradients, and again for weight gradients when the base trains.
"""

from __future__ import annotations

import time
from functools import lru_cache

import torch


@lru_cache(maxsize=4)
def matmul_peak_flops(device_type: str, precision: str, size: int = 2048) -> float:
    """Best-of-five FLOP/s of one square matmul in the training dtype on this device."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(size, size, device=device_type, dtype=dtype)
    b = torch.randn(size, size, device=device_type, dtype=dtype)
    best = float("inf")
    for _ in range(6):
        if device_type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device_type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def hardware(device: torch.device) -> dict:
    """What a speed number was measured on, so that numbers from different hosts are never compared blindly:
    the CPU model and its bf16 matrix extensions, the core count, the GPU's name on CUDA, and the malloc behind the
    CPU tensors (tunelab/allocator.py)."""
    import os

    from tunelab.allocator import allocator_in_use
    from tunelab.train.precision import BF16_FLAGS, cpu_info

    cpu, flags = cpu_info()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cpu_bf16": sorted(flags & BF16_FLAGS), "cores": cores,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "allocator": allocator_in_use()}


def training_flops(model, *, input_tokens: int, trained_tokens: int, base_trains: bool) -> float:
    """Approximate FLOPs spent on `input_tokens` (non-padding) of which `trained_tokens` carry loss."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding = base.get_input_embeddings().weight
    output = base.get_output_embeddings()  # None for a scalar (reward) head, whose FLOPs are negligible
    head = output.weight if output is not None else embedding.new_zeros(0)
    body = sum(p.numel() for p in base.parameters()) - embedding.numel()
    if output is not None and head.data_ptr() != embedding.data_ptr():
        body -= head.numel()
    passes = 3 if base_trains else 2  # forward, activation grads, (weight grads)
    return passes * 2 * (body * input_tokens + head.numel() * trained_tokens)
