"""Freeze tuning: only the last N transformer blocks (and any named modules) train."""

from __future__ import annotations

import re

from tunelab.config import FreezeMethod
from tunelab.errors import ConfigError

_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def apply(model, config: FreezeMethod):
    indices = {int(m.group(1)) for name, _ in model.named_parameters() if (m := _LAYER_INDEX.search(name))}
    if not indices and config.trainable_layers:
        raise ConfigError("this model has no `.layers.N.` blocks to unfreeze", where="method.trainable_layers")
    first_trained = max(indices, default=-1) + 1 - config.trainable_layers
    trained = 0
    for name, param in model.named_parameters():
        match = _LAYER_INDEX.search(name)
        in_last_blocks = match is not None and int(match.group(1)) >= first_trained
        named = any(part in name for part in config.trainable_modules)
        param.requires_grad_(in_last_blocks or named)
        trained += int(in_last_blocks or named)
    if trained == 0:
        raise ConfigError("nothing left to train: raise trainable_layers or name trainable_modules", where="method")
    return model


def quantization(config, compute_dtype):
    return None
