"""One canonical sample to the token rows training sees, with the row's problem or note: the single place that
applies data.max_length / data.overlong, shared by the streamed, cached pipeline and the in-memory one."""

from __future__ import annotations

from dataclasses import dataclass, field

from tunelab.config import DataConfig
from tunelab.data.formats import Sample
from tunelab.data.template import ChatRenderer, TemplateError, TokenizedSample, tokenize_chat, tokenize_text

MAX_LISTED = 10
"""Problems and notes quoted word for word; the rest are only counted."""


class Problems:
    """Invalid rows of a run: the first MAX_LISTED kept as `file:line: why`, every one counted, so a file with
    millions of bad rows does not fill memory. Quacks like the list[str] the in-memory helpers append to."""

    def __init__(self, keep: int = MAX_LISTED) -> None:
        self.keep = keep
        self.listed: list[str] = []
        self.count = 0

    def append(self, problem: str) -> None:
        self.count += 1
        if len(self.listed) < self.keep:
            self.listed.append(problem)

    def extend(self, problems) -> None:
        for problem in problems:
            self.append(problem)

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        return iter(self.listed)


@dataclass
class SampleTokens:
    """What one sample became: its token rows (none when dropped or invalid; several for chunked raw text)."""

    units: list[TokenizedSample] = field(default_factory=list)
    problem: str | None = None
    """Set when the row is invalid: `file:line: why`."""
    truncated: str | None = None
    dropped: str | None = None


def tokenize_sample(sample: Sample, renderer: ChatRenderer, config: DataConfig) -> SampleTokens:
    """Template, tokenise and mask one sample; over-long chat samples are cut, dropped or refused per
    data.overlong; raw text is cut into max_length chunks instead (nothing thrown away)."""
    if sample.text is not None:
        return SampleTokens(tokenize_text(sample, renderer.tokenizer, config.max_length))
    try:
        tokenized = tokenize_chat(sample, renderer, config.train_on)
    except TemplateError as err:
        return SampleTokens(problem=f"{sample.where}: {err}")
    result = SampleTokens([tokenized])
    length = len(tokenized.input_ids)
    if length > config.max_length:
        what = f"has {length} tokens, more than data.max_length={config.max_length}"
        if config.overlong == "error":
            return SampleTokens(problem=f"{sample.where}: {what} (data.overlong=error)")
        if config.overlong == "drop":
            return SampleTokens(dropped=f"{sample.where}: {what}; dropped")
        tokenized.input_ids = tokenized.input_ids[: config.max_length]
        tokenized.labels = tokenized.labels[: config.max_length]
        result.truncated = f"{sample.where}: {what}; cut to {config.max_length}"
    if tokenized.trainable_tokens == 0:
        return SampleTokens(problem=f"{sample.where}: no trainable token left (the reply lies beyond data.max_length)")
    return result
