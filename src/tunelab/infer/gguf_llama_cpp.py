"""The exported GGUF file checked by llama.cpp itself (through `llama-cpp-python`, where it is installed).

transformers' GGUF loader rebuilds the tokenizer and chat template from the file with its own code, so it can
agree with a file that llama.cpp reads differently (a pre-tokenizer name llama.cpp does not know stops it from
loading the file at all). This check asks llama.cpp: does its tokenizer give the ids tunelab trained with, does
the chat template in the metadata, rendered as llama-cpp-python renders it, give tunelab's prompt, and does it
compute, over held-out prompts and the source's replies, what the source computes with the file's weights?

llama.cpp runs in a child process (`python -m tunelab.infer.gguf_llama_cpp FOLDER`): some of its CPU kernels
crash on some machines (its AMX matmul, llama.cpp#20824), and a crash must fail the check, not end the export.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

READER_LIMIT = {"f32": 1e-3, "f16": 0.02, "bf16": 0.1, "q8_0": 0.2, "q6_k": 0.3, "q5_k_m": 0.3, "q4_k_m": 0.3,
                "q4_0": 0.3, "q3_k_m": 0.4, "q2_k": 0.5}
"""Largest relative logit error of llama.cpp's reading of the file against the source holding the file's dequantised
weights (gguf_check.dequantised_source), by type: llama.cpp also rounds activations in its matmuls (to the weights'
type for f16 and bf16, 8 bits for quantised ones), so this is not float rounding alone. Measured (2026-12-05,
llama-cpp-python 0.3.36) on the default model's support-tickets LoRA run: f16 0.0021, bf16 0.018, q8_0 0.065, q6_k
0.081, q5_k_m 0.082, q4_k_m 0.090, q4_0 0.075; on a random 256-wide model f32 0.0000, f16 0.0039, bf16 0.031, q8_0
0.057, q6_k 0.135, q4_k_m 0.12."""
NEAR_BEST_REQUIRED = 0.98
"""As gguf_check's: the share of positions where llama.cpp, reading an unquantised file, picks one of the source's
best tokens."""


@dataclass
class LlamaCppCheck:
    version: str
    prompts: int
    same_prompt_text: int = 0
    """Prompts the file's chat template (llama-cpp-python's Jinja renderer) writes exactly as tunelab's does."""
    same_tokens: int = 0
    """Prompts llama.cpp's tokenizer splits into exactly tunelab's token ids."""
    reader_error: float = float("inf")
    """Relative logit error against the source with the file's weights, teacher-forced over prompts and replies."""
    reader_limit: float = 0.0
    near_best: float = 0.0
    """Share of positions where llama.cpp's top token is one of the source's best."""
    max_logit_difference: float = float("inf")
    """Largest next-token logit difference after a prompt, against the source (for the record)."""
    same_next_token: int = 0
    same_greedy_reply: int = 0
    error: str | None = None
    """Why llama.cpp gave no answer (it could not load the file, or crashed)."""

    def passed(self, exact: bool) -> bool:
        read_alike = self.same_prompt_text == self.same_tokens == self.prompts
        picks = not exact or self.near_best >= NEAR_BEST_REQUIRED
        return self.error is None and read_alike and self.reader_error <= self.reader_limit and picks

    def summary(self) -> str:
        if self.error:
            return f"llama.cpp {self.version}: {self.error}"
        return (f"llama.cpp {self.version}: same prompt text {self.same_prompt_text}/{self.prompts}, same tokens "
                f"{self.same_tokens}/{self.prompts}, reads the file as tunelab does within {self.reader_error:.2g} "
                f"(limit {self.reader_limit:g}), the source's best token at {100 * self.near_best:.1f}% of "
                f"positions, same greedy reply {self.same_greedy_reply}/{self.prompts}")


def llama_cpp_check(path: Path, renderer, prompts: list[list[dict]], sequences: list[tuple[list[int], int]],
                    expected: list, own: list, replies: list[str], stop_ids: list[int], greedy_tokens: int,
                    quant: str) -> LlamaCppCheck | None:
    """Compare llama.cpp's reading of `path` with the source: `sequences` are each prompt's ids followed by its
    reply's and where the prompt ends (gguf_check.teacher_forced_sequences), `expected` the source's logits over
    them, `own` the logits of the source holding the file's weights, `replies` the source's greedy replies. None
    when llama-cpp-python is not installed."""
    from tunelab.infer.gguf_check import LogitComparison

    if importlib.util.find_spec("llama_cpp") is None:
        return None
    tokenizer = renderer.tokenizer
    texts = [renderer.prompt(conversation) for conversation in prompts]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    version = metadata.version("llama-cpp-python")
    limit = READER_LIMIT.get(quant, 0.5)
    with tempfile.TemporaryDirectory(prefix="tunelab-llama-cpp-") as folder:
        request = {"model": str(Path(path).resolve()), "conversations": prompts, "texts": texts, "ids": ids,
                   "sequences": [list(sequence) for sequence in sequences], "stop_ids": list(stop_ids),
                   "greedy_tokens": greedy_tokens}
        (Path(folder) / "request.json").write_text(json.dumps(request))
        done = subprocess.run([sys.executable, "-m", "tunelab.infer.gguf_llama_cpp", folder], capture_output=True,
                              text=True, timeout=1800)
        if done.returncode != 0:
            return LlamaCppCheck(version, len(prompts), reader_limit=limit, error=_failure(done))
        answer = json.loads((Path(folder) / "answer.json").read_text())
        logits = np.load(Path(folder) / "logits.npy")
    compared, at = LogitComparison(), 0
    for source, with_file_weights in zip(expected, own, strict=True):
        count = source.shape[0]
        compared.add(source, torch_tensor(logits[at:at + count]), with_file_weights)
        at += count
    check = LlamaCppCheck(version, len(prompts), reader_error=compared.reader_error(), reader_limit=limit,
                          near_best=compared.near_best(), max_logit_difference=compared.worst_next,
                          same_next_token=compared.same_next)
    for index, (text, reply) in enumerate(zip(texts, replies, strict=True)):
        check.same_prompt_text += int(answer["texts"][index] == text)
        check.same_tokens += int(answer["tokens"][index] == ids[index])
        got = tokenizer.decode(answer["greedy"][index], skip_special_tokens=True).strip()
        check.same_greedy_reply += int(got == reply)
    return check


def torch_tensor(array: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _failure(done: subprocess.CompletedProcess) -> str:
    said = [line for line in done.stderr.strip().splitlines() if line.strip()][-3:]
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        return (f"llama.cpp crashed ({name}) reading or running the file; on CPUs with AMX, llama.cpp's AMX "
                "matmul is known to crash on quantised types (llama.cpp#20824): build llama-cpp-python with "
                "CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX512=ON' to check there. " + " | ".join(said)).strip()
    return "llama.cpp did not load or run the file: " + " | ".join(said)


def _answer(folder: Path) -> None:
    """The child's side: llama.cpp's prompt text, tokens, next-token logits and greedy continuation per prompt."""
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    request = json.loads((folder / "request.json").read_text())
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        # A float32 KV cache (llama.cpp's default is f16, which alone moves the default model's logits by ~0.02):
        # the check is about the file, not about llama.cpp's runtime settings.
        llm = llama_cpp.Llama(model_path=request["model"], n_ctx=2048, logits_all=True, verbose=False,
                              n_threads=threads, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    except ValueError as err:
        sys.exit(f"{err} (llama.cpp refuses it; with verbose logs it says why)")
    template = llm.metadata.get("tokenizer.chat_template", "")
    formatter = Jinja2ChatFormatter(template=template, eos_token=_token_text(llm, llm.token_eos()),
                                    bos_token=_token_text(llm, llm.token_bos()))
    texts, tokens, greedy, logits = [], [], [], []
    for conversation, text, ids, (sequence, start) in zip(request["conversations"], request["texts"], request["ids"],
                                                          request["sequences"], strict=True):
        texts.append(formatter(messages=conversation).prompt)
        tokens.append(llm.tokenize(text.encode(), add_bos=False, special=True))
        llm.reset()
        llm.eval(sequence)  # teacher-forced: the prompt and the source's reply
        logits.append(np.array(llm.scores[start:len(sequence)], dtype=np.float32))
        llm.reset()
        llm.eval(ids)
        last = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        greedy.append(_greedy(llm, last, set(request["stop_ids"]), request["greedy_tokens"]))
    np.save(folder / "logits.npy", np.concatenate(logits))
    (folder / "answer.json").write_text(json.dumps({"texts": texts, "tokens": tokens, "greedy": greedy}))


def _greedy(llm, logits: np.ndarray, stop_ids: set[int], limit: int) -> list[int]:
    """Greedy continuation by llama.cpp from its current state (`logits` for the next position)."""
    new: list[int] = []
    for _ in range(limit):
        token = int(logits.argmax())
        new.append(token)
        if token in stop_ids:
            break
        llm.eval([token])
        logits = np.asarray(llm.scores[llm.n_tokens - 1])
    return new


def _token_text(llm, token: int) -> str:
    return llm.detokenize([token], special=True).decode("utf-8", errors="replace") if token >= 0 else ""


if __name__ == "__main__":
    _answer(Path(sys.argv[1]))
