"""Compiled decoder layers and output head for training (`train.kernels: compiled`).

Eager PyTorch runs a decoder layer's elementwise work op by op: RMSNorm is six ops forward and a dozen backward,
SwiGLU three, the rotary embedding promotes bf16 queries and keys to float32 copies, and the residual adds cast
their bf16 inputs, each a pass over the activations with a fresh allocation plus Python and autograd overhead.
Where matmuls are fast (AMX, AVX512-BF16, GPUs) that is a third to a half of a small model's LoRA step. Here
each decoder layer's forward is compiled by torch.compile (inductor fuses the elementwise work into a few
vectorised loops, forward and backward; tunelab's fused LoRA and matmul attention are traced inside without
graph breaks), and a trained head's log-softmax (full fine-tuning) becomes one fused pass over the bf16 logits
instead of a float32 copy kept for backward; a frozen head takes models/frozen_head.py's path, compiled or not.

The layers' classes are swapped to subclasses (parameters, state dicts, deep copies and saving see the model as
it was), and the compiled forward runs only while gradients are on: evaluation, generation and reference passes
keep the eager forward, so compilation happens once per layer class for training only. Numerics are those of
eager bf16 autocast up to rounding order (inductor computes a fusion in float32 and rounds once).
"""

from __future__ import annotations

import functools
import shutil

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.errors import ConfigError
from tunelab.models.attention import base_config

COMPILED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
"""Decoder layers compiled and tested without graph breaks."""


def compiler_available() -> bool:
    """Inductor's CPU code needs a C++ compiler (GPUs need Triton, which ships with CUDA builds of torch)."""
    return shutil.which("g++") is not None or shutil.which("c++") is not None


@functools.cache
def _compiled(function):
    _let_the_compile_cache_hold_our_graphs()
    return torch.compile(function, dynamic=True)


CACHEABLE_CALLS = ("torch.amp.autocast_mode._enter_autocast", "torch.amp.autocast_mode._exit_autocast")
"""The autocast switches inside the matmul attention and fused LoRA functions; their arguments are constants of
the graph, so its cache key already holds everything they depend on."""


def _let_the_compile_cache_hold_our_graphs() -> None:
    """Let AOTAutograd's on-disk cache keep the decoder-layer graphs. By default it refuses any graph with an
    autograd.Function (the fused LoRA and matmul attention) or an autocast switch, so every run traced and
    lowered the layer again: a 2-step LoRA run of the default model took 28.4 s compiled against 12.1 s eager;
    with the cache holding the graphs the next run took 15.4 s (AMD EPYC, 2 cores). PyTorch's developers found
    autograd.Function's graphs pure with respect to their inputs (pytorch#149751) and mean to allow them by
    default; the switches are keyed by torch's version."""
    import torch._functorch.config
    import torch._inductor.config

    torch._functorch.config.autograd_cache_allow_custom_autograd_functions = True
    marked = torch._inductor.config.unsafe_marked_cacheable_functions
    for name in CACHEABLE_CALLS:
        marked.setdefault(name, torch.__version__)


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature != 1.0:
        logits = logits.float() / temperature
    # log_softmax's own cast to float32 instead of a float32 copy of the logits: the same values and gradients
    # to the bit, and a 128-row chunk of a 49k vocabulary's forward and backward 11.5-12.9 ms against 15.1-17.0
    # in eager mode (bf16 logits, AMD EPYC, 2 cores).
    return -F.nll_loss(torch.log_softmax(logits, dim=-1, dtype=torch.float32), targets, reduction="none")


def _training(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.is_floating_point()


@functools.cache
def _compiled_class(original: type) -> type:
    """A subclass of a decoder layer class whose forward runs compiled while gradients are on (one per class, so
    all layers share one compiled graph). A class swap rather than nn.Module.compile, which would also compile
    evaluation and KV-cache decoding."""
    compiled_forward = _compiled(original.forward)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if _training(hidden_states):
            if not hidden_states.requires_grad:
                # The first layer's input (frozen embeddings) would otherwise be compiled as a graph of its own:
                # one more compile for a gradient that costs a few small matmuls a step.
                hidden_states = hidden_states.detach().requires_grad_()
            return compiled_forward(self, hidden_states, *args, **kwargs)
        return original.forward(self, hidden_states, *args, **kwargs)

    return type(f"Compiled{original.__name__}", (original,), {"forward": forward, "_tunelab_original": original})


def compile_layers(model) -> int:
    """Swap the model's decoder layers to compiled forms and mark its head for compiled log-probabilities;
    returns how many decoder layers changed."""
    from tunelab.models.logprobs import decoder_and_head

    decoder, head = decoder_and_head(model)
    layers = list(getattr(decoder, "layers", []))
    for layer in layers:
        if "_tunelab_original" not in type(layer).__dict__:
            layer.__class__ = _compiled_class(type(layer))
    if head is not None:
        head._tunelab_compiled_logprobs = True
    return len(layers)


def restore_layers(model) -> None:
    """Put the original classes back."""
    from tunelab.models.logprobs import decoder_and_head

    for module in model.modules():
        original = type(module).__dict__.get("_tunelab_original")
        if original is not None:
            module.__class__ = original
    _, head = decoder_and_head(model)
    if head is not None:
        head.__dict__.pop("_tunelab_compiled_logprobs", None)


def head_logprobs(head: nn.Module, logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature)[target] in float32 for logits [N, V]: compiled when the head is marked and
    gradients are on, else eager."""
    if getattr(head, "_tunelab_compiled_logprobs", False) and _training(logits):
        return _compiled(_token_logprobs)(logits, targets, temperature)
    return _token_logprobs(logits, targets, temperature)


AUTO_MIN_PARAMETERS = 50_000_000
AUTO_MIN_STEPS = 120
"""Below these a machine's first compile costs more than it saves: on the default model (2 AVX512-BF16 cores,
2026-12-04) a 2-step LoRA run took 12.1 s eager, 63.6 s compiled on a cold cache (~51 s of compiling) and 15.4-16.8 s
once the caches held the graphs (~4 s), and compiling saved ~0.4 s of a 2.5 s step: 120 steps pay back the cold
compile, and every later run on the machine gains ~45 s. Under tcmalloc (the `tunelab` command's malloc since
2026-12-05) the eager step lost most of what compiling saved (fewer, smaller allocations): 30-step runs of the main
job's config, alternating, 200.3 / 180.8 trained tokens/s eager against 196.5 / 200.2 compiled. Kept, untested
against this, for hosts where elementwise work decides the step (AMX: ../shared/perf/amx-lora-step-2026-12-02.md);
to measure there."""
AUTO_METHODS = {"lora", "rslora", "full"}
AUTO_MIN_TORCH = (2, 13)
"""The torch the compiled layers were measured and tested on; on torch 2.11 (an H200's image, 2026-12-04)
dynamo failed tracing the fused LoRA function (`overwrite_tensor_vt_proxy` assertion), so auto stays eager
there and `compiled` is the user's explicit choice."""


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def training_kernels(setting: str, *, device: torch.device, precision: str, model, method: str, objective: str,
                     steps: int, sharded: bool, checkpointing: bool) -> str:
    """'compiled', 'liger' or 'none' for `train.kernels`: auto takes Liger's kernels on CUDA where they are
    installed and compiles on CPU where it was measured to pay (see the config field). Neither under FSDP, whose
    own subclass of each layer would wrap the patched one (untried)."""
    from tunelab.models.liger import liger_problem

    if sharded:
        return "none"
    if setting == "liger":
        problem = liger_problem(model, device)
        if problem:
            raise ConfigError(f"liger {problem}", where="train.kernels")
    if setting != "auto":
        return setting
    if liger_problem(model, device) is None:
        return "liger"
    from tunelab.models.logprobs import uses_virtual_tokens

    config = base_config(model)
    total = sum(param.numel() for param in model.parameters())
    fits = (device.type == "cpu" and precision == "bf16" and compiler_available() and method in AUTO_METHODS
            and objective == "sft" and not checkpointing and not uses_virtual_tokens(model)
            and getattr(config, "model_type", None) in COMPILED_MODEL_TYPES and torch_version() >= AUTO_MIN_TORCH)
    return "compiled" if fits and total >= AUTO_MIN_PARAMETERS and steps >= AUTO_MIN_STEPS else "none"


def enable_training_kernels(model, kernels: str, requested: str, precision: str) -> str | None:
    """Put the kernels training_kernels chose into `model`; what to tell the user, if anything."""
    from tunelab.models.liger import enable_liger_kernels

    if kernels == "compiled":
        return (f"compiling {enable_compiled_kernels(model, precision)} decoder layers for training "
                "(train.kernels; the first run on a machine takes about a minute more)")
    if kernels == "liger":
        enable_liger_kernels(model)
        return "Liger's RMSNorm, rotary and SwiGLU kernels in the decoder layers (train.kernels)"
    if requested in ("compiled", "liger"):
        return f"{requested} kernels are off under FSDP (train.kernels)"
    return None


def enable_compiled_kernels(model, precision: str) -> int:
    """Compile the model's decoder layers and head for training; returns how many layers were compiled. Fused LoRA
    layers' frozen weight casts are made first, so the compiled layers read them instead of casting per forward."""
    from tunelab.methods.fused_lora import cache_weight_casts, unfuse_norms

    cache_weight_casts(model, torch.bfloat16 if precision == "bf16" else torch.float32)
    unfuse_norms(model)  # inductor fuses transformers' norm ops with their neighbours; measured that way
    return compile_layers(model)


def kernels_in_use(model) -> str:
    """'compiled' when the model's decoder layers run compiled in training, 'liger' with Liger's kernels, else
    'none' (for summary.json)."""
    from tunelab.models.liger import uses_liger

    if uses_liger(model):
        return "liger"
    return "compiled" if any("_tunelab_original" in type(m).__dict__ for m in model.modules()) else "none"
