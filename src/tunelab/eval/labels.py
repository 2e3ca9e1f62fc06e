"""Classification by label likelihood: every label is scored as the reply to the prompt, the likeliest wins.

Free generation can say "I think it's a refund request" or nothing useful at all; scoring a closed label set
asks the model only which of the allowed answers it prefers, so a model can be measured before it has
learned the answer format. Each label is rendered as the assistant reply with the same chat template and
the same loss mask as training (the label's tokens and the end-of-turn token after it), so its score is
log P(reply == label exactly) under the model; `mean` divides by the label's token count instead.

Cost: the prompt, shared by its K labels, runs through the model once; its key/value cache is repeated for
the K label continuations, which are short. So N prompts cost about N prompt forwards plus N x K label-length
forwards, not N x K prompt forwards. Prompt and prefix tuning (whose virtual tokens only PEFT's own forward
adds) score every (prompt, label) sequence whole instead. The output head runs only on label positions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from tunelab.data.batching import collate
from tunelab.data.formats import Sample
from tunelab.data.template import IGNORE_INDEX, ChatRenderer, TokenizedSample, tokenize_chat
from tunelab.errors import ConfigError
from tunelab.eval.metrics import LABEL_METRICS, _label_form
from tunelab.models.logprobs import decoder_and_head, hidden_states, uses_virtual_tokens
from tunelab.train.precision import autocast

__all__ = ["LABEL_METRICS", "LabelEvaluation", "evaluate_labels", "resolve_labels", "score_labels"]

MAX_DEFAULT_LABELS = 50
"""Above this many distinct references the eval data does not look like a classification task."""

LabelScore = Literal["sum", "mean"]


def resolve_labels(labels: Sequence[str] | None, references: Sequence[str], *, where: str = "eval.labels") -> list[str]:
    """The label set to score: the given labels, or else the distinct references when there are few.

    Raises ConfigError (naming `where`) for an empty or duplicated label set, or for references too varied to
    be labels."""
    if labels is not None:
        chosen = [str(label) for label in labels]
        if not chosen or any(not label.strip() for label in chosen):
            raise ConfigError("the label set must hold non-empty labels", where=where)
    else:
        chosen = sorted(set(references))
        if len(chosen) > MAX_DEFAULT_LABELS:
            raise ConfigError(
                f"label_accuracy needs a label set: the eval data has {len(chosen)} distinct references (more than "
                f"{MAX_DEFAULT_LABELS}), so they are not used as labels; give the labels explicitly",
                where=where,
            )
        if not chosen:
            raise ConfigError("label_accuracy needs a label set and the eval data has no references", where=where)
    forms = Counter(_label_form(label) for label in chosen)
    repeated = [label for label in chosen if forms[_label_form(label)] > 1]
    if repeated:
        raise ConfigError(
            f"labels {', '.join(repeated)} name the same label (case, '_' and '-' are ignored)", where=where
        )
    return chosen


def _with_reply(messages: list[dict[str, str]], reply: str) -> list[dict[str, str]]:
    prompt = messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages
    return [*prompt, {"role": "assistant", "content": reply}]


def _left_truncated(sample: TokenizedSample, max_length: int | None) -> TokenizedSample:
    """Long prompts lose their start, never the label at the end."""
    if max_length is None or len(sample.input_ids) <= max_length:
        return sample
    return TokenizedSample(sample.input_ids[-max_length:], sample.labels[-max_length:], sample.where, sample.source)


def label_sequences(
    renderer: ChatRenderer, samples: Sequence[Sample], labels: Sequence[str], max_length: int | None = None
) -> list[TokenizedSample]:
    """Sample i with label k as its reply, at index i * len(labels) + k; only the reply (and its end-of-turn
    token) is trained, exactly as `train_on: last_assistant` renders it for training."""
    sequences = []
    for sample in samples:
        for label in labels:
            conversation = Sample(sample.where, messages=_with_reply(sample.messages, label), source=sample.source)
            sequences.append(_left_truncated(tokenize_chat(conversation, renderer, "last_assistant"), max_length))
    return sequences


@torch.no_grad()
def sequence_logprobs(
    model, sequences: Sequence[TokenizedSample], *, pad_token_id: int, precision: str = "fp32", batch_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each sequence's trained tokens, their count), both [len(sequences)]; every
    sequence runs whole, in length-sorted batches."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    _, head = decoder_and_head(model)
    sums = torch.zeros(len(sequences), dtype=torch.float64)
    counts = torch.zeros(len(sequences), dtype=torch.long)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i].input_ids))  # less padding
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = collate([[sequences[i]] for i in chunk], pad_token_id, packed=False)
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(precision, device):
                hidden = hidden_states(model, batch)
                keep = batch["targets"] != IGNORE_INDEX
                logits = head(hidden[keep]).float()
            _accumulate(sums, counts, chunk, keep, logits, batch["targets"][keep])
    finally:
        model.train(was_training)
    return sums, counts


def _accumulate(sums, counts, rows: list[int], keep, logits, targets) -> None:
    """Add each kept position's log-probability to the sequence (index into `rows`) it belongs to."""
    token_logprobs = -F.cross_entropy(logits, targets, reduction="none")
    owners = torch.tensor(rows)[keep.nonzero()[:, 0].cpu()]
    sums.index_add_(0, owners, token_logprobs.double().cpu())
    counts.index_add_(0, owners, torch.ones_like(owners))


def _shared_prefix(group: Sequence[TokenizedSample]) -> int:
    """How many leading tokens every sequence of the group shares and none trains (the prompt, minus the
    token whose output predicts the first label token)."""
    first = group[0].input_ids
    common = len(first)
    for sequence in group[1:]:
        ids = sequence.input_ids[:common]
        common = next((i for i, (a, b) in enumerate(zip(first, ids, strict=False)) if a != b), len(ids))
    first_trained = min(
        next((i for i, label in enumerate(s.labels) if label != IGNORE_INDEX), len(s.labels)) for s in group
    )
    return max(0, min(common, first_trained - 1))


@torch.no_grad()
def grouped_logprobs(
    model,
    sequences: Sequence[TokenizedSample],
    group_size: int,
    *,
    pad_token_id: int,
    precision: str = "fp32",
    batch_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As sequence_logprobs, for consecutive groups of `group_size` sequences that share a prompt: each prompt
    runs once and its key/value cache serves every continuation of its group (batch_size bounds the
    continuations per forward, so batch_size // group_size prompts go together)."""
    groups = [list(range(i, i + group_size)) for i in range(0, len(sequences), group_size)]
    splits = [_shared_prefix([sequences[i] for i in group]) for group in groups]
    whole = [i for group, split in zip(groups, splits, strict=True) if split == 0 for i in group]
    sums, counts = torch.zeros(len(sequences), dtype=torch.float64), torch.zeros(len(sequences), dtype=torch.long)
    if whole:  # nothing shareable (an empty prompt, or a long prompt cut differently per label)
        some_sums, some_counts = sequence_logprobs(
            model, [sequences[i] for i in whole], pad_token_id=pad_token_id, precision=precision, batch_size=batch_size
        )
        sums[whole], counts[whole] = some_sums, some_counts
    shared = sorted((g for g, split in enumerate(splits) if split), key=lambda g: splits[g])
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    decoder, head = decoder_and_head(model)
    per_batch = max(1, batch_size // group_size)
    try:
        for start in range(0, len(shared), per_batch):
            chunk = shared[start : start + per_batch]
            prompts = [sequences[groups[g][0]] for g in chunk]
            prompts = [
                TokenizedSample(s.input_ids[: splits[g]], [IGNORE_INDEX] * splits[g], s.where)
                for s, g in zip(prompts, chunk, strict=True)
            ]
            rows = [i for g in chunk for i in groups[g]]
            rests = [
                TokenizedSample(sequences[i].input_ids[splits[g] :], sequences[i].labels[splits[g] :], "")
                for g in chunk
                for i in groups[g]
            ]
            prompt = {k: v.to(device) for k, v in collate([[p] for p in prompts], pad_token_id, False).items()}
            rest = {k: v.to(device) for k, v in collate([[r] for r in rests], pad_token_id, False).items()}
            # Right-padded prompts: padding sits between a prompt and its continuation, masked out, and the
            # continuation's positions go on from the prompt's real length.
            lengths = torch.tensor([splits[g] for g in chunk], device=device).repeat_interleave(group_size)
            positions = lengths[:, None] + torch.arange(rest["input_ids"].shape[1], device=device)
            mask = torch.cat([prompt["attention_mask"].repeat_interleave(group_size, 0), rest["attention_mask"]], 1)
            with autocast(precision, device):
                cache = decoder(
                    input_ids=prompt["input_ids"], attention_mask=prompt["attention_mask"], use_cache=True
                ).past_key_values
                cache.batch_repeat_interleave(group_size)
                hidden = decoder(
                    input_ids=rest["input_ids"],
                    attention_mask=mask,
                    position_ids=positions,
                    cache=cache,
                    use_cache=True,
                ).last_hidden_state
                keep = rest["targets"] != IGNORE_INDEX
                logits = head(hidden[keep]).float()
            _accumulate(sums, counts, rows, keep, logits, rest["targets"][keep])
    finally:
        model.train(was_training)
    return sums, counts


def score_labels(
    model,
    renderer: ChatRenderer,
    samples: Sequence[Sample],
    labels: Sequence[str],
    *,
    score: LabelScore = "sum",
    precision: str = "fp32",
    batch_size: int = 32,
    max_length: int | None = None,
) -> torch.Tensor:
    """[len(samples), len(labels)] scores: summed (or per-token mean) log-probability of each label as the reply."""
    sequences = label_sequences(renderer, samples, labels, max_length)
    pad = renderer.tokenizer.pad_token_id
    options = {"pad_token_id": pad if pad is not None else 0, "precision": precision, "batch_size": batch_size}
    if uses_virtual_tokens(model):  # only PEFT's own forward adds the virtual tokens: no shared cache
        sums, counts = sequence_logprobs(model, sequences, **options)
    else:
        sums, counts = grouped_logprobs(model, sequences, len(labels), **options)
    if (counts == 0).any():
        empty = labels[int((counts == 0).nonzero()[0, 0]) % len(labels)]
        raise ConfigError(f"label {empty!r} renders to no reply tokens under this chat template", where="labels")
    scores = sums / counts if score == "mean" else sums
    return scores.view(len(samples), len(labels))


@dataclass
class LabelEvaluation:
    """Label-likelihood classification of some samples."""

    labels: list[str]
    predictions: list[str]
    """The likeliest label per sample."""
    correct: list[bool]
    scores: list[list[float]] = field(repr=False)
    confusion: dict[str, dict[str, int]] = field(default_factory=dict)
    """reference label -> predicted label -> count."""

    @property
    def metrics(self) -> dict[str, float]:
        return {"label_accuracy": sum(self.correct) / len(self.correct)} if self.correct else {}


def evaluate_labels(
    model,
    renderer: ChatRenderer,
    samples: Sequence[Sample],
    labels: Sequence[str],
    *,
    score: LabelScore = "sum",
    precision: str = "fp32",
    batch_size: int = 32,
    max_length: int | None = None,
) -> LabelEvaluation:
    """Predict the likeliest label for every sample and compare it with the reference (case, '_' and '-'
    ignored, as the `accuracy` metric compares)."""
    labels = list(labels)
    if not samples:
        return LabelEvaluation(labels, [], [], [])
    scores = score_labels(
        model, renderer, samples, labels, score=score, precision=precision, batch_size=batch_size, max_length=max_length
    )
    predictions = [labels[int(i)] for i in scores.argmax(dim=1)]
    by_form = {_label_form(label): label for label in labels}
    confusion: dict[str, dict[str, int]] = {}
    correct = []
    for sample, predicted in zip(samples, predictions, strict=True):
        reference = by_form.get(_label_form(sample.reference), sample.reference)
        correct.append(reference == predicted)
        row = confusion.setdefault(reference, {})
        row[predicted] = row.get(predicted, 0) + 1
    return LabelEvaluation(labels, predictions, correct, scores.tolist(), confusion)
