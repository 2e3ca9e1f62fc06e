"""IA3 through PEFT: learned rescaling of attention keys/values and feed-forward inputs."""

from __future__ import annotations

from tunelab.config import IA3Method
from tunelab.methods.lora import task_type


def apply(model, config: IA3Method):
    from peft import IA3Config, get_peft_model

    peft_config = IA3Config(
        target_modules=config.target_modules,
        feedforward_modules=config.feedforward_modules,
        task_type=task_type(model),
    )
    return get_peft_model(model, peft_config)


def without_adapter(model):
    """A context in which the model computes what its base computes (the reference of preference objectives)."""
    return model.disable_adapter()


def quantization(config, compute_dtype):
    return None
