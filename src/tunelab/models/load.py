"""Load a resolved checkpoint for training or inference: model (quantised when the method asks) and
tokenizer with a pad token."""

from __future__ import annotations

from pathlib import Path

import torch

from tunelab.config import QLoraMethod
from tunelab.errors import ModelError
from tunelab.models.attention import avoid_per_shape_attention_plans
from tunelab.models.resolve import ensure_pad_token


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:
        raise ModelError(f"cannot load tokenizer: {err}", where=str(path)) from None
    ensure_pad_token(tokenizer)
    return tokenizer


def quantization_config(method: QLoraMethod, compute_dtype: torch.dtype):
    """bitsandbytes settings for the frozen base of QLoRA (4-bit nf4/fp4 or 8-bit)."""
    from transformers import BitsAndBytesConfig

    if method.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method.quant_type,
        bnb_4bit_use_double_quant=method.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_model(path: Path, *, quantization=None, device: str = "cpu", head: str = "lm",
               pad_token_id: int | None = None):
    """A causal LM in float32 master weights (or quantised), on `device`, in training-ready state. `head="reward"`:
    the same body with a one-output score head instead (transformers' sequence classification; the head is
    initialised afresh unless `path` already is a reward model), `pad_token_id` written to its config."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    # use_kernels=False: with the `kernels` package installed, transformers 5 swaps layers for Hugging Face Hub
    # kernels by default, which it fetches on first use (offline on a lent H200 every CUDA run failed: "Version 2 of
    # 'kernels-community/rotary' is not available in the local cache") and whose numerics nobody here tested;
    # tunelab's own kernels are train.kernels.
    kwargs = {"dtype": torch.float32, "use_kernels": False}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = device
    if head == "reward":
        kwargs.update(num_labels=1, pad_token_id=pad_token_id)
    loader = AutoModelForSequenceClassification if head == "reward" else AutoModelForCausalLM
    try:
        model = loader.from_pretrained(path, **kwargs)
    except Exception as err:
        if "Weights only load failed" in str(err):  # torch refused a pickle that would run code
            pickles = ", ".join(sorted(p.name for p in Path(path).glob("*.bin"))) or "its .bin weights"
            raise ModelError(f"refused {pickles}: a pickle holding more than tensors could run code when loaded; "
                             "use a copy of the model in safetensors", where=str(path)) from None
        raise ModelError(f"cannot load model: {err}", where=str(path)) from None
    if quantization is None:
        model.to(device)
    else:
        own_unquantized_tensors(model)
    avoid_per_shape_attention_plans(torch.device(device))
    return model


def own_unquantized_tensors(model) -> None:
    """Quantised loading leaves the tensors it did not quantise (embedding, norms, head) as views of the
    memory-mapped checkpoint, which keeps the whole mapping, and every float32 page quantisation read, resident:
    on the default model 508 MB of file pages after loading 4-bit. Copies of those few tensors let it go
    (resident 884 -> 587 MB)."""
    seen: set[int] = set()
    for module in model.modules():
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        for tensor in tensors:
            if id(tensor) in seen or type(tensor).__name__ in ("Params4bit", "Int8Params") or tensor.is_cuda:
                continue
            seen.add(id(tensor))
            tensor.data = tensor.data.clone()


def enable_activation_checkpointing(model, every_n_layers: int) -> None:
    """Checkpoint every `every_n_layers`-th decoder layer of the (possibly PEFT-wrapped) model; the layers
    recompute their forward in backward (non-reentrant, so frozen inputs need no requires_grad trick)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ModelError(f"{type(base).__name__} does not support activation checkpointing",
                         where="train.activation_checkpointing")
    base.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=every_n_layers)
