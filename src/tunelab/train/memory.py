"""Peak-memory estimate, printed before training starts: measured where it can be, counted where it must be.

- What is resident now (libraries, the loaded and prepared model, the data) is read from the process
  (resident set size on CPU, allocated bytes on CUDA).
- Gradients (float32) and AdamW's two moments (float32, or 8-bit with train.optimizer=adamw_8bit) are counted
  from the trainable parameters.
- Activations are measured, not guessed: a forward pass on small probe batches, under the run's precision,
  attention path and objective, records the bytes autograd keeps for backward at three lengths. A fit
  `a + rows * (b*T + c*T^2)` (constant: cast weight copies; linear: per-token tensors; quadratic: attention
  scores where the attention path materialises them) is then evaluated on the largest batch of the plan.
The estimate counts all of these at once, so it errs high for full fine-tuning, where gradients appear only
as activations are freed.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from tunelab.data.batching import collate
from tunelab.data.template import IGNORE_INDEX, TokenizedSample
from tunelab.methods.fused_lora import cached_weight_storages
from tunelab.models.logprobs import decoder_and_head, head_chunk_rows, hidden_states
from tunelab.objectives.sft import sft_loss_sum
from tunelab.train.precision import autocast
from tunelab.train.schedule import optimizer_state_bytes

_MB = 2**20


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory of a training run and its parts, in MiB."""

    resident_mb: float
    optimizer_mb: float
    gradients_mb: float
    activations_mb: float

    @property
    def peak_mb(self) -> float:
        return self.resident_mb + self.optimizer_mb + self.gradients_mb + self.activations_mb

    def as_dict(self) -> dict[str, float]:
        parts = {k: round(v, 1) for k, v in vars(self).items()}
        return {"peak_mb": round(self.peak_mb, 1), **parts}


def resident_mb(device: torch.device) -> float:
    """Memory in use now: CUDA bytes allocated, or this process's resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / _MB
    if sys.platform.startswith("linux"):
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / _MB
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / _MB if sys.platform == "darwin" else peak / 2**10


def saved_activation_bytes(model, batch: dict[str, torch.Tensor], precision: str, device: torch.device) -> int:
    """Bytes autograd keeps for backward after one forward of `batch` (parameters themselves excluded)."""
    owned = {p.untyped_storage().data_ptr() for p in model.parameters()}
    owned |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            seen[storage.data_ptr()] = storage.nbytes()
        # Not the tensor itself: a saved output would then hold its own grad_fn, a reference cycle that kept
        # every probe's activations alive into training (+1.3 GB peak and 15-25% slower steps on the default
        # model). No backward runs on a probe, so the detached view is never unpacked for gradients.
        return tensor.detach()

    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(precision, device):
        loss = _probe_loss(model, batch)
    del loss
    for cast in cached_weight_storages(model):  # counted once, in the resident memory measured afterwards
        seen.pop(cast, None)
    return sum(seen.values())


def _probe_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What a training step computes on `batch`: the language-model loss, or, for a model with a scalar head
    instead of an output head (a reward model), the decoder's last hidden states (the head is negligible)."""
    if decoder_and_head(model)[1] is None:
        return hidden_states(model, batch)[:, -1].float().sum()
    return sft_loss_sum(model, batch)[0]


def _probe_sample(length: int, trained_fraction: float, token_id: int) -> TokenizedSample:
    """A sample whose last `trained_fraction` of tokens carry loss, like a prompt followed by its reply."""
    trained = max(1, round(length * trained_fraction))
    labels = [IGNORE_INDEX] * (length - trained) + [token_id] * trained
    return TokenizedSample([token_id] * length, labels, "memory probe")


def _probe_batch(length: int, packed: bool, trained_fraction: float, token_id: int) -> dict[str, torch.Tensor]:
    """Two samples, as two padded rows (so the padding mask takes the attention path training takes) or
    packed into one row."""
    if packed:
        half = _probe_sample(length // 2, trained_fraction, token_id)
        return collate([[half, half]], token_id, packed=True)
    rows = [[_probe_sample(n, trained_fraction, token_id)] for n in (length, length - 1)]
    return collate(rows, token_id, packed=False)


def _head_backward_bytes(model, batch_shapes: list[tuple[int, int]], trained_fraction: float) -> float:
    """One chunk of the output head at a time holds vocabulary-sized tensors the saved-tensor probe does not
    see: autograd's backward its float32 logit gradient, the softmax gradient and a bf16 copy; a frozen head's
    forward (models/frozen_head.py) its bf16 logits, float32 log-softmax and bf16 probabilities."""
    _, head = decoder_and_head(model)
    if head is None:  # a scalar head: no logits
        return 0.0
    vocab = head.weight.shape[0]
    tokens = max(rows * length for rows, length in batch_shapes) * trained_fraction
    return min(head_chunk_rows(vocab, head.weight.device), tokens) * vocab * (4 + 4 + 2)


def fit_activation_model(lengths: list[int], measured: list[float], rows: int) -> tuple[float, float, float]:
    """Solve bytes(T) = a + rows*(b*T + c*T^2) through three (T, bytes) probe points."""
    matrix = torch.tensor([[1.0, rows * t, rows * t * t] for t in lengths], dtype=torch.float64)
    a, b, c = torch.linalg.solve(matrix, torch.tensor(measured, dtype=torch.float64)).tolist()
    return a, b, max(c, 0.0)


def estimate_peak_memory(
    model,
    batch_shapes: list[tuple[int, int]],
    *,
    packed: bool,
    precision: str,
    device: torch.device,
    pad_token_id: int,
    max_length: int,
    trained_fraction: float = 1.0,
    optimizer: str = "adamw",
) -> MemoryEstimate:
    """Estimate the run's peak memory. `batch_shapes` are the (rows, padded length) of every micro-batch the
    plan will feed; the largest activation footprint among them sets the peak. `trained_fraction` is the share
    of tokens that carry loss: the output head runs only on those."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_bytes = sum(p.numel() * 4 for p in trainable)  # fp32 gradients, whatever the weights
    top = max(16, min(max_length, max(length for _, length in batch_shapes)))
    lengths = [max(8, top // 4), max(12, top // 2), top]
    was_training = model.training
    model.train()
    token_id = pad_token_id if pad_token_id is not None else 0
    probe_rows = 1 if packed else 2
    fraction = min(1.0, max(trained_fraction, 0.01))
    measured = [
        saved_activation_bytes(model, _probe_batch(t, packed, fraction, token_id), precision, device) for t in lengths
    ]
    model.train(was_training)
    a, b, c = fit_activation_model(lengths, measured, probe_rows)
    activations = max(a + rows * (b * t + c * t * t) for rows, t in batch_shapes)
    activations += _head_backward_bytes(model, batch_shapes, fraction)
    return MemoryEstimate(
        resident_mb=resident_mb(device),
        optimizer_mb=optimizer_state_bytes(trainable, optimizer) / _MB,
        gradients_mb=trainable_bytes / _MB,
        activations_mb=max(activations, 0.0) / _MB,
    )
