"""Knowledge distillation: at every trained token of SFT rows, the student's next-token distribution is pulled
towards a frozen teacher's over the whole vocabulary (TRL's generalized Jensen-Shannon divergence), optionally mixed
with the ordinary cross-entropy. By default on the data's replies (GKD with lmbda 0); with lmbda > 0 or seq_kd,
micro-batches train on the student's or the teacher's own samples instead (GKD: objectives/distill_samples.py).

Both models' output heads run only on the trained positions, a chunk of rows at a time, and each chunk is
recomputed in backward instead of keeping its [rows, vocab] tensors: the largest thing held for backward is the
hidden states [N, H] of the N trained tokens, as for SFT.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunelab.config import DistillObjective as DistillConfig
from tunelab.data.batching import sample_lengths
from tunelab.data.template import IGNORE_INDEX, TokenizedSample
from tunelab.errors import ConfigError, ModelError
from tunelab.models import frozen_head
from tunelab.models.attention import attention_implementation, base_config
from tunelab.models.logprobs import decoder_and_head, head_chunk_rows, hidden_states
from tunelab.objectives.distill_samples import (
    SampledReply,
    has_student_replies,
    replace_replies,
    reply_sources,
    reply_start,
    unwrapped,
)
from tunelab.objectives.metrics import Metrics
from tunelab.objectives.sft import SftObjective

DISTILL_METRICS = ("distill/divergence", "ce", "perplexity")
"""What a distillation evaluation logs besides eval_loss (as eval_<key>): the divergence to the teacher, the
student's cross-entropy on the data's reply tokens, and its perplexity exp(ce)."""

CHUNK_LOGIT_BYTES = 2**28
"""Bound on one chunk's float32 [rows, vocab] tensors on accelerators (the divergence holds several at once)."""


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                    temperature: float = 1.0) -> torch.Tensor:
    """Per-row divergence [N] in float32 between softmax(student / T) and softmax(teacher / T) for logits [N, V]:
    beta 0 the forward KL(teacher || student), beta 1 the reverse KL(student || teacher), else
    beta KL(teacher || m) + (1 - beta) KL(student || m) with m = (1 - beta) student + beta teacher (TRL's)."""
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0:
        return (t.exp() * (t - s)).sum(-1)
    if beta == 1:
        return (s.exp() * (s - t)).sum(-1)
    m = torch.logaddexp(s + math.log1p(-beta), t + math.log(beta))
    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)


def vocabulary_mismatch(student, teacher) -> str | None:
    """Why the `teacher` tokenizer does not give the student's tokens the same ids, or None: its size, a special
    token of the student's (or one its chat template writes) at another id, or ordinary tokens at other ids."""
    if len(teacher) != len(student):
        return f"the teacher's tokenizer has {len(teacher):,} tokens and the student's {len(student):,}"
    template = student.chat_template if isinstance(student.chat_template, str) else ""
    added = student.get_added_vocab()
    specials = sorted(set(student.all_special_tokens) | {token for token in added if token in template})
    for token in specials:
        ours, theirs = student.convert_tokens_to_ids(token), teacher.convert_tokens_to_ids(token)
        if ours != theirs:
            return f"the special token {token!r} is id {ours} for the student and {theirs} for the teacher"
    skip = set(added) | set(teacher.get_added_vocab())
    theirs = teacher.get_vocab()
    moved = [(token, i, theirs.get(token)) for token, i in student.get_vocab().items()
             if token not in skip and theirs.get(token) != i]
    if moved:
        token, ours, other = moved[0]
        return (f"{len(moved):,} of the student's tokens have other ids in the teacher's tokenizer (e.g. {token!r}: "
                f"{ours} for the student, {other} for the teacher)")
    return None


def load_teacher(spec: str, tokenizer, *, device: torch.device | str, precision: str) -> torch.nn.Module:
    """The teacher model `spec` names, resolved and loaded as `model:` is, frozen and in eval mode, on `device`
    in the training precision's dtype. Raises ConfigError naming objective.teacher when it cannot be loaded or
    does not share the student's `tokenizer`."""
    from tunelab.infer.load import refuse_unfinished_run
    from tunelab.models.load import load_model, load_tokenizer
    from tunelab.models.resolve import resolve_model

    where = "objective.teacher"
    try:
        refuse_unfinished_run(Path(spec).expanduser())
        path = resolve_model(spec)
        teacher_tokenizer = load_tokenizer(path)
    except ModelError as err:
        raise ConfigError(f"cannot load the teacher: {err}", where=where) from None
    problem = vocabulary_mismatch(tokenizer, teacher_tokenizer)
    if problem:
        raise ConfigError(f"{spec} does not share the student's vocabulary, so their next-token distributions "
                          f"cannot be compared: {problem}; use a teacher with the student's tokenizer", where=where)
    architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    if any(name.endswith("ForSequenceClassification") for name in architectures):
        raise ConfigError(f"{spec} is a reward model: it scores replies and has no next-token distribution to "
                          "learn from", where=where)
    try:
        teacher = load_model(path, device=str(device))
    except ModelError as err:
        raise ConfigError(f"cannot load the teacher: {err}", where=where) from None
    _, head = decoder_and_head(teacher)
    if head is None or head.weight.shape[0] < len(tokenizer):
        raise ConfigError(f"{spec} has no output head over the student's {len(tokenizer):,} tokens", where=where)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return teacher.to(dtype).eval().requires_grad_(False)


def _logits_function(head: torch.nn.Module, like: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The head as a function of hidden states: a frozen linear head with its weight cast to the compute dtype
    once (or the cast fuse_lora_layers keeps), not per chunk as autocast would; any other head as it is."""
    if not frozen_head.fits(head):
        return head
    dtype = frozen_head.compute_dtype(like)
    cast = head.__dict__.get(frozen_head.WEIGHT_CAST)
    weight = cast(dtype) if cast is not None else head.weight.detach().to(dtype)
    bias = None if head.bias is None else head.bias.detach().to(dtype)
    return lambda hidden: F.linear(hidden.to(dtype), weight, bias)


class DistillObjective:
    """The generalized JSD to a frozen teacher (and alpha x cross-entropy) on the trained tokens of SFT rows, per
    trained token; batches and counts are SFT's. With lmbda > 0 or seq_kd the loop first hands each step's rows
    to `rollout`, which replaces the replies of the micro-batches it draws by sampled ones."""

    data_kind = "sft"
    sequences_per_item = 1
    model_head = "lm"

    def __init__(self, config: DistillConfig, teacher: torch.nn.Module, *, pad_token_id: int, precision: str,
                 batch_size: int, tokenizer, seed: int = 0) -> None:
        self.config = config
        self.teacher = teacher
        """Frozen, in eval mode; never part of the trained module (no gradients, not saved)."""
        self.pad_token_id = pad_token_id
        self.precision = precision
        self.batch_size = batch_size
        """Rows per held-out batch (train.batch_size)."""
        self.rows = SftObjective(packing=False)
        """Collates and counts exactly as SFT does (data.packing is refused for objectives other than sft)."""
        self.tokenizer = tokenizer
        """Stop and padding tokens of sampled replies (lmbda > 0 or seq_kd)."""
        self.seed = seed
        """train.seed: with the step, what decides which micro-batches are sampled and seeds the samples."""
        self._planned: tuple | None = None
        """(samples, planned_lengths of them): the attention choice and the memory estimate both ask."""
        if config.lmbda > 0 or config.seq_kd:
            # Only then is there a rollout: the loop treats an objective with one as training on its own samples
            # (no loss-spike watch, rollout timings logged); with lmbda 0 a run is exactly as before.
            self.rollout = self.with_sampled_replies

    def with_sampled_replies(self, model, step_rows: list[list[list[TokenizedSample]]], step: int,
                             epoch: float | None = None,
                             weights: Sequence[float] | None = None) -> tuple[list[list[list]], Metrics]:
        """The step's micro-batches (rows of samples), those drawn for on-policy training with the student's own
        samples as replies, under seq_kd the others with the teacher's; and what to log (distill_samples.py).
        `epoch` is the loop's rollout argument, unused here; `weights` its share_weights (0: a stand-in, not
        sampled)."""
        sources = reply_sources(self.config.lmbda, self.config.seq_kd, self.seed, step, len(step_rows))
        return replace_replies(step_rows, sources, student=model, teacher=self.teacher, tokenizer=self.tokenizer,
                               max_new_tokens=self.config.max_new_tokens, temperature=self.config.temperature,
                               seed=self.seed, step=step, precision=self.precision, weights=weights)

    @property
    def share_prefix(self) -> bool:
        """Padding-free batches hold their samples' shared prefix once (set by the run on the matmul path; the
        teacher reads the same layout under the same attention)."""
        return self.rows.share_prefix

    @share_prefix.setter
    def share_prefix(self, value: bool) -> None:
        self.rows.share_prefix = value

    def collate(self, rows: Sequence[Sequence[TokenizedSample | SampledReply]], pad_token_id: int,
                padding_free: bool) -> dict[str, torch.Tensor]:
        """SFT's batch of the rows' samples; `student_replies` (a 0-d tensor) marks one of the student's own
        samples, on which loss_sum takes no cross-entropy."""
        batch = self.rows.collate(unwrapped(rows), pad_token_id, padding_free)
        if has_student_replies(rows):
            batch["student_replies"] = torch.ones((), dtype=torch.bool)
        return batch

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """What the loss is divided by: trained tokens."""
        return self.rows.count(batch)

    def planned_lengths(self, samples: Sequence[TokenizedSample]) -> np.ndarray:
        """Each training sample's longest sequence in training, for the memory estimate: its own length, or, when
        replies are sampled (lmbda, seq_kd), its prompt plus max_new_tokens where that is longer."""
        lengths = sample_lengths(samples)
        if not (self.config.lmbda > 0 or self.config.seq_kd):
            return lengths
        if self._planned is None or self._planned[0] is not samples:  # one pass over the data, not one per caller
            prompts = np.fromiter((reply_start(sample) or 0 for sample in samples), np.int64, count=len(samples))
            self._planned = (samples, np.maximum(lengths, prompts + self.config.max_new_tokens))
        return self._planned[1]

    def input_tokens(self, sample: TokenizedSample | SampledReply) -> int:
        return self.rows.input_tokens(sample.sample if isinstance(sample, SampledReply) else sample)

    def loss_sum(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        """(sum over trained tokens of alpha x CE + (1 - alpha) x divergence, metrics). On the student's own
        samples the loss is the divergence alone and no `ce` is logged: TRL's GKDTrainer has no cross-entropy term
        at all, and the cross-entropy of the student's own sample would push up whatever it happened to draw."""
        keep = batch["targets"] != IGNORE_INDEX  # [B, T]
        targets = batch["targets"][keep]  # [N]
        student = hidden_states(model, batch)[keep]  # [N, H]
        # The teacher reads the batch as the student does: a padding-free layout needs the same attention.
        implementation = getattr(base_config(model), "_attn_implementation", None)
        with torch.no_grad(), attention_implementation(self.teacher, implementation):
            teacher = hidden_states(self.teacher, batch)[keep]  # [N, H_teacher]
        own_samples = "student_replies" in batch
        alpha = 0.0 if own_samples else self.config.alpha
        losses, divergence, ce = self._token_losses(model, student, teacher, targets, alpha)
        count = int(targets.numel())
        metrics = {"distill/divergence": (float(divergence.sum()), count)}
        if not own_samples:
            metrics["ce"] = (float(ce.sum()), count)
        return losses.sum(), metrics

    def _token_losses(self, model, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
                      alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss [N], divergence [N], ce [N]) through both output heads, chunk by chunk; with gradients on, each
        chunk's logits are recomputed in backward rather than kept."""
        _, student_head = decoder_and_head(model)
        _, teacher_head = decoder_and_head(self.teacher)
        vocab = min(student_head.weight.shape[0], teacher_head.weight.shape[0])  # heads may pad past the tokenizer
        student_logits = _logits_function(student_head, student)
        teacher_logits = _logits_function(teacher_head, teacher)
        beta, temperature = self.config.beta, self.config.temperature

        def chunk_losses(hidden: torch.Tensor, teacher_hidden: torch.Tensor, wanted: torch.Tensor):
            logits = student_logits(hidden).float()  # [n, V_student]
            with torch.no_grad():
                reference = teacher_logits(teacher_hidden)[:, :vocab]  # [n, vocab]
            ce = torch.logsumexp(logits, dim=-1) - logits.gather(1, wanted[:, None]).squeeze(1)
            divergence = generalized_jsd(logits[:, :vocab], reference, beta, temperature)
            return alpha * ce + (1 - alpha) * divergence, divergence.detach(), ce.detach()

        rows = student.shape[0]
        if rows == 0:
            empty = student.new_zeros(0, dtype=torch.float32)
            return student.sum(-1).float(), empty, empty  # keeps the step's graph whole
        chunk = head_chunk_rows(vocab, student.device)
        if student.device.type != "cpu":
            chunk = max(16, min(chunk, CHUNK_LOGIT_BYTES // (4 * vocab)))
        recompute = torch.is_grad_enabled() and student.requires_grad
        pieces = []
        for start in range(0, rows, chunk):
            args = (student[start : start + chunk], teacher[start : start + chunk], targets[start : start + chunk])
            pieces.append(checkpoint(chunk_losses, *args, use_reentrant=False) if recompute else chunk_losses(*args))
        return tuple(torch.cat(parts) for parts in zip(*pieces, strict=True))

    @torch.no_grad()
    def evaluate(self, model, rows: Sequence[TokenizedSample]) -> dict[str, float]:
        """eval_loss (the objective's, per trained token), eval_distill/divergence, eval_ce and eval_perplexity
        (exp of eval_ce) on the held-out rows; rows of similar length batched together."""
        from tunelab.eval.preference import evaluate_objective

        ordered = sorted(rows, key=lambda sample: len(sample.input_ids))
        result = evaluate_objective(model, self, ordered, pad_token_id=self.pad_token_id, precision=self.precision,
                                    batch_size=self.batch_size)
        if "eval_ce" in result:
            result["eval_perplexity"] = math.exp(min(result["eval_ce"], 50.0))
        return result
