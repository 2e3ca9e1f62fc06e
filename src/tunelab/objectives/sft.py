"""Supervised fine-tuning: summed next-token cross-entropy over trained tokens, divided by the trained tokens
of the whole optimiser step."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch

from tunelab.data.batching import collate, collate_shared_prefix
from tunelab.data.template import IGNORE_INDEX, TokenizedSample
from tunelab.models.logprobs import trained_token_logprobs
from tunelab.models.neftune import NoisyEmbeddings


def sft_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies over trained positions, number of trained positions).

    The caller divides by the trained-token count of the whole optimiser step, so every token weighs
    the same however the tokens fall into micro-batches.
    """
    token_logps, keep = trained_token_logprobs(model, batch)
    return -token_logps.sum(), int(keep.sum())


class SftObjective:
    """Next-token cross-entropy on the trained tokens of each sample (rows may pack several samples)."""

    data_kind = "sft"
    sequences_per_item = 1
    model_head = "lm"

    def __init__(self, packing: bool) -> None:
        self.packing = packing
        self.share_prefix = False
        """Padding-free batches hold their samples' shared prefix once (collate_shared_prefix): set by the run
        where attention reads that layout (the matmul path)."""
        self.neftune: NoisyEmbeddings | None = None
        """NEFTune's noisy input embeddings (train.neftune_alpha), set by the run."""

    def collate(self, rows: Sequence[Sequence[TokenizedSample]], pad_token_id: int,
                padding_free: bool) -> dict[str, torch.Tensor]:
        if padding_free:
            samples = [sample for row in rows for sample in row]
            if self.share_prefix:
                return collate_shared_prefix(samples, pad_token_id)
            return collate([samples], pad_token_id, packed=True)
        return collate([list(row) for row in rows], pad_token_id, self.packing)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """What the loss is divided by: trained tokens."""
        return int((batch["targets"] != IGNORE_INDEX).sum())

    def input_tokens(self, sample: TokenizedSample) -> int:
        return len(sample.input_ids)

    def loss_sum(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        with self.neftune.lengths_of(batch) if self.neftune is not None else nullcontext():
            loss, _ = sft_loss_sum(model, batch)
        return loss, {}
