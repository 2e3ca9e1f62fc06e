"""LoRA, DoRA, rsLoRA and QLoRA (LoRA on a frozen 4- or 8-bit bitsandbytes base), through PEFT."""

from __future__ import annotations

from tunelab.config import LoraMethod, QLoraMethod
from tunelab.models.load import quantization_config


def task_type(model) -> str:
    """PEFT's task type for the model: a scalar-head reward model keeps its head trainable and saved with the
    adapter (SEQ_CLS), a language model does not (CAUSAL_LM)."""
    return "SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else "CAUSAL_LM"


def peft_config(config: LoraMethod | QLoraMethod, task: str = "CAUSAL_LM"):
    from peft import LoraConfig

    return LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        use_dora=config.name == "dora",
        use_rslora=config.name == "rslora",
        task_type=task,
    )


def apply(model, config: LoraMethod | QLoraMethod):
    from peft import get_peft_model, prepare_model_for_kbit_training

    if isinstance(config, QLoraMethod):
        # Casts norms and the head to fp32 and freezes the quantised base; no gradient checkpointing.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_4bit_weights_differentiable(model)
    return get_peft_model(model, peft_config(config, task_type(model)))


def keep_4bit_weights_differentiable(model) -> None:
    """On AVX512-BF16 CPUs bitsandbytes repacks a 4-bit weight for speed the first time it runs in eval mode
    without grad (our evaluation before and during training), and from then on routes it through a kernel
    with no backward: gradients stop flowing through every frozen base layer, silently. Training models
    keep the differentiable layout."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def without_adapter(model):
    """A context in which the model computes what its base computes (the reference of preference objectives)."""
    return model.disable_adapter()


def quantization(config, compute_dtype):
    return quantization_config(config, compute_dtype) if isinstance(config, QLoraMethod) else None
