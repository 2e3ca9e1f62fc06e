"""tunelab's decoding loop (infer/decode.py) against transformers' `generate`: the same greedy tokens on the
default model whatever the batch size, order and lengths (with the shared template prefix run once, the reserved
KV cache and the single-query attention); finished rows leave the batch without changing the others; bf16
decoding works from a copy with packed matmul weights and leaves the trained model as it was."""

from __future__ import annotations

import pytest
import torch

from tunelab.data.template import ChatRenderer
from tunelab.infer import decode as decode_module
from tunelab.infer.decode import MIN_SHARED_PREFIX, _shared_prefix_length, decode, length_groups, prefill
from tunelab.infer.generate import (
    GenerationOptions,
    _generate_batches,
    decoding_model,
    generate_replies,
    stop_token_ids,
)
from tunelab.infer.kv_cache import ReservedLayer
from tunelab.models.load import load_model, load_tokenizer
from tunelab.models.packed_linear import PackedLinear, packing_available

QUESTIONS = ["What is 2+2?", "Say hi.", "Write one sentence about the sea, the wind and the moon at night.",
             "What is the capital of France?", "List three fruits.", "Why is the sky blue? Answer briefly."]


def conversations():
    return [[{"role": "user", "content": q}] for q in QUESTIONS]


def test_greedy_decoding_gives_generates_tokens_for_any_batching(default_model_dir):
    tokenizer = load_tokenizer(default_model_dir)
    model = load_model(default_model_dir, device="cpu").eval()
    renderer = ChatRenderer(tokenizer, "auto")
    expected = [reply for batch in _generate_batches(model, renderer, conversations(),
                                                     GenerationOptions(max_new_tokens=20, batch_size=6))
                for reply in batch]
    assert len(set(expected)) == len(QUESTIONS)
    prompts = [tokenizer(renderer.prompt(c), add_special_tokens=False)["input_ids"] for c in conversations()]
    assert _shared_prefix_length(prompts[:4]) >= MIN_SHARED_PREFIX  # batches of 4 run the template's prefix once
    for batch_size in (1, 4):  # batches of one, and batches whose rows finish at different steps
        replies = generate_replies(model, renderer, conversations(),
                                   GenerationOptions(max_new_tokens=20, batch_size=batch_size))
        assert replies == expected, batch_size
    # stops and truncation: a reply that ended has its stop token last and is not marked truncated
    stops = stop_token_ids(model, tokenizer)
    decoded = decode(model, prompts, max_new_tokens=12, stop_ids=stops, pad_id=tokenizer.pad_token_id, batch_size=3)
    for tokens, cut in zip(decoded.tokens, decoded.truncated, strict=True):
        assert (tokens[-1] in stops) != cut and len(tokens) <= 12
        assert cut == (len(tokens) == 12 and tokens[-1] not in stops)
    assert any(not cut for cut in decoded.truncated) and any(decoded.truncated)


def test_bf16_decoding_uses_a_copy_and_leaves_the_model_as_it_was(tiny_model_dir, tiny_tokenizer):
    model = load_model(tiny_model_dir, device="cpu").train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with decoding_model(model, "bf16") as decoder:
        assert decoder is not model and next(decoder.parameters()).dtype == torch.bfloat16
        assert not model.training
    assert model.training and next(model.parameters()).dtype == torch.float32
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    renderer = ChatRenderer(tiny_tokenizer, "auto")
    replies = generate_replies(model, renderer, conversations()[:2], GenerationOptions(max_new_tokens=4,
                                                                                       precision="bf16"))
    assert len(replies) == 2 and model.training


def test_bf16_copy_packs_its_linears_with_the_same_outputs(tiny_model_dir):
    model = load_model(tiny_model_dir, device="cpu")
    plain = load_model(tiny_model_dir, device="cpu").to(torch.bfloat16).eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 11))
    with decoding_model(model, "bf16") as decoder, torch.no_grad():
        linears = [m for m in decoder.modules() if isinstance(m, torch.nn.Linear)]
        packed = packing_available(decoder)  # CPUs whose oneDNN runs bf16 (AVX-512 and newer)
        assert linears and all((type(m) is PackedLinear) == packed for m in linears)
        # bit-identical on AMD EPYC (avx512_bf16); other oneDNN kernels (AMX) may sum in another order
        torch.testing.assert_close(decoder(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-2, atol=1e-2)


def test_prefill_in_length_groups_keeps_every_rows_logits_and_order(default_model_dir, monkeypatch):
    """Prompts of different lengths run in groups whose caches are stacked (and put back in the caller's order):
    every row's logits, and a decoding step from the stacked cache, are what the prompt gives alone."""
    tokenizer = load_tokenizer(default_model_dir)
    model = load_model(default_model_dir, device="cpu").eval()
    renderer = ChatRenderer(tokenizer, "auto")
    prompts = [tokenizer(renderer.prompt(c), add_special_tokens=False)["input_ids"] for c in conversations()]
    monkeypatch.setattr(decode_module, "PREFILL_GROUP_COST", 0)  # every length its own group
    shared = _shared_prefix_length(prompts)
    assert len(length_groups([len(p) - shared for p in prompts])) >= 4
    with torch.no_grad():
        logits, cache, mask, positions = prefill(model, prompts, tokenizer.pad_token_id, 2)
        step = decode_module.decoding_forward(model)
        token = logits.argmax(-1)[:, None]
        after = step(token, torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1), positions[:, -1:] + 1, cache)
        for row, prompt in enumerate(prompts):
            alone, alone_cache, alone_mask, alone_positions = prefill(model, [prompt], tokenizer.pad_token_id, 2)
            torch.testing.assert_close(logits[row], alone[0], atol=1e-4, rtol=1e-4)
            assert int(positions[row, -1]) == len(prompt) - 1 == int(alone_positions[0, -1])
            alone_after = step(token[row:row + 1], torch.ones(1, len(prompt) + 1, dtype=torch.long),
                               alone_positions[:, -1:] + 1, alone_cache)
            torch.testing.assert_close(after[row], alone_after[0], atol=1e-4, rtol=1e-4)


def test_length_groups_are_runs_of_similar_length_that_save_padding():
    assert length_groups([50, 10, 49, 11, 48, 12, 10, 50]) == [[0, 7, 2, 4], [5, 3, 1, 6]]
    assert length_groups([40, 38, 39]) == [[0, 2, 1]]  # a second forward would cost more than 2 tokens of padding
    assert length_groups([7]) == [[0]]


def test_reserved_cache_layer_holds_what_a_dynamic_layer_holds():
    from transformers.cache_utils import DynamicLayer

    reserved, dynamic = ReservedLayer(capacity=9), DynamicLayer()
    steps = [torch.randn(4, 2, n, 8) for n in (5, 1, 1)]
    for states in steps:
        for layer in (reserved, dynamic):
            keys, values = layer.update(states, states * 2)
        assert torch.equal(keys, dynamic.keys) and torch.equal(reserved.values, dynamic.values)
    keep = torch.tensor([3, 1])
    for layer in (reserved, dynamic):
        layer.batch_select_indices(keep)
        layer.batch_repeat_interleave(2)
        layer.update(torch.ones(4, 2, 1, 8), torch.zeros(4, 2, 1, 8))
    assert reserved.get_seq_length() == dynamic.get_seq_length() == 8
    assert torch.equal(reserved.keys, dynamic.keys) and torch.equal(reserved.values, dynamic.values)
    with pytest.raises(ValueError, match="holds 9 positions"):
        reserved.update(torch.ones(4, 2, 2, 8), torch.ones(4, 2, 2, 8))


def test_reserved_cache_columns_past_the_written_ones_hold_zeros():
    """A decoding step attends over the written columns rounded up (ReservedLayer.padded); the columns past them
    must be zeros however the storage was made, or a masked-out garbage NaN would poison the softmax's sum."""
    layer = ReservedLayer(capacity=20)

    def unwritten_are_zero(columns: int) -> bool:
        keys, values = layer.padded(columns)
        return bool((keys[:, :, layer.length:] == 0).all() and (values[:, :, layer.length:] == 0).all())

    def poison(*shape: int) -> None:  # NaN-filled blocks freed just before, for the next allocations to reuse
        blocks = [torch.full(shape, float("nan")) for _ in range(2)]
        del blocks

    poison(3, 2, 8, 8)
    layer.update(torch.randn(3, 2, 4, 8), torch.randn(3, 2, 4, 8))
    assert layer.length == 4 and unwritten_are_zero(8)
    assert layer.padded_columns(5) == 8 and layer.padded_columns(9) == 16 and layer.padded_columns(17) == 20
    poison(3, 2, 16, 8)
    layer.update(torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 8))
    assert layer.length == 9 and unwritten_are_zero(16)
    layer.grow(30)
    layer.batch_select_indices(torch.tensor([2, 0]))
    layer.update(torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8))
    assert layer.length == 10 and unwritten_are_zero(16)
    poison(2, 2, 8, 8)
    layer.drop_leading(3)
    assert layer.length == 7 and layer.capacity == 27 and unwritten_are_zero(8)
    assert unwritten_are_zero(layer.capacity)


def test_a_decoding_step_reads_the_cache_without_copying_it():
    """After every update the step's padded columns are the whole storage, so its batched matmuls read keys and
    values in place (PyTorch's CPU bmm copies an operand whose matrices are not back to back: a view of wider
    storage was copied twice a layer every step); and the keys written are the keys read."""
    layer = ReservedLayer(capacity=40)
    written = torch.randn(3, 2, 5, 8)
    layer.update(written, written * 2)

    def compact() -> bool:
        keys, values = layer.padded(layer.padded_columns(layer.length))
        return keys.is_contiguous() and values.is_contiguous()

    for _ in range(12):
        step = torch.randn(3, 2, 1, 8)
        layer.update(step, step * 2)
        written = torch.cat([written, step], dim=2)
        assert compact() and torch.equal(layer.keys, written) and torch.equal(layer.values, written * 2)
    layer.batch_select_indices(torch.tensor([1, 2]))
    layer.drop_leading(2)
    assert compact() and torch.equal(layer.keys, written[1:, :, 2:])


def test_decoding_copy_of_a_fused_lora_model_runs_its_own_modules(tiny_model_dir):
    """Fused LoRA forwards are closures over the trained model's modules; the decoding copy must not keep them
    (its head would run the original's weight), nor the weight casts they cached."""
    from test_fused_lora import lora_model

    from tunelab.methods.fused_lora import fuse_lora_layers
    from tunelab.models.logprobs import decoder_and_head

    model = lora_model(tiny_model_dir)
    fuse_lora_layers(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with decoding_model(model, "bf16") as decoder, torch.no_grad():
        assert not any("forward" in m.__dict__ or "_tunelab_weight" in m.__dict__ for m in decoder.modules())
        _, head = decoder_and_head(decoder)
        assert (type(head) is PackedLinear) == packing_available(decoder)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = model(input_ids=ids).logits.float()
        got = decoder(input_ids=ids).logits.float()
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()
    assert "forward" in decoder_and_head(model)[1].__dict__  # the trained model keeps its fused head


def test_single_query_attention_equals_sdpa_with_grouped_heads_and_padding():
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from tunelab.models.attention import decode_attention

    torch.manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True, training=False)
    query = torch.randn(4, 6, 1, 16)
    key = torch.randn(4, 2, 16, 12).transpose(2, 3)  # [B, kv heads, L, D] as the reserved cache exposes it
    value = torch.randn(4, 2, 12, 16)
    mask = torch.ones(4, 1, 1, 12, dtype=torch.bool)
    mask[0, ..., :5] = False  # a left-padded row
    mask[2, ..., 3:7] = False  # padding between a shared prefix and the prompt's own tokens
    for attention_mask in (mask, None):
        got, _ = decode_attention(module, query, key, value, attention_mask, 0.25)
        expected, _ = sdpa_attention_forward(module, query, key.contiguous(), value, attention_mask, scaling=0.25)
        assert got.shape == expected.shape == (4, 1, 6, 16)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_chat_streams_generates_reply_piece_by_piece(default_model_dir):
    from tunelab.infer.chat import stream_reply
    from tunelab.infer.load import load_generator

    loaded = load_generator(default_model_dir)
    for options in (GenerationOptions(max_new_tokens=20, batch_size=1),
                    GenerationOptions(max_new_tokens=20, batch_size=1, do_sample=True, seed=3)):
        for conversation in conversations()[:3]:  # one at a time: a sampled batch draws from one generator
            reply = generate_replies(loaded.model, loaded.renderer, [conversation], options)[0]
            pieces = list(stream_reply(loaded, conversation, options))
            assert len(pieces) > 3 and "".join(pieces).strip() == reply


def test_a_sliding_window_model_decodes_prompts_of_any_length_together_as_generate_does_alone():
    """Prompts longer and shorter than the window, in different length groups (prefill runs them apart and stacks
    their caches, as the server does when requests join): each row's greedy tokens are generate's for it alone."""
    from test_lean_decoder import random_model

    model = random_model("mistral", sliding_window=8)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 96, (n,), generator=generator).tolist() for n in (3, 30, 12, 5, 41)]
    assert len(length_groups([len(p) for p in prompts])) > 1
    decoded = decode(model, prompts, max_new_tokens=12, stop_ids=[0], pad_id=0, batch_size=8)
    for prompt, tokens in zip(prompts, decoded.tokens, strict=True):
        ids = torch.tensor([prompt])
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                  eos_token_id=0, pad_token_id=0)[0, len(prompt):].tolist()
        assert tokens == (expected[:expected.index(0) + 1] if 0 in expected else expected)


def test_a_sampled_reply_does_not_depend_on_the_batch_it_decodes_in(tiny_model_dir):
    """Each completion draws from its own generator (seed, index): alone, in batches of 2 or 8, the same tokens."""
    from transformers import AutoModelForCausalLM

    from tunelab.infer.decode import Sampling

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 90, (n,), generator=generator).tolist() for n in (4, 9, 6, 12, 5, 7)]
    sampling = Sampling(temperature=1.0, top_p=0.9, seed=11)
    runs = [decode(model, prompts, max_new_tokens=10, stop_ids=[2], pad_id=0, sampling=sampling, batch_size=size,
                   lookup=False).tokens for size in (1, 2, 8)]
    assert runs[0] == runs[1] == runs[2]
    other_seed = decode(model, prompts, max_new_tokens=10, stop_ids=[2], pad_id=0, batch_size=8, lookup=False,
                        sampling=Sampling(temperature=1.0, top_p=0.9, seed=12)).tokens
    assert other_seed != runs[0]
