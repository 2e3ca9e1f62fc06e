"""RLOO's arithmetic (REINFORCE leave-one-out, Ahmadian et al. 2024), as TRL 1.16's RLOOTrainer computes it; the
rollout, rewards and checkpointed state are GRPO's (objectives/grpo.py), only these differ:
- the KL penalty is taken off the reward, not added to the loss: beta x the completion's KL to the reference, the
  sum over its tokens of log pi(token) - log ref(token) under the policy that sampled it (the first-order estimate
  of the RLOO paper, which can be negative for a token, unlike GRPO's k3);
- a completion's baseline is the mean reward of the other completions of its prompt (those some reward judged);
- the probability ratio is the completion's (its tokens' log-probabilities summed), clipped, and the loss is the
  mean over completions of -min(ratio x A, clip(ratio) x A).
"""

from __future__ import annotations

import torch

from tunelab.config import RlooObjective as RlooConfig
from tunelab.objectives.grpo_loss import ADVANTAGE_EPS, nanstd


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int, normalize: bool) -> torch.Tensor:
    """Each reward [G * group_size] minus the mean of its group's other judged rewards; 0 for a completion no
    reward judged (NaN) or the only judged one of its group; with `normalize` the step's advantages are then
    scaled to mean 0 and std 1 (over the judged ones, as TRL does it)."""
    grouped = rewards.view(-1, group_size)
    judged = (~grouped.isnan()).sum(dim=1, keepdim=True)
    baselines = (grouped.nansum(dim=1, keepdim=True) - grouped) / (judged - 1)
    advantages = (grouped - baselines).view(-1)
    if normalize:
        advantages = (advantages - advantages.nanmean()) / (nanstd(advantages) + ADVANTAGE_EPS)
    return advantages.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def sequence_kl(policy_logps: torch.Tensor, reference_logps: torch.Tensor, owners: torch.Tensor,
                sequences: int) -> torch.Tensor:
    """Each completion's KL estimate [sequences]: its tokens' log-ratios to the reference, summed (owners [N]: the
    completion each token [N] belongs to)."""
    log_ratios = policy_logps - reference_logps
    return log_ratios.new_zeros(sequences).index_add(0, owners, log_ratios)


def sequence_losses(logps: torch.Tensor, old_logps: torch.Tensor, owners: torch.Tensor, sequences: int,
                    advantages: torch.Tensor, config: RlooConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(each completion's loss [sequences], whether its ratio was clipped [sequences] bool) from its tokens'
    log-probabilities under the policy [N] and the one that sampled it [N], and its advantage [sequences]."""
    summed = logps.new_zeros(sequences).index_add(0, owners, logps)
    old_summed = old_logps.new_zeros(sequences).index_add(0, owners, old_logps.to(logps.dtype))
    ratio = torch.exp(summed - old_summed)
    clipped_ratio = ratio.clamp(1 - config.epsilon, 1 + config.clip_high)
    losses = -torch.min(ratio * advantages, clipped_ratio * advantages)
    clipped = ((ratio < 1 - config.epsilon) & (advantages < 0)) | ((ratio > 1 + config.clip_high) & (advantages > 0))
    return losses, clipped


def zero_std_share(rewards: torch.Tensor, group_size: int) -> float:
    """The share of completions whose group's rewards [G * group_size] (KL penalty taken off) have std 0: TRL's
    frac_reward_zero_std for RLOO, which with beta > 0 is about 0 (each reply's KL differs)."""
    stds = nanstd(rewards.view(-1, group_size), dim=1)
    return float(torch.isclose(stds, torch.zeros_like(stds)).float().mean())
