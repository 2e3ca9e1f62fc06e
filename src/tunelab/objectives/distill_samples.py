"""On-policy distillation's replies (GKD, Agarwal et al. 2024, as TRL's GKDTrainer samples them): with probability
lmbda a micro-batch's replies are replaced by the student's own samples from the same prompts, else, with seq_kd,
by the teacher's (sequence-level KD); the divergence is then taken on those tokens.

Which micro-batches are sampled, and the samples themselves, are functions of (train.seed, step) alone: a run
resumed from a checkpoint makes the very choices and draws of an uninterrupted one, and the global random state
(dropout) is left alone.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from tunelab.data.template import IGNORE_INDEX, TokenizedSample
from tunelab.infer.generate import context_length, decoding_model, sample_token_ids
from tunelab.models.attention import DECODE, attention_implementation
from tunelab.objectives.metrics import Metrics

ReplySource = Literal["data", "student", "teacher"]


@dataclass(frozen=True)
class SampledReply:
    """A sample whose reply was generated during training: by the student (on-policy) or the teacher (seq_kd)."""

    sample: TokenizedSample
    by: ReplySource


def reply_sources(lmbda: float, seq_kd: bool, seed: int, step: int, micro_batches: int) -> list[ReplySource]:
    """Whose replies each micro-batch of step `step` (0-based) trains on: `student` with probability lmbda, else
    `teacher` under seq_kd, else `data` (TRL's GKDTrainer.training_step, one draw per micro-batch). The draws come
    from a generator seeded by (seed, step) only, so they are the same on every process and after a resume."""
    draws = random.Random(f"tunelab-distill:{seed}:{step}")  # a str seed is hashed by sha512: stable everywhere
    sources: list[ReplySource] = []
    for _ in range(micro_batches):
        if draws.random() < lmbda:  # in [0, 1): lmbda 0 never, 1 always
            sources.append("student")
        else:
            sources.append("teacher" if seq_kd else "data")
    return sources


def sampling_seed(seed: int, step: int, by: ReplySource) -> int:
    """The seed of step `step`'s draws by the student or the teacher (each completion then has its own generator,
    infer/decode.py's RowNoise)."""
    return (seed * 1_000_003 + step) * 2 + (by == "teacher")


def reply_start(sample: TokenizedSample) -> int | None:
    """Where the sample's last trained reply begins (its prompt is everything before), or None when nothing is
    trained. Earlier turns' replies belong to the prompt, as in TRL's collator (prompt = all but the last reply)."""
    end = next((i for i in range(len(sample.labels) - 1, -1, -1) if sample.labels[i] != IGNORE_INDEX), None)
    if end is None:
        return None
    start = end
    while start > 0 and sample.labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start


def with_reply(sample: TokenizedSample, start: int, reply: list[int]) -> TokenizedSample:
    """`sample` with everything from `start` on replaced by `reply`, trained on the reply alone (labels -100 on
    the prompt: TRL's generate_on_policy_outputs masks the prompt, earlier replies included)."""
    prompt = sample.input_ids[:start]
    return TokenizedSample([*prompt, *reply], [IGNORE_INDEX] * len(prompt) + list(reply), sample.where,
                           sample.source)


def sample_replies(model, tokenizer, prompts: list[list[int]], *, by: ReplySource, max_new_tokens: int,
                   temperature: float, seed: int, precision: str) -> tuple[list[list[int]], list[bool]]:
    """(each prompt's sampled reply, through its stop token when it produced one; whether it was cut at the token
    limit), temperature-sampled (top_p 1, top_k off, as TRL's GKD) with tunelab's decoding loop. The student
    decodes as evaluation does (infer/generate.decoding_model: eval mode, the training precision, an adapter
    folded into a copy where it can be, PEFT's virtual tokens for prompt and prefix tuning); the teacher, frozen
    and in eval mode already, decodes as it is."""
    longest = max(len(p) for p in prompts)
    limit = context_length(model)
    if limit is not None:  # the reply must fit the positions the model has
        max_new_tokens = max(1, min(max_new_tokens, limit - longest))
    options = {"max_new_tokens": max_new_tokens, "do_sample": True, "temperature": temperature, "top_p": 1.0,
               "seed": seed}
    if by == "teacher":
        with attention_implementation(model, DECODE):
            return sample_token_ids(model, tokenizer, prompts, **options)
    with decoding_model(model, precision) as decoder:
        return sample_token_ids(decoder, tokenizer, prompts, **options)


def replace_replies(step_rows: Sequence[Sequence[Sequence[TokenizedSample]]], sources: list[ReplySource], *,
                    student, teacher, tokenizer, max_new_tokens: int, temperature: float, seed: int, step: int,
                    precision: str, weights: Sequence[float] | None = None) -> tuple[list[list[list]], Metrics]:
    """The step's micro-batches with the replies `sources` names replaced by the student's or the teacher's samples
    (SampledReply items; the data's rows stay TokenizedSample), and what to log: distill/on_policy (the share of
    micro-batches trained on the student's samples), distill/sampled_length (tokens per sampled reply) and
    distill/sampled_clipped_ratio (the share cut at max_new_tokens). `weights`: per micro-batch, 0 for a stand-in
    (the loop's share_weights under --nproc, trained with weight 0): it keeps the data's replies and is left out of
    what is logged."""
    real = [weights is None or bool(weights[b]) for b in range(len(step_rows))]
    out: list[list[list]] = [[list(row) for row in rows] for rows in step_rows]
    metrics: Metrics = {}
    if any(real):
        on_policy = sum(1 for b, source in enumerate(sources) if real[b] and source == "student")
        metrics["distill/on_policy"] = (float(on_policy), sum(real))
    lengths, clipped = [], []
    for by in ("student", "teacher"):
        places = [(b, r, i, start) for b, rows in enumerate(step_rows) if sources[b] == by and real[b]
                  for r, row in enumerate(rows) for i, sample in enumerate(row)
                  if (start := reply_start(sample))]  # a row all trained (raw text) has no prompt: kept as it is
        if not places:
            continue
        prompts = [step_rows[b][r][i].input_ids[:start] for b, r, i, start in places]
        model = student if by == "student" else teacher
        replies, truncated = sample_replies(model, tokenizer, prompts, by=by, max_new_tokens=max_new_tokens,
                                            temperature=temperature, seed=sampling_seed(seed, step, by),
                                            precision=precision)
        for (b, r, i, start), reply in zip(places, replies, strict=True):
            out[b][r][i] = SampledReply(with_reply(step_rows[b][r][i], start, reply), by)
        lengths += [len(reply) for reply in replies]
        clipped += truncated
    if lengths:
        metrics["distill/sampled_length"] = (float(sum(lengths)), len(lengths))
        metrics["distill/sampled_clipped_ratio"] = (float(sum(clipped)), len(clipped))
    return out, metrics


def unwrapped(rows: Sequence[Sequence[TokenizedSample | SampledReply]]) -> list[list[TokenizedSample]]:
    """The rows' samples, sampled replies included, as SFT collates them."""
    return [[item.sample if isinstance(item, SampledReply) else item for item in row] for row in rows]


def has_student_replies(rows: Sequence[Sequence[TokenizedSample | SampledReply]]) -> bool:
    return any(isinstance(item, SampledReply) and item.by == "student" for row in rows for item in row)

