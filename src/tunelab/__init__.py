"""tunelab: fine-tune large language models end to end, with the evidence that it helped."""

import os

__version__ = "0.1.0"

ONEDNN_PRIMITIVE_CACHE_CAPACITY = "256"
"""oneDNN (PyTorch's CPU bf16 matmuls) compiles a kernel for every distinct shape and keeps up to 1024 of them;
padding-free batches bring new shapes every step, so a LoRA run of the default model grew by ~500 MB over its
first ~70 steps before the cache was full (AMD EPYC, 2026-12-05). 256 holds a few steps' shapes: at 60 steps
260 MB less held (what is left after malloc_trim), at the same speed (173-175 against 169 trained tokens/s); the
peak, which the heap's fragmentation sets, stayed within its spread (3100-3249 against 3265 MB). Set before
oneDNN's first kernel; a user's own setting wins."""
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_PRIMITIVE_CACHE_CAPACITY)
