"""Evaluation a run makes: held-out loss and perplexity, task metrics on generated replies, and label
accuracy from label likelihoods."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from tunelab.data.batching import collate, collate_shared_prefix
from tunelab.data.formats import Sample
from tunelab.data.template import ChatRenderer, TokenizedSample
from tunelab.eval.labels import LabelEvaluation, LabelScore, evaluate_labels, resolve_labels
from tunelab.eval.metrics import LABEL_METRICS, compute_metrics
from tunelab.infer.generate import GenerationOptions, generate_replies
from tunelab.models.attention import MATMUL, attention_implementation
from tunelab.objectives.sft import sft_loss_sum
from tunelab.train.precision import autocast


@torch.no_grad()
def evaluate_loss(
    model, samples: list[TokenizedSample], *, pad_token_id: int, precision: str, batch_size: int = 8,
    share_prefix: bool = False,
) -> dict[str, float]:
    """Token-weighted eval loss and perplexity, overall and per source dataset (`eval_loss/<name>`).

    `share_prefix` (a run on the matmul attention path, train.share_prefix): each batch is one padding-free row
    holding its samples' shared prefix once, as training's are, under that attention; the same loss from ~a third
    fewer tokens on the main job. Otherwise padded rows under the model's own attention."""
    if not samples:
        return {}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    ordered = sorted(samples, key=lambda s: len(s.input_ids))  # similar lengths together: less padding
    with attention_implementation(model, MATMUL if share_prefix else None):
        for start in range(0, len(ordered), batch_size):
            chunk = ordered[start : start + batch_size]
            for source in {s.source for s in chunk}:
                rows = [s for s in chunk if s.source == source]
                tensors = (collate_shared_prefix(rows, pad_token_id) if share_prefix
                           else collate([[s] for s in rows], pad_token_id, packed=False))
                batch = {k: v.to(device) for k, v in tensors.items()}
                with autocast(precision, device):
                    loss_sum, tokens = sft_loss_sum(model, batch)
                sums[source] += float(loss_sum)
                counts[source] += tokens
    model.train(was_training)
    total_tokens = sum(counts.values())
    loss = sum(sums.values()) / max(1, total_tokens)
    result = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
    if len(sums) > 1:
        for source in sorted(sums):
            result[f"eval_loss/{source}"] = sums[source] / max(1, counts[source])
    return result


@dataclass
class TaskEvaluation:
    """Task metrics of some samples, the model's replies, and the label classification when one was asked."""

    metrics: dict[str, float]
    replies: list[str]
    labels: LabelEvaluation | None = None


def evaluate_task(
    model,
    renderer: ChatRenderer,
    samples: list[Sample],
    metrics: list[str],
    options: GenerationOptions,
    *,
    labels: list[str] | None = None,
    label_score: LabelScore = "sum",
    precision: str = "fp32",
    max_length: int | None = None,
    label_batch_size: int | None = None,
) -> TaskEvaluation:
    """Generation metrics on greedy replies; `label_accuracy` by scoring each label's likelihood instead
    (labels: the given set, else the samples' distinct references). With label_accuracy alone nothing is
    generated and the replies are the predicted labels. Labels are scored in batches of `label_batch_size`
    (default: the generation batch)."""
    if not samples:
        return TaskEvaluation({}, [])
    references = [s.reference for s in samples]
    generated = [m for m in metrics if m not in LABEL_METRICS]
    replies = generate_replies(model, renderer, [s.messages for s in samples], options) if generated else []
    scores = compute_metrics(generated, replies, references) if generated else {}
    classified = None
    if any(m in LABEL_METRICS for m in metrics):
        classified = evaluate_labels(model, renderer, samples, resolve_labels(labels, references), score=label_score,
                                     precision=precision, batch_size=label_batch_size or options.batch_size,
                                     max_length=max_length)
        scores.update(classified.metrics)
        replies = replies or classified.predictions
    return TaskEvaluation(scores, replies, classified)


def evaluate_generations(
    model,
    renderer: ChatRenderer,
    samples: list[Sample],
    metrics: list[str],
    options: GenerationOptions,
    *,
    labels: list[str] | None = None,
    label_score: LabelScore = "sum",
    precision: str = "fp32",
) -> tuple[dict[str, float], list[str]]:
    """Task metrics of greedy replies against the reference replies, and the replies themselves (with
    label_accuracy among `metrics`: see evaluate_task)."""
    result = evaluate_task(model, renderer, samples, metrics, options, labels=labels, label_score=label_score,
                           precision=precision)
    return result.metrics, result.replies
