"""What `accelerate launch` asked for, read from the environment it gives each process, as a `train.distributed`.

tunelab runs its own training loop on torch.distributed, so accelerate's launcher only starts the processes; the
sharding its config file chose (FSDP, or DeepSpeed ZeRO) arrives as environment variables. Each is mapped to the
torch-native strategy that partitions memory the same way, and said so, instead of being silently ignored:
ZeRO-3 and FSDP full sharding -> `fsdp`; ZeRO-1/2 and FSDP without resharding after forward -> `zero2`; ZeRO-0
-> `ddp`. DeepSpeed's own engine is never used; offloading to CPU memory is refused rather than skipped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import ConfigError

TRUE = ("1", "true", "yes")


@dataclass(frozen=True)
class LauncherSharding:
    strategy: str
    """The train.distributed value that partitions memory as the launcher's config asked."""
    asked: str
    """What the launcher's config asked for, in its own words (for the notice and for conflicts)."""


def launcher_sharding(environ: Mapping[str, str]) -> LauncherSharding | None:
    """The sharding `accelerate launch` asked for, or None when it asked for none (or another launcher ran us)."""
    if environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in TRUE:
        stage, offload = _deepspeed_settings(environ)
        if offload:
            raise ConfigError(f"accelerate's DeepSpeed config offloads {offload} to CPU memory, which tunelab does "
                              "not do (its loop keeps them on the device); remove the offload from the accelerate "
                              "config", where="accelerate launch")
        strategy = {0: "ddp", 1: "zero2", 2: "zero2", 3: "fsdp"}.get(stage)
        if strategy is None:
            raise ConfigError(f"accelerate's DeepSpeed config asks for ZeRO stage {stage}; stages 0-3 exist",
                              where="accelerate launch")
        return LauncherSharding(strategy, f"DeepSpeed ZeRO-{stage}")
    if environ.get("ACCELERATE_USE_FSDP", "").lower() in TRUE:
        if environ.get("FSDP_OFFLOAD_PARAMS", "").lower() in TRUE:
            raise ConfigError("accelerate's FSDP config offloads parameters to CPU memory (fsdp_offload_params), "
                              "which tunelab does not do; set it to false", where="accelerate launch")
        # FSDP2 configs say true/false; FSDP1 configs name a sharding strategy in the same variable.
        reshard = environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower()
        full = reshard in (*TRUE, "full_shard", "hybrid_shard")
        return LauncherSharding("fsdp" if full else "zero2",
                                "FSDP, resharding after forward" if full else "FSDP, not resharding after forward")
    return None


def _deepspeed_settings(environ: Mapping[str, str]) -> tuple[int, str]:
    """(ZeRO stage, what is offloaded or ''), from the DeepSpeed JSON file accelerate names or its own fields."""
    config_file = environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if config_file and config_file.lower() != "none":
        try:
            zero = json.loads(Path(config_file).read_text()).get("zero_optimization", {})
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot read DeepSpeed config {config_file}: {err}", where="accelerate launch") from None
        offloaded = [what for what in ("optimizer", "param")
                     if str(zero.get(f"offload_{what}", {}).get("device", "none")).lower() not in ("none", "")]
        return int(zero.get("stage", 0)), " and ".join(offloaded)
    offloaded = [what for what in ("optimizer", "param")
                 if environ.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{what.upper()}_DEVICE", "none").lower() != "none"]
    return int(environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")), " and ".join(offloaded)


def apply_launcher_sharding(train_config, environ: Mapping[str, str]) -> tuple[object, str | None]:
    """(the train config with the launcher's sharding, a notice to print or None). A config that chose another
    strategy itself is refused with both named: which one the user meant cannot be guessed."""
    asked = launcher_sharding(environ)
    if asked is None:
        return train_config, None
    if "distributed" in train_config.model_fields_set and train_config.distributed != asked.strategy:
        raise ConfigError(f"the config says train.distributed={train_config.distributed} but accelerate launch "
                          f"asked for {asked.asked} (train.distributed={asked.strategy}); make them agree",
                          where="train.distributed")
    notice = f"accelerate launch asked for {asked.asked}: training with train.distributed={asked.strategy}"
    if asked.asked.startswith("DeepSpeed"):
        notice += ", the torch-native equivalent (tunelab runs its own loop; DeepSpeed's engine is not used)"
    return train_config.model_copy(update={"distributed": asked.strategy}), notice
