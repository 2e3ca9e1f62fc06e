"""Batched generation with the same chat template as training."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from tunelab.data.template import ChatRenderer
from tunelab.infer.decode import Decoded, RowNoise, Sampling, decode, left_padded, pick_scores
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
    """How many positions a prompt and its reply may take: the config's max_position_embeddings, less the virtual
    tokens of prompt or prefix tuning (they take the first positions), as `tunelab serve` limits requests; None
    where the config does not say."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    positions = getattr(base.config, "max_position_embeddings", None)
    if not positions:
        return None
    virtual = model.active_peft_config.num_virtual_tokens if uses_virtual_tokens(model) else 0
    return int(positions) - virtual


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
            decoded = decode_with_virtual_tokens(decoder, prompts, max_new_tokens=options.max_new_tokens,
                                                 stop_ids=stop_token_ids(model, tokenizer),
                                                 pad_id=tokenizer.pad_token_id, sampling=sampling,
                                                 batch_size=options.batch_size)
        else:
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
    """Greedy replies from transformers' own `generate`, batch by batch: the reference tests hold tunelab's
    decoding loop to (tests/test_decode.py). Not for prompt or prefix tuning (see decode_with_virtual_tokens)."""
    if options.do_sample:
        raise ValueError("_generate_batches is the greedy reference; sampled replies come from generate_replies")
    tokenizer = renderer.tokenizer
    device = next(model.parameters()).device
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right edge of every row
    try:
        for start in range(0, len(conversations), options.batch_size):
            encoded = encode_prompts(renderer, conversations[start : start + options.batch_size]).to(device)
            output = model.generate(**encoded, max_new_tokens=options.max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_token_ids(model, tokenizer))
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
        decoded = decode_with_virtual_tokens(model, [p for p in prompts for _ in range(repeats)],
                                             max_new_tokens=max_new_tokens, stop_ids=stop_token_ids(model, tokenizer),
                                             pad_id=tokenizer.pad_token_id, sampling=sampling,
                                             batch_size=(batch_size or len(prompts)) * repeats)
        return decoded.tokens, decoded.truncated
    decoded = decode(model, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_token_ids(model, tokenizer),
                     pad_id=tokenizer.pad_token_id, sampling=sampling, batch_size=batch_size or len(prompts),
                     repeats=repeats)
    return decoded.tokens, decoded.truncated


@torch.no_grad()
def decode_with_virtual_tokens(model, prompts: list[list[int]], *, max_new_tokens: int, stop_ids: list[int],
                               pad_id: int, sampling: Sampling | None = None, batch_size: int = 16) -> Decoded:
    """decode's completions for a prompt- or prefix-tuned PEFT model: its learned inputs first, then each prompt,
    at the positions training gave them ([virtual tokens][prompt], however much left padding the batch needs),
    greedy unless `sampling`, each completion drawing from its own generator (decode's RowNoise): a reply does not
    depend on the batch size or the prompts beside it.

    Why not `generate`: with peft 0.21.2 and transformers 5.25 (whose generate passes the KV cache as `cache`, not
    `past_key_values`), PEFT's prepare_inputs_for_generation does not see the cache and injects its virtual tokens
    or prefix as if every step were the first; on a tiny Llama the logits `generate` picked from differed from
    PEFT's own forward over the same tokens by 0.05-0.25 (their spread: 0.16), prompt tuning from the second token
    on, prefix tuning from the first. PEFT's prompt tuning also drops position ids, so left padding
    moved a prompt away from its virtual tokens. This loop uses PEFT's public pieces (get_prompt, word_embeddings,
    get_base_model) and the base model's forward; tests/test_launch_sampling_fixes.py holds it to PEFT's forward."""
    stops = set(stop_ids)
    tokens: list[list[int]] = []
    truncated: list[bool] = []
    noise = RowNoise(sampling.seed, next(model.parameters()).device) if sampling is not None else None
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        new: list[list[int]] = [[] for _ in batch]
        finished = [False] * len(batch)
        for picked in _virtual_token_steps(model, batch, list(range(start, start + len(batch))), max_new_tokens,
                                           pad_id, sampling, noise):
            for row, token in enumerate(picked):
                if not finished[row]:
                    new[row].append(token)
                    finished[row] = token in stops
            if all(finished):
                break
        tokens += new
        truncated += [not row or row[-1] not in stops for row in new]
    return Decoded(tokens, truncated)


@torch.no_grad()
def stream_with_virtual_tokens(model, prompt: list[int], *, max_new_tokens: int, stop_ids: list[int],
                               sampling: Sampling | None = None) -> Iterator[int]:
    """The tokens of decode_with_virtual_tokens' completion of one prompt as they are decoded, through its stop
    token (the same loop and draws: completion 0's generator), for chat."""
    noise = RowNoise(sampling.seed, next(model.parameters()).device) if sampling is not None else None
    # a single prompt has no padding: pad_id is never used
    for (token,) in _virtual_token_steps(model, [prompt], [0], max_new_tokens, 0, sampling, noise):
        yield token
        if token in stop_ids:
            return


def _virtual_token_steps(model, prompts: list[list[int]], rows: list[int], max_new_tokens: int, pad_id: int,
                         sampling: Sampling | None, noise: RowNoise | None) -> Iterator[list[int]]:
    """Every prompt's next token, step by step (up to max_new_tokens steps), with the KV cache: the loop of
    decode_with_virtual_tokens and stream_with_virtual_tokens. `rows` are the completions' indices, whose
    generators they draw from; rows that produced a stop token go on decoding until the caller stops asking."""
    from peft import PeftType

    config, base = model.active_peft_config, model.get_base_model()
    virtual = config.num_virtual_tokens
    input_ids, mask = left_padded(prompts, pad_id, next(model.parameters()).device)  # [B, T]
    ones = torch.ones(len(prompts), virtual, dtype=mask.dtype, device=mask.device)
    if config.peft_type in (PeftType.PREFIX_TUNING, PeftType.CARTRIDGE):
        # the learned keys and values fill the first `virtual` cache positions; the prompt continues after them
        cache = model.get_prompt(batch_size=len(prompts))
        mask = torch.cat([ones, mask], dim=1)
        positions = virtual + (mask[:, virtual:].cumsum(-1) - 1).clamp(min=0)
        inputs = {"input_ids": input_ids}
    else:
        # prompt tuning: [padding][virtual tokens][prompt], so every row's virtual tokens sit at 0..virtual-1
        embeds = model.word_embeddings(input_ids)
        embeds = torch.cat([model.get_prompt(batch_size=len(prompts)).to(embeds.dtype), embeds], dim=1)
        mask = torch.cat([ones, mask], dim=1)
        order = mask.argsort(dim=1, stable=True)  # padding (0) first, the rest in their order
        embeds = embeds.gather(1, order[..., None].expand_as(embeds))  # [B, virtual + T, H]
        mask = mask.gather(1, order)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache, inputs = None, {"inputs_embeds": embeds}
    for step in range(max_new_tokens):
        out = base(**inputs, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                   logits_to_keep=1)
        cache, logits = out.cache, out.logits[:, -1]  # [B, vocabulary]
        if sampling is not None:
            logits = pick_scores(logits, sampling, None, noise.uniform(rows, logits.shape[-1]))
        picked = logits.float().max(dim=-1).indices  # max's indices are argmax's
        yield picked.tolist()
        if step == max_new_tokens - 1:
            return
        inputs = {"input_ids": picked[:, None]}  # [B, 1]
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
        positions = positions[:, -1:] + 1
