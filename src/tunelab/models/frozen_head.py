"""Log-probabilities of the trained tokens through a frozen output head, with their gradient computed in the
forward pass.

Every method but full fine-tuning leaves the output head frozen, so the only gradient the head passes back is the
one to its input h, and for log p = log softmax(h W^T / T)[target] that gradient is g (onehot - softmax) W / T,
where g is the upstream gradient of each token's log-probability: a per-row scale, whatever the objective makes
of the log-probabilities (SFT's sum, DPO's sequence sums, GRPO's ratios). So each chunk of rows is done in one
go while its logits exist: logits, log-sum-exp, the target's log-probability, and u = (softmax - onehot) W / T;
backward is -g * u. Autograd's way keeps every chunk's float32 log-softmax [N, vocab] for backward and spends
three more passes over it there (nll_loss's zero-filled scatter, log_softmax's backward, a cast); this keeps u
[N, hidden], a vocabulary-sized saving (on a 49k vocabulary and 576 hidden, 340x less). The values are the
same; the gradient differs from autograd's by where bf16 rounds (before the per-row scale instead of after).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _FrozenHeadLogprobs(torch.autograd.Function):
    """[N] float32 log-probabilities of `targets` under logits = x_c W^T (+ b), divided by `temperature`; x_c is
    x in the compute dtype, weight and bias already in it too."""

    @staticmethod
    def forward(ctx, x, x_c, weight, bias, targets, temperature, chunk):
        rows = x_c.shape[0]
        logps = torch.empty(rows, dtype=torch.float32, device=x_c.device)
        want_grad = ctx.needs_input_grad[0]
        slopes = torch.empty_like(x_c) if want_grad else None
        for start in range(0, rows, chunk):
            end = min(rows, start + chunk)
            wanted = targets[start:end, None]
            logits = F.linear(x_c[start:end], weight, bias)
            if temperature != 1.0:
                logits = logits.float().div_(temperature)
            # log-softmax in float32 straight from the bf16 logits: one pass, no float32 copy of them first
            chunk_logps = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
            logps[start:end] = chunk_logps.gather(1, wanted).squeeze(1)
            if want_grad:  # softmax - onehot, then through the head: d(-log p)/dx before the per-row scale
                probs = chunk_logps.exp_()
                probs.scatter_add_(1, wanted, probs.new_full(wanted.shape, -1.0))
                torch.mm(probs.to(x_c.dtype), weight, out=slopes[start:end])
        if want_grad:
            if temperature != 1.0:
                slopes.div_(temperature)
            ctx.save_for_backward(slopes)
        ctx.x_dtype = x.dtype
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        (slopes,) = ctx.saved_tensors
        grad_x = (slopes * -grad_logps[:, None]).to(ctx.x_dtype)
        return grad_x, None, None, None, None, None, None


WEIGHT_CAST = "_tunelab_head_weight"
"""Set by fuse_lora_layers on the head: a function of the compute dtype returning the head's weight cast once
(methods/fused_lora.py); without it the weight is cast per call, as autocast would."""


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast computes matmuls in, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def fits(head) -> bool:
    """Whether `head` is a plain frozen linear: PEFT's modules_to_save wrappers and quantised layers are other
    types, full fine-tuning trains the head, and a head with hooks of its own (sharded on its own) must be called."""
    return (type(head) is nn.Linear and not head.weight.requires_grad
            and (head.bias is None or not head.bias.requires_grad)
            and not (head._forward_hooks or head._forward_pre_hooks))


def frozen_head_logprobs(head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
                         chunk: int) -> torch.Tensor:
    """log softmax(head(hidden) / temperature)[targets] in float32 for hidden [N, H] and targets [N], `chunk`
    rows at a time, for a head that `fits`."""
    dtype = compute_dtype(hidden)
    cast = head.__dict__.get(WEIGHT_CAST)
    weight = cast(dtype) if cast is not None else head.weight.detach().to(dtype)
    bias = None if head.bias is None else head.bias.detach().to(dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        return _FrozenHeadLogprobs.apply(hidden, hidden.detach().to(dtype), weight, bias, targets, float(temperature),
                                         chunk)
