"""Continuous batching for the server: one thread owns the model and decodes every active request together,
one token a step (more where lookup drafts are confirmed, infer/lookup.py), with a KV cache; requests join at
any step and leave when they finish.

Why not `model.generate` per batch: a batch would wait for its longest reply and new requests for the whole
batch. Here a joining request's prompt is run once (prefill) and its cache is merged into the running batch,
left-padded to a common length, so positions and attention stay each row's own; a finished row is dropped
from the cache at once. Each row samples with its own temperature, top_p and seeded generator, so a
request's reply does not depend on what else is in the batch (greedy replies equal the request sent alone,
tested in float32; in bf16 a pass's width and rows change its rounding).

The decoding path is the one evaluation uses (infer/decode.py): a KV cache written in place (infer/kv_cache.py;
it grows by ROOM positions when full, since reply lengths are unknown when a request joins) and
decode.decoding_forward: models/lean_decoder.py's forward for llama-family models, else the model's own with
single-query attention (`tunelab_decode`); load_served folds and casts the model to its compute dtype beforehand.

Prompt- and prefix-tuned models are not batched (merged caches cannot put their virtual tokens first): their
requests decode one at a time by `tunelab generate`'s loop (infer/generate.py's stream_with_virtual_tokens), so a
reply, greedy or seeded, is generate_replies'; stop strings, streaming and finish_reason work as for others.
"""

from __future__ import annotations

import threading
from collections import deque

import torch

from tunelab.infer.decode import Sampling as DecodeSampling
from tunelab.infer.decode import decoding_forward, drafts_possible, model_forward, pick_scores, prefill
from tunelab.infer.generate import stop_token_ids
from tunelab.infer.kv_cache import ReservedLayer, rewind, stack_rows
from tunelab.infer.lookup import History, NgramIndex, draft, drafts_for_rows
from tunelab.infer.serve.request import Finished, QueueFull, Request
from tunelab.infer.serve.stops import first_stop, held_back
from tunelab.infer.serve.virtual_tokens import decode_alone
from tunelab.models.attention import DECODE, attention_implementation
from tunelab.models.compiled_step import compile_decoding
from tunelab.models.logprobs import uses_virtual_tokens

ROOM = 128
"""Positions the KV cache is reserved beyond what the batch holds; when they are used up it grows by as many."""


class Engine:
    """Owns `model` in a worker thread, or in the thread that calls `run_here` when made with start=False.
    `submit` queues a request (QueueFull past `max_waiting`); at most `max_batch` decode together.

    Why `tunelab serve` decodes in the thread that loaded the model (run_here): libgomp gives each thread that
    runs torch ops its own team of workers, and once it manages more threads than there are CPUs it cuts their
    spin-wait to 1000 iterations, so every matmul wakes sleeping workers. With the model loaded in the main
    thread and decoded in a worker, batch-1 decoding of 48 tokens took 4.1 s instead of 2.4 (default model, bf16,
    2 cores, AMD EPYC).

    Unless made with lookup=False, each pass of up to 8 rows also checks lookup drafts (infer/lookup.py): tokens
    drafted for each row from its prompt, its reply so far and earlier replies, fewer the more rows there are
    (drafts_for_rows): a CPU pass over more rows costs more for each position it adds."""

    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_waiting: int = 64, start: bool = True,
                 compile_steps: bool = False, lookup: bool = True, precision: str = "fp32") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.one_at_a_time = uses_virtual_tokens(model)
        """Prompt or prefix tuning: requests decode alone, by `tunelab generate`'s loop (see the module), in
        `precision` (decoding_model's; other models come cast to theirs)."""
        self.precision = precision
        self.max_batch = 1 if self.one_at_a_time else max_batch
        self.max_waiting = max_waiting
        self.stop_ids = set(stop_token_ids(model, tokenizer))
        self.device = next(model.parameters()).device
        self._forward = decoding_forward(model)  # built once: the served model does not change
        self.eager_reason = compile_decoding(model) if compile_steps else None
        """With compile_steps, why one-token steps still run eagerly; None once compiled."""
        self.compiled = compile_steps and self.eager_reason is None
        """Whether single-row one-token steps run a compiled graph (models/compiled_step.py)."""
        self.history = History() if lookup and not self.one_at_a_time and drafts_possible(model) else None
        """Earlier replies, for lookup drafts; None when requests decode without them."""
        self.drafted = 0
        self.accepted = 0
        """Tokens drafted, and of them those the model confirmed."""
        self._waiting: deque[Request] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._active: list[Request] = []
        self._cache = None
        self._mask: torch.Tensor | None = None  # [B, T] 1 where a row has a real token
        self._logits: torch.Tensor | None = None  # [B, V] each row's next-token logits
        self.steps = 0
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._run, name="tunelab-engine", daemon=True)
            self._thread.start()

    # --- the caller's side ----------------------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        self.submit_all([request])

    def submit_all(self, requests: list[Request]) -> None:
        """Queue `requests` together (one HTTP request's n completions of each prompt), or none of them."""
        with self._wake:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) + len(requests) > self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            for request in requests:
                if request.sampling.temperature > 0:
                    request.generator = torch.Generator(device="cpu")
                    if request.sampling.seed is not None:
                        request.generator.manual_seed(request.sampling.seed)
                    else:
                        request.generator.seed()
                self._waiting.append(request)
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def run_here(self) -> None:
        """Decode in the calling thread until `close` (from another thread) or an interruption."""
        if self._thread is not None:
            raise RuntimeError("this engine already runs in its own thread")
        self._run()

    @property
    def load(self) -> dict[str, int]:
        return {"active": len(self._active), "waiting": len(self._waiting)}

    @property
    def batching(self) -> dict:
        """How requests share the model, as /health says it: `continuous` (up to max_batch decode together,
        joining and leaving at any step) or `one request at a time` (prompt and prefix tuning; max_batch 1)."""
        return {"mode": "one request at a time" if self.one_at_a_time else "continuous", "max_batch": self.max_batch}

    @property
    def closed(self) -> bool:
        """Whether `close` was called: whatever still decodes stops, and the worker ends every request left."""
        return self._closed

    def hand_out(self, request: Request, token: int) -> bool:
        """Append `token` to `request`'s reply and send the text it completes; True when that finished the request
        (its stop, stop string or max_tokens), which is then done."""
        request.generated.append(token)
        finished = self._advance(request, token)
        if finished is not None:
            self._done(request, finished)
        return finished is not None

    @property
    def lookup(self) -> dict[str, int] | None:
        """Lookup drafts so far: tokens drafted and confirmed (None when requests decode without them)."""
        return None if self.history is None else {"drafted": self.drafted, "confirmed": self.accepted}

    # --- the worker ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with attention_implementation(self.model, DECODE):
                self._serve()
        finally:
            for request in [*self._active, *self._waiting]:
                request.on_done(QueueFull("the server is shutting down"))

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self._active:
                    self._wake.wait()
                if self._closed:
                    break
                room = self.max_batch - len(self._active)
                joining = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            try:
                with torch.inference_mode():
                    if self.one_at_a_time:
                        self._active = joining  # on close or error, ended below or by _run with the others
                        if decode_alone(self, joining[0]):
                            self._active = []
                    else:
                        if joining:
                            self._join(joining)
                        if self._active:
                            self._step()
            except Exception as err:  # noqa: BLE001 - every waiting client gets the error, the server lives on
                for request in {id(r): r for r in [*self._active, *joining]}.values():
                    request.on_done(err)
                self._active, self._cache, self._mask, self._logits = [], None, None, None

    def _join(self, requests: list[Request]) -> None:
        """Run the new prompts (left-padded together) and merge their caches into the running batch. Requests
        that join together on one adapter run their shared leading tokens (chat template, system prompt) once,
        as evaluation's decoding does (infer/decode.py's prefill)."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        logits, cache, mask, _ = prefill(self.model, [r.prompt_ids for r in requests], pad,
                                         0 if self._active else ROOM, self._adapters(requests))
        logits = logits.float()
        if not self._active:
            self._active, self._cache, self._mask, self._logits = list(requests), cache, mask, logits
            return
        self._cache, self._mask = stack_rows([(self._cache, self._mask), (cache, mask)], self._config(), ROOM)
        self._active += requests
        self._logits = torch.cat([self._logits, logits])

    def _step(self) -> None:
        """Pick each row's next token, hand out text, drop finished rows, and run the model one position on."""
        tokens = self._pick(self._logits)
        keep: list[int] = []
        for row, (request, token) in enumerate(zip(self._active, tokens, strict=True)):
            if not request.cancelled.is_set() and not self.hand_out(request, token):
                keep.append(row)
        self.steps += 1
        tokens = [tokens[i] for i in keep]
        self._drop_all_but(keep)
        if not self._active or (self.history is not None and self._step_with_drafts(tokens)):
            return
        _make_room(self._cache, 1)
        mask = torch.cat([self._mask, self._mask.new_ones(len(keep), 1)], dim=1)
        positions = self._mask.sum(dim=1, keepdim=True)
        adapters = self._adapters(self._active)
        forward = model_forward(self.model, adapters) if adapters else self._forward
        logits = forward(torch.tensor(tokens, device=self.device)[:, None], mask, positions, self._cache)
        self._mask = mask
        self._logits = logits.float()

    def _step_with_drafts(self, tokens: list[int]) -> bool:
        """Run every active row one pass on from its token together with tokens drafted for it (up to
        DRAFTS_FOR_ROWS), keeping those the model confirms (infer/decode.py's _single_row: a reply is the one
        without drafts); False, having done nothing, when no row has a draft. Rows confirm different numbers of
        drafts: the columns a row did not confirm stay in the cache, masked out, and the columns no row confirmed
        are forgotten."""
        rows = len(self._active)
        limit = drafts_for_rows(rows)
        if not limit or self._adapters(self._active):
            return False
        drafts = [self._drafts(request, limit) for request in self._active]
        if not any(drafts):
            return False
        width = 1 + max(len(row_drafts) for row_drafts in drafts)
        cached = self._cache.get_seq_length()
        _make_room(self._cache, width)
        ids = [[token, *row_drafts] + [token] * (width - 1 - len(row_drafts))
               for token, row_drafts in zip(tokens, drafts, strict=True)]
        first = self._mask.sum(dim=1, keepdim=True)
        mask = torch.cat([self._mask, self._mask.new_ones(rows, width)], dim=1)
        logits = self._forward(torch.tensor(ids, device=self.device), mask,
                               first + torch.arange(width, device=self.device), self._cache,
                               every_position=True).float()
        kept = self._mask.new_zeros(rows, width)  # the pass's columns each row confirmed
        keep, next_logits = [], []
        for row, (request, row_drafts) in enumerate(zip(self._active, drafts, strict=True)):
            self.drafted += len(row_drafts)
            confirmed, finished = self._confirm(request, row_drafts, logits[row])
            kept[row, :confirmed + 1] = 1
            if finished is None:
                keep.append(row)
                next_logits.append(logits[row, confirmed])
            else:
                self._done(request, finished)
        used = int(kept.sum(dim=0).nonzero().max()) + 1
        rewind(self._cache, cached + used)
        self._mask = torch.cat([self._mask, kept[:, :used]], dim=1)
        self._drop_all_but(keep)
        if keep:
            self._logits = torch.stack(next_logits)
        return True

    def _drafts(self, request: Request, limit: int) -> list[int]:
        """Up to `limit` tokens guessed to follow a request's reply so far (infer/lookup.py), fewer near its
        max_tokens."""
        left = request.sampling.max_tokens - len(request.generated)  # a pass picks up to len(drafts) + 1
        if left < 2:
            return []
        if request.own is None:
            request.own = NgramIndex(request.prompt_ids)
        request.own.extend(request.generated[len(request.own.tokens) - len(request.prompt_ids):])
        return draft(request.own, self.history, min(limit, left - 1))

    def _confirm(self, request: Request, drafts: list[int], logits: torch.Tensor) -> tuple[int, Finished | None]:
        """Pick a row's tokens from its pass's logits [width, vocab] in order while they equal its drafts, handing
        each out: (how many drafts it confirmed, its Finished if one of them ended it). The first pick that is not
        a draft is kept as its next token (request.drawn)."""
        for confirmed, drafted in enumerate([*drafts, None]):
            picked = self._pick_row(request, logits[confirmed])
            if picked != drafted:
                request.drawn = picked
                return confirmed, None
            self.accepted += 1
            request.generated.append(picked)
            finished = self._advance(request, picked)
            if finished is not None:
                return confirmed, finished
        raise AssertionError("unreachable: the last pick is compared with None")

    def _pick(self, logits: torch.Tensor) -> list[int]:
        """Each row's next token with its own sampling settings and generator (or the one it already drew)."""
        greedy = logits.argmax(dim=-1).tolist()
        picked = []
        for row, request in enumerate(self._active):
            if request.drawn is not None:
                picked.append(request.drawn)
                request.drawn = None
            elif request.sampling.temperature <= 0:
                picked.append(greedy[row])
            else:
                picked.append(self._pick_row(request, logits[row]))
        return picked

    def _pick_row(self, request: Request, logits: torch.Tensor) -> int:
        """One row's next token from its logits [vocab], with its sampling settings and generator."""
        sampling = request.sampling
        if sampling.temperature <= 0:
            return int(logits.argmax())
        shaped = DecodeSampling(temperature=sampling.temperature, top_p=sampling.top_p)
        return int(pick_scores(logits[None].cpu(), shaped, request.generator).argmax())

    def _done(self, request: Request, finished: Finished) -> None:
        if self.history is not None:
            self.history.add(request.generated)
        request.on_done(finished)

    def _advance(self, request: Request, token: int) -> Finished | None:
        """Hand out the text `token` completed; a Finished when the request is done."""
        count = len(request.generated)
        if token in self.stop_ids:
            text = self._text(request.generated[:-1])
            return self._finish(request, text, "stop", count)
        text = self._text(request.generated)
        cut = first_stop(text, request.sampling.stop)
        if cut is not None:
            return self._finish(request, text[:cut], "stop", count)
        if count >= request.sampling.max_tokens:
            return self._finish(request, text, "length", count)
        safe = len(text) - held_back(text, request.sampling.stop)
        if text.endswith("\ufffd"):  # half a character: wait for the token that completes it
            safe = min(safe, len(text) - 1)
        if safe > request.sent:
            request.on_text(text[request.sent : safe])
            request.sent = safe
        return None

    def _finish(self, request: Request, text: str, reason: str, count: int) -> Finished:
        if reason == "length":  # cut inside a character: its first bytes decode to U+FFFD, which is no text
            text = text.removesuffix("\ufffd")
        if len(text) > request.sent:
            request.on_text(text[request.sent :])
            request.sent = len(text)
        return Finished(text, reason, count)

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _drop_all_but(self, keep: list[int]) -> None:
        """Keep only the batch's rows `keep` (the others finished or were cancelled): they leave the cache now."""
        if len(keep) == len(self._active):
            return
        if not keep:
            self._active, self._cache, self._mask, self._logits = [], None, None, None
            return
        index = torch.tensor(keep, device=self.device)
        self._cache.batch_select_indices(index)
        self._active = [self._active[i] for i in keep]
        self._mask = self._mask[index]
        self._trim()

    def _trim(self) -> None:
        """Drop cache columns no remaining row uses (left padding of rows that have left)."""
        used = self._mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else self._mask.shape[1]
        if start > 0:
            self._mask = self._mask[:, start:]
            for layer in self._cache.layers:
                if isinstance(layer, ReservedLayer):
                    layer.drop_leading(start)
                else:
                    layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]

    def _adapters(self, requests: list[Request]) -> dict:
        """PEFT's per-row adapter choice, when rows may differ (several adapters on one base)."""
        names = [r.adapter for r in requests]
        if not hasattr(self.model, "peft_config") or all(n in (None, self.model.active_adapter) for n in names):
            return {}
        return {"adapter_names": [n or "__base__" for n in names]}

    def _config(self):
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return base.config


def _make_room(cache, positions: int) -> None:
    """Grow the reserved layers by ROOM positions (or more) when the next `positions` would not fit."""
    for layer in cache.layers:
        if isinstance(layer, ReservedLayer) and layer.length + positions > layer.capacity:
            layer.grow(max(layer.capacity + ROOM, layer.length + positions))
