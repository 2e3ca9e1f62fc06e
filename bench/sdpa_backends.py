"""Time scaled_dot_product_attention forward + backward per backend over a run of distinct sequence lengths, the
way padded training batches meet it (each batch padded to its own longest row): is a backend's first call at a
new length (plan building, autotuning) what a short fine-tuning step pays for?

    python bench/sdpa_backends.py            # on a CUDA machine; prints one line per backend

Shapes are a ~1B Llama's (32 query heads, 8 key/value heads, head size 64) at batch 8, bf16, causal.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

BACKENDS = {"default": None, "cudnn": [SDPBackend.CUDNN_ATTENTION], "flash": [SDPBackend.FLASH_ATTENTION],
            "efficient": [SDPBackend.EFFICIENT_ATTENTION], "math": [SDPBackend.MATH]}


def step(batch: int, length: int, heads: int, kv_heads: int, size: int, device: str) -> float:
    q = torch.randn(batch, heads, length, size, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(batch, kv_heads, length, size, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(batch, kv_heads, length, size, device=device, dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out.sum().backward()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="131,147,160,173,190,203,219,236,251,256")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    base_lengths = [int(n) for n in args.lengths.split(",")]
    print(torch.__version__, torch.cuda.get_device_name(0), "cudnn", torch.backends.cudnn.version())
    for index, (name, backends) in enumerate(BACKENDS.items()):
        lengths = [n + index for n in base_lengths]  # lengths no backend met before ("default" may be cuDNN)
        context = sdpa_kernel(backends) if backends else contextlib.nullcontext()
        try:
            with context:
                step(args.batch, 64, 32, 8, 64, "cuda")  # CUDA context, cuBLAS handles: not what is measured
                first = [step(args.batch, n, 32, 8, 64, "cuda") for n in lengths]
                again = [step(args.batch, n, 32, 8, 64, "cuda") for n in lengths]
        except RuntimeError as error:
            print(f"{name:<10} failed: {str(error).splitlines()[0]}")
            continue
        print(f"{name:<10} first call per length: median {1000 * statistics.median(first):7.2f} ms, "
              f"sum {1000 * sum(first):8.1f} ms; again: median {1000 * statistics.median(again):6.2f} ms")


if __name__ == "__main__":
    main()
