"""Batched generation with the same chat template as training."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from tunelab.data.template import ChatRenderer


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 128
    do_sample: bool = False
    """Greedy decoding unless sampling is asked for."""
    temperature: float = 0.7
    top_p: float = 0.9
    batch_size: int = 16
    seed: int = 0


def stop_token_ids(model, tokenizer) -> list[int]:
    """Tokens that end a reply: the tokenizer's EOS and whatever the model's generation config lists."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return sorted(ids)


def encode_prompts(renderer: ChatRenderer, conversations: list[list[dict[str, str]]]):
    """The token ids generation feeds the model, padded on the tokenizer's padding side. The template check
    (data/template_check.py) compares training's tokens against this very encoding."""
    prompts = [renderer.prompt(c) for c in conversations]
    return renderer.tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")


@torch.no_grad()
def generate_replies(
    model, renderer: ChatRenderer, conversations: list[list[dict[str, str]]], options: GenerationOptions
) -> list[str]:
    """One reply per conversation (every turn before the last assistant reply is the prompt)."""
    return [reply for batch in _generate_batches(model, renderer, conversations, options) for reply in batch]


def _generate_batches(
    model, renderer: ChatRenderer, conversations: list[list[dict[str, str]]], options: GenerationOptions
) -> Iterator[list[str]]:
    tokenizer = renderer.tokenizer
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right edge of every row
    try:
        for start in range(0, len(conversations), options.batch_size):
            encoded = encode_prompts(renderer, conversations[start : start + options.batch_size]).to(device)
            if options.do_sample:
                torch.manual_seed(options.seed + start)
            sampling = {"temperature": options.temperature, "top_p": options.top_p} if options.do_sample else {}
            output = model.generate(
                **encoded,
                max_new_tokens=options.max_new_tokens,
                do_sample=options.do_sample,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stop_token_ids(model, tokenizer),
                **sampling,
            )
            new_tokens = output[:, encoded["input_ids"].shape[1] :]
            yield [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new_tokens]
    finally:
        tokenizer.padding_side = previous_side
        model.train(was_training)
