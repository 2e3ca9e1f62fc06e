"""The frozen output head's log-probabilities with their input gradient computed in forward (models/frozen_head.py)
against autograd through the same head."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_model
from tunelab.data.template import IGNORE_INDEX
from tunelab.methods.fused_lora import fuse_lora_layers, unfuse_lora_layers
from tunelab.models import frozen_head
from tunelab.models.fused_ops import head_logprobs
from tunelab.models.logprobs import _head_logprobs, decoder_and_head, trained_token_logprobs


def frozen_model():
    model = build_tiny_model(vocab_size=400)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def inputs(rows: int = 37, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, 64, generator=generator).requires_grad_()
    targets = torch.randint(0, 400, (rows,), generator=generator)
    upstream = torch.randn(rows, generator=generator)  # per-token weights, as DPO's sequence sums give
    return hidden, targets, upstream


def autograds(head, hidden, targets, temperature):
    """What tunelab computed before: the head called, autograd through log-softmax and nll_loss."""
    return head_logprobs(head, head(hidden), targets, temperature)


def logprobs_and_grad(head, hidden, targets, upstream, temperature, bf16, function=_head_logprobs, chunk=16):
    hidden.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        pieces = [function(head, hidden[s : s + chunk], targets[s : s + chunk], temperature)
                  for s in range(0, hidden.shape[0], chunk)]
    logps = torch.cat(pieces)
    (logps * upstream).sum().backward()
    return logps.detach(), hidden.grad.clone()


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("fused", [False, True])
def test_values_and_input_gradient_equal_autograds(bf16, temperature, fused):
    model = frozen_model()
    _, head = decoder_and_head(model)
    assert frozen_head.fits(head)
    hidden, targets, upstream = inputs()
    reference, reference_grad = logprobs_and_grad(head, hidden, targets, upstream, temperature, bf16, autograds)
    if fused:  # the head's weight cast once and kept
        fuse_lora_layers(model)
    logps, grad = logprobs_and_grad(head, hidden, targets, upstream, temperature, bf16)
    assert (frozen_head.WEIGHT_CAST in head.__dict__) == fused
    torch.testing.assert_close(logps, reference, rtol=0, atol=0)  # the same log-softmax, to the bit
    assert grad.dtype == reference_grad.dtype == torch.float32
    # bf16 rounds (softmax - onehot) before the per-token weight instead of after: measured 0.3% of the norm
    tolerance = 1e-2 if bf16 else 1e-6
    assert (grad - reference_grad).norm() / reference_grad.norm() < tolerance


def test_it_keeps_hidden_sized_slopes_for_backward_not_vocabulary_sized_logits():
    model = frozen_model()
    _, head = decoder_and_head(model)
    hidden, targets, _ = inputs(rows=64)

    def saved_bytes(function) -> int:
        seen: dict[int, int] = {}

        def pack(tensor):
            seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            function(head, hidden, targets, 1.0)
        return sum(seen.values())

    assert saved_bytes(_head_logprobs) == 64 * 64 * 2  # one bf16 row of hidden size per token
    assert saved_bytes(autograds) >= 64 * 400 * 4  # float32 log-softmax over the vocabulary, at least


def test_without_gradients_nothing_is_kept_and_values_match():
    model = frozen_model()
    _, head = decoder_and_head(model)
    hidden, targets, _ = inputs()
    with torch.no_grad():
        reference = autograds(head, hidden, targets, 1.0)
        logps = _head_logprobs(head, hidden, targets, 1.0)
    assert logps.grad_fn is None
    torch.testing.assert_close(logps, reference, rtol=0, atol=0)


def test_a_trained_head_keeps_autograds_path():
    model = build_tiny_model(vocab_size=400)  # full fine-tuning: the head trains
    _, head = decoder_and_head(model)
    fuse_lora_layers(model)
    assert not frozen_head.fits(head)
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
             "targets": torch.tensor([[IGNORE_INDEX, 7, 8, 9]])}
    logps, _ = trained_token_logprobs(model, batch)
    logps.sum().backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    unfuse_lora_layers(model)
    assert frozen_head.WEIGHT_CAST not in head.__dict__


@pytest.mark.parametrize("bf16", [False, True])
def test_chunks_of_any_size_give_the_same_values_and_gradients(bf16):
    model = frozen_model()
    _, head = decoder_and_head(model)
    hidden, targets, upstream = inputs()

    def in_chunks_of(rows: int):
        hidden.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logps = frozen_head.frozen_head_logprobs(head, hidden, targets, 0.7, rows)
        (logps * upstream).sum().backward()
        return logps.detach(), hidden.grad.clone()

    whole, pieces = in_chunks_of(37), in_chunks_of(5)  # one chunk, or eight with a short last one
    # the same up to the matmul's blocking, which depends on the rows it is given
    torch.testing.assert_close(pieces[0], whole[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pieces[1], whole[1], rtol=1e-5, atol=1e-6)
