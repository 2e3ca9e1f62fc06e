"""FSDP2 (`train.distributed: fsdp`): each decoder block's parameters sharded across the processes, and how
weights and optimiser state move between the shards and whole tensors on disk.

`fully_shard` goes on every decoder block and on the ObjectiveModule around the model (the root), not on the
model itself: the objectives call the decoder and the output head separately, so only a root whose forward wraps
the whole computation unshards the embedding, final norm and head for it. Anything else that runs the model
(evaluation, generation) runs inside the root's forward too (ObjectiveModule accepts a function) and on every
process, because every forward gathers the shards collectively.
"""

from __future__ import annotations

import sys

import torch

from tunelab.config import ROLLOUT_OBJECTIVES
from tunelab.errors import ConfigError

# torch.distributed.checkpoint and .tensor take ~1 s to import: only runs that shard pay it (a DTensor can exist
# only once torch.distributed.tensor has been imported, which fully_shard does).


def _dtensor_type():
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def _state_dict_api():
    from torch.distributed.checkpoint import state_dict

    return state_dict

SHARDED = ("fsdp", "zero2")
"""The train.distributed strategies that shard the model with FSDP2."""

FSDP_METHODS = ("full", "freeze", "lora", "dora", "rslora")
"""Methods whose parameters FSDP2 can shard: one storage dtype per block (4-bit weights cannot be, trl#1723) and
no forward of PEFT's own around the model (prompt and prefix tuning)."""


def check_several_processes(config, ranks) -> None:
    """Refuse, before anything is written, what cannot train in several processes yet, saying why."""
    if not ranks.distributed:
        return
    if config.train.distributed not in SHARDED:
        return
    if config.train.optimizer != "adamw":
        raise ConfigError(f"train.optimizer={config.train.optimizer} (bitsandbytes) cannot update sharded parameters; "
                          "use train.optimizer=adamw (FSDP already splits its state across the processes) or "
                          "train.distributed=ddp", where="train.optimizer")
    if config.objective.name in ROLLOUT_OBJECTIVES:
        raise ConfigError(f"objective.name={config.objective.name} cannot shard the model: each process samples "
                          "its own prompts, and completions of different lengths would break the processes' "
                          "lock-step forwards; use train.distributed=ddp", where="train.distributed")
    if config.objective.name == "distill" and config.objective.lmbda > 0:
        raise ConfigError("objective.lmbda samples the student's replies, which a sharded student cannot decode "
                          "outside its forward (and processes sampling different lengths would break the lock-step "
                          "forwards); use train.distributed=ddp", where="train.distributed")
    if config.method.name not in FSDP_METHODS:
        raise ConfigError(f"FSDP shards {', '.join(FSDP_METHODS)}; '{config.method.name}' cannot be sharded "
                          "(4-bit weights mix storage dtypes in a block, trl#1723; prompt methods run PEFT's own "
                          "forward): use train.distributed=ddp", where="train.distributed")
    if config.train.keep_best or config.train.early_stopping_patience:
        raise ConfigError("keeping the best weights (train.keep_best, early stopping) is not done under FSDP yet; "
                          "use train.distributed=ddp", where="train.distributed")


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a (possibly PEFT-wrapped) decoder: the longest ModuleList named `layers`."""
    found = [module for name, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks")]
    if not found:
        raise ValueError("found no decoder blocks to shard (no ModuleList named layers)")
    return list(max(found, key=len))


def shard(root: torch.nn.Module, model: torch.nn.Module, *, reshard_after_forward: bool = True) -> None:
    """FSDP2 on every decoder block of `model`, then on `root` (what the loop calls). Without resharding after
    forward, a block's gathered parameters stay until its backward (ZeRO-2's peak memory, one gather per step)."""
    from torch.distributed.fsdp import fully_shard

    for block in decoder_blocks(model):
        fully_shard(block, reshard_after_forward=reshard_after_forward)
    fully_shard(root, reshard_after_forward=reshard_after_forward)


def _fsdp_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    fsdp = sys.modules.get("torch.distributed.fsdp")  # imported by fully_shard: nothing is sharded without it
    return [] if fsdp is None else [m for m in module.modules() if isinstance(m, fsdp.FSDPModule)]


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether fully_shard went on `module` or inside it (its parameters may be gathered whole at the moment)."""
    return bool(_fsdp_modules(module))


def reshard(root: torch.nn.Module) -> None:
    """Every FSDP module under `root` back to its shards: blocks that do not reshard after forward (`zero2`) keep
    whole parameters after a forward without backward (evaluation), and state must be read from the shards."""
    for module in _fsdp_modules(root):
        module.reshard()


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a possibly sharded one (collective for a DTensor: every process must call it)."""
    dtensor = _dtensor_type()
    return tensor.full_tensor() if dtensor is not None and isinstance(tensor, dtensor) else tensor


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter whole, on the CPU (collective when sharded)."""
    reshard(model)
    return {name: whole(p.detach()).to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


def optimizer_state(root: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimiser's state with whole tensors, keyed by parameter name (collective)."""
    reshard(root)
    api = _state_dict_api()
    return api.get_optimizer_state_dict(root, optimizer, options=api.StateDictOptions(full_state_dict=True))


def load_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Whole tensors from a checkpoint into this process's shards."""
    reshard(model)
    api = _state_dict_api()
    api.set_model_state_dict(model, tensors, options=api.StateDictOptions(full_state_dict=True, strict=False))


def load_optimizer(root: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    reshard(root)
    api = _state_dict_api()
    api.set_optimizer_state_dict(root, optimizer, state, options=api.StateDictOptions(full_state_dict=True))


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict (collective), for saving the final weights."""
    reshard(model)
    api = _state_dict_api()
    return api.get_model_state_dict(model, options=api.StateDictOptions(full_state_dict=True, cpu_offload=True))
