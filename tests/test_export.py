"""GGUF export of a real (tiny) LoRA run: written with the gguf package, loaded back, and compared with the run;
the metadata llama.cpp reads; refusals for what cannot be exported."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.config import load_config
from tunelab.errors import ConfigError
from tunelab.infer import gguf_export
from tunelab.infer.gguf_export import export_gguf
from tunelab.train.run import train_run


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    data = folder / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"question {i}?", "answer": f"the answer is {i}"}) + "\n"
                            for i in range(24)))
    config = load_config(None, [f"model={tiny_model_dir}", f"data.train={data}", "data.eval_split=0.25",
                                f"output_dir={folder / 'run'}", "train.max_steps=8", "train.lr=3e-2",
                                "train.precision=fp32", "eval.generate_samples=4", "eval.max_new_tokens=8"])
    train_run(config)
    return folder / "run"


def test_an_f16_gguf_answers_like_the_run_and_carries_what_llama_cpp_reads(run_dir, tmp_path):
    import gguf

    from tunelab.infer.load import load_generator

    out = tmp_path / "run-f16.gguf"
    result = CliRunner().invoke(app, ["export", str(run_dir), "--quant", "f16", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "check passed" in result.output
    check = json.loads((tmp_path / "run-f16.gguf.check.json").read_text())
    assert check["passed"] and check["prompts"] == 4  # the run's held-out prompts
    assert check["weight_error"] < 1e-3 and check["reader_error"] < 1e-3 and check["near_best"] == 1.0
    reader = gguf.GGUFReader(str(out))
    fields = {name: field.contents() for name, field in reader.fields.items()
              if not name.startswith("tokenizer.ggml.") or name.endswith(("model", "pre", "_token_id"))}
    assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"  # llama.cpp's name; "gpt2" fails to load there
    loaded = load_generator(str(run_dir))
    assert fields["tokenizer.chat_template"] == loaded.renderer.template
    assert fields["tokenizer.ggml.eos_token_id"] == loaded.tokenizer.eos_token_id
    assert fields["llama.attention.head_count_kv"] == 2 and fields["llama.block_count"] == 2
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied to token_embd, as llama.cpp expects
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert len(tensors) == 2 + 2 * 9


def test_without_the_rotary_permutation_the_check_fails(tmp_path, monkeypatch):
    import torch

    from conftest import build_tiny_model, build_tokenizer

    # Sharp attention (large q, k), so that rotating the wrong pairs of dimensions shows in the logits.
    tokenizer = build_tokenizer()
    model = build_tiny_model(len(tokenizer), seed=3)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(12)
            layer.self_attn.k_proj.weight.mul_(12)
    folder = tmp_path / "sharp"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert export_gguf(str(folder), tmp_path / "permuted.gguf", "f16").passed
    monkeypatch.setattr(gguf_export, "permute", lambda weights, heads, kv_heads: weights)
    check = export_gguf(str(folder), tmp_path / "unpermuted.gguf", "f16")
    assert not check.passed and check.weight_error > 1
    assert check.worst_tensor.endswith(("attn_q.weight", "attn_k.weight"))
    assert check.reader_error < 1e-3  # transformers reads the wrong file as tunelab would: the weights tell


def test_q8_0_stays_within_its_tolerance(run_dir, tmp_path):
    check = export_gguf(str(run_dir), tmp_path / "run-q8.gguf", "q8_0")
    assert check.passed and check.weight_error < 0.01, check.summary()
    assert check.size_mb < (tmp_path / "run-q8.gguf").stat().st_size / 2**20 + 0.1


def test_what_cannot_be_exported_is_refused(run_dir, tmp_path, monkeypatch):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from conftest import build_tokenizer

    monkeypatch.setattr(gguf_export.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="llama-quantize on PATH"):
        export_gguf(str(run_dir), tmp_path / "k.gguf", "q3_k_m")
    with pytest.raises(ConfigError, match="unknown quantisation"):
        export_gguf(str(run_dir), tmp_path / "x.gguf", "q3")
    tokenizer = build_tokenizer()
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    folder = tmp_path / "qwen"
    qwen.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with pytest.raises(ConfigError, match="Llama-architecture models; .* is 'qwen2'"):
        export_gguf(str(folder), tmp_path / "qwen.gguf", "f16")
    result = CliRunner().invoke(app, ["export", str(folder), "--output", str(tmp_path / "q.gguf")])
    assert result.exit_code == 2 and "Llama-architecture" in result.output
    assert not (tmp_path / "q.gguf").exists()


def test_llama_cpp_reads_the_file_as_tunelab_does_and_a_wrong_pre_tokenizer_is_caught(run_dir, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python builds from source (no wheel on PyPI)")

    check = export_gguf(str(run_dir), tmp_path / "run-f32.gguf", "f32")
    native = check.llama_cpp
    assert native is not None and native.prompts == 4 and native.error is None
    assert native.same_prompt_text == native.same_tokens == native.same_greedy_reply == 4
    assert native.reader_error <= native.reader_limit and native.near_best == 1.0 and check.passed
    # " 0123456789" is one GPT-2 pre-token, which the tiny tokenizer merged whole; llama-bpe cuts digits in
    # threes apart from the space, so llama.cpp would feed the model other tokens than it was trained on.
    prompts = [[{"role": "user", "content": f"hello world 0123456789 question {i}"}] for i in range(2)]
    assert export_gguf(str(run_dir), tmp_path / "run-digits.gguf", "f32", check_prompts=prompts).passed
    monkeypatch.setattr(gguf_export, "PRE_TOKENIZERS", _Always("llama-bpe"))
    wrong = export_gguf(str(run_dir), tmp_path / "run-wrong-pre.gguf", "f32", check_prompts=prompts)
    assert wrong.reader_error <= 1e-3 and wrong.quantisation_error <= 1e-3  # transformers' loader does not notice
    assert wrong.llama_cpp.same_tokens == 0 and not wrong.passed


class _Always(dict):
    def __init__(self, value: str) -> None:
        super().__init__()
        self.value = value

    def get(self, key, default=None):
        return self.value


def test_a_head_dim_other_than_hidden_over_heads_is_written_for_llama_cpp(tmp_path):
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import build_tokenizer

    tokenizer = build_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=32, tie_word_embeddings=True, pad_token_id=0, eos_token_id=2))
    folder = tmp_path / "wide-heads"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    check = export_gguf(str(folder), tmp_path / "wide-heads.gguf", "f16")
    assert check.passed, check.summary()  # llama.cpp (where installed) refused it before: "invalid n_rot: 32"
    reader = gguf.GGUFReader(str(tmp_path / "wide-heads.gguf"))
    fields = {name: field.contents() for name, field in reader.fields.items() if name.startswith("llama.")}
    assert fields["llama.attention.key_length"] == fields["llama.attention.value_length"] == 32
    assert fields["llama.rope.dimension_count"] == 32


def test_a_llama_3_style_tokenizer_is_named_for_llama_cpp_and_read_alike(tmp_path, monkeypatch):
    """Llama 3's pre-tokenizer (numbers in threes, contractions, whitespace runs) with ignore_merges is llama.cpp's
    `llama-bpe`; where llama-cpp-python is installed, llama.cpp must split the prompts into tunelab's token ids,
    and does not when the file names GPT-2's pre-tokenizer instead."""
    import gguf
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import CHATML, CORPUS, SPECIALS, build_tiny_model

    backend = Tokenizer(models.BPE(ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(gguf_export.LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    corpus = CORPUS + ["I'LL pay 1234567 dollars, DON'T you think?\n\n  Order #C-90824   shipped.\t ok"]
    backend.train_from_iterator(corpus * 20, trainers.BpeTrainer(
        vocab_size=500, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    folder = tmp_path / "llama3-style"
    build_tiny_model(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    prompts = [[{"role": "user", "content": "I'LL pay 1234567 dollars, DON'T you think?\n\n  Order #C-90824 ok"}],
               [{"role": "user", "content": "question 98765 answer\t\t  world's end"}]]
    check = export_gguf(str(folder), tmp_path / "llama3-style.gguf", "f32", check_prompts=prompts)
    pre = gguf.GGUFReader(str(tmp_path / "llama3-style.gguf")).fields["tokenizer.ggml.pre"].contents()
    assert pre == "llama-bpe" and not check.warnings and check.passed, check.summary()
    if check.llama_cpp is None:
        return  # llama-cpp-python not installed: transformers' loader agreed
    assert check.llama_cpp.same_tokens == 2
    monkeypatch.setattr(gguf_export, "_pre_tokenizer_name", lambda pre_tokenizer: "gpt-2")
    wrong = export_gguf(str(folder), tmp_path / "as-gpt2.gguf", "f32", check_prompts=prompts)
    assert wrong.llama_cpp.same_tokens < 2 and not wrong.passed
