"""tunelab's own decoding loop: what evaluation, `tunelab generate` and GRPO's rollouts generate with.

transformers' `generate` runs every row of a batch until the longest is done, pads every prompt to the batch's
longest, and does per-token bookkeeping (logits processors, stopping criteria, input preparation) around the
model. For the short, uneven replies of fine-tuning data that overhead and the finished rows are much of the
time. Here:
- prompts are decoded longest first, so a batch holds prompts of similar length (little left padding), and
  results come back in the caller's order;
- the leading tokens all prompts of a batch share (chat template, system prompt, instruction) run once, and the
  KV cache is reserved for the whole decode and written in place (infer/kv_cache.py) instead of concatenated;
- a row that produced a stop token leaves the batch (its KV-cache rows are dropped once enough rows finished),
  so the rest run on a smaller batch;
- the prompt is run once per prompt and its cache repeated for `repeats` completions (GRPO's groups);
- greedy is an argmax, sampling is Gumbel-max over temperature/top_p-shaped logits (an exact draw without
  torch.multinomial's CPU cost), each completion drawing from its own generator seeded by the seed and its index:
  the same draws on resume, and a reply that does not depend on the batch size or what else decodes beside it.
Llama-family models run models/lean_decoder.py's forward (the same computation without transformers' per-layer
machinery); others, and PEFT models, run their own. Models whose PEFT forward adds virtual tokens (prompt and
prefix tuning) decode by infer/generate.py's decode_with_virtual_tokens instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tunelab.models.lean_decoder import lean_decoder

from .kv_cache import ReservedLayer, reserved_cache, rewind, stack_rows
from .lookup import DRAFT_TOKENS, History, NgramIndex, draft

if TYPE_CHECKING:
    from collections.abc import Callable

    from transformers import DynamicCache

    Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache], torch.Tensor]

MIN_SHARED_PREFIX = 8
"""Prompts of a batch that share at least this many leading tokens run them once (see prefill)."""
COMPACT_FRACTION = 8
"""Drop finished rows from the KV cache once at least 1/COMPACT_FRACTION of the batch has finished: copying the
cache for every single finished row would cost more than computing a few dead rows."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


class RowNoise:
    """A generator per completion, seeded from the sampling seed and the completion's index: `decode`'s rows draw
    their Gumbel noise each from its own, so a sampled reply is the same whether its prompt decodes alone (a batch
    of one, or `stream`) or beside others, in any batch size."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.seed, self.device = seed, device
        self.generators: dict[int, torch.Generator] = {}

    def generator(self, row: int) -> torch.Generator:
        if row not in self.generators:
            mixed = (self.seed * 6364136223846793005 + row * 1442695040888963407 + 1) % 2**63
            self.generators[row] = torch.Generator(device=self.device).manual_seed(mixed)
        return self.generators[row]

    def uniform(self, rows: list[int], vocabulary: int) -> torch.Tensor:
        """[len(rows), vocabulary] uniform draws, row i from completion rows[i]'s generator."""
        return torch.stack([torch.rand(vocabulary, generator=self.generator(row), device=self.device,
                                       dtype=torch.float32) for row in rows])


@dataclass
class Decoded:
    tokens: list[list[int]]
    """New tokens of each completion, through its stop token when it produced one."""
    truncated: list[bool]
    """Whether a completion was cut at max_new_tokens (no stop token)."""


@torch.no_grad()
def decode(model, prompts: list[list[int]], *, max_new_tokens: int, stop_ids: list[int], pad_id: int,
           sampling: Sampling | None = None, batch_size: int = 16, repeats: int = 1, lookup: bool = True) -> Decoded:
    """Completions of every prompt, `repeats` per prompt (prompt 0's first), greedy unless `sampling`.
    `batch_size` counts prompts (each batch decodes batch_size x repeats rows); a batch of a single row decodes
    with lookup drafts (see stream) unless `lookup` is False."""
    n = len(prompts)
    tokens: list[list[int]] = [[] for _ in range(n * repeats)]
    truncated = [True] * (n * repeats)
    noise = RowNoise(sampling.seed, _device(model)) if sampling is not None else None
    history = History() if lookup else None
    for batch in _batches_by_length(prompts, batch_size):
        if len(batch) == 1 and repeats == 1:  # one row: lookup decoding (see _single_row)
            generator = noise.generator(batch[0]) if noise is not None else None
            new = list(_single_row(model, prompts[batch[0]], max_new_tokens, set(stop_ids), sampling, generator,
                                   history))
            tokens[batch[0]], truncated[batch[0]] = new, new[-1] not in stop_ids
            continue
        rows = [batch[slot // repeats] * repeats + slot % repeats for slot in range(len(batch) * repeats)]
        done = _decode_batch(model, [prompts[i] for i in batch], max_new_tokens, set(stop_ids), pad_id, sampling,
                             noise, repeats, rows)
        for row, new, cut in zip(rows, *done, strict=True):
            tokens[row], truncated[row] = new, cut
    return Decoded(tokens, truncated)


@torch.no_grad()
def stream(model, prompt: list[int], *, max_new_tokens: int, stop_ids: list[int],
           sampling: Sampling | None = None, lookup: bool = True) -> Iterator[int]:
    """The tokens of one completion as they are decoded, through its stop token: decode's loop for a single
    prompt (the same prefill, cache and picks, so a greedy stream is decode's reply), for chat. With `lookup`
    each pass also checks tokens drafted from the prompt and reply (infer/lookup.py), where the model's cache can
    forget the drafts it rejects (drafts_possible)."""
    generator = RowNoise(sampling.seed, _device(model)).generator(0) if sampling is not None else None
    yield from _single_row(model, prompt, max_new_tokens, set(stop_ids), sampling, generator,
                           History() if lookup else None)


def _single_row(model, prompt: list[int], max_new_tokens: int, stops: set[int], sampling: Sampling | None,
                generator: torch.Generator | None, history: History | None) -> Iterator[int]:
    """stream's loop. Every token is picked from the model's logits in order, one draw each, whether or not it
    was drafted: a drafted token counts only where the pick equals it, and the pass's later positions (computed
    after it) are used only while they do. So drafts change how many passes a reply takes, not the reply (up to
    the rounding of a wider pass in bf16)."""
    with torch.inference_mode():  # not across a yield, which would leave the caller in it (compiled_step.py: why)
        logits, cache, _, _ = prefill(model, [prompt], 0, max_new_tokens)
    forward = decoding_forward(model)
    own = NgramIndex(prompt) if history is not None and drafts_possible(model) else None
    device = logits.device
    token = int(_pick(logits, sampling, generator)[0])
    produced = []
    while True:
        yield token
        produced.append(token)
        if token in stops or len(produced) == max_new_tokens:
            if history is not None:
                history.add(produced)
            return
        drafts = []
        if own is not None:
            own.extend([token])
            drafts = draft(own, history, min(DRAFT_TOKENS, max_new_tokens - len(produced) - 1))
        cached = len(prompt) + len(produced) - 1  # positions in the cache: all but the token just picked
        width = 1 + len(drafts)
        with torch.inference_mode():
            out = forward(torch.tensor([[token, *drafts]], device=device),
                          torch.ones(1, cached + width, dtype=torch.long, device=device),
                          torch.arange(cached, cached + width, device=device)[None], cache,
                          **({"every_position": True} if drafts else {}))
        if not drafts:
            token = int(_pick(out, sampling, generator)[0])
            continue
        for position, drafted in enumerate([*drafts, None]):
            token = int(_pick(out[:, position], sampling, generator)[0])
            if token != drafted:
                break
            yield token
            produced.append(token)
            own.extend([token])
            if token in stops:
                history.add(produced)
                return
        with torch.inference_mode():
            rewind(cache, cached + 1 + position)


def _batches_by_length(prompts: list[list[int]], batch_size: int) -> Iterator[list[int]]:
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def left_padded(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of prompts padded on the left to the longest: each row continues from the right
    edge."""
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return input_ids, mask


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _decode_batch(model, prompts: list[list[int]], max_new_tokens: int, stops: set[int], pad_id: int,
                  sampling: Sampling | None, noise: RowNoise | None, repeats: int,
                  row_ids: list[int]) -> tuple[list[list[int]], list[bool]]:
    """Decode a batch; `row_ids` are the completions' indices in the whole decode (whose noise each row draws)."""
    device = _device(model)
    logits, cache, prompt_mask, positions = prefill(model, prompts, pad_id, max_new_tokens)
    forward = decoding_forward(model)
    width = prompt_mask.shape[1]
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(len(prompts), max_new_tokens)], dim=1)
    if repeats > 1:
        cache.batch_repeat_interleave(repeats)
        logits, mask, positions = (t.repeat_interleave(repeats, dim=0) for t in (logits, mask, positions))
    rows = len(prompts) * repeats
    new: list[list[int]] = [[] for _ in range(rows)]
    finished = [False] * rows
    alive = list(range(rows))  # the batch's rows, in the order the cache holds them
    next_position = positions[:, -1] + 1
    for step in range(max_new_tokens):
        uniform = noise.uniform([row_ids[row] for row in alive], logits.shape[-1]) if noise is not None else None
        token = _pick(logits, sampling, None, uniform)
        for row, value in zip(alive, token.tolist(), strict=True):
            if finished[row]:
                continue
            new[row].append(value)
            finished[row] = value in stops
        live = [slot for slot, row in enumerate(alive) if not finished[row]]
        if not live or step == max_new_tokens - 1:
            break
        if len(alive) - len(live) >= max(1, len(alive) // COMPACT_FRACTION):
            keep = torch.tensor(live, device=device)
            cache.batch_select_indices(keep)
            mask, token, next_position = mask[keep], token[keep], next_position[keep]
            alive = [alive[slot] for slot in live]
        logits = forward(token[:, None], mask[:, :width + step + 1], next_position[:, None], cache)
        next_position = next_position + 1
    return new, [not done for done in finished]


def prefill(model, prompts: list[list[int]], pad_id: int, max_new_tokens: int,
            row_inputs: dict | None = None) -> tuple[torch.Tensor, DynamicCache, torch.Tensor, torch.Tensor]:
    """(last-position logits, cache, attention mask, position ids) after running the prompts, the cache reserved
    for max_new_tokens more. Leading tokens that every prompt shares (a system prompt, an instruction) run once and
    their cache is copied to every row; the rest of each prompt follows, left-padded, in groups of similar length
    (see length_groups) whose caches are then stacked, so padding sits between the shared part and the prompt's
    own, or before both. `row_inputs` are forward arguments with an entry per row (PEFT's adapter_names); rows
    may then compute even a shared prefix differently, so nothing is shared."""
    device = _device(model)
    shared = 0 if row_inputs else _shared_prefix_length(prompts)
    prefix = None
    if shared:
        prefix = reserved_cache(model.config, shared)
        ids = torch.tensor([prompts[0][:shared]], device=device)
        decoding_forward(model)(ids, torch.ones_like(ids), torch.arange(shared, device=device)[None], prefix)
    groups = length_groups([len(p) - shared for p in prompts])
    parts = []
    for group in groups:
        inputs = {name: [values[i] for i in group] for name, values in (row_inputs or {}).items()}
        room = max_new_tokens if len(groups) == 1 else 0
        parts.append(_prefill_rows(model, [prompts[i][shared:] for i in group], prefix, pad_id, room, inputs))
    if len(parts) == 1:
        logits, cache, mask = parts[0]
    else:
        cache, mask = stack_rows([(cache, mask) for _, cache, mask in parts], model.config, max_new_tokens)
        logits = torch.cat([logits for logits, _, _ in parts])
    order = [row for group in groups for row in group]
    if order != sorted(order):  # back to the caller's order
        where = torch.tensor(order, device=device).argsort()
        cache.batch_select_indices(where)
        logits, mask = logits[where], mask[where]
    return logits, cache, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _prefill_rows(model, suffixes: list[list[int]], prefix: DynamicCache | None, pad_id: int, room: int,
                  row_inputs: dict) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
    """(last-position logits, cache, mask) of one group of prompts, left-padded after the shared prefix's cache."""
    device = _device(model)
    shared = prefix.get_seq_length() if prefix is not None else 0
    ids, suffix_mask = left_padded(suffixes, pad_id, device)
    cache = reserved_cache(model.config, shared + ids.shape[1] + room)
    if prefix is not None:
        for layer, prefix_layer in zip(cache.layers, prefix.layers, strict=True):
            layer.update(prefix_layer.keys.expand(len(suffixes), -1, -1, -1),
                         prefix_layer.values.expand(len(suffixes), -1, -1, -1))
    mask = torch.cat([suffix_mask.new_ones(len(suffixes), shared), suffix_mask], dim=1)
    positions = shared + (suffix_mask.cumsum(-1) - 1).clamp(min=0)
    return decoding_forward(model, row_inputs)(ids, mask, positions, cache), cache, mask


PREFILL_GROUP_COST = 32
"""What one more prompt forward costs, in padded tokens (the per-call work of every layer): prefill runs rows of
different lengths apart only where that saves more padding than this."""


def length_groups(lengths: list[int]) -> list[list[int]]:
    """Rows (indices into `lengths`) grouped for prefill: runs of the longest-first order, chosen to compute the
    fewest padded tokens plus PREFILL_GROUP_COST a group (exact, by dynamic programming over where runs end). On
    the main job's 60 held-out prompts (26-59 tokens after the shared template) one group padded 29% of its
    tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best, start_of = [0] + [None] * len(order), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for start in range(end):
            cost = best[start] + (end - start) * lengths[order[start]] + PREFILL_GROUP_COST
            if best[end] is None or cost < best[end]:
                best[end], start_of[end] = cost, start
    groups, end = [], len(order)
    while end:
        groups.append(order[start_of[end]:end])
        end = start_of[end]
    return groups[::-1]


def decoding_forward(model, row_inputs: dict | None = None) -> Forward:
    """(input ids, attention mask, position ids, cache) -> the last position's logits: models/lean_decoder.py's
    forward where it applies, else the model's own (with `row_inputs`, which only PEFT models take)."""
    lean = None if row_inputs else lean_decoder(model)
    return lean if lean is not None else model_forward(model, row_inputs)


def model_forward(model, row_inputs: dict | None = None) -> Forward:
    """decoding_forward through the model's own forward."""
    def forward(input_ids, attention_mask, position_ids, cache, every_position: bool = False):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                       use_cache=True, logits_to_keep=0 if every_position else 1, **(row_inputs or {})).logits
        return logits if every_position else logits[:, -1]
    return forward


def drafts_possible(model) -> bool:
    """Whether lookup drafts can be checked on `model`: every layer of its cache is a reserved one, whose positions
    the model rejected can be forgotten (ReservedLayer.rewind; linear-attention layers cannot)."""
    return all(type(layer) is ReservedLayer for layer in reserved_cache(model.config, 1).layers)


def _shared_prefix_length(prompts: list[list[int]]) -> int:
    """How many leading tokens all prompts share, if at least MIN_SHARED_PREFIX, else 0; each prompt keeps at
    least one token of its own (decoding starts from its last position's logits)."""
    if len(prompts) < 2:
        return 0
    first, limit = prompts[0], min(len(p) for p in prompts) - 1
    length = 0
    while length < limit and all(p[length] == first[length] for p in prompts):
        length += 1
    return length if length >= MIN_SHARED_PREFIX else 0


def _pick(logits: torch.Tensor, sampling: Sampling | None, generator: torch.Generator | None,
          uniform: torch.Tensor | None = None) -> torch.Tensor:
    """The next token of every row: argmax, or a Gumbel-max draw (see pick_scores)."""
    if sampling is None:
        # max's indices are argmax's (the first of equal maxima) at a third of its time on CPU: 0.8 against 2.1 ms
        # over [64, 49152] float32 logits (Xeon with AMX)
        return logits.float().max(dim=-1).indices
    return pick_scores(logits, sampling, generator, uniform).max(dim=-1).indices


def pick_scores(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None,
                uniform: torch.Tensor | None = None) -> torch.Tensor:
    """Scores whose argmax is a draw from softmax(logits / temperature) restricted to the top_p nucleus: the
    shaped logits plus standard Gumbel noise (from `uniform` draws when given, else drawn from `generator`)."""
    scores = logits.float() / sampling.temperature
    if sampling.top_p < 1.0:
        ordered, indices = scores.sort(dim=-1, descending=True)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
        outside = (cumulative - ordered.softmax(dim=-1)) >= sampling.top_p
        scores = scores.scatter(-1, indices, ordered.masked_fill(outside, float("-inf")))
    if uniform is None:
        uniform = torch.rand(scores.shape, generator=generator, device=scores.device, dtype=torch.float32)
    return scores - torch.log(-torch.log(uniform.clamp_(min=1e-20, max=1 - 1e-7)))
