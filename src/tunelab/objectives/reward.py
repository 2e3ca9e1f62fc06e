"""Reward models: a scalar head on the decoder, trained on preference pairs with the Bradley-Terry loss
-log sigmoid(r(chosen) - r(rejected) - margin), where `margin` is the row's optional margin column (0 without).

A sequence's reward is the head applied to the hidden state of its last token, found from the batch's
`sequence_ids` (not from the pad token, which may equal the end-of-turn token: trl#937), so padding side and
batch layout do not change it. The model is a transformers `*ForSequenceClassification` with one label, so the
saved run loads in `AutoModelForSequenceClassification` (plus PEFT for adapters) and scores the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.models.logprobs import hidden_states
from tunelab.objectives.metrics import Metrics, mean_metrics
from tunelab.objectives.pairs import collate_sequences, collate_shared_prompts

REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def last_token_positions(sequence_ids: torch.Tensor, count: int) -> torch.Tensor:
    """Flat index into [B * T] of each sequence's last token [S]; `sequence_ids` is -1 on padding."""
    flat = sequence_ids.reshape(-1)
    positions = torch.arange(flat.numel(), device=flat.device)
    real = flat >= 0
    last = torch.full((count,), -1, dtype=torch.long, device=flat.device)
    return last.scatter_reduce(0, flat[real], positions[real], reduce="amax")


def sequence_rewards(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The scalar reward of every sequence of the batch [S], in float32."""
    hidden = hidden_states(model, batch)  # [B, T, H]
    last = last_token_positions(batch["sequence_ids"], int(batch["sequence_count"]))
    selected = hidden.reshape(-1, hidden.shape[-1])[last]  # [S, H]
    return reward_head(model)(selected).squeeze(-1).float()


def reward_head(model) -> torch.nn.Module:
    """The score head of a (possibly PEFT-wrapped) sequence-classification model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.score


def make_head_trainable(model) -> None:
    """The score head starts random and must train whatever the method freezes (PEFT already trains its copy)."""
    head = reward_head(model)
    if not any(p.requires_grad for p in head.parameters()):
        head.requires_grad_(True)


def reward_losses(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None) -> torch.Tensor:
    """Per-pair Bradley-Terry loss."""
    difference = chosen - rejected
    if margin is not None:
        difference = difference - margin
    return -F.logsigmoid(difference)


class RewardObjective:
    """A scalar reward trained on preference pairs; the loss is divided by the pairs of the step."""

    data_kind = "preference"
    sequences_per_item = 2
    model_head = "reward"

    def __init__(self) -> None:
        self.share_prefix = False
        """Padding-free batches hold each pair's shared prompt once (collate_shared_prompts): set by the run where
        attention reads that layout (the matmul path)."""

    def collate(self, rows, pad_token_id: int, padding_free: bool) -> dict[str, torch.Tensor]:
        pairs = [item for row in rows for item in row]
        if padding_free and self.share_prefix:
            batch = collate_shared_prompts([p.chosen for p in pairs], [p.rejected for p in pairs])
        else:
            batch = collate_sequences([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_token_id,
                                      padding_free)
        if any(p.margin is not None for p in pairs):
            batch["margin"] = torch.tensor([p.margin or 0.0 for p in pairs], dtype=torch.float32)
        return batch

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["sequence_count"]) // 2

    def input_tokens(self, pair) -> int:
        return len(pair.chosen.input_ids) + len(pair.rejected.input_ids)

    def loss_sum(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        rewards = sequence_rewards(model, batch)
        half = rewards.shape[0] // 2
        chosen, rejected = rewards[:half], rewards[half:]
        losses = reward_losses(chosen, rejected, batch.get("margin"))
        margins = (chosen - rejected).detach()
        metrics = mean_metrics({"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": margins,
                                "rewards/accuracies": (margins > 0).float()})
        return losses.sum(), metrics

