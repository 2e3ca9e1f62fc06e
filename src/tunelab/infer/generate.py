"""Batched generation with the same chat template as training."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from tunelab.data.template import ChatRenderer
from tunelab.infer.decode import Sampling, decode, left_padded, pick_scores
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
    precision: str = "fp32"
    """The compute dtype: `bf16` decodes a bf16 copy of an fp32 model (see decoding_model), as training computed."""
    lookup: bool = True
    """A reply decoded alone (a batch of one prompt, a chat turn) checks tokens drafted from its prompt and earlier
    replies in each pass (same reply, fewer passes: infer/lookup.py)."""


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


def context_length(model) -> int | None:
    """How many positions (prompt and reply) the model was built for: its config's max_position_embeddings, as
    `tunelab serve` limits requests; None where the config does not say."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    positions = getattr(base.config, "max_position_embeddings", None)
    return int(positions) if positions else None


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
    tokenizer = renderer.tokenizer
    prompts = [tokenizer(renderer.prompt(c), add_special_tokens=False)["input_ids"] for c in conversations]
    sampling = Sampling(options.temperature, options.top_p, options.seed) if options.do_sample else None
    with decoding_model(model, options.precision) as decoder:
        if uses_virtual_tokens(decoder):
            return [reply for batch in _generate_batches(decoder, renderer, conversations, options) for reply in batch]
        decoded = decode(decoder, prompts, max_new_tokens=options.max_new_tokens,
                         stop_ids=stop_token_ids(model, tokenizer), pad_id=tokenizer.pad_token_id,
                         sampling=sampling, batch_size=options.batch_size, lookup=options.lookup)
    return [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in decoded.tokens]


@contextmanager
def decoding_model(model, precision: str = "fp32") -> Iterator[torch.nn.Module]:
    """The model to decode with, in eval mode with tunelab_decode attention (sdpa for prompts), in the compute
    dtype `precision` names.

    For bf16 with fp32 weights: a bf16 copy with any adapter folded in (no per-token weight casts, no adapter
    matmuls), for models of up to COPY_LIMIT parameters that are not quantised; else the model itself under
    autocast. The model's training mode is restored afterwards."""
    from tunelab.models.attention import DECODE, attention_implementation

    was_training = model.training
    model.eval()
    decoder, cast = model, contextlib.nullcontext()
    if precision == "bf16" and next(model.parameters()).dtype == torch.float32:
        decoder = _bf16_copy(model)
        if decoder is None:
            decoder = model
            cast = torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16)
    try:
        with attention_implementation(decoder, DECODE), cast:
            yield decoder
    finally:
        model.train(was_training)


COPY_LIMIT = 2_000_000_000
"""Largest model (parameters) decoded from a bf16 copy; bigger ones use autocast rather than a second copy."""


def _bf16_copy(model) -> torch.nn.Module | None:
    from tunelab.methods import can_fold, folded_copy

    if sum(p.numel() for p in model.parameters()) > COPY_LIMIT or not can_fold(model):
        return None
    return folded_copy(model, torch.bfloat16)


def _generate_batches(
    model, renderer: ChatRenderer, conversations: list[list[dict[str, str]]], options: GenerationOptions
) -> Iterator[list[str]]:
    """transformers' `generate`, for models whose forward adds virtual tokens (prompt and prefix tuning)."""
    tokenizer = renderer.tokenizer
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


@torch.no_grad()
def sample_token_ids(
    model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, do_sample: bool, temperature: float = 1.0,
    top_p: float = 1.0, seed: int = 0, repeats: int = 1, batch_size: int | None = None,
) -> tuple[list[list[int]], list[bool]]:
    """(new token ids through the first stop token, whether cut at max_new_tokens) for each prompt `repeats`
    times over (prompt 0's completions first), from tunelab's decoding loop (infer/decode.py): each prompt run
    once and its cache repeated for its `repeats` completions, so a GRPO group of 8 pays for one prompt forward;
    sampling seeded by `seed`, so a resumed run samples the same completions and the global random state is left
    alone. Only temperature and top_p shape the distribution (top_k off), as in TRL, whatever the model's
    generation config says."""
    sampling = Sampling(temperature, top_p, seed) if do_sample else None
    if uses_virtual_tokens(model):
        return _sample_with_generate(model, tokenizer, prompts, max_new_tokens, sampling, repeats)
    decoded = decode(model, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_token_ids(model, tokenizer),
                     pad_id=tokenizer.pad_token_id, sampling=sampling, batch_size=batch_size or len(prompts),
                     repeats=repeats)
    return decoded.tokens, decoded.truncated


def _sample_with_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling | None,
                          repeats: int) -> tuple[list[list[int]], list[bool]]:
    """sample_token_ids through transformers' `generate` (prompt and prefix tuning: PEFT's forward adds the
    virtual tokens), sampling by the same Gumbel-max draw."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    input_ids, attention_mask = left_padded(prompts, pad, device)
    width = input_ids.shape[1]
    processors = None
    if sampling is not None:
        from transformers import LogitsProcessorList

        generator = torch.Generator(device=device).manual_seed(sampling.seed)
        processors = LogitsProcessorList([lambda ids, scores: pick_scores(scores, sampling, generator)])
    stops = stop_token_ids(model, tokenizer)
    output = model.generate(input_ids=input_ids.repeat_interleave(repeats, dim=0),
                            attention_mask=attention_mask.repeat_interleave(repeats, dim=0),
                            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=stops,
                            logits_processor=processors)
    completions, truncated = [], []
    for row in output[:, width:].tolist():
        end = next((i for i, token in enumerate(row) if token in stops), None)
        completions.append(row if end is None else row[: end + 1])
        truncated.append(end is None)
    return completions, truncated
