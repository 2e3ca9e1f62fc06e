"""KTO (Ethayarajh et al. 2024) on unpaired feedback: each reply's log-ratio to the reference is pushed above
(good replies) or below (bad ones) a reference point, the policy's KL divergence from the reference.

The KL term is estimated as TRL does, from replies paired with prompts they do not answer (each row's
`mismatched` sequence, built when the data is prepared), averaged over the micro-batch, clamped at zero and
without gradient; the policy scores those sequences without building a graph.
"""

from __future__ import annotations

import torch

from tunelab.config import KtoObjective as KtoConfig
from tunelab.data.preference import TokenizedFeedback
from tunelab.models.logprobs import sequence_logprobs
from tunelab.objectives.metrics import Metrics, mean_metrics
from tunelab.objectives.pairs import Reference, collate_sequences, collate_shared_sequences

KL_PREFIX = "kl/"
KTO_METRICS = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl")


def kto_losses(policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
               config: KtoConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row weighted losses, rewards beta x log-ratio) for summed log-probabilities [P] of each reply."""
    logratios = policy - reference
    good = 1 - torch.sigmoid(config.beta * (logratios - kl))
    bad = 1 - torch.sigmoid(config.beta * (kl - logratios))
    losses = torch.where(desirable, config.desirable_weight * good, config.undesirable_weight * bad)
    return losses, config.beta * logratios.detach()


class KtoObjective:
    """KTO on feedback rows; the loss is divided by the rows of the optimiser step."""

    data_kind = "feedback"
    sequences_per_item = 2
    model_head = "lm"

    def __init__(self, config: KtoConfig, reference: Reference) -> None:
        self.config = config
        self.reference = reference
        self.share_prefix = False
        """Padding-free batches hold the leading tokens their replies share once (collate_shared_sequences): set
        by the run where attention reads that layout (the matmul path)."""

    def sequences(self, row: TokenizedFeedback):
        return row.sample, row.mismatched

    def collate(self, rows, pad_token_id: int, padding_free: bool) -> dict[str, torch.Tensor]:
        items: list[TokenizedFeedback] = [item for row in rows for item in row]
        precomputed = self.reference.precomputed and items[0].reference_logps is not None

        def sequences(which: int) -> dict[str, torch.Tensor]:  # 0: the replies, 1: their mismatched partners
            picked = [i.sample if which == 0 else i.mismatched for i in items]
            reference = [i.reference_logps[which] for i in items] if precomputed else None
            if padding_free and self.share_prefix:
                return collate_shared_sequences(picked, reference)
            return collate_sequences(picked, pad_token_id, padding_free, reference)

        replies, mismatched = sequences(0), sequences(1)
        if "shared_tokens" in replies:  # what the loop counts as not computed: both passes'
            replies["shared_tokens"] = replies["shared_tokens"] + mismatched["shared_tokens"]
        replies["desirable"] = torch.tensor([i.label for i in items])
        return {**replies, **{KL_PREFIX + key: value for key, value in mismatched.items()}}

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """What the loss is divided by: feedback rows."""
        return int(batch["sequence_count"])

    def input_tokens(self, row: TokenizedFeedback) -> int:
        return len(row.sample.input_ids) + len(row.mismatched.input_ids)

    def loss_sum(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        replies = {k: v for k, v in batch.items() if not k.startswith(KL_PREFIX)}
        mismatched = {k.removeprefix(KL_PREFIX): v for k, v in batch.items() if k.startswith(KL_PREFIX)}
        policy, _ = sequence_logprobs(model, replies)
        with torch.no_grad():
            policy_kl, _ = sequence_logprobs(model, mismatched)
        reference, _ = self.reference.logprobs(model, replies)
        reference_kl, _ = self.reference.logprobs(model, mismatched)
        kl = (policy_kl - reference_kl).mean().clamp(min=0)
        desirable = replies["desirable"]
        losses, rewards = kto_losses(policy, reference, desirable, kl, self.config)
        metrics = mean_metrics({"rewards/chosen": rewards[desirable], "rewards/rejected": rewards[~desirable],
                                "logps/chosen": policy.detach()[desirable],
                                "logps/rejected": policy.detach()[~desirable]})
        metrics["kl"] = (float(kl), 1)
        return losses.sum(), metrics
