"""A KV cache written in place, in storage as wide as a decoding step attends over.

transformers' DynamicCache appends each new token's keys and values with torch.cat, which copies the whole
cache of every layer at every step (on the default model, 60 held-out prompts decoded together, the profiler
put a third of the decoding time there, though wall time gained little from this alone). Here each layer writes
each step's keys and values into the next free column of its storage, which is kept exactly as wide as the
written columns rounded up to COLUMN_MULTIPLE: it is widened (copied into new zeroed storage) once every
COLUMN_MULTIPLE steps, and a decoding step attends over the whole storage (`padded`), unwritten columns behind
its mask. A view of wider storage would not do: PyTorch's CPU batched matmul copies an operand whose matrices
are not back to back, so the reserved storage of before had both attention matmuls copy every layer's keys and
values every step (60 held-out prompts at batch 64, bf16, AMD EPYC, 2 cores: 6.93 s, now 6.25, medians of 6
alternating rounds).
Keys are stored as written ([batch, heads, positions, dim]); the query-key matmul reads their transpose in place.
Dropping finished rows (batch_select_indices) still copies, but only when it happens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

COLUMN_MULTIPLE = 8
"""A decoding step attends over the written columns rounded up to this many (ReservedLayer.padded). oneDNN builds
a bf16 matmul kernel for every new shape and the written length grows by one each step: a single query's
attention matmul took 0.65 ms with a new length against 0.04 ms reusing one at 1 row, 1.7 against 0.37 ms at 60
rows (default model's shapes, AMD EPYC, 2 cores); two such builds a step (scores, then values) for every layer's
calls to share."""


class ReservedLayer(DynamicLayer):
    """One decoder layer's keys and values, for up to `capacity` positions, in storage exactly as wide as the
    written positions rounded up to COLUMN_MULTIPLE (`padded` is then the whole storage, see the module's
    docstring)."""

    def __init__(self, capacity: int, **kwargs):
        super().__init__(**kwargs)
        self.capacity = capacity
        self.length = 0
        self._key_storage: torch.Tensor | None = None
        self._value_storage: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._key_storage = key_states.new_zeros(*key_states.shape[:2], 0, key_states.shape[-1])
        self._value_storage = value_states.new_zeros(*value_states.shape[:2], 0, value_states.shape[-1])
        self.is_initialized = True
        self._expose()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self._make_room(end)
        self._key_storage[:, :, self.length:end].copy_(key_states)
        self._value_storage[:, :, self.length:end].copy_(value_states)
        self.length = end
        self._expose()
        return self.keys, self.values

    def step_storage(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value storage with room for one more position, for a step that writes column `length` itself
        (models/compiled_step.py) and then calls `advance`."""
        self._make_room(self.length + 1)
        return self._key_storage, self._value_storage

    def advance(self) -> None:
        """Count the column a step wrote into `step_storage` as written."""
        self.length += 1
        self._expose()

    def _make_room(self, end: int) -> None:
        """Storage for `end` positions, widened to `padded_columns(end)`; more than the capacity is an error."""
        if end > self.capacity:
            raise ValueError(f"the reserved KV cache holds {self.capacity} positions; {end} were asked for")
        self._widen(self.padded_columns(end))

    def _widen(self, width: int) -> None:
        """Storage at least `width` positions wide (new zeroed storage holding the written positions)."""
        if self._key_storage.shape[2] < width:
            self._rewrite(0, width)

    def _rewrite(self, start: int, width: int) -> None:
        """New zeroed storage `width` positions wide holding the `length` written positions from `start` on."""
        def moved(storage: torch.Tensor) -> torch.Tensor:
            fresh = storage.new_zeros(*storage.shape[:2], width, storage.shape[-1])
            fresh[:, :, :self.length].copy_(storage[:, :, start:start + self.length])
            return fresh

        self._key_storage, self._value_storage = moved(self._key_storage), moved(self._value_storage)

    def _expose(self) -> None:
        self.keys = self._key_storage[:, :, :self.length]
        self.values = self._value_storage[:, :, :self.length]

    def get_seq_length(self) -> int:
        return self.length

    def rewind(self, length: int) -> None:
        """Forget the positions from `length` on (drafted tokens the model did not confirm, infer/lookup.py); their
        columns are zeroed, as unwritten columns are."""
        if length < self.length:
            self._key_storage[:, :, length:self.length].zero_()
            self._value_storage[:, :, length:self.length].zero_()
            self.length = length
            self._expose()

    def padded_columns(self, length: int) -> int:
        """`length` rounded up to COLUMN_MULTIPLE, within the capacity."""
        return min(self.capacity, -(-length // COLUMN_MULTIPLE) * COLUMN_MULTIPLE)

    def padded(self, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first `columns` positions, written or not: unwritten ones hold zeros, which a
        mask of -inf there turns into attention weights of exactly 0. After an update, `padded_columns(length)`
        columns are the whole storage: a view a batched matmul reads without copying it."""
        self._widen(columns)
        return self._key_storage[:, :, :columns], self._value_storage[:, :, :columns]

    def reset(self) -> None:
        self.length = 0
        self._key_storage = self._value_storage = None
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a reserved KV cache is written forward only")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._key_storage = self._key_storage.repeat_interleave(repeats, dim=0)
            self._value_storage = self._value_storage.repeat_interleave(repeats, dim=0)
            self._expose()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._key_storage = self._key_storage[indices]
            self._value_storage = self._value_storage[indices]
            self._expose()

    def grow(self, capacity: int) -> None:
        """Room for `capacity` positions (the server's cache grows this way, by chunks, since a request's reply
        length is not known when it joins); the storage widens as positions are written."""
        self.capacity = max(self.capacity, capacity)

    def drop_leading(self, count: int) -> None:
        """Forget the first `count` positions (columns no row attends to any more); the rest move to new storage,
        compact again."""
        if self.is_initialized and count:
            self.capacity -= count
            self.length -= count
            self._rewrite(count, self.padded_columns(self.length))
            self._expose()


def reserved_cache(config, capacity: int) -> DynamicCache:
    """A DynamicCache for `config`'s model whose attention layers reserve `capacity` positions. Sliding-window
    layers keep every position too, the window applied by the mask transformers builds from the config:
    transformers' own sliding layers keep only the last window's keys, so prompts run apart (length groups, a
    server's joining requests) left caches of different widths that could not be stacked into one batch. Other
    special layers (linear attention) keep transformers' own kind."""
    cache = DynamicCache(config=config)
    cache.layers = [ReservedLayer(capacity) if type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) else layer
                    for layer in cache.layers]
    return cache


def windowed(config) -> bool:
    """Whether some attention layer of `config`'s model sees only a window of earlier positions (a sliding or
    chunked window: transformers gives such layers a cache layer of their own kind)."""
    return any(type(layer) is not DynamicLayer for layer in DynamicCache(config=config).layers)


def rewind(cache: DynamicCache, length: int) -> None:
    """Every layer of a reserved cache back to its first `length` positions (ReservedLayer.rewind)."""
    for layer in cache.layers:
        layer.rewind(length)


def stack_rows(parts: list[tuple[DynamicCache, torch.Tensor]], config, room: int) -> tuple[DynamicCache, torch.Tensor]:
    """One cache and attention mask holding the rows of every (cache, mask) part in order, each left-padded to
    the widest part (padding columns are masked out; positions are the callers' own), with `room` positions
    reserved beyond."""
    width = max(mask.shape[1] for _, mask in parts)
    stacked = reserved_cache(config, width + room)
    for index, layer in enumerate(stacked.layers):
        keys = torch.cat([F.pad(cache.layers[index].keys, (0, 0, width - mask.shape[1], 0)) for cache, mask in parts])
        values = torch.cat([F.pad(cache.layers[index].values, (0, 0, width - mask.shape[1], 0))
                            for cache, mask in parts])
        layer.update(keys, values)
    return stacked, torch.cat([F.pad(mask, (width - mask.shape[1], 0)) for _, mask in parts])
