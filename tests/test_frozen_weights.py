"""Frozen linear weights stored in bf16 for the training steps compute exactly what bf16 autocast computes from
the float32 masters, and the masters come back untouched."""

from __future__ import annotations

import torch

from tunelab.config import LoraMethod
from tunelab.data.batching import collate
from tunelab.data.template import IGNORE_INDEX, TokenizedSample
from tunelab.methods.lora import apply
from tunelab.objectives.sft import sft_loss_sum
from tunelab.train.frozen_weights import FrozenWeights


def lora_model(tiny_model_dir, name: str = "lora"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    model = apply(model, LoraMethod(name=name, r=4))
    for param in model.parameters():  # non-zero B so the adapters change the loss and every gradient
        if param.requires_grad:
            torch.nn.init.normal_(param, std=0.05)
    return model.train()


def batch():
    generator = torch.Generator().manual_seed(1)
    rows = []
    for n in (19, 11, 15):
        ids = torch.randint(3, 390, (n,), generator=generator).tolist()
        rows.append([TokenizedSample(ids, [IGNORE_INDEX] * 4 + ids[4:], "t")])
    return collate(rows, pad_token_id=0, packed=False)


def loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, tokens = sft_loss_sum(model, inputs)
    (loss / tokens).backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_bf16_frozen_weights_give_bitwise_the_same_loss_and_gradients(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    inputs = batch()
    masters = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    reference_loss, reference_grads = loss_and_grads(model, inputs)

    frozen = FrozenWeights(model, "bf16")
    frozen.to_compute()
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    head_dtype = model.get_output_embeddings().weight.dtype
    loss, grads = loss_and_grads(model, inputs)
    frozen.to_masters()

    assert frozen.count == 7 * 2 + 1  # every frozen projection of both blocks, and the output head
    assert all(dtypes[n] == torch.bfloat16 for n in dtypes if n.endswith("base_layer.weight"))
    assert dtypes["base_model.model.model.embed_tokens.weight"] == torch.float32  # tied to the output head
    assert head_dtype == torch.bfloat16
    assert all(dtypes[n] == torch.float32 for n in dtypes if "lora_" in n or "norm" in n)
    assert loss == reference_loss
    for name, grad in grads.items():
        assert torch.equal(grad, reference_grads[name]), name
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied again
    for name, param in model.named_parameters():  # the very same float32 storage, unchanged
        assert param.data_ptr() == masters[name][0] and torch.equal(param, masters[name][1]), name


def test_masters_context_restores_float32_for_evaluation_and_goes_back(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    frozen = FrozenWeights(model, "bf16")
    frozen.to_compute()
    weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    with frozen.masters():
        assert weight.dtype == torch.float32
    assert weight.dtype == torch.bfloat16
    frozen.to_masters()


def test_nothing_is_swapped_in_fp32(tiny_model_dir):
    assert FrozenWeights(lora_model(tiny_model_dir), "fp32").count == 0


def test_dora_base_layers_keep_float32(tiny_model_dir):
    """DoRA adds the float32 base weight to its update outside any matmul: only the output head is swapped."""
    frozen = FrozenWeights(lora_model(tiny_model_dir, "dora"), "bf16")
    assert frozen.swaps == [] and frozen.head is not None
