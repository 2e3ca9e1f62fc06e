"""`tunelab export --format gguf`: a run (its adapter folded in) or a model as one GGUF file for llama.cpp,
Ollama and LM Studio, written with the `gguf` package (no llama.cpp checkout or compiler), then verified.

What llama.cpp's converter does that is easy to miss, done here: q and k projection rows permuted into
llama.cpp's rotary layout; 1-D tensors (norms) kept in F32; the tokenizer written as llama.cpp reads it (BPE
vocabulary with token types, merges, the pre-tokenizer name, BOS/EOS/pad ids, add_bos) and the chat template
the run trained with. Only Llama-architecture models are exported (the default model is one); others are
refused with the reason. The k-quant mixes q4_k_m, q5_k_m and q6_k are computed here (gguf_kquants.py, checked
against llama.cpp's own quantiser); q2_k and q3_k_m need llama.cpp's `llama-quantize`, used when on PATH, never a
silent fallback.

Every export is checked by loading the file back (transformers' GGUF loader, and llama.cpp itself where
llama-cpp-python is installed: gguf_llama_cpp.py) and reading, teacher-forced, held-out prompts and the source's
greedy replies to them; the numbers are printed and written beside the file (`<file>.check.json`). Two questions
are kept apart. Layout: does the file, as the loader reads it, compute what the source computes with the file's
own (dequantised) weights put back by tunelab? That holds to float rounding for every type, so a misplaced, mis-
permuted or mis-named tensor fails it whatever the quantisation (a wrong rotary permutation passed the old
absolute-logit check at q8_0 on a small model). Quantisation: how far do the logits move from the source's, as a
fraction of their spread, and does the file still pick tokens the source ranks best? That has a limit per type
(a correct f16 file of a sensitive model no longer fails because one greedy reply parts after 29 tokens).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from tunelab.errors import ConfigError, ModelError
from tunelab.infer.gguf_kquants import FILE_TYPES, MIXES, quantize, tensor_type
from tunelab.infer.gguf_llama_cpp import LlamaCppCheck, llama_cpp_check
from tunelab.methods import METHODS
from tunelab.models.resolve import gguf_alone

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

WEIGHT_LIMIT = {"f32": 1e-6, "f16": 1e-3, "bf16": 5e-3, "q8_0": 0.02, "q6_k": 0.05, "q5_k_m": 0.1, "q4_k_m": 0.12,
                "q4_0": 0.2, "q3_k_m": 0.3, "q2_k": 0.5}
"""Largest relative error (root mean square over the source's) of one tensor of the file, dequantised and put back
by tunelab's inverse of the export's mapping, against the source's tensor, by type. Measured (2026-12-05) on the
default model's support-tickets LoRA run and on a random 256-wide model, worst tensor: f16 0.0002, bf16 0.0017,
q8_0 0.0066, q6_k 0.018, q5_k_m 0.053, q4_k_m 0.072, q4_0 0.111; without the rotary permutation 1.40 on both."""
READER_TOLERANCE = 1e-3
"""Largest relative logit error between the file as transformers' loader reads it and the source holding the file's
dequantised weights: float rounding only (the file's metadata, read by another's code, means what tunelab meant)."""
QUANTISATION_LIMIT = {"f32": 1e-3, "f16": 0.02, "bf16": 0.1, "q8_0": 0.3, "q6_k": 0.5, "q5_k_m": 1.2,
                      "q4_k_m": 1.2, "q4_0": 1.2, "q3_k_m": 1.5, "q2_k": 2.0}
"""Largest relative logit error (root mean square of the difference over the source logits' spread, over every
position of the held-out prompts and replies) of the file against the source, by type: a bound on what the
quantisation costs. Measured (2026-12-05, ~260 positions): the default model's support-tickets LoRA run f16
0.0017, bf16 0.013, q8_0 0.043, q6_k 0.075, q5_k_m 0.94 (its 576-wide rows are not whole k-quant blocks: mostly
Q5_1), q4_k_m 0.27, q4_0 0.85 (its top token one of the source's best in 98.9% of positions); a random 8-layer,
256-wide model f16 0.005, bf16 0.042, q8_0 0.14, q6_k 0.39, q4_k_m 0.75, q4_0 0.82 (random weights have no
structure to keep)."""
EXACT_TYPES = ("f32", "f16", "bf16")
NEAR_BEST_MARGIN = 0.1
"""A file's top token counts as the source's choice when the source's logit for it is within this many standard
deviations (of the source's logits at that position) of the source's best: near-ties may go either way."""
NEAR_BEST_REQUIRED = 0.98
"""Share of positions where an unquantised file (f32, f16, bf16) must pick one of the source's best tokens."""


@dataclass
class ExportCheck:
    """What loading the file back showed, against the source model."""

    file: str
    quant: str
    size_mb: float
    prompts: int
    positions: int
    """Positions compared: each held-out prompt's last token and the source's greedy reply after it."""
    weight_error: float
    """Relative error of the file's worst tensor (dequantised, put back) against the source's (WEIGHT_LIMIT)."""
    worst_tensor: str
    reader_error: float
    """Relative logit error of the file as transformers reads it against the source with the file's weights."""
    quantisation_error: float
    """Relative logit error of the file against the source."""
    quantisation_limit: float
    near_best: float
    """Share of positions where the file's top token is one of the source's best (NEAR_BEST_MARGIN)."""
    max_logit_difference: float
    """Largest next-token logit difference after a prompt (for the record; the check reads the errors above)."""
    same_next_token: int
    same_greedy_reply: int
    greedy_tokens: int
    warnings: list[str] = field(default_factory=list)
    llama_cpp: LlamaCppCheck | None = None
    """llama.cpp's own reading of the file (tokens, template, logits, replies); None without llama-cpp-python."""

    @property
    def passed(self) -> bool:
        exact = self.quant in EXACT_TYPES
        loader = (self.weight_error <= WEIGHT_LIMIT.get(self.quant, 0.5) and self.reader_error <= READER_TOLERANCE
                  and self.quantisation_error <= self.quantisation_limit
                  and (not exact or self.near_best >= NEAR_BEST_REQUIRED))
        return loader and (self.llama_cpp is None or self.llama_cpp.passed(exact))

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        checked = (f"; {self.llama_cpp.summary()}" if self.llama_cpp else
                   "; llama.cpp not asked (pip install llama-cpp-python to check the file there too)")
        return (f"check {verdict}: weights put back from the file within {self.weight_error:.2g} of the source's "
                f"(worst {self.worst_tensor}; limit {WEIGHT_LIMIT.get(self.quant, 0.5):g}); {self.prompts} held-out "
                f"prompts and replies, {self.positions} positions: transformers' loader reads the file as tunelab "
                f"does within {self.reader_error:.2g} (tolerance {READER_TOLERANCE:g}), "
                f"{self.quant} error {self.quantisation_error:.3g} of the logits' spread (limit "
                f"{self.quantisation_limit:g}), the source's best token at {100 * self.near_best:.1f}% of positions, "
                f"same greedy reply ({self.greedy_tokens} tokens) {self.same_greedy_reply}/{self.prompts}{checked}")


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
        gguf_name = _tensor_name(hf_name)
        if gguf_name is None:
            raise ModelError(f"no GGUF name for tensor {hf_name}", where="export")
        data = tensor.detach().float().numpy()
        if gguf_name.endswith("attn_q.weight"):
            data = _permute(data, heads, heads)
        elif gguf_name.endswith("attn_k.weight"):
            data = _permute(data, heads, kv_heads)
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


_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _tensor_name(hf_name: str) -> str | None:
    """llama.cpp's name for a transformers Llama tensor."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":  # an untied head
        return "output.weight"
    parts = hf_name.split(".")
    if hf_name.startswith("model.layers.") and parts[-1] == "weight":
        short = _LAYER_NAMES.get(".".join(parts[3:-1]))
        return f"blk.{parts[2]}.{short}.weight" if short else None
    return None


def _unpermute(weights: np.ndarray, heads: int, kv_heads: int) -> np.ndarray:
    """The inverse of _permute: llama.cpp's interleaved rotary rows back to transformers' halves."""
    groups = kv_heads if kv_heads != heads else heads
    shape = weights.shape
    return weights.reshape(groups, shape[0] // groups // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _permute(weights: np.ndarray, heads: int, kv_heads: int) -> np.ndarray:
    """Rows of a q or k projection from transformers' rotary layout (halves) to llama.cpp's (interleaved pairs),
    as llama.cpp's converter permutes them."""
    groups = kv_heads if kv_heads != heads else heads
    shape = weights.shape
    return weights.reshape(groups, 2, shape[0] // groups // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


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


def verify_gguf(path: Path, source, renderer, quant: str, prompts: list[list[dict]], greedy_tokens: int
                ) -> ExportCheck:
    """Load `path` back and compare it with `source` (and with the source holding the file's weights) on `prompts`
    followed by the source's greedy replies, read teacher-forced; see the module's docstring."""
    from transformers import AutoModelForCausalLM

    from tunelab.infer.generate import GenerationOptions, generate_replies, stop_token_ids

    with gguf_alone(path) as folder:
        try:
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=path.name, dtype=torch.float32,
                                                          use_kernels=False).eval()
        except Exception as err:
            raise ModelError(f"the exported file does not load back: {err}", where=str(path)) from None
    loaded.generation_config = source.generation_config
    options = GenerationOptions(max_new_tokens=greedy_tokens)
    replies = generate_replies(source, renderer, prompts, options)
    exported = generate_replies(loaded, renderer, prompts, options)
    sequences = teacher_forced_sequences(renderer, prompts, replies)
    own, weight_error, worst_tensor = dequantised_source(path, source)
    expected = [_logits(source, ids, start) for ids, start in sequences]
    with_file_weights = [_logits(own, ids, start) for ids, start in sequences]
    del own
    compared = LogitComparison()
    for (ids, start), wanted, meant in zip(sequences, expected, with_file_weights, strict=True):
        compared.add(wanted, _logits(loaded, ids, start), meant)
    del loaded
    native = llama_cpp_check(path, renderer, prompts, sequences, expected, with_file_weights, replies,
                             stop_token_ids(source, renderer.tokenizer), greedy_tokens, quant)
    return ExportCheck(str(path), quant, round(path.stat().st_size / 2**20, 1), len(prompts), compared.positions,
                       weight_error, worst_tensor, compared.reader_error(), compared.quantisation_error(),
                       QUANTISATION_LIMIT.get(quant, 1.2), compared.near_best(), compared.worst_next,
                       compared.same_next, sum(a == b for a, b in zip(replies, exported, strict=True)), greedy_tokens,
                       llama_cpp=native)


def teacher_forced_sequences(renderer, prompts: list[list[dict]], replies: list[str]) -> list[tuple[list[int], int]]:
    """(each prompt's token ids followed by its reply's, the index of the prompt's last token)."""
    from tunelab.infer.generate import encode_prompts

    tokenizer = renderer.tokenizer
    sequences = []
    for conversation, reply in zip(prompts, replies, strict=True):
        prompt = encode_prompts(renderer, [conversation])["input_ids"][0].tolist()
        sequences.append((prompt + tokenizer(reply, add_special_tokens=False)["input_ids"], len(prompt) - 1))
    return sequences


def _logits(model, ids: list[int], start: int) -> torch.Tensor:
    """Next-token logits [positions, vocabulary] at every position from `start` on."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, start:].float()


class LogitComparison:
    """Sums over positions for the relative errors (root mean square of a difference over the root mean square
    spread of the source's logits around their mean) and the near-best share."""

    def __init__(self) -> None:
        self.positions = self.same_next = self.near = 0
        self.reader = self.quantisation = self.spread = self.worst_next = 0.0

    def add(self, source: torch.Tensor, file: torch.Tensor, own: torch.Tensor) -> None:
        self.positions += source.shape[0]
        self.spread += float(((source - source.mean(-1, keepdim=True)) ** 2).sum())
        self.reader += float(((file - own) ** 2).sum())
        self.quantisation += float(((file - source) ** 2).sum())
        self.near += near_best_count(source, file)
        self.worst_next = max(self.worst_next, float((source[0] - file[0]).abs().max()))
        self.same_next += int(source[0].argmax() == file[0].argmax())

    def reader_error(self) -> float:
        return (self.reader / max(self.spread, 1e-30)) ** 0.5

    def quantisation_error(self) -> float:
        return (self.quantisation / max(self.spread, 1e-30)) ** 0.5

    def near_best(self) -> float:
        return self.near / max(self.positions, 1)


def near_best_count(source: torch.Tensor, file: torch.Tensor) -> int:
    """Positions where the file's top token is within NEAR_BEST_MARGIN standard deviations of the source's best."""
    picked = source.gather(1, file.argmax(-1, keepdim=True))[:, 0]
    return int((source.max(-1).values - picked <= NEAR_BEST_MARGIN * source.std(-1)).sum())


def dequantised_source(path: Path, source) -> tuple[torch.nn.Module, float, str]:
    """(a copy of `source` holding the file's weights, dequantised and put back by tunelab's own inverse of the
    export's mapping (names, rotary permutation); the relative error of the file's worst tensor against the source's,
    and that tensor's name). A misplaced, mis-permuted or mis-named tensor is ~1.4 off, whatever the type."""
    import copy

    import gguf

    config = source.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    weights = source.state_dict()
    names = {_tensor_name(name): name for name in weights if _tensor_name(name)}
    state, worst = {}, (0.0, "")
    for tensor in gguf.GGUFReader(str(path)).tensors:
        if tensor.name not in names:
            raise ModelError(f"the file holds a tensor the model has no place for: {tensor.name}", where=str(path))
        data = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if tensor.name.endswith("attn_q.weight"):
            data = _unpermute(data, heads, heads)
        elif tensor.name.endswith("attn_k.weight"):
            data = _unpermute(data, heads, kv_heads)
        put_back = torch.from_numpy(data.copy())
        original = weights[names[tensor.name]].float()
        if put_back.shape != original.shape:
            raise ModelError(f"{tensor.name} has shape {tuple(put_back.shape)} in the file, "
                             f"{tuple(original.shape)} in the model", where=str(path))
        error = float((put_back - original).norm() / original.norm().clamp(min=1e-30))
        worst = max(worst, (error, tensor.name))
        state[names[tensor.name]] = put_back
    own = copy.deepcopy(source)
    missing, _ = own.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied:
        raise ModelError(f"the file lacks tensors: {', '.join(sorted(set(missing) - tied)[:5])}", where=str(path))
    return own.eval(), worst[0], worst[1]


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
