"""Direct preference optimisation (Rafailov et al. 2023) and its variants that change only the loss of the
reference-relative log-ratios: IPO (Azar et al. 2023), SLiC's hinge (Zhao et al. 2023), robust DPO (Chowdhury
et al. 2024), EXO (Ji et al. 2024), NCA (Chen et al. 2024), BCO's pairwise form (Jung et al. 2024), SPPO with hard
labels (Wu et al. 2024), APO-zero and APO-down (D'Oosterlinck et al. 2024), DiscoPOP (Chan et al. 2024) and a
length-normalised sigmoid, as TRL's DPOTrainer names them. Every loss_type is its own formula here: none falls
back to another."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tunelab.config import DpoObjective
from tunelab.objectives.pairs import PairLogps, PairLosses

AVERAGED = ("ipo", "sigmoid_norm")
"""Loss types on per-token averaged log-probabilities (IPO's paper's definition: on sums a long reply's margin
would dwarf 1/(2 beta)); the others compare sums."""


def dpo_losses(policy: PairLogps, reference: PairLogps, config: DpoObjective, *,
               averaged: bool | None = None) -> PairLosses:
    """Per-pair DPO losses and the implied rewards (beta x log-ratio) of both replies. `averaged`: compare per-token
    averaged log-probabilities (default: for the AVERAGED loss types) or sums (False: online DPO's ipo, as TRL's
    OnlineDPOTrainer takes it on sums)."""
    beta, smoothing = config.beta, config.label_smoothing
    if (config.loss_type in AVERAGED) if averaged is None else averaged:
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
    elif config.loss_type == "sigmoid_norm":
        losses = -F.logsigmoid(beta * margin)
    else:
        losses = _other_losses(config, beta * chosen_logratios, beta * rejected_logratios, beta * margin)
    if config.sft_weight:
        losses = losses + config.sft_weight * -(policy.chosen / policy.chosen_tokens.clamp(min=1))
    return PairLosses(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def _other_losses(config: DpoObjective, chosen: torch.Tensor, rejected: torch.Tensor, scaled_margin: torch.Tensor
                  ) -> torch.Tensor:
    """The loss types that read each reply's scaled log-ratio (`chosen`, `rejected`: beta x log-ratio) or weigh the
    scaled margin otherwise than a log-sigmoid."""
    z = scaled_margin
    if config.loss_type == "exo_pair":  # KL(softmax over the pair || (1 - eps, eps)), EXO's Eq. 16 for K = 2
        eps = config.label_smoothing
        return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + \
            torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps))
    if config.loss_type == "nca_pair":
        return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)
    if config.loss_type == "bco_pair":
        return -F.logsigmoid(chosen) - F.logsigmoid(-rejected)
    if config.loss_type == "sppo_hard":  # chosen log-ratio towards 1/(2 beta), rejected towards -1/(2 beta)
        return (chosen / config.beta - 0.5 / config.beta) ** 2 + (rejected / config.beta + 0.5 / config.beta) ** 2
    if config.loss_type == "apo_zero":  # chosen replies better than the model's own: raise chosen, lower rejected
        return (1 - torch.sigmoid(chosen)) + torch.sigmoid(rejected)
    if config.loss_type == "apo_down":  # chosen replies worse than the model's own: lower both, rejected more
        return torch.sigmoid(chosen) + (1 - torch.sigmoid(z))
    if config.loss_type == "discopop":  # log-sigmoid and exponential losses blended by the margin
        blend = torch.sigmoid(z / config.discopop_tau)
        return -F.logsigmoid(z) * (1 - blend) + torch.exp(-z) * blend
    raise ValueError(f"unknown DPO loss_type {config.loss_type!r}")

