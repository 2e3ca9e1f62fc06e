"""What a request to the server's engine is (its prompt, how to sample, where its text goes) and how it ends."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tunelab.infer.lookup import NgramIndex


class QueueFull(Exception):
    """More requests are waiting than the server accepts; the caller answers 503."""


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    """0 picks the most likely token (greedy)."""
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Finished:
    text: str
    finish_reason: str
    """`stop` (a stop token or string) or `length` (max_tokens)."""
    completion_tokens: int


@dataclass
class Request:
    """One completion to produce: its prompt tokens, how to sample, and where its text goes. `on_text` receives
    each new piece of text (never a piece of a stop string or half a character); `on_done` the end."""

    prompt_ids: list[int]
    sampling: Sampling
    adapter: str | None
    """The adapter its rows run with (PEFT's `adapter_names`); None when the model has one or none."""
    on_text: Callable[[str], None]
    on_done: Callable[[Finished | BaseException], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    sent: int = 0
    """Characters of the reply already handed to on_text."""
    generator: torch.Generator | None = None
    drawn: int | None = None
    """Its next token, already picked while checking drafts (Engine._confirm): the next step uses it
    instead of picking again, so no extra draw is made."""
    own: NgramIndex | None = None
    """Its prompt and reply so far, indexed for lookup drafts."""
