"""GRPO's arithmetic, apart from its objective's plumbing: group-relative advantages, the clipped per-token loss
with its KL estimate, the rollout's logged reward metrics, and the layout of a micro-batch as groups of completions
after a shared prompt."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch

from tunelab.config import GrpoObjective as GrpoConfig
from tunelab.data.template import IGNORE_INDEX, TokenizedSample
from tunelab.objectives.metrics import Metrics

ADVANTAGE_EPS = 1e-4  # TRL's: a group whose rewards are all equal gets advantages 0, not a division by zero


@dataclass
class Completion:
    """One sampled completion after its prompt: what a GRPO step trains on."""

    sample: TokenizedSample
    """Prompt ids (untrained) followed by the completion's ids through its stop token (trained)."""
    advantage: float
    truncated: bool
    """Cut at max_new_tokens before a stop token."""
    index: int = 0
    """Position in its rollout."""
    old_logps: list[float] | None = None
    """Log-probabilities of its tokens under the policy that sampled it, kept at the rollout's first update for
    the later ones (updates_per_rollout > 1)."""


@dataclass
class GreedyEvaluation:
    """What GrpoObjective.evaluate measured on some prompts."""

    replies: list[str]
    scores: torch.Tensor
    """Each reward of each reply [C, R], NaN where a reward gave None."""
    total: torch.Tensor
    """Each reply's weighted total [C], NaN where no reward judged it."""
    metrics: dict[str, float]
    """evaluate's result."""


def nanstd(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The (Bessel-corrected) std of the values that are not NaN, NaN where fewer than two are: TRL's nanstd."""
    keep = dim is not None
    mean = values.nanmean(dim=dim, keepdim=True) if keep else values.nanmean()
    count = (~values.isnan()).sum(dim=dim, keepdim=keep) if keep else (~values.isnan()).sum()
    variance = ((values - mean) ** 2).nansum(dim=dim, keepdim=keep) if keep else ((values - mean) ** 2).nansum()
    std = (variance / (count - 1).clamp(min=1)).sqrt()
    std = torch.where(count > 1, std, torch.full_like(std, math.nan))
    return std.squeeze(dim) if keep else std


def reward_stds(rewards: torch.Tensor, group_size: int, scale: str) -> torch.Tensor:
    """The std each completion's advantage is scaled by [G * group_size]: its group's (group, and none, where TRL
    still logs it as frac_reward_zero_std) or the batch's; NaN rewards (no reward judged) left out."""
    if scale == "batch":
        return nanstd(rewards).expand_as(rewards)
    return nanstd(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str) -> torch.Tensor:
    """Each reward [G * group_size] minus its group's mean, divided by the group's (or the batch's) std, as TRL
    computes it: a NaN reward (no reward judged the completion) is left out of the mean and std and gets advantage
    0, as does a completion whose group (or batch) has only one judged."""
    grouped = rewards.view(-1, group_size)
    advantages = (grouped - grouped.nanmean(dim=1, keepdim=True)).view(-1)
    if scale != "none":
        advantages = advantages / (reward_stds(rewards, group_size, scale) + ADVANTAGE_EPS)
    return advantages.nan_to_num(nan=0.0)


def reward_metrics(scores: torch.Tensor, total: torch.Tensor, names: list[str],
                   logged: list[dict[str, list[float]]], group_size: int, scale: str) -> Metrics:
    """What TRL logs of a rollout's rewards (scores [C, R], their weighted total [C], NaN where none judged): the
    mean and std of the total over the judged completions, the share whose scaling std is 0, each reward's mean and
    std where it judged, and the mean of what it gave log_metric (`logged`: values by name) as
    rewards/<name>/<metric>."""
    stds = reward_stds(total, group_size, scale)
    metrics: Metrics = {
        "reward": (float(total.nanmean()), 1),
        "reward_std": (float(nanstd(total)), 1),
        "frac_reward_zero_std": (float(torch.isclose(stds, torch.zeros_like(stds)).float().mean()), 1),
    }
    for index, (name, values) in enumerate(zip(names, logged, strict=True)):
        column = scores[:, index]
        column = column[~column.isnan()]
        metrics[f"rewards/{name}/mean"] = (float(column.mean()) if len(column) else math.nan, 1)
        metrics[f"rewards/{name}/std"] = (float(column.std()) if len(column) > 1 else 0.0, 1)
        metrics |= {f"rewards/{name}/{metric}": (sum(given) / len(given), 1) for metric, given in values.items()}
    return metrics


def counted_completions(sizes: list[int], weights: Sequence[float] | None) -> tuple[list[int], list[int]]:
    """(the completions that count in each micro-batch, `sizes` completions each: all, or none in a stand-in whose
    weight is 0; the positions of those that count in the rollout). A stand-in's stay out of every statistic."""
    counted = [size if weight else 0 for size, weight in zip(sizes, weights or [1.0] * len(sizes), strict=True)]
    starts = [0, *accumulate(sizes)][:-1]
    return counted, [row for start, count in zip(starts, counted, strict=True) for row in range(start, start + count)]


def joined_values(everyone: list[list[dict[str, list[float]]]]) -> list[dict[str, list[float]]]:
    """Each reward's log_metric values from every process, in rank order (`everyone`: by process, then reward)."""
    joined: list[dict[str, list[float]]] = [{} for _ in everyone[0]]
    for per_reward in everyone:
        for into, values in zip(joined, per_reward, strict=True):
            for name, given in values.items():
                into.setdefault(name, []).extend(given)
    return joined


def token_losses(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, config: GrpoConfig,
                 reference_logps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token loss [N], per-token KL [N] (zeros without a reference), clipped [N] bool) for completion tokens
    with their sequence's advantage [N]."""
    ratio = torch.exp(logps - old_logps)
    clipped_ratio = ratio.clamp(1 - config.epsilon, 1 + config.clip_high)
    losses = -torch.min(ratio * advantages, clipped_ratio * advantages)
    clipped = ((ratio < 1 - config.epsilon) & (advantages < 0)) | ((ratio > 1 + config.clip_high) & (advantages > 0))
    kl = torch.zeros_like(logps)
    if reference_logps is not None and config.beta:
        delta = reference_logps - logps
        kl = torch.exp(delta) - delta - 1
        losses = losses + config.beta * kl
    return losses, kl.detach(), clipped


def prompt_groups(completions: list[Completion], pad_token_id: int) -> dict[str, torch.Tensor]:
    """The micro-batch as groups of consecutive completions after the same prompt (what a rollout makes): the
    prompts back to back (`group_prompt_ids`, `group_prompt_lengths`), `group_sizes`, and the completions alone,
    right-padded (`completion_ids` [C, L], `completion_lengths` [C])."""
    prompts: list[list[int]] = []
    sizes: list[int] = []
    replies: list[list[int]] = []
    for completion in completions:
        ids = completion.sample.input_ids
        start = completion.sample.labels.count(IGNORE_INDEX)
        if not prompts or prompts[-1] != ids[:start]:
            prompts.append(ids[:start])
            sizes.append(0)
        sizes[-1] += 1
        replies.append(ids[start:])
    width = max(1, max(len(r) for r in replies))
    return {
        "group_prompt_ids": torch.tensor([t for p in prompts for t in p]),
        "group_prompt_lengths": torch.tensor([len(p) for p in prompts]),
        "group_sizes": torch.tensor(sizes),
        "completion_ids": torch.tensor([r + [pad_token_id] * (width - len(r)) for r in replies]),
        "completion_lengths": torch.tensor([len(r) for r in replies]),
    }


def split_groups(batch: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """(prompt [P] of each group, its completions [G, L], their lengths [G]) from prompt_groups' tensors."""
    sizes = batch["group_sizes"].tolist()
    prompts = list(batch["group_prompt_ids"].split(batch["group_prompt_lengths"].tolist()))
    return prompts, list(batch["completion_ids"].split(sizes)), list(batch["completion_lengths"].split(sizes))
