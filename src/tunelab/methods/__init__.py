"""How a model becomes trainable. One module per method; `METHODS` maps `method.name` to it.

Each method module offers:
    apply(model, config) -> model            make the loaded base model trainable
    quantization(config, compute_dtype)      bitsandbytes settings for loading the base, or None
"""

from __future__ import annotations

from types import ModuleType

from tunelab.methods import full, lora

METHODS: dict[str, ModuleType] = {
    "full": full,
    "lora": lora,
    "qlora": lora,
}


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights count as the values they hold."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if getattr(param, "quant_state", None) is not None or param.dtype == __import__("torch").uint8:
            n *= 2  # two 4-bit values per stored byte
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total
