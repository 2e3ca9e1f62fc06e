"""`tunelab serve`: an OpenAI-compatible API (app.py) over a continuously batching engine (engine.py; prompt- and
prefix-tuning runs decode one request at a time)."""

from __future__ import annotations

from pathlib import Path

import torch

from tunelab.errors import ConfigError
from tunelab.infer.serve.app import Route, Served, create_app
from tunelab.infer.serve.engine import Engine

__all__ = ["Served", "create_app", "load_served"]

SHARED_BASE_METHODS = ("lora", "dora", "rslora")
"""Runs that can share one base in a batch: PEFT applies a LoRA-family adapter per row (`adapter_names`)."""


def load_served(spec: str, *, adapters: dict[str, str] | None = None, max_batch: int = 8, max_waiting: int = 64,
                device: str | None = None, precision: str = "auto", start_engine: bool = True,
                compile_steps: bool = False, lookup: bool = True) -> Served:
    """A run directory or model spec loaded for serving, named as clients must name it in `model` (the run
    folder's name, or the spec as given), plus LoRA runs on the same base under the names given in `adapters`,
    all answered by one model in memory: each request's rows use its own adapter (or none), in one batch.
    `precision` `auto` decodes as `tunelab generate` does: in what the run trained in (auto's choice for a model
    that is not a run; see auto_precision with `adapters`). With start_engine=False the caller runs the engine
    (`served.engine.run_here()`). `compile_steps` compiles the one-token decoding step where it can
    (models/compiled_step.py; `served.engine.compiled` says whether it did); `lookup` drafts tokens for requests
    decoded alone and in batches of up to 8 (infer/lookup.py). Prompt- and prefix-tuning runs decode one request
    at a time (engine.py), as `tunelab generate` does, in `precision` under autocast where it is bf16."""
    from tunelab.infer.generate import context_length
    from tunelab.infer.load import in_compute_dtype, is_run_dir, load_generator
    from tunelab.models.logprobs import uses_virtual_tokens

    loaded = load_generator(spec, device)
    path = Path(spec)
    is_run = path.is_dir() and is_run_dir(path)
    name = path.resolve().name if is_run else str(spec)
    model = loaded.model
    routes = {name: Route(loaded.renderer, "default" if hasattr(model, "peft_config") else None)}
    adapter_configs: list = []
    if adapters:
        model, routes, adapter_configs = _with_adapters(loaded, spec, name, routes, adapters)
    if precision == "auto":
        precision = auto_precision(loaded, adapter_configs)
    model = in_compute_dtype(model, precision, keep_adapters=bool(adapters))
    context = context_length(model) or 2048  # less the virtual tokens of prompt or prefix tuning
    virtual = uses_virtual_tokens(model)
    engine = Engine(model, loaded.tokenizer, max_batch=max_batch, max_waiting=max_waiting, start=start_engine,
                    compile_steps=compile_steps, lookup=lookup, precision=precision)
    autocast = virtual and precision == "bf16" and next(model.parameters()).dtype == torch.float32
    return Served(routes, engine, context, precision="bf16" if autocast else serving_precision(model))


def auto_precision(loaded, adapter_configs: list) -> str:
    """What `--precision auto` serves in: what the served runs trained in, float32 if any of them did, so each
    answers as it does alone (`tunelab generate` on it); auto's choice for the device when none is a run. A plain
    base with float32 --adapter runs decoded in bf16 ended a reply one token early where a run's top two
    logits were 0.004 apart."""
    from tunelab.infer.load import compute_precision
    from tunelab.train.precision import resolve_precision

    device = next(loaded.model.parameters()).device
    trained = [resolve_precision(config.train.precision, device) for config in adapter_configs]
    if loaded.run_config is not None or not trained:
        trained.append(compute_precision(loaded))
    return "fp32" if "fp32" in trained else trained[0]


def serving_precision(model) -> str:
    dtype = next(model.parameters()).dtype
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}.get(dtype, str(dtype))


def _with_adapters(loaded, spec: str, name: str, routes: dict[str, Route], adapters: dict[str, str]):
    """The served model with every --adapter run loaded onto its base, a route for each, and their run configs."""
    from peft import PeftModel

    from tunelab.config import load_config
    from tunelab.data.template import ChatRenderer
    from tunelab.models.resolve import resolve_model

    primary = loaded.run_config
    configs = []
    if primary is not None and not hasattr(loaded.model, "peft_config"):
        raise ConfigError(f"{spec} holds full weights, not an adapter: --adapter runs need the base model they "
                          "were trained on (serve that, or a LoRA run of it)", where="--adapter")
    if primary is not None and primary.method.name not in SHARED_BASE_METHODS:
        raise ConfigError(f"{spec} is a {primary.method.name} run; only {', '.join(SHARED_BASE_METHODS)} runs share "
                          "a base in one batch", where="--adapter")
    base_path = resolve_model(primary.model if primary is not None else spec)
    model = loaded.model
    for adapter_name, run in adapters.items():
        where = f"--adapter {adapter_name}={run}"
        if adapter_name in routes:
            raise ConfigError(f"the name '{adapter_name}' is already served", where=where)
        run_dir = Path(run)
        if not (run_dir / "adapter_config.json").is_file() or not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"{run} is not a tunelab run directory with an adapter", where=where)
        config = load_config(run_dir / "config.yaml")
        if config.method.name not in SHARED_BASE_METHODS:
            raise ConfigError(f"it is a {config.method.name} run; only {', '.join(SHARED_BASE_METHODS)} runs share a "
                              "base in one batch", where=where)
        if resolve_model(config.model) != base_path:
            raise ConfigError(f"it was trained on {config.model}, not on the served base {base_path}", where=where)
        if isinstance(model, PeftModel):
            model.load_adapter(str(run_dir), adapter_name=adapter_name, is_trainable=False)
        else:
            model = PeftModel.from_pretrained(model, str(run_dir), adapter_name=adapter_name, is_trainable=False)
            routes = {key: Route(route.renderer, "__base__") for key, route in routes.items()}
        routes[adapter_name] = Route(ChatRenderer(loaded.tokenizer, config.data.chat_template), adapter_name)
        configs.append(config)
    model.eval()
    return model, routes, configs
