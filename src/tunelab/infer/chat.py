"""Interactive chat with streaming output, using the run's chat template."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

from rich.console import Console

from tunelab.infer.decode import Sampling, stream
from tunelab.infer.generate import (
    GenerationOptions,
    context_length,
    decoding_model,
    stop_token_ids,
    stream_with_virtual_tokens,
)
from tunelab.infer.load import LoadedModel
from tunelab.models.logprobs import uses_virtual_tokens


def stream_reply(loaded: LoadedModel, messages: list[dict[str, str]], options: GenerationOptions) -> Iterator[str]:
    """Yield the reply to `messages` piece by piece as it is generated, decoded in the calling thread by
    `tunelab generate`'s loop for the model (decode's, or decode_with_virtual_tokens' for prompt and prefix
    tuning): a greedy reply is `tunelab generate`'s, a sampled one what it samples for the conversation as its
    first prompt with the same seed (each completion draws from its own generator); never half a character."""
    model, tokenizer = loaded.model, loaded.tokenizer
    prompt = tokenizer(loaded.renderer.prompt(messages), add_special_tokens=False)["input_ids"]
    sampling = Sampling(options.temperature, options.top_p, options.seed) if options.do_sample else None
    stop_ids = stop_token_ids(model, tokenizer)
    tokens: list[int] = []
    sent = 0
    with decoding_model(model, options.precision) as decoder:
        if uses_virtual_tokens(decoder):
            decoded = stream_with_virtual_tokens(decoder, prompt, max_new_tokens=options.max_new_tokens,
                                                 stop_ids=stop_ids, sampling=sampling)
        else:
            decoded = stream(decoder, prompt, max_new_tokens=options.max_new_tokens, stop_ids=stop_ids,
                             sampling=sampling, lookup=options.lookup)
        for token in decoded:
            tokens.append(token)
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            ready = len(text) - 1 if text.endswith("\ufffd") else len(text)  # wait for the rest of a character
            if ready > sent:
                yield text[sent:ready]
                sent = ready
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if len(text) > sent:
        yield text[sent:]


def fit_context(messages: list[dict[str, str]], count_tokens: Callable[[list[dict[str, str]]], int], context: int,
                room: int) -> tuple[list[dict[str, str]], int]:
    """(the conversation without its oldest turns, how many messages were dropped): whole turns (a message and the
    reply to it) go, oldest first, until the prompt leaves `room` tokens of the context for the reply; a system
    message and the newest message are always kept."""
    first = 1 if messages and messages[0]["role"] == "system" else 0
    kept, dropped = list(messages), 0
    while len(kept) - first > 1 and count_tokens(kept) + room > context:
        turn = 2 if len(kept) - first > 2 and kept[first + 1]["role"] == "assistant" else 1
        del kept[first:first + turn]
        dropped += turn
    return kept, dropped


def chat_loop(loaded: LoadedModel, options: GenerationOptions, system: str | None, console: Console) -> None:
    """Read a line, stream the reply; `/reset` forgets the conversation, `/exit` or Ctrl-D leaves. A conversation
    that outgrows the model's context forgets its oldest turns (the user is told once)."""
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    context = context_length(loaded.model)
    forgotten, told = 0, False
    console.print("[dim]chat: type a message; /reset clears the conversation, /exit leaves[/]")
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages, forgotten = (messages[:1] if system else []), 0
            console.print("[dim](conversation cleared)[/]")
            continue
        messages.append({"role": "user", "content": text})
        # sampled: a new draw each turn, reproducible
        turn = replace(options, seed=options.seed + forgotten + len(messages))
        if context is not None:
            fitted, dropped = fit_context(messages, lambda m: _prompt_tokens(loaded, m), context,
                                          options.max_new_tokens)
            room = context - _prompt_tokens(loaded, fitted)
            if room < 1:
                console.print(f"[yellow]that message is too long: the prompt would take {context - room} tokens of "
                              f"the model's context of {context}; send a shorter one[/]")
                messages.pop()
                continue
            if dropped and not told:
                console.print(f"[dim](the conversation no longer fits the model's context of {context} tokens: "
                              "its oldest turns are forgotten from now on; the system prompt is kept)[/]")
                told = True
            messages, forgotten = fitted, forgotten + dropped
            turn = replace(turn, max_new_tokens=min(turn.max_new_tokens, room))
        print("assistant> ", end="", flush=True)
        reply = ""
        for piece in stream_reply(loaded, messages, turn):
            reply += piece
            print(piece, end="", flush=True)
        print(flush=True)
        messages.append({"role": "assistant", "content": reply.strip()})


def _prompt_tokens(loaded: LoadedModel, messages: list[dict[str, str]]) -> int:
    """How many tokens stream_reply feeds the model for `messages`."""
    return len(loaded.tokenizer(loaded.renderer.prompt(messages), add_special_tokens=False)["input_ids"])
