"""The k-quant mixes tunelab writes itself (infer/gguf_kquants.py): blocks that gguf's own dequantisers read back
closer to the weights than the legacy types of as many bits, llama.cpp's choice of type for every tensor, an
export of a model with whole 256-weight rows that passes its check, and, where llama-cpp-python is installed,
the same bytes as llama.cpp's quantiser."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from tunelab.infer.gguf_export import export_gguf
from tunelab.infer.gguf_kquants import quantize, tensor_type


def _relative_error(weights: np.ndarray, type_name: str, quantized: np.ndarray | None = None) -> float:
    import gguf

    kind = gguf.GGMLQuantizationType[type_name]
    back = gguf.quants.dequantize(quantized if quantized is not None else quantize(weights, type_name), kind)
    return float(np.sqrt(((back - weights) ** 2).mean() / (weights ** 2).mean()))


def test_k_quant_blocks_read_back_closer_than_the_legacy_types_and_zero_stays_zero():
    import gguf

    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((64, 512)) * 0.02).astype(np.float32)
    weights[1, :256] = 0.0  # a block of zeros
    weights[2, 256:] = -0.01  # a constant block
    weights[3, 7] = 0.5  # an outlier
    errors = {}
    for type_name in ("Q4_K", "Q5_K", "Q6_K"):
        quantized = quantize(weights, type_name)
        block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][1]
        assert quantized.dtype == np.uint8 and quantized.shape == (64, 2 * block_bytes)
        back = gguf.quants.dequantize(quantized, gguf.GGMLQuantizationType[type_name])
        assert np.all(back[1, :256] == 0) and np.allclose(back[2, 256:], -0.01, atol=2e-4)
        errors[type_name] = _relative_error(weights, type_name, quantized)
    legacy = {name: _relative_error(weights, name) for name in ("Q4_0", "Q5_0", "Q8_0")}
    assert errors["Q4_K"] < legacy["Q4_0"] and errors["Q5_K"] < legacy["Q5_0"]
    assert legacy["Q8_0"] < errors["Q6_K"] < errors["Q5_K"] < errors["Q4_K"] < 0.1


def test_each_tensor_gets_llama_cpps_type():
    # The default model: 30 layers, 576-wide rows (not whole 256-weight blocks), the head tied to the embedding.
    small = {name: tensor_type("q4_k_m", name, columns, 30, has_output=False) for name, columns in [
        ("token_embd.weight", 576), ("blk.0.attn_q.weight", 576), ("blk.0.attn_v.weight", 576),
        ("blk.4.attn_v.weight", 576), ("blk.0.ffn_down.weight", 1536), ("blk.4.ffn_down.weight", 1536),
        ("blk.5.ffn_down.weight", 1536), ("blk.29.ffn_down.weight", 1536)]}
    assert small == {"token_embd.weight": "Q8_0", "blk.0.attn_q.weight": "Q5_0", "blk.0.attn_v.weight": "Q8_0",
                     "blk.4.attn_v.weight": "Q5_0", "blk.0.ffn_down.weight": "Q6_K", "blk.4.ffn_down.weight": "Q4_K",
                     "blk.5.ffn_down.weight": "Q6_K", "blk.29.ffn_down.weight": "Q6_K"}
    # A 4096-wide model with 32 layers and its own head.
    assert tensor_type("q4_k_m", "token_embd.weight", 4096, 32, has_output=True) == "Q4_K"
    assert tensor_type("q4_k_m", "output.weight", 4096, 32, has_output=True) == "Q6_K"
    assert tensor_type("q5_k_m", "blk.10.attn_q.weight", 4096, 32, has_output=True) == "Q5_K"
    assert tensor_type("q5_k_m", "blk.10.attn_v.weight", 4096, 32, has_output=True) == "Q5_K"
    assert tensor_type("q5_k_m", "blk.9.attn_v.weight", 4096, 32, has_output=True) == "Q6_K"
    assert tensor_type("q5_k_m", "blk.10.ffn_down.weight", 14336, 32, has_output=True) == "Q5_K"
    assert tensor_type("q6_k", "blk.10.ffn_gate.weight", 4096, 32, has_output=True) == "Q6_K"
    assert tensor_type("q6_k", "blk.0.ffn_gate.weight", 100, 32, has_output=True) == "F16"


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """A random Llama whose rows are whole k-quant blocks (256 wide), with its own head, 8 layers (so the _m
    mixes give some layers more bits), and weights float16 holds exactly (llama.cpp quantises from float16)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=2))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.half().float())
    folder = tmp_path_factory.mktemp("wide-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_q4_k_m_export_passes_its_check_with_llama_cpps_mix(wide_model, tmp_path):
    import gguf

    out = tmp_path / "wide-q4_k_m.gguf"
    check = export_gguf(str(wide_model), out, "q4_k_m")
    assert check.passed and check.weight_error < 0.1, check.summary()
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    assert types["blk.0.attn_v.weight"] == types["blk.3.attn_v.weight"] == types["blk.7.ffn_down.weight"] == "Q6_K"
    assert types["blk.1.attn_v.weight"] == types["blk.1.ffn_down.weight"] == types["blk.1.attn_q.weight"] == "Q4_K"
    assert types["blk.1.attn_norm.weight"] == "F32"
    assert out.stat().st_size < 0.4 * export_gguf(str(wide_model), tmp_path / "wide-f16.gguf", "f16").size_mb * 2**20


@pytest.mark.parametrize("mix", ["q4_k_m", "q5_k_m", "q6_k"])
def test_the_mixes_match_llama_cpps_quantiser(wide_model, tmp_path, mix):
    import gguf

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python builds from source (no wheel on PyPI)")
    f16 = tmp_path / "wide-f16.gguf"
    export_gguf(str(wide_model), f16, "f16")
    theirs = tmp_path / f"llama-{mix}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = gguf.LlamaFileType[{"q4_k_m": "MOSTLY_Q4_K_M", "q5_k_m": "MOSTLY_Q5_K_M",
                                       "q6_k": "MOSTLY_Q6_K"}[mix]]
    assert llama_cpp.llama_model_quantize(str(f16).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    ours = tmp_path / f"ours-{mix}.gguf"
    export_gguf(str(wide_model), ours, mix)
    reference = {t.name: t for t in gguf.GGUFReader(str(theirs)).tensors}
    same = total = 0
    for tensor in gguf.GGUFReader(str(ours)).tensors:
        expected = reference[tensor.name]
        assert tensor.tensor_type == expected.tensor_type, tensor.name
        block_bytes = gguf.GGML_QUANT_SIZES[tensor.tensor_type][1]
        mine, its = (np.asarray(t.data).view(np.uint8).reshape(-1, block_bytes) for t in (tensor, expected))
        same += int((mine == its).all(axis=1).sum())
        total += len(mine)
    assert same >= 0.995 * total, f"{same}/{total} blocks identical"
