"""What the preference objectives share: batches of whole sequences, per-sequence log-probabilities, and the
reference those log-probabilities are compared with.

A batch holds S sequences (a pair's chosen and rejected replies, or a feedback row's reply and its mismatched
partner), one per padded row or back to back in one padding-free row; `sequence_ids` [B, T] says which sequence
each position belongs to (-1 on padding), so a sequence's log-probability does not depend on the layout, its
neighbours or the padding side.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from tunelab.data.batching import collate, shared_layout
from tunelab.data.template import TokenizedSample
from tunelab.models.logprobs import sequence_logprobs
from tunelab.objectives.metrics import Metrics, mean_metrics

PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "logps/margins", "preference_accuracy")
"""What a pair objective logs every step (and as eval_<name> at every evaluation)."""

def collate_sequences(sequences: Sequence[TokenizedSample], pad_token_id: int, padding_free: bool,
                      reference: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """A batch of whole sequences with `sequence_ids`, `sequence_count` and, when given, `reference_logps` [S]."""
    if padding_free:
        batch = collate([list(sequences)], pad_token_id, packed=True)
        lengths = torch.tensor([len(s.input_ids) for s in sequences])
        batch["sequence_ids"] = torch.repeat_interleave(torch.arange(len(sequences)), lengths)[None, :]
    else:
        batch = collate([[s] for s in sequences], pad_token_id, packed=False)
        rows = batch["input_ids"].shape[0]
        batch["sequence_ids"] = torch.where(batch["attention_mask"].bool(), torch.arange(rows)[:, None], -1)
    batch["sequence_count"] = torch.tensor(len(sequences))
    if reference is not None:
        batch["reference_logps"] = torch.tensor(reference, dtype=torch.float32)
    return batch


def collate_shared_prompts(chosen: Sequence[TokenizedSample], rejected: Sequence[TokenizedSample],
                           reference: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """collate_sequences' padding-free row of every chosen reply, then every rejected one (sequence ids in that
    order), laid out pair by pair with each pair's shared prompt held once: the rejected sequence attends to the
    chosen one's copy (data/batching.py's shared_layout)."""
    count = len(chosen)
    batch, held = shared_layout([pair for pair in zip(chosen, rejected, strict=True)])
    owners = torch.arange(2 * count).view(2, count).t().reshape(-1)  # pair by pair: chosen i, rejected i
    return _with_sequences(batch, owners, torch.tensor(held), reference)


def collate_shared_sequences(sequences: Sequence[TokenizedSample],
                             reference: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """collate_sequences' padding-free row with the leading tokens every sequence shares held once (the first
    sequence's copy)."""
    batch, held = shared_layout([sequences])
    return _with_sequences(batch, torch.arange(len(sequences)), torch.tensor(held), reference)


def _with_sequences(batch: dict[str, torch.Tensor], owners: torch.Tensor, held: torch.Tensor,
                    reference: Sequence[float] | None) -> dict[str, torch.Tensor]:
    """`batch` with sequence_ids (sequence `owners[i]` holds the next `held[i]` tokens), sequence_count and
    reference_logps."""
    batch["sequence_ids"] = torch.repeat_interleave(owners, held)[None, :]
    batch["sequence_count"] = torch.tensor(len(owners))
    if reference is not None:
        batch["reference_logps"] = torch.tensor(reference, dtype=torch.float32)
    return batch


@dataclass
class Reference:
    """Where reference log-probabilities come from: the model with its adapter switched off (`switch_off`, live
    in every step), or the values precomputed on each row before training (read from the batch)."""

    switch_off: Callable[[object], AbstractContextManager] | None

    @property
    def precomputed(self) -> bool:
        return self.switch_off is None

    def logprobs(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed log-probability [S], trained tokens [S]) of every sequence under the reference."""
        if self.precomputed:
            if "reference_logps" not in batch:
                raise RuntimeError("reference log-probabilities were not precomputed for this batch")
            return batch["reference_logps"], _token_counts(batch)
        with torch.no_grad(), self.switch_off(model):
            return sequence_logprobs(model, batch)


def _token_counts(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    keep = batch["targets"] != -100
    owners = batch["sequence_ids"][keep]
    return torch.zeros(int(batch["sequence_count"]), dtype=torch.long, device=owners.device).index_add(
        0, owners, torch.ones_like(owners))


@dataclass
class PairLogps:
    """Summed log-probabilities of each pair's chosen and rejected replies [P], and their trained tokens [P]."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    @classmethod
    def split(cls, sums: torch.Tensor, tokens: torch.Tensor) -> PairLogps:
        """From per-sequence values laid out as every chosen reply, then every rejected one."""
        half = sums.shape[0] // 2
        return cls(sums[:half], sums[half:], tokens[:half], tokens[half:])

    def averaged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token mean log-probabilities (chosen, rejected)."""
        return self.chosen / self.chosen_tokens.clamp(min=1), self.rejected / self.rejected_tokens.clamp(min=1)


@dataclass
class PairLosses:
    """Each pair's loss and the implied rewards of its two replies (what TRL logs as rewards/*)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


PairLossFunction = Callable[[PairLogps, "PairLogps | None"], PairLosses]


class PairObjective:
    """A loss over preference pairs: one forward pass scores both replies of every pair (chosen rows first, then
    rejected), the reference (when the loss has one) scores them again without gradients or comes precomputed.
    The loss is divided by the pairs of the optimiser step."""

    data_kind = "preference"
    sequences_per_item = 2
    model_head = "lm"

    def __init__(self, name: str, losses: PairLossFunction, reference: Reference | None) -> None:
        self.name = name
        self.losses = losses
        self.reference = reference
        self.share_prefix = False
        """Padding-free batches hold each pair's shared prompt once (collate_shared_prompts): set by the run where
        attention reads that layout (the matmul path)."""

    def sequences(self, pair) -> tuple[TokenizedSample, TokenizedSample]:
        return pair.chosen, pair.rejected

    def collate(self, rows, pad_token_id: int, padding_free: bool) -> dict[str, torch.Tensor]:
        pairs = [item for row in rows for item in row]
        sequences = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        reference = None
        if self.reference is not None and self.reference.precomputed and pairs[0].reference_logps is not None:
            reference = [p.reference_logps[0] for p in pairs] + [p.reference_logps[1] for p in pairs]
        if padding_free and self.share_prefix:
            return collate_shared_prompts(sequences[:len(pairs)], sequences[len(pairs):], reference)
        return collate_sequences(sequences, pad_token_id, padding_free, reference)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """What the loss is divided by: pairs."""
        return int(batch["sequence_count"]) // 2

    def input_tokens(self, pair) -> int:
        return len(pair.chosen.input_ids) + len(pair.rejected.input_ids)

    def loss_sum(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        policy = PairLogps.split(*sequence_logprobs(model, batch))
        reference = PairLogps.split(*self.reference.logprobs(model, batch)) if self.reference else None
        out = self.losses(policy, reference)
        margins = out.chosen_rewards - out.rejected_rewards
        metrics = mean_metrics({
            "rewards/chosen": out.chosen_rewards,
            "rewards/rejected": out.rejected_rewards,
            "rewards/margins": margins,
            "rewards/accuracies": (margins > 0).float(),
            "logps/chosen": policy.chosen,
            "logps/rejected": policy.rejected,
            # The model's own preference, no reference involved: what the base model is compared on.
            "logps/margins": policy.chosen - policy.rejected,
            "preference_accuracy": (policy.chosen > policy.rejected).float(),
        })
        return out.losses.sum(), metrics
