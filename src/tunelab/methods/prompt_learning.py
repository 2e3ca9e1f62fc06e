"""Prompt tuning and prefix tuning through PEFT. Neither changes the model's weights, so neither merges:
the learned virtual tokens / prefixes must travel with the adapter."""

from __future__ import annotations

import torch

from tunelab.config import PrefixMethod, PromptMethod

CANNOT_MERGE = (
    "prompt and prefix tuning learn extra inputs (virtual tokens or attention prefixes), not weight changes, "
    "so there is nothing to fold into the model; use the run directory itself with generate/chat"
)


PREFIX_INIT_TEXT = "Read the request below carefully, then answer it accurately and concisely."


def apply(model, config: PromptMethod | PrefixMethod):
    from peft import get_peft_model

    if isinstance(config, PrefixMethod) and not config.projection:
        prefix = real_token_prefix(model, config.num_virtual_tokens)
        model = get_peft_model(model, peft_config(model, config))
        model.prompt_encoder[model.active_adapter].embedding.weight.data.copy_(prefix)
        return model
    return get_peft_model(model, peft_config(model, config))


@torch.no_grad()
def real_token_prefix(model, num_virtual_tokens: int) -> torch.Tensor:
    """Initial prefixes: the keys and values the model itself computes for a neutral instruction, in PEFT's
    layout [virtual tokens, layers x (key, value) x kv heads x head dim]. PEFT's default N(0, 1) prefixes are
    far outside the range of real keys and values: on the default model they raised the loss from 1.2 to 12.9
    before the first step, and 25 steps did not bring it back (measured); prefixes from real activations start
    near the base model's loss (Li & Liang 2021 initialise from real words too)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    ids = tokenizer(PREFIX_INIT_TEXT, add_special_tokens=False)["input_ids"]
    ids = (ids * (num_virtual_tokens // len(ids) + 1))[:num_virtual_tokens]
    from tunelab.infer.kv_cache import reserved_cache

    device = next(model.parameters()).device
    cache = reserved_cache(model.config, len(ids))  # every position, also where a sliding window would keep fewer
    model(input_ids=torch.tensor([ids], device=device), cache=cache, use_cache=True)
    per_layer = [torch.cat([layer.keys[0], layer.values[0]], dim=0) for layer in cache.layers]  # [2*kv, T, hd]
    stacked = torch.stack(per_layer)  # [layers, 2*kv_heads, T, head_dim]
    layers, pairs, tokens, head_dim = stacked.shape
    # PEFT views each row as [layers * 2, heads, head_dim] with keys and values alternating per layer.
    rows = stacked.view(layers, 2, pairs // 2, tokens, head_dim).permute(3, 0, 1, 2, 4)
    return rows.reshape(tokens, -1).float()


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


def without_adapter(model):
    """A context in which the model computes what its base computes (the reference of preference objectives)."""
    return model.disable_adapter()


def quantization(config, compute_dtype):
    return None
