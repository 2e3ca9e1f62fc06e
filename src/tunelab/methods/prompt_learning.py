"""Prompt tuning and prefix tuning through PEFT. Neither changes the model's weights, so neither merges:
the learned virtual tokens / prefixes must travel with the adapter."""

from __future__ import annotations

from tunelab.config import PrefixMethod, PromptMethod

CANNOT_MERGE = (
    "prompt and prefix tuning learn extra inputs (virtual tokens or attention prefixes), not weight changes, "
    "so there is nothing to fold into the model; use the run directory itself with generate/chat"
)


def apply(model, config: PromptMethod | PrefixMethod):
    from peft import get_peft_model

    return get_peft_model(model, peft_config(model, config))


def peft_config(model, config: PromptMethod | PrefixMethod):
    from peft import PrefixTuningConfig, PromptTuningConfig, PromptTuningInit

    if isinstance(config, PrefixMethod):
        return PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=config.num_virtual_tokens,
            prefix_projection=config.projection,
            encoder_hidden_size=config.projection_hidden,
        )
    if config.init_text:
        return PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=config.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.TEXT,
            prompt_tuning_init_text=config.init_text,
            tokenizer_name_or_path=model.name_or_path,
        )
    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=config.num_virtual_tokens)


def quantization(config, compute_dtype):
    return None
