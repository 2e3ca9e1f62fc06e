"""Full fine-tuning: every weight trains."""

from __future__ import annotations


def apply(model, config):
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def quantization(config, compute_dtype):
    return None
