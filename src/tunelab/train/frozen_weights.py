"""Frozen linear weights stored in the compute dtype while the training steps run.

Under bf16 autocast a linear layer casts its float32 weight to bf16 at every forward, and autocast caches
that copy only for trainable leaves: a frozen base (LoRA, QLoRA's non-quantised layers, IA3, adapters,
prompt learning, `freeze`) is re-cast at every step and each bf16 copy is kept for backward. Storing those
weights in bf16 for the steps computes exactly the same products (autocast rounds the same way) without the
casts. The float32 masters are kept and swapped back for evaluation, generation and saving, which may run
outside autocast.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class FrozenWeights:
    """Swaps frozen float32 linear weights (and biases) between their masters and compute-dtype copies."""

    def __init__(self, model: torch.nn.Module, precision: str):
        self.swaps: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = []
        self.head: tuple[torch.nn.Linear, torch.nn.Parameter, torch.nn.Parameter] | None = None
        if precision != "bf16":
            return
        shared = _embedding_weights(model)  # a tied output head shares the input embedding (see below)
        dora = _dora_base_layers(model)  # DoRA adds the float32 weight to its update outside the matmul
        seen: set[int] = set()
        for module in model.modules():
            if type(module) is not torch.nn.Linear or id(module) in dora:  # quantised layers keep their storage
                continue
            for param in (module.weight, module.bias):
                if param is None or param.requires_grad or param.dtype != torch.float32:
                    continue
                if id(param) in seen or param.data_ptr() in shared:
                    continue
                seen.add(id(param))
                self.swaps.append((param, param.data, param.data.to(torch.bfloat16)))
        head = _output_head(model)
        if (type(head) is torch.nn.Linear and head.weight.data_ptr() in shared and not head.weight.requires_grad
                and head.weight.dtype == torch.float32):
            # Tied to the input embedding, whose lookups must stay float32: the head gets its own bf16 copy.
            copy = torch.nn.Parameter(head.weight.detach().to(torch.bfloat16), requires_grad=False)
            self.head = (head, head.weight, copy)

    @property
    def count(self) -> int:
        return len(self.swaps) + (self.head is not None)

    def to_compute(self) -> None:
        for param, _, compute in self.swaps:
            param.data = compute
        if self.head is not None:
            self.head[0].weight = self.head[2]

    def to_masters(self) -> None:
        for param, master, _ in self.swaps:
            param.data = master
        if self.head is not None:
            self.head[0].weight = self.head[1]

    @contextmanager
    def masters(self) -> Iterator[None]:
        """Masters for the body (an evaluation inside the training loop), compute copies again after."""
        self.to_masters()
        try:
            yield
        finally:
            self.to_compute()


def _output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None


def _embedding_weights(model: torch.nn.Module) -> set[int]:
    return {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Embedding)}


def _dora_base_layers(model: torch.nn.Module) -> set[int]:
    return {id(m.get_base_layer()) for m in model.modules() if any(getattr(m, "use_dora", {}).values())}
