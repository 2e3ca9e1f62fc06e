"""`tunelab export --format gguf`: a run (its adapter folded in) or a model as one GGUF file for llama.cpp,
Ollama and LM Studio, written with the `gguf` package (no llama.cpp checkout or compiler), then verified.

What llama.cpp's converter does that is easy to miss, done here: q and k projection rows permuted into
llama.cpp's rotary layout; 1-D tensors (norms) kept in F32; the tokenizer written as llama.cpp reads it (BPE
vocabulary with token types, merges, the pre-tokenizer name, BOS/EOS/pad ids, add_bos) and the chat template
the run trained with. Only Llama-architecture models are exported (the default model is one); others are
refused with the reason. The k-quant mixes q4_k_m, q5_k_m and q6_k are computed here (gguf_kquants.py, checked
against llama.cpp's own quantiser); q2_k and q3_k_m need llama.cpp's `llama-quantize`, used when on PATH, never a
silent fallback.

Every export is checked after writing (infer/gguf_check.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path

import numpy as np

from tunelab.errors import ConfigError, ModelError
from tunelab.infer.gguf_check import ExportCheck, verify_gguf
from tunelab.infer.gguf_kquants import FILE_TYPES, MIXES, quantize, tensor_type
from tunelab.infer.gguf_layout import permute, tensor_name
from tunelab.methods import METHODS

DIRECT_QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", *MIXES)
"""Written by tunelab itself (gguf's numpy quantisers; the k-quant mixes by gguf_kquants.py)."""
K_QUANTS = ("q2_k", "q3_k_m")
"""Need llama.cpp's llama-quantize (from an f16 file)."""
LLAMA_TYPES = ("llama",)

PRE_TOKENIZERS = {
    # sha256 of tokenizer.json's pre_tokenizer (sorted JSON) -> llama.cpp's pre-tokenizer with the same splits.
    # GPT-2's byte-level regex alone: what transformers builds when it reads SmolLM2's GGUF (the default model's
    # tokenizer, so what tunelab trained with); llama.cpp's `gpt-2` splits text the same way (`gpt2`, without
    # the hyphen, is a name llama.cpp refuses to load: found by the llama.cpp check).
    "baad9354616c54e28804f1ac4dc6f27c3032867d2da3f9106a8d12ac859680f0": "gpt-2",
    # Digits one by one, then GPT-2's regex: SmolLM's own tokenizer.json; llama.cpp's `smollm`.
    "88e46f2b7ff38881b25bdcbd53c00c71a177d17bb9af73bec520e942c76aee6c": "smollm",
}
"""Pre-tokenizers llama.cpp knows by name; others (unless _pre_tokenizer_name recognises their parts) are written as
`default` with a warning in the check."""
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
"""Llama 3's pre-tokenizer split (its tokenizer.json): words, numbers in threes, punctuation runs, whitespace;
llama.cpp's `llama-bpe`, which also takes whole words from the vocabulary before merging (ignore_merges)."""

def export_gguf(spec: str, output: Path | None, quant: str = "f16", *, check_prompts: list[list[dict]] | None = None,
                greedy_tokens: int = 32) -> ExportCheck:
    """Write `spec` (a run directory or model) as GGUF in `quant`, load it back and compare; returns the check
    (also written to `<output>.check.json`). Raises ConfigError for what cannot be exported."""
    quant = quant.lower()
    if quant not in DIRECT_QUANTS + K_QUANTS:
        raise ConfigError(f"unknown quantisation '{quant}'; one of {', '.join(DIRECT_QUANTS + K_QUANTS)}",
                          where="--quant")
    quantize_tool = shutil.which("llama-quantize") if quant in K_QUANTS else None
    if quant in K_QUANTS and quantize_tool is None:
        raise ConfigError(f"{quant} is a llama.cpp k-quant: it needs llama.cpp's llama-quantize on PATH (not found); "
                          f"export {', '.join(DIRECT_QUANTS)} without it", where="--quant")
    model, tokenizer, renderer, name, run_dir = _source(spec)
    config = model.config
    if config.model_type not in LLAMA_TYPES:
        raise ConfigError(f"GGUF export writes Llama-architecture models; {spec} is '{config.model_type}'",
                          where=str(spec))
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ConfigError("GGUF export of Llama models with bias terms is not supported", where=str(spec))
    output = Path(output) if output else (run_dir or Path.cwd()) / f"{name}-{quant}.gguf"
    output.parent.mkdir(parents=True, exist_ok=True)
    warnings: list[str] = []
    prompts = check_prompts or _held_out_prompts(run_dir, warnings=warnings)  # before writing: a bad file fails first
    partial = output.with_name(output.name + ".partial")
    f16 = output.with_name(output.stem + ".f16.partial")
    try:  # nothing half-written is left: a full disk or a failed llama-quantize removes the scratch files
        if quant in K_QUANTS:
            _write(model, tokenizer, renderer.portable_template, f16, "f16", name, warnings)
            done = subprocess.run([quantize_tool, str(f16), str(partial), quant.upper()], capture_output=True,
                                  text=True)
            if done.returncode != 0:
                raise ModelError(f"llama-quantize failed: {done.stderr.strip()[-500:]}", where=str(output))
        else:
            _write(model, tokenizer, renderer.portable_template, partial, quant, name, warnings)
        partial.replace(output)
    except OSError as err:
        raise ModelError(f"cannot write it: {err.strerror or err}", where=str(output)) from None
    finally:
        partial.unlink(missing_ok=True)
        f16.unlink(missing_ok=True)
    check = verify_gguf(output, model, renderer, quant, prompts, greedy_tokens)
    check.warnings = warnings
    Path(f"{output}.check.json").write_text(json.dumps({**asdict(check), "passed": check.passed}, indent=1))
    return check


def _source(spec: str):
    """(model in float32 with any adapter folded in, tokenizer, renderer of the run's template, name, run dir)."""
    from tunelab.infer.load import is_run_dir, load_generator

    path = Path(spec)
    loaded = load_generator(spec, "cpu")
    model = loaded.model
    why_not = loaded.run_config and getattr(METHODS[loaded.run_config.method.name], "CANNOT_MERGE", None)
    if why_not:
        raise ConfigError(f"{spec} cannot be exported as one model file: {why_not}", where=str(spec))
    if hasattr(model, "peft_config"):
        if loaded.run_config is not None and loaded.run_config.method.name == "qlora":
            raise ConfigError("a QLoRA run folds into its 4-bit base here; export it after `tunelab merge` "
                              "(which merges into the full-precision base)", where=str(spec))
        model = model.merge_and_unload()
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise ConfigError(f"{spec} has no language-model head to export", where=str(spec))
    model = model.float().eval()
    run_dir = path if path.is_dir() and is_run_dir(path) else None
    name = path.resolve().name if run_dir else Path(str(spec)).name.removesuffix(".gguf")
    return model, loaded.tokenizer, loaded.renderer, name, run_dir


def _write(model, tokenizer, chat_template: str, path: Path, quant: str, name: str, warnings: list[str]) -> None:
    import gguf

    config = model.config
    qtype, file_type = _types(quant) if quant not in MIXES else (None, gguf.LlamaFileType[FILE_TYPES[quant]])
    writer = gguf.GGUFWriter(str(path), "llama")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"rope scaling '{rope.get('rope_type')}' is not exported yet", where="export")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)  # llama.cpp assumes hidden / heads without these
    writer.add_value_length(head_dim)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, chat_template, warnings)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    odd_rows: list[str] = []
    has_output = not tied and "lm_head.weight" in model.state_dict()
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp uses token_embd when output is absent
        gguf_name = tensor_name(hf_name)
        if gguf_name is None:
            raise ModelError(f"no GGUF name for tensor {hf_name}", where="export")
        data = tensor.detach().float().numpy()
        if gguf_name.endswith("attn_q.weight"):
            data = permute(data, heads, heads)
        elif gguf_name.endswith("attn_k.weight"):
            data = permute(data, heads, kv_heads)
        if data.ndim == 1 or quant == "f32":
            writer.add_tensor(gguf_name, data.astype(np.float32))
        elif quant == "f16":
            writer.add_tensor(gguf_name, data.astype(np.float16))
        elif quant in MIXES:
            chosen = tensor_type(quant, gguf_name, data.shape[1], config.num_hidden_layers, has_output)
            if chosen == "F16":
                writer.add_tensor(gguf_name, data.astype(np.float16))
            else:
                writer.add_tensor(gguf_name, quantize(data, chosen), raw_dtype=gguf.GGMLQuantizationType[chosen])
        elif data.shape[1] % gguf.GGML_QUANT_SIZES[qtype][0]:  # rows not whole blocks: F16, as llama.cpp's converter
            writer.add_tensor(gguf_name, data.astype(np.float16))
            odd_rows.append(gguf_name)
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    if odd_rows:
        warnings.append(f"{len(odd_rows)} tensor(s) whose rows are not whole {quant} blocks are written as F16 "
                        f"({', '.join(odd_rows[:3])}{', ...' if len(odd_rows) > 3 else ''})")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _types(quant: str):
    import gguf

    return {
        "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
        "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
        "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
        "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
        "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    }[quant]


def _add_tokenizer(writer, tokenizer, chat_template: str, warnings: list[str]) -> None:
    """A byte-level BPE tokenizer as llama.cpp's `gpt2` model: tokens by id with types, merges, pre-tokenizer,
    special ids and the chat template."""
    import gguf

    definition = json.loads(tokenizer.backend_tokenizer.to_str())
    if definition.get("model", {}).get("type") != "BPE":
        raise ConfigError("GGUF export writes byte-level BPE tokenizers (tokenizer.json); this one is "
                          f"{definition.get('model', {}).get('type')}", where="export")
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    special = {token["id"]: token["special"] for token in definition.get("added_tokens", [])}
    for token, index in vocab.items():
        tokens[index] = token
        types[index] = (gguf.TokenType.CONTROL if special.get(index) else
                        gguf.TokenType.USER_DEFINED if index in special else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    pre = _pre_tokenizer_name(definition.get("pre_tokenizer"))
    if pre is None:
        pre = "default"
        warnings.append("the tokenizer's pre-tokenizer is not one llama.cpp knows by name here: written as "
                        "'default', so llama.cpp may split text differently from transformers")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = definition["model"].get("merges", [])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for setter, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                             (writer.add_eos_token_id, tokenizer.eos_token_id),
                             (writer.add_unk_token_id, tokenizer.unk_token_id),
                             (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None:
            setter(int(token_id))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    writer.add_chat_template(chat_template)


def _pre_tokenizer_name(pre_tokenizer: dict | None) -> str | None:
    """llama.cpp's name for a tokenizer.json pre-tokenizer, or None when it is not one tunelab can name: by its
    hash (PRE_TOKENIZERS), or Llama 3's split followed by a byte-level step without its own regex."""
    found = PRE_TOKENIZERS.get(hashlib.sha256(json.dumps(pre_tokenizer, sort_keys=True).encode()).hexdigest())
    if found or not isinstance(pre_tokenizer, dict) or pre_tokenizer.get("type") != "Sequence":
        return found
    parts = pre_tokenizer.get("pretokenizers") or []
    if len(parts) != 2:
        return None
    split, byte_level = parts
    is_llama3_split = (split.get("type") == "Split" and (split.get("pattern") or {}).get("Regex") == LLAMA3_SPLIT
                       and split.get("behavior") == "Isolated" and not split.get("invert"))
    plain_bytes = (byte_level.get("type") == "ByteLevel" and not byte_level.get("use_regex", True)
                   and not byte_level.get("add_prefix_space"))
    return "llama-bpe" if is_llama3_split and plain_bytes else None


def _held_out_prompts(run_dir: Path | None, count: int = 8, warnings: list[str] | None = None) -> list[list[dict]]:
    """The run's held-out prompts (samples.jsonl; lines that are not a sample with a prompt are skipped, said in
    `warnings`), else a few fixed ones."""
    path = run_dir / "samples.jsonl" if run_dir is not None else None
    if path is not None and path.is_file():
        prompts, skipped = [], 0
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                prompt = json.loads(line).get("prompt")
            except (json.JSONDecodeError, AttributeError):
                prompt = None
            if _is_conversation(prompt):
                prompts.append(prompt)
            else:
                skipped += 1
            if len(prompts) == count:
                break
        if skipped and warnings is not None:
            warnings.append(f"{path}: {skipped} line(s) without a readable prompt skipped for the check")
        if prompts:
            return prompts
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
                 "Explain what a GPU is in one sentence."]
    return [[{"role": "user", "content": q}] for q in questions]


def _is_conversation(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)
