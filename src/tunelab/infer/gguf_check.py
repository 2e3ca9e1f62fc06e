"""The check every GGUF export ends with (infer/gguf_export.py).

Three questions, kept apart. Weights: each tensor of the file, dequantised and put back by tunelab's inverse of the
export's mapping (gguf_layout.py), against the source's: a misplaced, mis-permuted or mis-named tensor is ~1.4 off
whatever the type (a wrong rotary permutation passed the old absolute-logit check at q8_0 on a small model).
Reading: transformers' GGUF loader, and llama.cpp where llama-cpp-python is installed (gguf_llama_cpp.py), must
compute what the source computes holding the file's weights, teacher-forced over held-out prompts and the source's
greedy replies to them (the file's metadata means what tunelab meant). Quantisation: how far the logits move from
the source's, as a fraction of their spread, with a limit per type, and for unquantised types whether the file
still picks tokens the source ranks best (a correct f16 file of a sensitive model no longer fails because one
greedy reply parts after 29 tokens). The numbers are printed and written beside the file (`<file>.check.json`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tunelab.errors import ModelError
from tunelab.infer.gguf_layout import tensor_name, unpermute
from tunelab.infer.gguf_llama_cpp import LlamaCppCheck, llama_cpp_check
from tunelab.models.resolve import gguf_alone

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
    names = {tensor_name(name): name for name in weights if tensor_name(name)}
    state, worst = {}, (0.0, "")
    for tensor in gguf.GGUFReader(str(path)).tensors:
        if tensor.name not in names:
            raise ModelError(f"the file holds a tensor the model has no place for: {tensor.name}", where=str(path))
        data = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if tensor.name.endswith("attn_q.weight"):
            data = unpermute(data, heads, heads)
        elif tensor.name.endswith("attn_k.weight"):
            data = unpermute(data, heads, kv_heads)
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
