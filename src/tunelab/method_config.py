"""The `method:` section of a run config: how training adapts the model, one schema per method (a union on
`name`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from tunelab.config_base import Strict


class FullMethod(Strict):
    name: Literal["full"]


class FreezeMethod(Strict):
    name: Literal["freeze"]
    trainable_layers: int = Field(2, ge=0)
    """Train the last N transformer blocks; every other weight stays frozen."""
    trainable_modules: list[str] = []
    """Also train parameters whose name contains one of these (e.g. `lm_head`, `norm`)."""


class LoraMethod(Strict):
    """LoRA, and its variants that differ in one switch: DoRA (weight-decomposed) and rsLoRA
    (rank-stabilised scale alpha / sqrt(r))."""

    name: Literal["lora", "dora", "rslora"]
    r: int = Field(16, ge=1)
    """LoRA rank."""
    alpha: float = 32
    """LoRA scaling numerator (scale = alpha / r; alpha / sqrt(r) for rslora)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA input; off by default: on CPU it costs ~20% of step time (bench/, 8 steps).
    Raise it (0.05-0.1) for small datasets trained for several epochs."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt, or `all-linear` for every linear layer except the output head."""
    loraplus_lr_ratio: float | None = Field(None, ge=1)
    """LoRA+: the B matrices (and 1-d trainable weights, as PEFT's create_loraplus_optimizer groups them) learn
    at this many times train.lr, the A matrices at train.lr. The paper suggests 16, with a train.lr about half
    a plain LoRA's. Off when absent."""


class QLoraMethod(Strict):
    """LoRA on a frozen base quantised by bitsandbytes (4-bit nf4/fp4, or 8-bit)."""

    name: Literal["qlora"]
    r: int = Field(16, ge=1)
    alpha: float = 32
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    loraplus_lr_ratio: float | None = Field(None, ge=1)
    """LoRA+ (see the lora method): B matrices at this many times train.lr."""
    bits: Literal[4, 8] = 4
    """Bits of the frozen, quantised base model (bitsandbytes)."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    """Quantise the quantisation constants too (4-bit only)."""


class IA3Method(Strict):
    """IA3: learned scaling vectors on keys, values and feed-forward activations (fewest parameters)."""

    name: Literal["ia3"]
    target_modules: list[str] | None = None
    """Modules to scale; PEFT's defaults for the architecture when absent."""
    feedforward_modules: list[str] | None = None
    """Which of target_modules are feed-forward (scaled on their input)."""


class PromptMethod(Strict):
    """Prompt tuning: trainable virtual token embeddings put before every input; the model is frozen."""

    name: Literal["prompt"]
    num_virtual_tokens: int = Field(20, ge=1)
    init_text: str | None = None
    """Initialise the virtual tokens from this text's embeddings (random when absent)."""


class PrefixMethod(Strict):
    """Prefix tuning: trainable key/value prefixes in every attention layer; the model is frozen."""

    name: Literal["prefix"]
    num_virtual_tokens: int = Field(20, ge=1)
    projection: bool = False
    """Reparameterise the prefixes through a small MLP (more stable, more parameters while training)."""
    projection_hidden: int = Field(256, ge=1)


class AdapterMethod(Strict):
    """Bottleneck adapters after attention and/or MLP blocks; the base is frozen (tunelab's own module)."""

    name: Literal["adapter"]
    reduction_factor: int = Field(16, ge=1)
    """Bottleneck width = hidden size / reduction_factor."""
    placement: Literal["attention", "mlp", "both"] = "both"
    activation: Literal["relu", "gelu", "silu"] = "relu"


MethodConfig = Annotated[
    FullMethod | FreezeMethod | LoraMethod | QLoraMethod | IA3Method | PromptMethod | PrefixMethod | AdapterMethod,
    Field(discriminator="name"),
]


METHOD_CLASSES = {
    "full": FullMethod,
    "freeze": FreezeMethod,
    "lora": LoraMethod,
    "dora": LoraMethod,
    "rslora": LoraMethod,
    "qlora": QLoraMethod,
    "ia3": IA3Method,
    "prompt": PromptMethod,
    "prefix": PrefixMethod,
    "adapter": AdapterMethod,
}
"""The schema of each method name (dora and rslora are LoRA with a switch)."""
