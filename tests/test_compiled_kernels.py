"""Compiled decoder layers (`train.kernels: compiled`) train what eager layers train: same loss and gradients on
the padding-free matmul-attention path with fused LoRA, no graph breaks, eager forwards whenever gradients are off,
and a model that saves, copies and restores as a plain one."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_fused_lora import lora_model
from test_train import run_config

from tunelab.data.batching import collate, collate_shared_prefix
from tunelab.data.template import IGNORE_INDEX, TokenizedSample
from tunelab.methods.fused_lora import fuse_lora_layers
from tunelab.models.attention import MATMUL, attention_implementation
from tunelab.models.fused_ops import (
    compile_layers,
    compiler_available,
    enable_compiled_kernels,
    kernels_in_use,
    restore_layers,
    training_kernels,
)
from tunelab.objectives.sft import sft_loss_sum
from tunelab.train.run import train_run


def padding_free_batch(seed: int = 0, lengths=(19, 12, 16)):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(3, 390, (n,), generator=generator).tolist()
        rows.append([TokenizedSample(ids, [IGNORE_INDEX] * 4 + ids[4:], "t")])
    return collate(rows, 0, packed=True)


def shared_prefix_batch(seed: int = 3, lengths=(9, 4, 13, 6), prefix: int = 11):
    """A padding-free batch holding its samples' common untrained prefix once (the others read its copies)."""
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, 390, (prefix,), generator=generator).tolist()
    group = []
    for n in lengths:
        ids = shared + torch.randint(3, 390, (n,), generator=generator).tolist()
        group.append(TokenizedSample(ids, [IGNORE_INDEX] * (prefix + 2) + ids[prefix + 2:], "t"))
    batch = collate_shared_prefix(group, 0)
    assert int(batch["shared_tokens"]) == prefix * (len(lengths) - 1)
    return batch


def loss_and_grads(model, data, bf16: bool):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss, tokens = sft_loss_sum(model, data)
    (loss / tokens).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return float(loss.detach()) / tokens, grads


def relative_error(grads, reference):
    return float((grads - reference).norm() / reference.norm())


@pytest.fixture
def fused_model(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    model.train()
    fuse_lora_layers(model)
    return model


def test_compiled_layers_match_eager_without_graph_breaks(fused_model):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    data = [padding_free_batch(seed) for seed in range(2)] + [padding_free_batch(2, lengths=(7, 30))]
    data.append(shared_prefix_batch())  # copies of a prefix: their keys' and values' gradients summed into it
    with attention_implementation(fused_model, MATMUL):
        exact = [loss_and_grads(fused_model, batch, bf16=False) for batch in data]
        eager = [loss_and_grads(fused_model, batch, bf16=True) for batch in data]
        assert enable_compiled_kernels(fused_model, "bf16") == 2
        compiled = [loss_and_grads(fused_model, batch, bf16=True) for batch in data]
    assert not counters["graph_break"], dict(counters["graph_break"])
    # the graphs may go to AOTAutograd's on-disk cache (the next run loads them instead of tracing again)
    assert counters["aot_autograd"]["total"] and not counters["aot_autograd"]["autograd_cache_bypass"]
    # the compiled layers are as close to float32 as eager bf16 is (they round fewer intermediates); float32 runs
    # agree to rounding (test_a_compiled_run_trains_like_an_eager_one)
    for (loss, grads), (bf16_loss, bf16_grads), (compiled_loss, compiled_grads) in zip(
            exact, eager, compiled, strict=True):
        assert abs(compiled_loss - loss) <= 2 * abs(bf16_loss - loss) + 1e-3 * loss
        assert relative_error(compiled_grads, grads) <= 2 * relative_error(bf16_grads, grads) + 1e-3


def test_compiled_layers_run_eager_without_gradients_and_leave_a_plain_model(fused_model):
    data = padding_free_batch()
    names = [type(m).__name__ for m in fused_model.modules()]
    keys = list(fused_model.state_dict())
    with torch.no_grad():
        eager_logits = fused_model(input_ids=data["input_ids"]).logits
    assert compile_layers(fused_model) == 2 and kernels_in_use(fused_model) == "compiled"
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():  # evaluation and generation: the eager forward, nothing compiled
        assert torch.equal(fused_model(input_ids=data["input_ids"]).logits, eager_logits)
        copied = copy.deepcopy(fused_model)  # the decoding copy: its own weights, the same eager forward
        assert torch.equal(copied(input_ids=data["input_ids"]).logits, eager_logits)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before
    assert list(fused_model.state_dict()) == keys
    restore_layers(fused_model)
    assert [type(m).__name__ for m in fused_model.modules()] == names and kernels_in_use(fused_model) == "none"


def test_auto_compiles_only_runs_it_pays_for(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3)
    with torch.device("meta"):
        default_sized = LlamaForCausalLM(config)  # SmolLM2-135M's shape, no memory
    cpu = torch.device("cpu")
    settings = dict(device=cpu, precision="bf16", model=default_sized, method="lora", objective="sft", steps=300,
                    sharded=False, checkpointing=False)
    assert training_kernels("auto", **settings) == ("compiled" if compiler_available() else "none")
    assert training_kernels("auto", **{**settings, "steps": 120}) == training_kernels("auto", **settings)
    for change in ({"steps": 68}, {"precision": "fp32"}, {"objective": "dpo"}, {"method": "qlora"},
                   {"sharded": True}, {"checkpointing": True}, {"device": torch.device("cuda")}):
        assert training_kernels("auto", **{**settings, **change}) == "none", change
    assert training_kernels("compiled", **{**settings, "steps": 1}) == "compiled"
    with monkeypatch.context() as patch:  # dynamo of torch 2.11 failed on the fused LoRA function
        patch.setattr(torch, "__version__", "2.11.0+cu130")
        assert training_kernels("auto", **settings) == "none"
        assert training_kernels("compiled", **settings) == "compiled"
    assert training_kernels("compiled", **{**settings, "sharded": True}) == "none"
    assert training_kernels("none", **settings) == "none"


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_compiled_run_trains_like_an_eager_one(tiny_model_dir, tmp_path, method):
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"what is {a} plus {b}?", "answer": f"{a + b}"}) + "\n"
                          for a in range(6) for b in range(6)))
    runs = {}
    for kernels in ("none", "compiled"):
        out = tmp_path / kernels
        runs[kernels] = train_run(run_config(tiny_model_dir, qa, out, "train.epochs=1", "train.lr=3e-3",
                                             f"train.kernels={kernels}", "train.profile_steps=2",
                                             f"method.name={method}"))
        runs[kernels]["losses"] = [json.loads(line).get("loss") for line in (out / "metrics.jsonl").open()][1:]
    assert runs["none"]["kernels"] == "none" and runs["compiled"]["kernels"] == "compiled"
    assert runs["compiled"]["losses"] == pytest.approx(runs["none"]["losses"], rel=1e-4)
    assert runs["compiled"]["final_eval_loss"] == pytest.approx(runs["none"]["final_eval_loss"], rel=1e-4)
    # the profile sees the compiled graphs' fused loops as elementwise work, not as time no op accounts for
    top = dict(runs["compiled"]["step_breakdown"]["top_ops"])
    assert "compiled graphs (fused loops)" in top


def test_liger_kernels_are_refused_off_cuda_before_the_run_directory_is_written(tiny_model_dir, tmp_path):
    from tunelab.errors import ConfigError

    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "what is 1 plus 1?", "answer": "2"}) + "\n")
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"^train\.kernels: liger needs a CUDA device"):
        train_run(run_config(tiny_model_dir, qa, out, "train.kernels=liger"))
    assert not out.exists()
