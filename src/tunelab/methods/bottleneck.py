"""Bottleneck adapters (Houlsby-style): a small down-project / activation / up-project block added to the
output of each attention and/or MLP block, the base frozen. PEFT has no such tuner, so this module owns it.

Adapters attach through forward hooks (a public PyTorch API) on each decoder layer's attention output
projection and MLP, and live in `model.bottleneck_adapters`, so they train, checkpoint and save like any
other parameters. The up-projection starts at zero: before training the model is exactly the base model.
They are non-linear, so they cannot be merged into the base weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab.config import AdapterMethod

CONFIG_FILE = "bottleneck_config.json"
WEIGHTS_FILE = "bottleneck_adapter.safetensors"
CANNOT_MERGE = "bottleneck adapters apply a non-linear function, which no weight matrix of the base can absorb"
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class Bottleneck(nn.Module):
    """h -> h + up(act(down(h)))."""

    def __init__(self, hidden: int, reduction_factor: int, activation: str) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, max(1, hidden // reduction_factor))
        self.act = _ACTIVATIONS[activation]()
        self.up = nn.Linear(self.down.out_features, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.enabled = True

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return hidden
        return hidden + self.up(self.act(self.down(hidden)))


def _attach_points(model, placement: str) -> list[tuple[str, nn.Module]]:
    """(name, module) pairs whose output gets an adapter: each layer's o_proj and/or mlp."""
    points = []
    for index, layer in enumerate(model.get_decoder().layers):
        if placement in ("attention", "both"):
            points.append((f"layer{index}_attention", layer.self_attn.o_proj))
        if placement in ("mlp", "both"):
            points.append((f"layer{index}_mlp", layer.mlp))
    return points


def apply(model, config: AdapterMethod):
    for param in model.parameters():
        param.requires_grad_(False)
    hidden = model.config.hidden_size
    adapters = nn.ModuleDict()
    device = next(model.parameters()).device
    for name, module in _attach_points(model, config.placement):
        adapter = Bottleneck(hidden, config.reduction_factor, config.activation).to(device)
        adapters[name] = adapter
        module.register_forward_hook(lambda _module, _inputs, output, adapter=adapter: adapter(output))
    model.add_module("bottleneck_adapters", adapters)
    return model


@contextmanager
def without_adapter(model) -> Iterator[None]:
    """A context in which the adapters pass their input through: the model computes what its base computes."""
    adapters = list(model.bottleneck_adapters.values())
    for adapter in adapters:
        adapter.enabled = False
    try:
        yield
    finally:
        for adapter in adapters:
            adapter.enabled = True


def quantization(config, compute_dtype):
    return None


def save(model, run_dir: Path, config: AdapterMethod) -> None:
    """Only the adapters: the base comes from the run's config.yaml, like a PEFT adapter."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.bottleneck_adapters.state_dict().items()}
    save_file(tensors, run_dir / WEIGHTS_FILE)
    (run_dir / CONFIG_FILE).write_text(json.dumps(config.model_dump(), indent=2))


def load(model, run_dir: Path):
    config = AdapterMethod.model_validate(json.loads((run_dir / CONFIG_FILE).read_text()))
    model = apply(model, config)
    model.bottleneck_adapters.load_state_dict(load_file(run_dir / WEIGHTS_FILE))
    return model
