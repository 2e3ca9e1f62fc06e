"""The lean forward's one-token decoding step as one compiled graph (`tunelab serve --compile`, `chat --compile`).

At one row a bf16 step of the default model mostly reads its 270 MB of weights, and the lean forward's ~20 eager ops
a layer add ~6 ms of PyTorch's per-op and Python overhead. Compiled, the norms, rotary embedding, residual adds,
SwiGLU and the attention's softmax fuse around the matmuls: 200 tokens streamed at 22.7 -> 16.4 ms a token (2 AMD
EPYC cores, prefill included, median of 3 alternating rounds; 21.4 -> 17.0 in later runs). The matmuls stay oneDNN's
on the packed weights, through `tunelab::packed_linear`, an op that finds its weight by number: with the packed
weights inside the graph (inductor's freezing) the step was as fast but compiled for 50-70 s on every start, as
oneDNN's packed tensors keep such a graph out of inductor's cache; this way a server's first start compiles for ~1
min and later ones for ~20 s. Rows and cache columns are dynamic sizes: one graph serves every batch of two rows or
more and every cache width, and one more a single row (the only one serve and chat use).

Keys and values are written inside the graph, into column `length` of each layer's storage (ReservedLayer.
step_storage); ReservedLayer.advance then counts them. Only decoding copies qualify (bf16 on CPU, packed linears:
their weights never change); elsewhere `compile_decoding` returns False and decoding stays eager. Graphs are
compiled for, and must be called under, torch.inference_mode (the server's engine and chat decode so): tensors
made outside it carry autograd's dispatch keys, which the graph's guards check, and would compile it again (in
the server, ~30 s at the first batch of another size, before this was found).
"""

from __future__ import annotations

import itertools
import weakref

import torch
import torch.nn.functional as F

from tunelab.infer.kv_cache import reserved_cache
from tunelab.models.attention import single_query_attention
from tunelab.models.lean_decoder import LeanDecoder, attention_bias, lean_decoder
from tunelab.models.packed_linear import PackedLinear

_WEIGHTS: dict[str, tuple[torch.Tensor, torch.Tensor | None, int]] = {}
"""Packed weight, bias and output width of every linear a compiled step calls, by number (a string: dynamo makes
an int argument a symbolic size under dynamic shapes). The number carries the linear's shape, `7:576x1536`: the
output width is known to the graph only through the fake kernel, so without it two models whose inputs match but
whose widths differ (intermediate size, vocabulary) would share a graph from torch's on-disk compile cache."""
_NUMBERS = itertools.count()


@torch.library.custom_op("tunelab::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, number: str) -> torch.Tensor:
    """x W^T (+ b) with the packed linear registered as `number`."""
    weight, bias, _ = _WEIGHTS[number]
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@packed_linear.register_fake
def _packed_linear_shape(x: torch.Tensor, number: str) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], _WEIGHTS[number][2])


def _register(linear: PackedLinear) -> str:
    number = f"{next(_NUMBERS)}:{linear.in_features}x{linear.out_features}"
    _WEIGHTS[number] = (linear.packed_weight, linear.bias, linear.out_features)
    return number


def _forget(numbers: list[str]) -> None:
    for number in numbers:
        _WEIGHTS.pop(number, None)


class CompiledStep:
    """`step(input_ids [rows, 1], attention_mask, position_ids, cache)` -> logits [rows, vocab], what the lean
    forward returns for one new token a row, from a compiled graph."""

    def __init__(self, decoder: LeanDecoder):
        self.decoder = decoder
        self.max_rows = 1
        """The most rows a step may have to run here; the lean forward runs larger batches eagerly."""
        numbers = [[_register(layer.qkv[0]), _register(layer.output), _register(layer.gate_up[0]),
                    _register(layer.down)] for layer in decoder.layers]
        head = _register(decoder.head)
        weakref.finalize(self, _forget, [n for layer in numbers for n in layer] + [head])
        self._graph = torch.compile(_step_function(decoder, numbers, head), dynamic=True, fullgraph=True)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 cache) -> torch.Tensor:
        decoder = self.decoder
        x = decoder.embed(input_ids)
        cos, sin = decoder.rotary(x, position_ids)
        length = cache.layers[0].get_seq_length()
        storages = [layer.step_storage() for layer in cache.layers]
        bias = attention_bias(attention_mask, 1, length)
        bias = F.pad(bias, (0, storages[0][0].shape[2] - bias.shape[-1]), value=float("-inf"))
        column = torch.tensor([length], device=x.device)
        logits = self._graph(x, cos[:, :, None], sin[:, :, None], bias, column, [keys for keys, _ in storages],
                             [values for _, values in storages])
        for layer in cache.layers:
            layer.advance()
        return logits


def _step_function(decoder: LeanDecoder, numbers: list[list[str]], head: str):
    """The step as a plain function of tensors (what torch.compile traces); weights are the decoder's."""
    heads, kv_heads, dim, eps, scaling = (decoder.heads, decoder.kv_heads, decoder.head_dim, decoder.eps,
                                          decoder.scaling)
    layers = list(zip(decoder.layers, numbers, strict=True))
    final_norm = decoder.norm

    def step(x, cos, sin, bias, column, keys, values):
        rows = x.shape[0]
        for index, (layer, (qkv_number, output_number, gate_up_number, down_number)) in enumerate(layers):
            h = F.rms_norm(x, x.shape[-1:], layer.input_norm, eps)
            qkv = packed_linear(h, qkv_number).view(rows, 1, heads + 2 * kv_heads, dim)
            qk = decoder.positioned(layer, qkv[:, :, :heads + kv_heads], cos, sin)
            keys[index].index_copy_(2, column, qk[:, :, heads:].transpose(1, 2))
            values[index].index_copy_(2, column, qkv[:, :, heads + kv_heads:].transpose(1, 2))
            attended = single_query_attention(qk[:, :, :heads].transpose(1, 2), keys[index], values[index],
                                              scaling, bias)
            x = x + packed_linear(attended.reshape(rows, 1, heads * dim), output_number)
            h = F.rms_norm(x, x.shape[-1:], layer.post_attention_norm, eps)
            gate, up = packed_linear(h, gate_up_number).chunk(2, dim=-1)
            x = x + packed_linear(F.silu(gate) * up, down_number)
        return packed_linear(F.rms_norm(x[:, -1], x.shape[-1:], final_norm, eps), head)

    return step


NOT_A_DECODING_COPY = "only bf16 decoding on CPU of llama-family models without per-row adapters compiles"


def compile_decoding(model, max_rows: int = 1) -> str | None:
    """Give `model`'s lean forward a compiled one-token step for batches of up to `max_rows` rows and compile it
    now (a single row has a graph of its own, every larger batch shares one), so the first request does not wait.
    None once compiled; else why decoding stays eager (nothing changed): the model is not a packed decoding copy,
    or torch.compile failed (no C++ compiler, say). Serve and chat compile single rows only: through HTTP, 8 and 32
    clients were served slower with compiled batches (see the README)."""
    decoder = lean_decoder(model)
    if decoder is None or not _packed(decoder):
        return NOT_A_DECODING_COPY
    if decoder.compiled is None:
        decoder.compiled = CompiledStep(decoder)
    decoder.compiled.max_rows = max_rows
    try:
        for rows in range(1, min(max_rows, 2) + 1):
            _warm_up(model, decoder, rows)
    except torch._dynamo.exc.BackendCompilerFailed as err:
        decoder.compiled = None
        return f"torch.compile failed: {str(err).strip().splitlines()[0]}"
    return None


def _packed(decoder: LeanDecoder) -> bool:
    linears = [decoder.head] + [linear for layer in decoder.layers
                                for linear in (*layer.qkv, layer.output, *layer.gate_up, layer.down)]
    return all(type(linear) is PackedLinear for linear in linears) and all(
        len(layer.qkv) == 1 and len(layer.gate_up) == 1 for layer in decoder.layers)


@torch.inference_mode()
def _warm_up(model, decoder: LeanDecoder, rows: int) -> None:
    """Decoding steps of `rows` rows after a two-token prompt: the first compiles, the rest cross a widening of the
    cache (COLUMN_MULTIPLE columns), which the graph's dynamic sizes absorb."""
    device = decoder.embed.weight.device
    cache = reserved_cache(model.config, 16)
    prompt = torch.zeros(rows, 2, dtype=torch.long, device=device)
    mask = torch.ones_like(prompt)
    decoder(prompt, mask, torch.arange(2, device=device).expand(rows, 2), cache)
    for position in range(2, 11):
        mask = torch.cat([mask, mask[:, :1]], dim=1)
        decoder(prompt[:, :1], mask, torch.full_like(prompt[:, :1], position), cache)
