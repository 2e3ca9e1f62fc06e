"""Classification by label likelihood: every label is scored as the reply to the prompt, the likeliest wins.

Free generation can say "I think it's a refund request" or nothing useful at all; scoring a closed label set
asks the model only which of the allowed answers it prefers, so a model can be measured before it has
learned the answer format. Each label is rendered as the assistant reply with the same chat template and
the same loss mask as training (the label's tokens and the end-of-turn token after it), so its score is
log P(reply == label exactly) under the model; `mean` divides by the label's token count instead.
All (prompt, label) pairs are scored in length-sorted batches: N prompts x K labels sequences, one
forward each, and the output head runs only on the label positions.
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
from tunelab.objectives.sft import decoder_and_head, hidden_states
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
    """(summed log-probability of each sequence's trained tokens, their count), both [len(sequences)]."""
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
            token_logprobs = -F.cross_entropy(logits, batch["targets"][keep], reduction="none")
            rows = torch.tensor(chunk)[keep.nonzero()[:, 0].cpu()]
            sums.index_add_(0, rows, token_logprobs.double().cpu())
            counts.index_add_(0, rows, torch.ones_like(rows))
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
    sums, counts = sequence_logprobs(
        model, sequences, pad_token_id=pad if pad is not None else 0, precision=precision, batch_size=batch_size
    )
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
