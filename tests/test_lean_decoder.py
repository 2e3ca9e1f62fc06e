"""models/lean_decoder.py computes what transformers' forward computes: on small random llama, mistral, qwen2
(biased q/k/v) and qwen3 (per-head q/k norms) models, a left-padded prompt batch after a shared prefix and then
single-token steps give the same last-position logits as the model's own forward, in float32 (calling the
model's projections) and in a packed bf16 decoding copy (fused projections); models it does not compute exactly
keep their own forward."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from tunelab.infer.decode import left_padded, model_forward
from tunelab.infer.kv_cache import reserved_cache
from tunelab.methods import folded_copy
from tunelab.models.compiled_step import compile_decoding
from tunelab.models.lean_decoder import LeanDecoder, lean_decoder
from tunelab.models.packed_linear import packing_available

SHAPE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
MODELS = {
    "llama": dict(tie_word_embeddings=True),
    "mistral": dict(sliding_window=None),
    "qwen2": dict(),  # q/k/v with biases
    "qwen3": dict(head_dim=24),  # per-head q/k RMSNorm, head_dim apart from hidden_size / heads
}


def random_model(model_type: str, **overrides):
    from transformers import AutoConfig

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**SHAPE, **MODELS[model_type], **overrides})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms and biases away from their initial ones and zeros, so a skipped one shows
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.add_(torch.randn_like(parameter) * 0.3)
    return model


def run_both(model, lean: LeanDecoder, steps: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(lean, transformers) logits after a shared 5-token prefix, a left-padded batch of 3 prompts, and `steps`
    single tokens."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(1)
    prefix = torch.randint(1, 96, (1, 5), generator=generator).to(device)
    prompts = [torch.randint(1, 96, (n,), generator=generator).tolist() for n in (4, 7, 1)]
    ids, suffix_mask = left_padded(prompts, 0, device)
    mask = torch.cat([torch.ones(3, 5, dtype=torch.long, device=device), suffix_mask], dim=1)
    positions = 5 + (suffix_mask.cumsum(-1) - 1).clamp(min=0)
    caches = [reserved_cache(model.config, 16 + steps), DynamicCache(config=model.config)]
    forwards = [lean, model_forward(model)]
    out = []
    for forward, cache in zip(forwards, caches, strict=True):
        forward(prefix, torch.ones_like(prefix), torch.arange(5, device=device)[None], cache)
        cache.batch_repeat_interleave(3)
        out.append([forward(ids, mask, positions, cache)])
        step_mask, position = mask, positions[:, -1:]
        for step in range(steps):
            step_mask = torch.cat([step_mask, torch.ones(3, 1, dtype=torch.long, device=device)], dim=1)
            position = position + 1
            token = torch.tensor([[7 + step], [11], [(13 * step + 1) % 96]], device=device)
            out[-1].append(forward(token, step_mask, position, cache))
    return list(zip(*out, strict=True))


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_lean_forward_equals_the_models_own_in_float32(model_type):
    model = random_model(model_type)
    lean = lean_decoder(model)
    assert lean is not None and len(lean.layers[0].qkv) == 3  # a float32 model: its own projections, not copies
    for got, expected in run_both(model, lean):
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_lean_forward_of_a_packed_bf16_copy_fuses_projections(model_type):
    model = folded_copy(random_model(model_type), torch.bfloat16)
    if not packing_available(model):
        pytest.skip("this CPU's oneDNN does not run bf16 matmuls")
    lean = lean_decoder(model)
    assert lean is lean_decoder(model)  # built once for a decoding copy
    assert len(lean.layers[0].qkv) == len(lean.layers[0].gate_up) == 1
    for got, expected in run_both(model, lean):  # bf16: rounding differs where the ops are fused
        torch.testing.assert_close(got.float(), expected.float(), atol=0.06, rtol=0.05)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_compiled_one_token_steps_compute_what_the_models_own_forward_does(model_type):
    """models/compiled_step.py (`serve --compile`): every one-token step runs the compiled graph, across widenings
    of the cache, and gives the logits transformers' forward gives, within bf16's rounding as the eager lean
    forward does; a model that is not a packed decoding copy is left eager."""
    float_model = random_model(model_type)
    assert compile_decoding(float_model) is not None and lean_decoder(float_model).compiled is None
    model = folded_copy(float_model, torch.bfloat16)
    if not packing_available(model):
        pytest.skip("this CPU's oneDNN does not run bf16 matmuls")
    assert compile_decoding(model, max_rows=3) is None
    lean = lean_decoder(model)
    graph, calls = lean.compiled._graph, []
    lean.compiled._graph = lambda *inputs: calls.append(inputs[0].shape[0]) or graph(*inputs)
    with torch.inference_mode():  # as compiled (and as serve and chat decode)
        results = run_both(model, lean, steps=12)  # 12 prompt columns + 12 steps: the storage widens at 16 and 24
    assert calls == [3] * 12
    for got, expected in results:
        torch.testing.assert_close(got.float(), expected.float(), atol=0.06, rtol=0.05)
    lean.compiled.max_rows, calls[:] = 2, []  # larger batches than it was compiled for run eagerly
    with torch.inference_mode():
        run_both(model, lean, steps=1)
    assert calls == []


FAILED_COMPILE = """
import torch
torch._inductor.config.force_disable_caches = True
torch._inductor.config.cpp.cxx = ("/nonexistent/g++",)
from test_lean_decoder import folded_copy, random_model, run_both
from tunelab.models.compiled_step import compile_decoding
from tunelab.models.lean_decoder import lean_decoder
model = folded_copy(random_model("llama"), torch.bfloat16)
reason = compile_decoding(model)
assert reason is not None and "C++ compiler" in reason, reason
assert lean_decoder(model).compiled is None
with torch.inference_mode():
    for got, expected in run_both(model, lean_decoder(model)):
        torch.testing.assert_close(got.float(), expected.float(), atol=0.06, rtol=0.05)
print("eager:", reason)
"""


def test_a_failed_compile_says_why_and_leaves_decoding_eager():
    """Without a working C++ compiler torch.compile fails: compile_decoding says so and the model decodes eagerly,
    as before. In a process of its own: inductor remembers a compiler it found wanting."""
    import subprocess
    import sys
    from pathlib import Path

    if not packing_available(folded_copy(random_model("llama"), torch.bfloat16)):
        pytest.skip("this CPU's oneDNN does not run bf16 matmuls")
    done = subprocess.run([sys.executable, "-c", FAILED_COMPILE], cwd=Path(__file__).parent, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "eager: torch.compile failed" in done.stdout, done.stderr[-3000:]


SHARED_CACHE_STEP = """
import sys
import torch
from test_lean_decoder import folded_copy, random_model, run_both
from tunelab.models.compiled_step import compile_decoding
from tunelab.models.lean_decoder import lean_decoder
model = folded_copy(random_model("llama", intermediate_size=int(sys.argv[1])), torch.bfloat16)
assert compile_decoding(model, max_rows=3) is None
with torch.inference_mode():
    for got, expected in run_both(model, lean_decoder(model), steps=2):
        torch.testing.assert_close(got.float(), expected.float(), atol=0.06, rtol=0.05)
print("compiled and equal")
"""


def test_a_model_of_other_widths_does_not_reuse_another_models_compiled_step(tmp_path):
    """Two processes, one compile cache (as two `serve --compile` starts on one machine): models that differ only
    in their MLP width must not share a graph (the second crashed in packed_linear before the linears' numbers
    carried their shapes)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if not packing_available(folded_copy(random_model("llama"), torch.bfloat16)):
        pytest.skip("this CPU's oneDNN does not run bf16 matmuls")
    environment = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    for width in ("128", "96"):
        done = subprocess.run([sys.executable, "-c", SHARED_CACHE_STEP, width], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=600, env=environment)
        assert done.returncode == 0 and "compiled and equal" in done.stdout, done.stderr[-3000:]


def test_models_it_does_not_compute_exactly_keep_their_own_forward():
    from peft import LoraConfig, get_peft_model

    assert lean_decoder(random_model("mistral", sliding_window=8)) is None  # sliding-window cache layers
    hooked = random_model("llama")
    hooked.model.layers[0].mlp.register_forward_hook(lambda *args: None)
    assert lean_decoder(hooked) is None
    assert lean_decoder(get_peft_model(random_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))) is None
    assert lean_decoder(random_model("llama", hidden_act="gelu")) is None
