"""LoRA, DoRA, rsLoRA and QLoRA (LoRA on a frozen 4- or 8-bit bitsandbytes base), through PEFT."""

from __future__ import annotations

from tunelab.config import LoraMethod, QLoraMethod
from tunelab.models.load import quantization_config


def peft_config(config: LoraMethod | QLoraMethod):
    from peft import LoraConfig

    return LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        use_dora=config.name == "dora",
        use_rslora=config.name == "rslora",
        task_type="CAUSAL_LM",
    )


def apply(model, config: LoraMethod | QLoraMethod):
    from peft import get_peft_model, prepare_model_for_kbit_training

    if isinstance(config, QLoraMethod):
        # Casts norms and the head to fp32 and freezes the quantised base; no gradient checkpointing.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, peft_config(config))


def quantization(config, compute_dtype):
    return quantization_config(config, compute_dtype) if isinstance(config, QLoraMethod) else None
