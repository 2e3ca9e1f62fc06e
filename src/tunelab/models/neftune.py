"""NEFTune (Jain et al. 2023, `train.neftune_alpha`): uniform noise on the input embeddings of training forwards.

Each position of a sample gets noise drawn from U(-1, 1) * alpha / sqrt(L * d), L that sample's length and d the
embedding width, as the paper defines it. transformers' hook divides by the padded row's width instead, which in a
padding-free or packed row (several samples, one row) would shrink every sample's noise by the square root of
how many share the row; here each position reads its own sample's length from the batch. No noise in evaluation,
generation or anything else run without gradients.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def sample_lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, T] float: the length of the sample each position belongs to. Rows holding several samples (position ids
    that restart, or continue from a shared prefix's length) count each sample's positions, its shared prefix
    included; padded rows count their attention mask."""
    if "position_ids" in batch:
        positions = batch["position_ids"]
        starts = torch.ones_like(positions, dtype=torch.bool)
        starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
        segment = starts.flatten().cumsum(0) - 1  # which sample each position is, over the whole batch
        last = torch.zeros(int(segment[-1]) + 1, dtype=positions.dtype, device=positions.device)
        last = last.scatter_reduce(0, segment, positions.flatten(), reduce="amax")
        return (last[segment] + 1).view_as(positions).float()
    mask = batch.get("attention_mask")
    if mask is None:
        width = batch["input_ids"].shape[1]
        return torch.full(batch["input_ids"].shape, float(width), device=batch["input_ids"].device)
    return mask.sum(dim=1, keepdim=True).clamp(min=1).float().expand_as(mask)


class NoisyEmbeddings:
    """The model's input embedding module with NEFTune's noise added to its output while `lengths_of` holds a
    training batch and gradients are on."""

    def __init__(self, embeddings: nn.Module, alpha: float) -> None:
        self.embeddings = embeddings
        self.alpha = alpha
        self.lengths: torch.Tensor | None = None
        embedding_forward = type(embeddings).forward

        def forward(input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            out = embedding_forward(embeddings, input_ids, *args, **kwargs)
            lengths = self.lengths
            if lengths is None or not (embeddings.training and torch.is_grad_enabled()) \
                    or lengths.shape != input_ids.shape:
                return out
            scale = self.alpha / torch.sqrt(lengths.to(out.device) * out.shape[-1])
            noise = torch.empty_like(out).uniform_(-1, 1) * scale.unsqueeze(-1).to(out.dtype)
            return out + noise

        forward.tunelab_neftune = True  # how drop_noise knows it
        embeddings.forward = forward

    @contextmanager
    def lengths_of(self, batch: dict[str, torch.Tensor]) -> Iterator[None]:
        self.lengths = sample_lengths(batch)
        try:
            yield
        finally:
            self.lengths = None

    def remove(self) -> None:
        self.embeddings.__dict__.pop("forward", None)


def drop_noise(model) -> None:
    """Remove NEFTune's forward from `model`'s input embeddings: a copy made for decoding (methods.fold_for_inference)
    would otherwise keep a closure that calls the original, float32 module."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings.__dict__.get("forward"), "tunelab_neftune", False):
        del embeddings.__dict__["forward"]


def add_neftune(model, alpha: float) -> NoisyEmbeddings:
    return NoisyEmbeddings(model.get_input_embeddings(), alpha)
