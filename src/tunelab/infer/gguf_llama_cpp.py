"""The exported GGUF file checked by llama.cpp itself (through `llama-cpp-python`, where it is installed).

transformers' GGUF loader rebuilds the tokenizer and chat template from the file with its own code, so it can
agree with a file that llama.cpp reads differently (a pre-tokenizer name llama.cpp does not know stops it from
loading the file at all). This check asks llama.cpp: does its tokenizer give the ids tunelab trained with, does
the chat template in the metadata, rendered as llama-cpp-python renders it, give tunelab's prompt, and do its
next-token logits and greedy replies match the source model's?

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


@dataclass
class LlamaCppCheck:
    version: str
    prompts: int
    same_prompt_text: int = 0
    """Prompts the file's chat template (llama-cpp-python's Jinja renderer) writes exactly as tunelab's does."""
    same_tokens: int = 0
    """Prompts llama.cpp's tokenizer splits into exactly tunelab's token ids."""
    max_logit_difference: float = float("inf")
    tolerance: float = 0.0
    same_next_token: int = 0
    same_greedy_reply: int = 0
    error: str | None = None
    """Why llama.cpp gave no answer (it could not load the file, or crashed)."""

    def passed(self, exact: bool) -> bool:
        read_alike = self.same_prompt_text == self.same_tokens == self.prompts
        replies = not exact or self.same_greedy_reply == self.prompts
        return self.error is None and read_alike and self.max_logit_difference <= self.tolerance and replies

    def summary(self) -> str:
        if self.error:
            return f"llama.cpp {self.version}: {self.error}"
        return (f"llama.cpp {self.version}: same prompt text {self.same_prompt_text}/{self.prompts}, same tokens "
                f"{self.same_tokens}/{self.prompts}, largest logit difference {self.max_logit_difference:.3g} "
                f"(tolerance {self.tolerance:g}), same greedy reply {self.same_greedy_reply}/{self.prompts}")


def llama_cpp_check(path: Path, renderer, prompts: list[list[dict]], expected_logits: list, replies: list[str],
                    stop_ids: list[int], greedy_tokens: int, tolerance: float) -> LlamaCppCheck | None:
    """Compare llama.cpp's reading of `path` with the source: `expected_logits` are the source's next-token logits
    for each prompt, `replies` its greedy replies. None when llama-cpp-python is not installed."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    tokenizer = renderer.tokenizer
    texts = [renderer.prompt(conversation) for conversation in prompts]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    version = metadata.version("llama-cpp-python")
    with tempfile.TemporaryDirectory(prefix="tunelab-llama-cpp-") as folder:
        request = {"model": str(Path(path).resolve()), "conversations": prompts, "texts": texts, "ids": ids,
                   "stop_ids": list(stop_ids), "greedy_tokens": greedy_tokens}
        (Path(folder) / "request.json").write_text(json.dumps(request))
        done = subprocess.run([sys.executable, "-m", "tunelab.infer.gguf_llama_cpp", folder], capture_output=True,
                              text=True, timeout=1800)
        if done.returncode != 0:
            return LlamaCppCheck(version, len(prompts), tolerance=tolerance, error=_failure(done))
        answer = json.loads((Path(folder) / "answer.json").read_text())
        logits = np.load(Path(folder) / "logits.npy")
    check = LlamaCppCheck(version, len(prompts), max_logit_difference=0.0, tolerance=tolerance)
    for index, (text, expected, reply) in enumerate(zip(texts, expected_logits, replies, strict=True)):
        expected = expected.float().numpy()
        check.same_prompt_text += int(answer["texts"][index] == text)
        check.same_tokens += int(answer["tokens"][index] == ids[index])
        check.max_logit_difference = max(check.max_logit_difference, float(np.abs(logits[index] - expected).max()))
        check.same_next_token += int(logits[index].argmax() == expected.argmax())
        got = tokenizer.decode(answer["greedy"][index], skip_special_tokens=True).strip()
        check.same_greedy_reply += int(got == reply)
    return check


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
    for conversation, text, ids in zip(request["conversations"], request["texts"], request["ids"], strict=True):
        texts.append(formatter(messages=conversation).prompt)
        tokens.append(llm.tokenize(text.encode(), add_bos=False, special=True))
        llm.reset()
        llm.eval(ids)
        last = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        logits.append(last)
        greedy.append(_greedy(llm, last, set(request["stop_ids"]), request["greedy_tokens"]))
    np.save(folder / "logits.npy", np.stack(logits))
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
