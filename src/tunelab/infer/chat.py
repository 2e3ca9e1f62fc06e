"""Interactive chat with streaming output, using the run's chat template."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from threading import Thread

from rich.console import Console

from tunelab.infer.decode import Sampling, stream
from tunelab.infer.generate import GenerationOptions, decoding_model, encode_prompts, stop_token_ids
from tunelab.infer.load import LoadedModel
from tunelab.models.logprobs import uses_virtual_tokens


def stream_reply(loaded: LoadedModel, messages: list[dict[str, str]], options: GenerationOptions) -> Iterator[str]:
    """Yield the reply to `messages` piece by piece as it is generated, decoded in the calling thread by
    tunelab's decoding loop (a greedy reply is `tunelab generate`'s, in `options.precision`); never half a
    character."""
    model, tokenizer = loaded.model, loaded.tokenizer
    if uses_virtual_tokens(model):
        yield from _stream_with_generate(loaded, messages, options)
        return
    prompt = tokenizer(loaded.renderer.prompt(messages), add_special_tokens=False)["input_ids"]
    sampling = Sampling(options.temperature, options.top_p, options.seed) if options.do_sample else None
    tokens: list[int] = []
    sent = 0
    with decoding_model(model, options.precision) as decoder:
        for token in stream(decoder, prompt, max_new_tokens=options.max_new_tokens,
                            stop_ids=stop_token_ids(model, tokenizer), sampling=sampling, lookup=options.lookup):
            tokens.append(token)
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            ready = len(text) - 1 if text.endswith("\ufffd") else len(text)  # wait for the rest of a character
            if ready > sent:
                yield text[sent:ready]
                sent = ready
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if len(text) > sent:
        yield text[sent:]


def _stream_with_generate(loaded: LoadedModel, messages: list[dict[str, str]], options: GenerationOptions):
    """stream_reply through transformers' `generate` (in a thread, with its streamer), for models whose forward
    adds virtual tokens (prompt and prefix tuning)."""
    from transformers import TextIteratorStreamer

    tokenizer = loaded.tokenizer
    device = next(loaded.model.parameters()).device
    encoded = encode_prompts(loaded.renderer, [messages]).to(device)  # the same encoding as `generate`
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = {"temperature": options.temperature, "top_p": options.top_p} if options.do_sample else {}
    kwargs = dict(
        **encoded,
        max_new_tokens=options.max_new_tokens,
        do_sample=options.do_sample,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stop_token_ids(loaded.model, tokenizer),
        streamer=streamer,
        **sampling,
    )
    thread = Thread(target=loaded.model.generate, kwargs=kwargs, daemon=True)
    thread.start()
    yield from streamer
    thread.join()


def chat_loop(loaded: LoadedModel, options: GenerationOptions, system: str | None, console: Console) -> None:
    """Read a line, stream the reply; `/reset` forgets the conversation, `/exit` or Ctrl-D leaves."""
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
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
            messages = messages[:1] if system else []
            console.print("[dim](conversation cleared)[/]")
            continue
        messages.append({"role": "user", "content": text})
        print("assistant> ", end="", flush=True)
        reply = ""
        turn = replace(options, seed=options.seed + len(messages))  # sampled: a new draw each turn, reproducible
        for piece in stream_reply(loaded, messages, turn):
            reply += piece
            print(piece, end="", flush=True)
        print(flush=True)
        messages.append({"role": "assistant", "content": reply.strip()})
