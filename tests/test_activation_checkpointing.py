"""Activation checkpointing recomputes each decoder layer in backward and changes no gradient."""

from __future__ import annotations

import torch

from tunelab.config import LoraMethod
from tunelab.data.batching import collate
from tunelab.data.template import IGNORE_INDEX, TokenizedSample
from tunelab.methods.lora import apply
from tunelab.models.load import enable_activation_checkpointing
from tunelab.objectives.sft import sft_loss_sum


def gradients_and_layer_calls(tiny_model_dir, every_n_layers: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), LoraMethod(name="lora"))
    for param in model.parameters():
        if param.requires_grad:
            torch.nn.init.normal_(param, std=0.05)
    if every_n_layers:
        enable_activation_checkpointing(model, every_n_layers)
    calls = []
    for layer in model.get_base_model().model.layers:  # module hooks do not fire on recompute: wrap forward
        forward = layer.mlp.forward
        layer.mlp.forward = lambda *args, _forward=forward, **kwargs: calls.append(1) or _forward(*args, **kwargs)
    generator = torch.Generator().manual_seed(1)
    rows = []
    for n in (17, 9, 12):
        ids = torch.randint(3, 390, (n,), generator=generator).tolist()
        rows.append([TokenizedSample(ids, [IGNORE_INDEX] * 3 + ids[3:], "t")])
    model.train()
    loss, tokens = sft_loss_sum(model, collate(rows, pad_token_id=0, packed=False))
    (loss / tokens).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, len(calls)


def test_checkpointed_layers_run_twice_and_give_the_same_gradients(tiny_model_dir):
    reference, plain_calls = gradients_and_layer_calls(tiny_model_dir, 0)
    grads, checkpointed_calls = gradients_and_layer_calls(tiny_model_dir, 1)
    assert plain_calls == 2 and checkpointed_calls == 4  # each of the 2 layers recomputed in backward
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], rtol=0, atol=0)
    _, every_second = gradients_and_layer_calls(tiny_model_dir, 2)
    assert every_second == 3  # only the first of the two layers is checkpointed
