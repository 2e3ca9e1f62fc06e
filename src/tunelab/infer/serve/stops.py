"""Stop strings (`stop` in OpenAI's API) over a reply's text as it grows: where one ends the reply, and how much
of the text's end must wait (it could be the start of one) before it is streamed."""

from __future__ import annotations


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first of the stop strings starts in `text`, if any does: the reply ends there."""
    found = [index for stop in stops if (index := text.find(stop)) >= 0]
    return min(found) if found else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` that could be the start of a stop string: not sent yet."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest
