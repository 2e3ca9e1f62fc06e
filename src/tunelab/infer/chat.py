"""Interactive chat with streaming output, using the run's chat template."""

from __future__ import annotations

from threading import Thread

from rich.console import Console

from tunelab.infer.generate import GenerationOptions, encode_prompts, stop_token_ids
from tunelab.infer.load import LoadedModel


def stream_reply(loaded: LoadedModel, messages: list[dict[str, str]], options: GenerationOptions):
    """Yield the reply to `messages` piece by piece as it is generated."""
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
        for piece in stream_reply(loaded, messages, options):
            reply += piece
            print(piece, end="", flush=True)
        print(flush=True)
        messages.append({"role": "assistant", "content": reply.strip()})
