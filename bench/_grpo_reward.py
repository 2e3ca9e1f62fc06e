"""The reward both tools' GRPO runs use in bench/compare_peer.py (the same code, loaded by each as a user's reward
function with TRL's signature): the share of the ticket's JSON fields a completion gets right."""

from __future__ import annotations

from tunelab.eval.metrics import per_sample_json_field_accuracy


def field_accuracy(prompts, completions, answer, **columns) -> list[float]:
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [per_sample_json_field_accuracy(text, reference) for text, reference in zip(texts, answer, strict=True)]
