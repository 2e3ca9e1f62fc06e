"""Liger Kernel's Triton kernels (RMSNorm, rotary embedding, SwiGLU) in the decoder layers, for training on CUDA
(`train.kernels: liger`, and `auto` on a CUDA device where the liger-kernel package is installed).

tunelab keeps its own head and loss (a chunked matmul + cross-entropy over trained positions only), so Liger's
fused linear cross-entropy is not used. Liger patches transformers' modeling module of the model's type for the
whole process (its rotary function, norm and MLP classes) besides the model's own modules, so every later model
of that type in the process runs its kernels too, as under TRL's `use_liger_kernel`. Its MLP calls the layer's
own gate/up/down projections, so LoRA and tunelab's fused LoRA layers stay in place."""

from __future__ import annotations

from importlib.util import find_spec

import torch

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_MARK = "_tunelab_liger"


def liger_unavailable(device: torch.device) -> str | None:
    """Why Liger's kernels cannot run on `device` at all, or None."""
    if device.type != "cuda":
        return "needs a CUDA device (Liger's kernels are Triton GPU kernels)"
    if find_spec("liger_kernel") is None:
        return "needs the liger-kernel package (pip install liger-kernel)"
    return None


def liger_problem(model, device: torch.device) -> str | None:
    """Why Liger's kernels cannot train `model` on `device`, or None when they can."""
    problem = liger_unavailable(device)
    if problem:
        return problem
    model_type = getattr(_base(model).config, "model_type", None)
    if model_type not in MODEL_TYPES:
        return f"covers {', '.join(MODEL_TYPES)} models here, not {model_type}"
    return None


def enable_liger_kernels(model) -> None:
    """Liger's RMSNorm, rotary and SwiGLU kernels in `model` (a PEFT model's base too)."""
    import liger_kernel.transformers as liger

    base = _base(model)
    apply = getattr(liger, f"apply_liger_kernel_to_{base.config.model_type}")
    apply(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=base)
    setattr(base, _MARK, True)


def uses_liger(model) -> bool:
    return bool(getattr(_base(model), _MARK, False))


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model
