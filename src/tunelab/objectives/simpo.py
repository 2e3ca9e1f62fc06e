"""SimPO (Meng et al. 2024): a margin gamma between the chosen and rejected replies' per-token average
log-probabilities scaled by beta. No reference model."""

from __future__ import annotations

import torch.nn.functional as F

from tunelab.config import SimpoObjective
from tunelab.objectives.pairs import PairLogps, PairLosses


def simpo_losses(policy: PairLogps, reference: PairLogps | None, config: SimpoObjective) -> PairLosses:
    chosen, rejected = policy.averaged()
    logits = config.beta * (chosen - rejected) - config.gamma
    smoothing = config.label_smoothing
    losses = -F.logsigmoid(logits) * (1 - smoothing) - F.logsigmoid(-logits) * smoothing
    if config.sft_weight:
        losses = losses + config.sft_weight * -chosen
    return PairLosses(losses, config.beta * chosen.detach(), config.beta * rejected.detach())
