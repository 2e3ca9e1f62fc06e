"""What a training run measures: loss on all held-out data at every evaluation, task metrics on a fixed
held-out subset when `eval.during_training` is on, and task metrics on the generation samples before and after.

Cost of task metrics during training, per evaluation (every train.eval_every steps, the last step, and the
base model at step 0): greedy generation for the first `eval.during_training_samples` held-out prompts
(default 32), i.e. ceil(n / 16) batched `generate` calls of at most `eval.max_new_tokens` new tokens each;
label_accuracy instead costs n prompt forwards plus n x (number of labels) short label continuations, and no
generation. The subset is fixed, so the cost does not grow with the eval set and successive values compare the
same samples. Measured on the default model (CPU, one thread, loaded machine): loss on 60 held-out samples 53s,
plus 41s for exact_match on 32 generated replies of up to 64 tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tunelab.config import RunConfig
from tunelab.data.formats import Sample
from tunelab.data.preference import PreparedPairs
from tunelab.data.prepare import PreparedData
from tunelab.data.template import ChatRenderer
from tunelab.eval.evaluate import evaluate_loss, evaluate_task
from tunelab.eval.labels import LABEL_METRICS, resolve_labels
from tunelab.eval.metrics import check_custom_metrics, check_references
from tunelab.infer.generate import GenerationOptions

LABEL_BATCH_SIZE = 16
"""Samples per label-scoring forward: each holds a whole conversation's logits, so it stays smaller than the
generation batch (eval.generate_batch_size)."""


@dataclass
class RunEvaluator:
    """Called by the training loop for each evaluation; `task` scores any held-out samples."""

    config: RunConfig
    model: object
    renderer: ChatRenderer
    data: PreparedData | PreparedPairs
    """SFT data, or preference/feedback rows (their eval_samples: held-out prompts with the chosen reply)."""
    precision: str
    generation: GenerationOptions
    loss: Callable[[], dict[str, float]] | None = None
    """The held-out loss of a non-SFT objective and its metrics; None: token-level loss and perplexity."""
    share_prefix: bool = False
    """Held-out loss batches hold their samples' shared prefix once, on the matmul attention path (set by the run
    when its training batches do: evaluate_loss)."""
    labels: list[str] | None = field(init=False, default=None)
    """label_accuracy's label set, resolved once over all held-out references so every evaluation uses it."""

    def __post_init__(self) -> None:
        if any(m in LABEL_METRICS for m in self.config.eval.metrics) and self.data.eval_samples:
            references = [s.reference for s in self.data.eval_samples]
            self.labels = resolve_labels(self.config.eval.labels, references)
        self._check_metrics()

    def _check_metrics(self) -> None:
        """Refuse, before training, eval.metrics that would fail on the samples they score: a custom metric whose
        file or function is missing, a reference json_field_accuracy cannot read."""
        scored = self.data.eval_samples[: max(self.config.eval.generate_samples, len(self.subset))]
        if not scored:
            return
        check_custom_metrics(self.config.eval.metrics, "eval.metrics")
        check_references(self.config.eval.metrics, [s.reference for s in scored], [s.where for s in scored])

    @property
    def subset(self) -> list[Sample]:
        """The fixed samples task metrics are computed on at each evaluation ([] when that is off)."""
        if not self.config.eval.during_training:
            return []
        return self.data.eval_samples[: self.config.eval.during_training_samples]

    def __call__(self) -> dict[str, float]:
        """eval_loss, eval_perplexity (and per source), plus eval_<metric> on the subset."""
        if self.loss is not None:
            result = self.loss()
        else:
            result = evaluate_loss(self.model, self.data.eval, pad_token_id=self.renderer.tokenizer.pad_token_id,
                                   precision=self.precision, batch_size=self.config.train.batch_size,
                                   share_prefix=self.share_prefix)
        if result and self.subset:
            metrics, _ = self.task(self.subset)
            result.update({f"eval_{key}": value for key, value in metrics.items()})
        return result

    def task(self, samples: list[Sample]) -> tuple[dict[str, float], list[str]]:
        """eval.metrics on `samples` and the model's replies (the predicted labels for label_accuracy alone)."""
        outcome = evaluate_task(
            self.model,
            self.renderer,
            samples,
            self.config.eval.metrics,
            self.generation,
            labels=self.labels,
            label_score=self.config.eval.label_score,
            precision=self.precision,
            max_length=self.config.data.max_length,
            label_batch_size=LABEL_BATCH_SIZE,
        )
        return outcome.metrics, outcome.replies
