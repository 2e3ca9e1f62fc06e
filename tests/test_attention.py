"""The matmul attention path computes what sdpa computes (loss and gradients), padded or packed, and training
with it leaves the model on its own attention afterwards."""

from __future__ import annotations

import json

import pytest
import torch

from tunelab.config import load_config
from tunelab.data.batching import collate
from tunelab.data.template import IGNORE_INDEX, TokenizedSample
from tunelab.models.attention import MATMUL, attention_implementation, training_attention
from tunelab.objectives.sft import sft_loss_sum
from tunelab.train.run import train_run


def samples(lengths: list[int]) -> list[TokenizedSample]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for n in lengths:
        ids = torch.randint(3, 390, (n,), generator=generator).tolist()
        out.append(TokenizedSample(ids, [IGNORE_INDEX] * 3 + ids[3:], "t"))
    return out


def loss_and_grads(model, batch, name):
    model.zero_grad()
    with attention_implementation(model, name):
        loss, tokens = sft_loss_sum(model, batch)
    (loss / tokens).backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("packed", [False, True])
def test_matmul_attention_equals_sdpa_in_fp32(tiny_model_dir, packed, monkeypatch):
    from transformers import AutoModelForCausalLM

    from tunelab.models import attention

    calls = []
    real = attention.matmul_attention
    monkeypatch.setattr(attention, "matmul_attention", lambda *a, **k: calls.append(1) or real(*a, **k))

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").train()
    group = samples([20, 13, 7, 17])
    rows = [group[:2], group[2:]] if packed else [[s] for s in group]
    batch = collate(rows, pad_token_id=0, packed=packed)
    reference_loss, reference_grads = loss_and_grads(model, batch, "sdpa")
    loss, grads = loss_and_grads(model, batch, MATMUL)
    assert len(calls) == 2  # both layers ran the matmul path
    assert loss == pytest.approx(reference_loss, rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], atol=1e-6, rtol=1e-4)
    assert model.config._attn_implementation == "sdpa"  # put back after the block


def test_auto_takes_the_matmul_path_only_on_cpu_for_llama_style_models_and_short_rows(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cpu = torch.device("cpu")
    assert training_attention("auto", cpu, "bf16", 256, model, batch_size=8) == MATMUL
    # 8 x heads x 4096^2 bf16 probabilities per layer exceed the budget: flash attention keeps no T x T matrix
    assert training_attention("auto", cpu, "bf16", 4096, model, batch_size=8) is None
    assert training_attention("auto", torch.device("cuda"), "bf16", 256, model) is None
    model.config.attention_dropout = 0.1
    assert training_attention("auto", cpu, "bf16", 256, model) is None
    model.config.attention_dropout = 0.0
    model.config.model_type = "gemma2"  # soft-capped scores: not plain dot-product attention
    assert training_attention("auto", cpu, "bf16", 256, model) is None
    assert training_attention("sdpa", cpu, "bf16", 256, model) == "sdpa"
    assert training_attention("matmul", cpu, "fp32", 4096, model) == MATMUL


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_training_on_the_matmul_path_learns_and_reloads_with_the_same_replies(tiny_model_dir, tmp_path, method):
    from tunelab.infer.generate import GenerationOptions, generate_replies
    from tunelab.infer.load import load_for_inference

    data = tmp_path / "qa.jsonl"
    rows = [{"question": f"what is {a} plus {b}?", "answer": f"{a + b}"} for a in range(6) for b in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    summary = train_run(load_config(None, [
        f"model={tiny_model_dir}", f"data.train={data}", "data.eval_split=0.2", "data.max_length=64",
        f"method.name={method}", "train.attention=matmul", "train.epochs=2", "train.lr=3e-2", "train.batch_size=4",
        "train.precision=fp32", "eval.generate_samples=4", "eval.max_new_tokens=4", f"output_dir={out}",
    ]))
    assert summary["final_eval_loss"] < summary["base_eval_loss"]
    saved = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    loaded = load_for_inference(out)
    replies = generate_replies(loaded.model, loaded.renderer, [s["prompt"] for s in saved],
                               GenerationOptions(max_new_tokens=4))
    assert replies == [s["fine_tuned"] for s in saved]


def test_matmul_attention_under_bf16_autocast_stays_close_to_fp32(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").train()
    batch = collate([[s] for s in samples([24, 19, 11])], pad_token_id=0, packed=False)
    reference_loss, reference_grads = loss_and_grads(model, batch, "sdpa")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(model, batch, MATMUL)
    assert loss == pytest.approx(reference_loss, rel=1e-2)
    for name, grad in grads.items():
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), reference_grads[name].flatten(), dim=0)
        assert cosine > 0.99, name


def test_segments_lay_each_sample_out_in_its_own_slot():
    from tunelab.models.segments import segments_from_positions

    group = samples([4, 5, 3])
    batch = collate([group[:2], group[2:]], pad_token_id=0, packed=True)  # width 9: second row 3 + 6 padding
    segments = segments_from_positions(batch["position_ids"])
    queries = segments.queries
    assert torch.equal(segments.keys.gather, queries.gather) and segments.keys.copy_slots is None  # no copies
    assert (queries.count, queries.length) == (4, 6)  # samples of 4, 5 and 3 tokens, and the padding
    slots = queries.gather.view(4, 6)
    assert slots[0, :4].tolist() == [0, 1, 2, 3] and slots[1, :5].tolist() == [4, 5, 6, 7, 8]
    assert slots[2, :3].tolist() == [9, 10, 11] and slots[3].tolist() == [12, 13, 14, 15, 16, 17]
    assert queries.gather[queries.scatter].tolist() == list(range(18))  # every token comes back to itself
    allowed = segments.mask[:, 0] == 0
    assert allowed[0, 2].tolist() == [True, True, True, False, False, False]  # causal, pad slots never keys
    assert allowed[0, 5].tolist() == [True, True, True, True, False, False]


def test_slot_layout_backward_gathers_what_index_select_would_scatter():
    """The slots' backward gathers each token's gradient from its one slot (no index_add): the same gradients
    as index_select's own backward through attention, pad slots included."""
    from tunelab.models.attention import _MatmulAttention
    from tunelab.models.segments import from_slots, segments_from_positions, to_slots

    group = samples([4, 5, 3])
    batch = collate([group[:2], group[2:]], pad_token_id=0, packed=True)  # pad slots in 3 of the 4 samples
    segments = segments_from_positions(batch["position_ids"])
    states = torch.randn(3, 2, 2, 9, 8, generator=torch.Generator().manual_seed(0))  # q, k, v: [2, 2, 9, 8]

    def attend(to_slots, from_slots):
        q, k, v = (x.clone().requires_grad_() for x in states)
        slots = [to_slots(x, segments.queries) for x in (q, k, v)]
        out = from_slots(_MatmulAttention.apply(*slots, segments.mask, 0.35), segments.queries, 2, 9)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return [x.grad for x in (q, k, v)]

    def plain_to_slots(states, segments):
        flat = states.transpose(1, 2).reshape(18, 2, 8).index_select(0, segments.gather)
        return flat.view(segments.count, segments.length, 2, 8).transpose(1, 2)

    def plain_from_slots(output, segments, rows, width):
        flat = output.transpose(1, 2).reshape(segments.count * segments.length, 2, 8)
        return flat.index_select(0, segments.scatter).view(rows, width, 2, 8)

    for grad, expected in zip(attend(to_slots, from_slots), attend(plain_to_slots, plain_from_slots),
                              strict=True):
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-5)


def test_a_padding_free_batch_equals_the_padded_one(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").train()
    group = samples([20, 13, 7, 17])
    padded = collate([[s] for s in group], pad_token_id=0, packed=False)
    padding_free = collate([group], pad_token_id=0, packed=True)
    assert padding_free["input_ids"].shape == (1, 57)
    reference_loss, reference_grads = loss_and_grads(model, padded, "sdpa")
    loss, grads = loss_and_grads(model, padding_free, MATMUL)
    assert loss == pytest.approx(reference_loss, rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], atol=1e-6, rtol=1e-4)


def prefixed(lengths: list[int], prefix: int) -> list[TokenizedSample]:
    """Samples that begin with the same `prefix` untrained tokens, then their own (trained after 2 more)."""
    shared = torch.randint(3, 390, (prefix,), generator=torch.Generator().manual_seed(1)).tolist()
    out = []
    for sample in samples(lengths):
        ids = shared + sample.input_ids
        out.append(TokenizedSample(ids, [IGNORE_INDEX] * (prefix + 2) + ids[prefix + 2:], "t"))
    return out


@pytest.mark.parametrize(("lengths", "slots", "autocast"), [
    ([9, 4, 13, 6], (5, 13, 24), False),  # the holder split: its prefix, then its rest; queries 13 rows a slot
    ([9, 4, 13, 6], (5, 13, 24), True),
    ([40, 2, 3], (3, 51, 51), False),  # a long holder, short sharers: not split (4 x 40 query rows, not 3 x 51)
])
def test_a_shared_prefix_batch_equals_the_padding_free_one(tiny_model_dir, lengths, slots, autocast):
    """The prefix held once, every sample attending to that copy: the loss and every gradient of the batch that
    holds each sample whole (keys' and values' gradients summed over the samples that read the prefix)."""
    from transformers import AutoModelForCausalLM

    from tunelab.data.batching import collate_shared_prefix
    from tunelab.models.segments import segments_from_positions

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").train()
    group = prefixed(lengths, prefix=11)
    whole = collate([group], pad_token_id=0, packed=True)
    shared = collate_shared_prefix(group, pad_token_id=0)
    copies = len(group) - 1
    assert shared["input_ids"].shape == (1, whole["input_ids"].shape[1] - copies * 11)
    assert int(shared["shared_tokens"]) == copies * 11
    layout = segments_from_positions(shared["position_ids"])  # (segments, query slot, key slot)
    assert (layout.queries.count, layout.queries.length, layout.keys.length) == slots
    assert layout.keys.copy_slots.numel() == (slots[0] - 1) * 11  # every segment but the prefix's reads a copy
    assert int((shared["targets"] != IGNORE_INDEX).sum()) == int((whole["targets"] != IGNORE_INDEX).sum())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        reference_loss, reference_grads = loss_and_grads(model, whole, MATMUL)
        loss, grads = loss_and_grads(model, shared, MATMUL)
    assert loss == pytest.approx(reference_loss, rel=1e-2 if autocast else 1e-6)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        if autocast:
            cosine = torch.nn.functional.cosine_similarity(grad.flatten(), reference_grads[name].flatten(), dim=0)
            assert cosine > 0.999, name
        else:
            torch.testing.assert_close(grad, reference_grads[name], atol=1e-6, rtol=1e-4)


def test_held_out_loss_with_shared_prefixes_equals_the_padded_one(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from tunelab.eval import evaluate
    from tunelab.eval.evaluate import evaluate_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").train()
    group = prefixed([9, 4, 13, 6, 7], prefix=11) + samples([5, 8])  # two batches of 4; the second shares nothing
    padded = evaluate_loss(model, group, pad_token_id=0, precision="fp32", batch_size=4)
    shared_tokens = []
    real = evaluate.collate_shared_prefix
    monkeypatch.setattr(evaluate, "collate_shared_prefix",
                        lambda *a: (batch := real(*a)) and shared_tokens.append(int(batch.get("shared_tokens", 0)))
                        or batch)
    shared = evaluate_loss(model, group, pad_token_id=0, precision="fp32", batch_size=4, share_prefix=True)
    assert sum(shared_tokens) >= 2 * 11  # a batch held a prefix once
    assert shared["eval_loss"] == pytest.approx(padded["eval_loss"], rel=1e-6)
    assert model.training and model.config._attn_implementation == "sdpa"  # as it was


def test_shared_prefix_stops_before_the_first_trained_position_and_needs_two_samples():
    from tunelab.data.batching import MIN_SHARED_PREFIX, shared_prefix_length

    group = prefixed([5, 6], prefix=12)
    assert shared_prefix_length(group) == 12
    alike = [TokenizedSample(s.input_ids[:12] + [7, 7, 7] + s.input_ids[15:], s.labels, "t") for s in group]
    assert shared_prefix_length(alike) == 13  # position 13 predicts the first trained token: not shared
    early = [TokenizedSample(s.input_ids, [IGNORE_INDEX] * 5 + s.input_ids[5:], "t") for s in group]
    assert shared_prefix_length(early) == 0  # position 4 predicts a trained token: 4 < MIN_SHARED_PREFIX
    assert shared_prefix_length(group[:1]) == 0
    short = prefixed([5, 6], prefix=MIN_SHARED_PREFIX - 2)
    assert shared_prefix_length(short) == 0


def test_training_on_the_matmul_path_computes_no_padding(tiny_model_dir, tmp_path, monkeypatch):
    from tunelab.train import summary

    counted = []  # the input tokens each run's MFU counts
    real_flops = summary.training_flops
    monkeypatch.setattr(summary, "training_flops", lambda model, **k: counted.append(k["input_tokens"])
                        or real_flops(model, **k))
    data = tmp_path / "qa.jsonl"
    rows = [{"question": f"what is {a} plus {b}{'?' * a}", "answer": f"{a + b}"} for a in range(6) for b in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [f"model={tiny_model_dir}", f"data.train={data}", "data.eval_split=0", "data.max_length=64",
              "train.max_steps=3", "train.batch_size=6", "train.precision=fp32", "eval.generate_samples=0",
              "eval.before_after=false", "data.shuffle=true"]
    free = train_run(load_config(None, [*common, "train.attention=matmul", f"output_dir={tmp_path / 'a'}"]))
    padded = train_run(load_config(None, [*common, "train.attention=sdpa", f"output_dir={tmp_path / 'b'}"]))
    whole = train_run(load_config(None, [*common, "train.attention=matmul", "train.share_prefix=false",
                                         f"output_dir={tmp_path / 'c'}"]))
    dropout = train_run(load_config(None, [*common, "train.attention=matmul", "method.dropout=0.1",
                                           f"output_dir={tmp_path / 'd'}"]))
    assert dropout["shared_prefix_fraction"] == 0.0  # each sample draws its own dropout masks over the prefix
    assert free["non_padding_fraction"] == whole["non_padding_fraction"] == 1.0
    assert padded["non_padding_fraction"] < 0.95
    # the chat template and "what is " lead every sample: held once a batch, the same losses
    assert free["shared_prefix_fraction"] > 0.2 and whole["shared_prefix_fraction"] == 0.0
    free_counted, _, whole_counted = counted[:3]  # MFU counts what was computed, not the samples' tokens
    assert free_counted == pytest.approx(whole_counted * (1 - free["shared_prefix_fraction"]), abs=1)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in line] for run in ("a", "b", "c")]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-5) == losses[2]


def test_varlen_boundaries_are_where_samples_start_over_all_rows():
    from tunelab.models.varlen import boundaries_from_positions

    group = samples([4, 5, 3])
    batch = collate([group[:2], group[2:]], pad_token_id=0, packed=True)  # width 9: second row 3 + 6 padding
    boundaries = boundaries_from_positions(batch["position_ids"])
    assert boundaries.cumulative.tolist() == [0, 4, 9, 12, 18] and boundaries.longest == 6
    assert boundaries.cumulative.dtype == torch.int32  # what flash attention's varlen kernels take


def test_varlen_attention_is_refused_off_cuda_before_the_run_directory_is_written(tiny_model_dir, tmp_path):
    from tunelab.errors import ConfigError

    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "what is 1 plus 1?", "answer": "2"}) + "\n")
    out = tmp_path / "run"
    config = load_config(None, [f"model={tiny_model_dir}", f"data.train={data}", "data.eval_split=0",
                                "train.attention=varlen", f"output_dir={out}"])
    with pytest.raises(ConfigError, match=r"^train\.attention: varlen needs a CUDA device"):
        train_run(config)
    assert not out.exists()


def _reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                      enable_gqa=False):
    """torch.nn.attention.varlen.varlen_attn's contract (torch 2.11+ signature) computed by sdpa one sample at a
    time, in float32 on CPU: the real kernel is CUDA's flash attention (tests/test_gpu.py runs it)."""
    assert cu_seq_q.dtype == torch.int32 and cu_seq_q is cu_seq_k and max_q == max_k
    assert max_q == int(torch.diff(cu_seq_q).max()) and window_size == (-1, 0)
    ends = cu_seq_q.tolist()
    pieces = [torch.nn.functional.scaled_dot_product_attention(
        *(states[start:end].transpose(0, 1) for states in (query, key, value)), is_causal=True, scale=scale,
        enable_gqa=enable_gqa).transpose(0, 1) for start, end in zip(ends, ends[1:], strict=False)]
    return torch.cat(pieces)


def _reference_varlen_of_torch_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False):
    """torch 2.10's signature: no scale (the kernel's own dim ** -0.5), no grouped heads."""
    assert is_causal and key.shape[1] == query.shape[1]
    return _reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size=(-1, 0))


@pytest.mark.parametrize("kernel", [_reference_varlen, _reference_varlen_of_torch_2_10])
def test_varlen_attention_lays_a_padding_free_batch_out_for_the_kernel(tiny_model_dir, kernel, monkeypatch):
    """tunelab's side of the varlen path (boundaries, layout, grouped heads for either signature) on CPU, with the
    kernel replaced by its contract computed one sample at a time."""
    import torch.nn.attention.varlen
    from transformers import AutoModelForCausalLM

    from tunelab.models.varlen import VARLEN

    monkeypatch.setattr(torch.nn.attention.varlen, "varlen_attn", kernel)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").train()
    group = samples([20, 13, 7, 17])
    padded = collate([[s] for s in group], pad_token_id=0, packed=False)
    packed = collate([group[:2], group[2:]], pad_token_id=0, packed=True)  # two rows, the second padded
    reference_loss, reference_grads = loss_and_grads(model, padded, "sdpa")
    loss, grads = loss_and_grads(model, packed, VARLEN)
    assert loss == pytest.approx(reference_loss, rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], atol=1e-6, rtol=1e-4)


def test_training_keeps_transformers_masks_where_a_sliding_window_binds():
    """The matmul path's segments are causal only: a sliding window that rows reach keeps the model's own attention
    (auto), and an explicit matmul or varlen setting is refused; a window longer than the rows changes nothing."""
    from test_lean_decoder import random_model

    from tunelab.errors import ConfigError

    cpu = torch.device("cpu")
    windowed = random_model("mistral", sliding_window=16)
    assert training_attention("auto", cpu, "fp32", 64, windowed) is None
    assert training_attention("auto", cpu, "fp32", 16, windowed) == MATMUL
    assert training_attention("auto", cpu, "fp32", 64, random_model("mistral")) == MATMUL
    for setting in ("matmul", "varlen"):
        with pytest.raises(ConfigError, match="sliding window of 16"):
            training_attention(setting, cpu, "fp32", 64, windowed)
