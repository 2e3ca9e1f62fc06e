"""Drafts for lookup decoding: the tokens that followed the last occurrence of what was just generated.

A single stream decodes one token per forward pass, and on a CPU that pass costs about the same for one position
as for several (the weights are read once either way: on the default model, bf16, AMD EPYC, 2 cores, 23 ms for one
position, 25 for nine). Replies of fine-tuned models repeat what they have seen: spans of the prompt (a product
name, an order id) and the shape of earlier replies (`", "urgency": "`). So the step guesses the next few tokens
by finding the latest n-gram that ends like the text so far, first in the request's own tokens (prompt and reply),
then in earlier replies, and checks the guess in the same pass (infer/decode.py's _single_row, the server's
Engine._confirm): each token is still picked from the model's own logits, so the reply is the one decoding
without drafts would give (same draws when sampled; in bf16 up to the rounding of a wider pass), only sooner. On
the main job's 60 held-out replies (fine-tuned model) drafts of up to 8 tokens from 3-grams down to single tokens
gave 3.3 tokens a pass with earlier replies, 1.15 without. The server's batches draft fewer tokens a row
(DRAFTS_FOR_ROWS).
"""

from __future__ import annotations

from collections.abc import Iterable

LONGEST_NGRAM = 3
"""Drafts follow the longest n-gram, up to this long, that ends the text and occurred before."""
DRAFT_TOKENS = 8
"""At most this many drafted tokens a pass: nine positions cost ~10% more than one on the default model."""
DRAFTS_FOR_ROWS = ((1, DRAFT_TOKENS), (4, 4), (8, 2))
"""(most rows, most drafts a row) for a pass of several rows (the server's batches): a CPU pass costs more for
each position it adds the more rows it has. Default model, bf16, AMD EPYC, 2 cores, ms a pass for 1, 3, 5 and 9
positions a row: 2 rows 24.6, 22.2, 26.0, 33.2; 4 rows 22.9, 29.2, 36.9, 50.5; 8 rows 30.2, 47.6, 61.4, 90.9; 16
rows 40.0, 83.5, 92.3 (5); more than 8 rows draft nothing. Through HTTP, 8 clients: 214.5 tokens/s with 2 drafts
a row, 191.3 with 4."""
HISTORY_TOKENS = 1 << 16
"""How many tokens of earlier replies a History keeps (the newest)."""
_SEPARATOR = -1
"""Between two replies in a History: no n-gram across it matches real tokens."""


class NgramIndex:
    """A token sequence and, for each of its n-grams (n up to LONGEST_NGRAM), where the token after its latest
    occurrence sits: a draft is a dictionary lookup, not a scan."""

    def __init__(self, tokens: Iterable[int] = ()) -> None:
        self.tokens: list[int] = []
        self._next: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            end = len(self.tokens)
            if token != _SEPARATOR:  # an n-gram that ends a reply keeps its earlier occurrence, which continues
                for n in range(1, min(LONGEST_NGRAM, end) + 1):
                    self._next[tuple(self.tokens[end - n:end])] = end
            self.tokens.append(token)

    def following(self, tail: tuple[int, ...], count: int) -> list[int]:
        """Up to `count` tokens that followed `tail`'s latest occurrence (not counting one at the very end)."""
        start = self._next.get(tail)
        if start is None:
            return []
        drafted = self.tokens[start:start + count]
        return drafted[:drafted.index(_SEPARATOR)] if _SEPARATOR in drafted else drafted


class History:
    """Earlier replies (the newest HISTORY_TOKENS tokens), where a reply's drafts are looked up when its own
    tokens have none: what the server's replies to similar requests have in common."""

    def __init__(self, limit: int = HISTORY_TOKENS) -> None:
        self.limit = limit
        self.index = NgramIndex()

    def add(self, reply: list[int]) -> None:
        if len(self.index.tokens) + len(reply) + 1 > self.limit:
            kept = self.index.tokens[-(self.limit // 2):]
            self.index = NgramIndex(kept[kept.index(_SEPARATOR):] if _SEPARATOR in kept else [])
        self.index.extend([_SEPARATOR, *reply])


def drafts_for_rows(rows: int) -> int:
    """How many tokens each row of a pass of `rows` rows may draft (DRAFTS_FOR_ROWS); 0 past its last entry."""
    return next((most for limit, most in DRAFTS_FOR_ROWS if rows <= limit), 0)


def draft(own: NgramIndex, history: History | None, count: int = DRAFT_TOKENS) -> list[int]:
    """Up to `count` tokens guessed to follow `own.tokens` (the prompt and the reply so far): after the longest
    n-gram ending them that occurred before, in `own` first, then in `history`."""
    tokens = own.tokens
    for n in range(min(LONGEST_NGRAM, len(tokens)), 0, -1):
        tail = tuple(tokens[-n:])
        found = own.following(tail, count) or (history.index.following(tail, count) if history else [])
        if found:
            return found
    return []
