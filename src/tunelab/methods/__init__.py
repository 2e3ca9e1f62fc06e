"""How a model becomes trainable. One module per method; `METHODS` maps `method.name` to it.

Each method module offers:
    apply(model, config) -> model            make the loaded base model trainable
    quantization(config, compute_dtype)      bitsandbytes settings for loading the base, or None
and, when the trained weights sit beside a frozen base (adapters of any kind):
    without_adapter(model) -> context manager   the model computes what its base computes (a free reference)
and, when its trained weights cannot be folded into the base:
    CANNOT_MERGE: str                        why not, in a user's words
and, when the method saves in a format of its own (not PEFT's, not a full checkpoint):
    save(model, run_dir, config)             write the trained weights
    load(base_model, run_dir) -> model       rebuild the trained model on its base
"""

from __future__ import annotations

from types import ModuleType

import torch

from tunelab.methods import bottleneck, freeze, full, ia3, lora, prompt_learning

METHODS: dict[str, ModuleType] = {
    "full": full,
    "freeze": freeze,
    "lora": lora,
    "dora": lora,
    "rslora": lora,
    "qlora": lora,
    "ia3": ia3,
    "prompt": prompt_learning,
    "prefix": prompt_learning,
    "adapter": bottleneck,
}

# A learning rate that works for each method on the default model and bundled data (300-ish steps, batch 8);
# used by `tunelab compare-methods`, and a starting point for any new task. Fewer trained parameters that each
# move more of the output (IA3 scales, virtual tokens) want larger steps; full fine-tuning wants small ones.
RECOMMENDED_LR: dict[str, float] = {
    "full": 3e-5,
    "freeze": 5e-5,
    "lora": 5e-4,
    "dora": 5e-4,
    "rslora": 2e-4,
    "qlora": 5e-4,
    "ia3": 5e-3,
    "prompt": 3e-2,
    "prefix": 1e-2,
    "adapter": 1e-3,
}


def has_frozen_base(name: str) -> bool:
    """Whether the method can switch its trained part off, giving the base model back for free."""
    return hasattr(METHODS[name], "without_adapter")


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights count as the values they hold."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if getattr(param, "quant_state", None) is not None or param.dtype == torch.uint8:
            n *= 2  # two 4-bit values per stored byte
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def merged_copy(model, method_name: str, dtype: torch.dtype):
    """A plain copy of the trained model, its adapter folded into the weights, cast to `dtype`; None when the
    method cannot fold (CANNOT_MERGE) or its base is quantised (QLoRA). What GRPO samples from: on the default
    model (2 CPU cores, bf16) it decoded 32 completions in 10.3 s where the live LoRA model under autocast
    took 14.5-19.4 s, for 1.3 s of copying."""
    if getattr(METHODS[method_name], "CANNOT_MERGE", None) or method_name == "qlora":
        return None
    return folded_copy(model, dtype)


def folded_copy(model, dtype: torch.dtype):
    """An inference-only copy of `model` (see fold_for_inference); the original is untouched.

    Weights no adapter merges into are copied already cast to `dtype`, and training's cached weight casts are not
    copied at all (the copy drops them): only adapter layers are copied in full precision, to be merged there as
    before. On the main job's evaluation after 6 LoRA steps (AMD EPYC, 2026-12-05) the copy took the process from
    1771 to 2036 MB where copying the whole float32 model (and the cached bf16 casts) took it from 1774 to 2170,
    and the run's peak, set by the evaluation after training, went from 2898 to 2744 MB. Full fine-tuning copies
    nothing in float32."""
    import copy

    from peft.tuners.tuners_utils import BaseTunerLayer

    adapter_parameters = {id(p) for m in model.modules() if isinstance(m, BaseTunerLayer) for p in m.parameters()}
    memo: dict[int, object] = {}
    for parameter in model.parameters():
        if id(parameter) not in adapter_parameters and parameter.is_floating_point():
            cast = parameter.detach().to(dtype)
            memo[id(parameter)] = torch.nn.Parameter(cast, requires_grad=parameter.requires_grad)
    for module in model.modules():  # training's cached weight casts (fused LoRA, frozen head): shared, not copied;
        cached = module.__dict__.get("_tunelab_weight")  # unfuse_lora_layers drops them from the copy
        if cached is not None:
            memo[id(cached)] = cached
    return fold_for_inference(copy.deepcopy(model, memo), dtype)


def fold_for_inference(model, dtype: torch.dtype):
    """`model`, modified in place, for inference only: any adapter folded in, cast to `dtype`, in eval mode, bf16
    matmul weights packed for oneDNN on CPU (models/packed_linear.py). Its parameters keep requires_grad: bf16
    weights without it took a slower CPU matmul path, 40% slower decoding on the default model (Xeon with AMX,
    torch 2.13).

    tunelab's training-time patches are dropped: fused LoRA forwards are closures over the original modules, so a
    plain deepcopy kept calling into the trained model (on the default model its head ran the original's weight
    through a batched matmul that copied it once per row: 3.3 GB and 9 s for a 60-row prefill); cached weight
    casts, compiled layer classes and NEFTune's embedding forward go too."""
    from tunelab.methods.fused_lora import unfuse_lora_layers
    from tunelab.models.fused_ops import restore_layers
    from tunelab.models.neftune import drop_noise
    from tunelab.models.packed_linear import pack_linears

    unfuse_lora_layers(model)
    restore_layers(model)
    drop_noise(model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model = model.to(dtype).eval()
    pack_linears(model)  # no-op unless bf16 on a CPU whose oneDNN runs bf16
    return model


def can_fold(model) -> bool:
    """Whether fold_for_inference applies: not sharded, not quantised, no virtual tokens (prompt and prefix tuning
    add them in PEFT's forward) and no forward hooks (bottleneck adapters' hooks may hold the original modules,
    which a copy would still call)."""
    from tunelab.models.logprobs import uses_virtual_tokens
    from tunelab.train.sharding import is_sharded

    if is_sharded(model) or uses_virtual_tokens(model):
        return False
    if any(p.dtype == torch.uint8 or getattr(p, "quant_state", None) is not None for p in model.parameters()):
        return False
    return not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())
