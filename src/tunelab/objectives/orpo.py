"""ORPO (Hong et al. 2024): the chosen reply's cross-entropy plus beta times an odds-ratio penalty that pushes
the rejected reply's odds below the chosen one's. No reference model."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tunelab.config import OrpoObjective
from tunelab.objectives.pairs import PairLogps, PairLosses


def log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and far below it (x is clamped just under 0)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_losses(policy: PairLogps, reference: PairLogps | None, config: OrpoObjective) -> PairLosses:
    """Per-pair ORPO losses on per-token averaged log-probabilities (the paper's odds of a reply)."""
    chosen, rejected = policy.averaged()
    log_odds = (chosen - rejected) - (log1m_exp(chosen) - log1m_exp(rejected))
    losses = -chosen - config.beta * F.logsigmoid(log_odds)
    return PairLosses(losses, config.beta * chosen.detach(), config.beta * rejected.detach())
