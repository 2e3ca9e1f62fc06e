"""Direct preference optimisation (Rafailov et al. 2023) and its variants that change only the loss of the
reference-relative margin: IPO (Azar et al. 2023), SLiC's hinge (Zhao et al. 2023) and robust DPO (Chowdhury
et al. 2024). Every loss_type is its own formula here: none falls back to another."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.config import DpoObjective
from tunelab.objectives.pairs import PairLogps, PairLosses


def dpo_losses(policy: PairLogps, reference: PairLogps, config: DpoObjective) -> PairLosses:
    """Per-pair DPO losses and rewards. IPO compares per-token averaged log-probabilities (its paper's
    definition; on sums a long reply's margin would dwarf 1/(2 beta)); the others compare sums."""
    beta, smoothing = config.beta, config.label_smoothing
    if config.loss_type == "ipo":
        policy_chosen, policy_rejected = policy.averaged()
        reference_chosen, reference_rejected = reference.averaged()
    else:
        policy_chosen, policy_rejected = policy.chosen, policy.rejected
        reference_chosen, reference_rejected = reference.chosen, reference.rejected
    chosen_logratios = policy_chosen - reference_chosen
    rejected_logratios = policy_rejected - reference_rejected
    margin = chosen_logratios - rejected_logratios
    if config.loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * margin) * (1 - smoothing) - F.logsigmoid(-beta * margin) * smoothing
    elif config.loss_type == "robust":
        losses = (-F.logsigmoid(beta * margin) * (1 - smoothing) + F.logsigmoid(-beta * margin) * smoothing) / (
            1 - 2 * smoothing)
    elif config.loss_type == "hinge":
        losses = torch.relu(1 - beta * margin)
    elif config.loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {config.loss_type!r}")
    if config.sft_weight:
        losses = losses + config.sft_weight * -(policy.chosen / policy.chosen_tokens.clamp(min=1))
    return PairLosses(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())
