"""LoRA linear layers as one autograd function (`train.fused_lora`).

PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as separate modules. Under bf16 autocast that
casts the frozen base weight to bf16 on every forward, casts the same input once per linear (q, k and v
each cast and keep their own copy of one norm output, and each LoRA A again), and runs the scaling and the
sum as extra passes over the output. Here one function does `y = x W^T; y += (x A^T) (scaling B)^T` with an
in-place addmm, the frozen weight is cast once and kept (autocast kept those casts through backward anyway),
and the cast input is shared by every layer that reads it, so it is also saved for backward only once.
Same arithmetic as autocast (bf16 matmuls, fp32 master adapter weights and gradients).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from tunelab.models.frozen_head import WEIGHT_CAST, compute_dtype
from tunelab.models.fused_norm import fusable_norms, fused_norm_forward
from tunelab.models.logprobs import decoder_and_head


class _LoraLinear(torch.autograd.Function):
    """y = x W^T + b + (x A^T) B_s^T, everything in `x_c`'s dtype; x_c is x already cast, B_s the LoRA B weight
    times its scaling (scaled outside, so the function holds no Python float: dynamo of torch 2.11 failed
    tracing this function under torch.compile, and a float kept on ctx is the likely cause)."""

    @staticmethod
    def forward(ctx, x, x_c, weight, bias, lora_a, scaled_b):
        a, b = lora_a.to(x_c.dtype), scaled_b.to(x_c.dtype)
        flat = x_c.reshape(-1, x_c.shape[-1])
        hidden = flat @ a.t()  # [N, r]
        out = flat @ weight.t() if bias is None else torch.addmm(bias, flat, weight.t())
        out.addmm_(hidden, b.t())
        ctx.save_for_backward(x_c, weight, a, b, hidden)
        ctx.x_dtype = x.dtype
        ctx.param_dtypes = (lora_a.dtype, scaled_b.dtype)
        return out.view(*x_c.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x_c, weight, a, b, hidden = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1]).to(x_c.dtype)
        flat = x_c.reshape(-1, x_c.shape[-1])
        grad_hidden = grad @ b  # [N, r]
        grad_a = (grad_hidden.t() @ flat).to(ctx.param_dtypes[0])
        grad_b = (grad.t() @ hidden).to(ctx.param_dtypes[1])
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight).addmm_(grad_hidden, a).to(ctx.x_dtype).view(x_c.shape)
        return grad_x, None, None, None, grad_a, grad_b


class _SharedCast:
    """The last input cast to the compute dtype: q, k and v (and gate and up) read the same norm output, so
    the first of them casts it and the others reuse that copy while the input is unchanged."""

    def __init__(self) -> None:
        self.source: weakref.ref | None = None
        self.version = -1
        self.cast: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if x.dtype == dtype:
            return x.detach()
        if torch.compiler.is_compiling():  # inside a compiled layer the compiler shares the cast itself
            return x.detach().to(dtype)
        cached = self.source() if self.source is not None else None
        if cached is x and self.version == x._version and self.cast is not None and self.cast.dtype == dtype:
            return self.cast
        with torch.no_grad():
            self.cast = x.detach().to(dtype)
        self.source, self.version = weakref.ref(x), x._version
        return self.cast

    def clear(self) -> None:
        self.source, self.cast = None, None


def _fusable(layer, x: torch.Tensor, kwargs: dict) -> str | None:
    """The active adapter when this call can take the fused path, else None (PEFT's own forward runs)."""
    if kwargs or layer.disable_adapters or layer.merged:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1 or active[0] in getattr(layer, "lora_variant", {}):
        return None
    adapter = active[0]
    if layer.training and getattr(layer.lora_dropout[adapter], "p", 0.0) > 0:  # nn.Identity when dropout is 0
        return None
    base = layer.base_layer
    if type(base) is not nn.Linear or base.weight.requires_grad or not x.is_floating_point():
        return None
    if getattr(layer, "fan_in_fan_out", False):
        return None
    return adapter


def _frozen_weight(layer, dtype: torch.dtype) -> torch.Tensor:
    """The (base) weight in `dtype`, cast once and kept while the weight is unchanged."""
    weight = getattr(layer, "base_layer", layer).weight
    if weight.dtype == dtype:
        return weight
    cached = getattr(layer, "_tunelab_weight", None)
    if torch.compiler.is_compiling():  # compiled layers read the cast cache_weight_casts made, never refresh it
        return cached[1] if cached is not None and cached[1].dtype == dtype else weight.to(dtype)
    if cached is None or cached[0] != weight._version or cached[1].dtype != dtype:
        with torch.no_grad():
            cached = (weight._version, weight.detach().to(dtype))
        layer._tunelab_weight = cached
    return cached[1]


def _make_forward(layer, shared: _SharedCast):
    peft_forward = type(layer).forward

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = _fusable(layer, x, kwargs) if not args else None
        if adapter is None:
            return peft_forward(layer, x, *args, **kwargs)
        dtype = compute_dtype(x)
        bias = layer.base_layer.bias
        if bias is not None:
            bias = bias.detach().to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            return _LoraLinear.apply(x, shared(x, dtype), _frozen_weight(layer, dtype), bias,
                                     layer.lora_A[adapter].weight,
                                     layer.lora_B[adapter].weight * float(layer.scaling[adapter]))

    return forward


def _frozen_head_forward(head: nn.Linear):
    """The output head (frozen in every method but full fine-tuning) with its weight cast once, not per call:
    on a 49k vocabulary that cast is 28M elements a step. The trained tokens' log-probabilities read the same
    cast (models/frozen_head.py)."""
    linear_forward = type(head).forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        if head.weight.requires_grad or head.weight.dtype == dtype:
            return linear_forward(head, x)
        bias = None if head.bias is None else head.bias.detach().to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            return nn.functional.linear(x.to(dtype), _frozen_weight(head, dtype), bias)

    return forward


def cache_weight_casts(model, dtype: torch.dtype) -> None:
    """Make every fused layer's frozen weight cast now, eagerly, for compiled layers to read (models/fused_ops.py)."""
    layers, _ = model.__dict__.get("_tunelab_fused", ([], None))
    for layer in layers:
        _frozen_weight(layer, dtype)


def lora_linear_layers(model) -> list:
    """PEFT LoRA layers over plain nn.Linear bases (QLoRA's quantised bases and DoRA keep PEFT's path)."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a dependency
        return []
    return [m for m in model.modules() if type(m) is LoraLinear and type(m.base_layer) is nn.Linear]


def fuse_lora_layers(model) -> int:
    """Fuse the model's LoRA linear layers, cast its frozen output head's weight once and run its RMSNorms as one
    function each (models/fused_norm.py); returns how many modules changed. Parameters and state dicts are
    untouched: saving and checkpoints see a plain model."""
    shared = _SharedCast()
    layers = lora_linear_layers(model)
    for layer in layers:
        layer.forward = _make_forward(layer, shared)
    _, head = decoder_and_head(model)
    if type(head) is nn.Linear:
        head.forward = _frozen_head_forward(head)
        setattr(head, WEIGHT_CAST, functools.partial(_frozen_weight, head))
        layers.append(head)
    model._tunelab_fused = (layers, shared)
    return len(layers) + fuse_norms(model)


def fuse_norms(model) -> int:
    """Run the model's RMSNorms as one function each (models/fused_norm.py); returns how many. Also under FSDP,
    where the rest of the fusion stays off: a norm reads its block's weight when called, gathered by then."""
    norms = fusable_norms(model)
    for norm in norms:
        norm.forward = fused_norm_forward(norm)
    model._tunelab_fused_norms = norms
    return len(norms)


def unfuse_norms(model) -> None:
    """transformers' own RMSNorm forwards back (compiled layers fuse the norm's ops themselves)."""
    for norm in model.__dict__.pop("_tunelab_fused_norms", []):
        norm.__dict__.pop("forward", None)


def cached_weight_storages(model) -> set[int]:
    """Storage addresses of the weight casts fused layers keep: resident memory, not activations."""
    layers, _ = model.__dict__.get("_tunelab_fused", ([], None))
    cached = (layer.__dict__.get("_tunelab_weight") for layer in layers)
    return {entry[1].untyped_storage().data_ptr() for entry in cached if entry is not None}


def unfuse_lora_layers(model) -> None:
    """Put the modules' own forwards back and drop the cached weight casts."""
    unfuse_norms(model)
    layers, shared = model.__dict__.pop("_tunelab_fused", ([], None))
    if shared is not None:
        shared.clear()
    for layer in layers:
        layer.__dict__.pop("forward", None)
        layer.__dict__.pop("_tunelab_weight", None)
        layer.__dict__.pop(WEIGHT_CAST, None)


@contextmanager
def fused_lora(model, enabled: bool = True) -> Iterator[int]:
    """Run a block with `fuse_lora_layers` applied; yields how many modules changed."""
    changed = fuse_lora_layers(model) if enabled else 0
    try:
        yield changed
    finally:
        if enabled:
            unfuse_lora_layers(model)
