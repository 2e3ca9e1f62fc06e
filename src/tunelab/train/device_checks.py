"""Settings the training device cannot run, refused before a run directory is written (exit 2 naming the key)."""

from __future__ import annotations

import torch

from tunelab.config import RunConfig
from tunelab.errors import ConfigError
from tunelab.models.liger import liger_unavailable
from tunelab.models.varlen import varlen_unavailable
from tunelab.train.precision import resolve_precision


def refuse_what_the_device_cannot_run(config: RunConfig, device: torch.device) -> None:
    if config.train.kernels == "liger" and (problem := liger_unavailable(device)):
        raise ConfigError(f"liger {problem}", where="train.kernels")
    if config.train.attention == "varlen" and (
            problem := varlen_unavailable(device, resolve_precision(config.train.precision, device))):
        raise ConfigError(f"varlen {problem}", where="train.attention")
