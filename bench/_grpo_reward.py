"""The reward both tools' GRPO runs use in bench/compare_peer.py (the same code, loaded by each as a user's reward
function with TRL's signature): the share of the ticket's JSON fields a completion gets right, plus 0.25 for
any parseable JSON object, so that the base model's completions (rarely a right field) already differ."""

from __future__ import annotations

from tunelab.eval.metrics import _first_json_object, per_sample_json_field_accuracy


def json_reward(prompts, completions, answer, **columns) -> list[float]:
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [per_sample_json_field_accuracy(text, reference) + 0.25 * (_first_json_object(text) is not None)
            for text, reference in zip(texts, answer, strict=True)]
