"""A KV cache whose storage is reserved once for the whole decode.

transformers' DynamicCache appends each new token's keys and values with torch.cat, which copies the whole
cache of every layer at every step (on the default model, 60 held-out prompts decoded together, the profiler
put a third of the decoding time there, though wall time gained little from this alone). Here each layer
reserves prompt + max_new_tokens positions at the first
update and writes each step's keys and values into the next free column; attention reads a view of the
columns written so far. Dropping finished rows (batch_select_indices) still copies, but only when it happens.
Keys are stored transposed ([batch, heads, dim, positions]) and exposed as a transposed view: a decoding step's
query-key matmul then reads them in the layout it wants (0.27 against 0.70 ms a layer at 60 rows x 130 positions,
where the plain layout had the matmul copy every layer's keys every step); prompts' sdpa takes either layout.
Storage starts zeroed, so a decoding step may attend over a few unwritten columns (`padded`) behind its mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

COLUMN_MULTIPLE = 8
"""A decoding step attends over the written columns rounded up to this many (ReservedLayer.padded). oneDNN builds
a bf16 matmul kernel for every new shape and the written length grows by one each step: a single query's
attention matmul took 0.65 ms with a new length against 0.04 ms reusing one at 1 row, 1.7 against 0.37 ms at 60
rows (default model's shapes, AMD EPYC, 2 cores); two such builds a step (scores, then values) for every layer's
calls to share."""


class ReservedLayer(DynamicLayer):
    """One decoder layer's keys and values, written into storage of `capacity` positions."""

    def __init__(self, capacity: int, **kwargs):
        super().__init__(**kwargs)
        self.capacity = capacity
        self.length = 0
        self._key_storage: torch.Tensor | None = None
        self._value_storage: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, _ = key_states.shape
        self.device = key_states.device
        self._key_storage = key_states.new_zeros(batch, heads, key_states.shape[-1], self.capacity)
        self._value_storage = value_states.new_zeros(batch, heads, self.capacity, value_states.shape[-1])
        self.is_initialized = True
        self._expose()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise ValueError(f"the reserved KV cache holds {self.capacity} positions; {end} were asked for")
        self._key_storage[..., self.length:end].copy_(key_states.transpose(2, 3))
        self._value_storage[:, :, self.length:end].copy_(value_states)
        self.length = end
        self._expose()
        return self.keys, self.values

    def _expose(self) -> None:
        self.keys = self._key_storage[..., :self.length].transpose(2, 3)
        self.values = self._value_storage[:, :, :self.length]

    def get_seq_length(self) -> int:
        return self.length

    def padded_columns(self, length: int) -> int:
        """`length` rounded up to COLUMN_MULTIPLE, within the storage."""
        return min(self.capacity, -(-length // COLUMN_MULTIPLE) * COLUMN_MULTIPLE)

    def padded(self, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first `columns` positions, written or not: unwritten ones hold zeros, which a
        mask of -inf there turns into attention weights of exactly 0."""
        return self._key_storage[..., :columns].transpose(2, 3), self._value_storage[:, :, :columns]

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
        """Room for `capacity` positions: the written ones are copied into new storage (the server's cache grows
        this way, by chunks, since a request's reply length is not known when it joins)."""
        if capacity <= self.capacity:
            return
        if self.is_initialized:
            keys = self._key_storage.new_zeros(*self._key_storage.shape[:-1], capacity)
            values = self._value_storage.new_zeros(*self._value_storage.shape[:2], capacity,
                                                   self._value_storage.shape[-1])
            keys[..., :self.length].copy_(self._key_storage[..., :self.length])
            values[:, :, :self.length].copy_(self._value_storage[:, :, :self.length])
            self._key_storage, self._value_storage = keys, values
            self._expose()
        self.capacity = capacity

    def drop_leading(self, count: int) -> None:
        """Forget the first `count` positions (columns no row attends to any more); no copy, the storage is viewed
        from there on."""
        if self.is_initialized and count:
            self._key_storage = self._key_storage[..., count:]
            self._value_storage = self._value_storage[:, :, count:]
            self.capacity -= count
            self.length -= count
            self._expose()


def reserved_cache(config, capacity: int) -> DynamicCache:
    """A DynamicCache for `config`'s model whose full-attention layers reserve `capacity` positions (sliding-window
    and other special layers keep transformers' own kind)."""
    cache = DynamicCache(config=config)
    cache.layers = [ReservedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


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
