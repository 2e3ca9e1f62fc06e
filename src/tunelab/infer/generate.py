"""Batched generation with the same chat template as training."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from tunelab.data.template import ChatRenderer
from tunelab.models.logprobs import uses_virtual_tokens


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


@torch.no_grad()
def sample_token_ids(
    model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, do_sample: bool, temperature: float = 1.0,
    top_p: float = 1.0, seed: int = 0, repeats: int = 1,
) -> tuple[list[list[int]], list[bool]]:
    """(new token ids through the first stop token, whether cut at max_new_tokens) for each prompt `repeats`
    times over (prompt 0's completions first).

    One left-padded `generate` call with the KV cache. The prompts are run through the model once and their
    cache copied `repeats` times, so a GRPO group of 8 pays for one prompt forward, not 8: on the default model
    (2 CPU cores, 4 prompts of ~86 tokens x 8, 48 new tokens) the prompt forwards were most of the time.

    Sampling adds Gumbel noise to the temperature-scaled (and top_p-filtered) logits and takes the argmax, an exact
    draw from the same distribution: torch.multinomial spent 55 ms a token on 32 x 49k probabilities on CPU, as
    long as the model's matmuls. The noise comes from a generator seeded with `seed`, so a resumed run samples
    the same completions and the global random state is left alone. Only temperature and top_p shape the
    distribution (top_k off), as in TRL, whatever the model's generation config says."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    cache = None
    if repeats > 1 and width > 1 and not uses_virtual_tokens(model):
        cache = _prompt_cache(model, input_ids[:, :-1], attention_mask[:, :-1], repeats)
    input_ids = input_ids.repeat_interleave(repeats, dim=0)
    attention_mask = attention_mask.repeat_interleave(repeats, dim=0)
    stops = stop_token_ids(model, tokenizer)
    processors = None
    if do_sample:  # Gumbel-max: greedy over noisy logits is an exact sample, without torch.multinomial's cost
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        generator = torch.Generator(device=device).manual_seed(seed)
        processors = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
        processors.append(_GumbelNoise(generator))
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                            do_sample=False, pad_token_id=pad, eos_token_id=stops, cache=cache,
                            logits_processor=processors)
    completions, truncated = [], []
    stop_set = set(stops)
    for row in output[:, width:].tolist():
        end = next((i for i, token in enumerate(row) if token in stop_set), None)
        completions.append(row if end is None else row[: end + 1])
        truncated.append(end is None)
    return completions, truncated


class _GumbelNoise:
    """A logits processor adding standard Gumbel noise: argmax(scores + noise) samples softmax(scores)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        uniform = torch.rand(scores.shape, generator=self.generator, device=scores.device, dtype=torch.float32)
        noise = -torch.log(-torch.log(uniform.clamp_(min=1e-20, max=1 - 1e-7)))
        return scores.float() + noise


def _prompt_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, repeats: int):
    """The KV cache of every prompt but its last token (left-padded), each row repeated `repeats` times: what
    `generate` continues from (it feeds the last prompt token itself)."""
    from transformers import DynamicCache

    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate numbers left-padded rows
    cache = DynamicCache(config=model.config)
    model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache,
          use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(repeats)
    return cache
