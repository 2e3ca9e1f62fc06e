"""RMSNorm as one autograd function (models/fused_norm.py) against transformers' own, on a tiny real model."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_model
from tunelab.methods.fused_lora import fuse_lora_layers, unfuse_lora_layers
from tunelab.models.fused_norm import fusable_norms


def norm_outputs_and_grads(norm, x, upstream):
    x = x.detach().requires_grad_()
    norm.zero_grad()
    out = norm(x)
    (out * upstream).sum().backward()
    return out.detach(), x.grad, norm.weight.grad.clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_and_gradients_equal_transformers(dtype):
    model = build_tiny_model(vocab_size=400)
    norms = fusable_norms(model)
    assert len(norms) == 2 * 2 + 1  # two a layer and the final one
    norm = norms[0]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(norm.weight.shape, generator=generator))
    x = (3 * torch.randn(2, 9, 64, generator=generator)).to(dtype)  # a residual stream far from unit scale
    upstream = torch.randn(2, 9, 64, generator=generator)
    reference = norm_outputs_and_grads(norm, x, upstream)
    fuse_lora_layers(model)
    assert "forward" in norm.__dict__
    fused = norm_outputs_and_grads(norm, x, upstream)
    torch.testing.assert_close(fused[0], reference[0], rtol=0, atol=0)  # transformers' forward, to the bit
    for name, got, want in zip(("output", "input grad", "weight grad"), fused, reference, strict=True):
        assert got.dtype == want.dtype, name
        # float32 throughout, rounded once to the input's dtype where transformers rounds there too
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        assert float((got.float() - want.float()).norm() / want.float().norm()) < tolerance, name
    unfuse_lora_layers(model)
    assert not any("forward" in n.__dict__ for n in norms)


@pytest.mark.parametrize("weight_trains", [False, True])
def test_it_keeps_only_the_input_and_a_scale_a_row_for_backward(weight_trains):
    model = build_tiny_model(vocab_size=400)
    norm = fusable_norms(model)[0]
    norm.weight.requires_grad_(weight_trains)  # frozen under LoRA, trained in full fine-tuning

    def saved_bytes() -> int:
        seen: dict[int, int] = {}

        def pack(tensor):
            seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        x = torch.randn(4, 16, 64, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            norm(x)
        seen.pop(norm.weight.untyped_storage().data_ptr(), None)
        return sum(seen.values())

    transformers_bytes = saved_bytes()
    fuse_lora_layers(model)
    fused_bytes = saved_bytes()
    assert fused_bytes == 4 * 16 * 64 * 4 + 4 * 16 * 4  # the float32 input and one float32 scale a row
    # transformers keeps the same when the weight is frozen, and the normalised copy too when it trains
    assert transformers_bytes == fused_bytes + (4 * 16 * 64 * 4 if weight_trains else 0)
