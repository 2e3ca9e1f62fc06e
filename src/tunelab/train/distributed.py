"""Data-parallel training on torch.distributed: several processes, one per device (or CPU share), one model each.

Every process builds the same data and the same epoch plan; each optimiser step takes world_size x batch_size
rows, and each process trains on its own contiguous share. Gradients are averaged by DistributedDataParallel once
per optimiser step (never during accumulation), and the loss is divided by the trained-token (or pair) count of
the whole step across processes, so N processes with batch B train exactly like one process with batch N x B.
Only the main process writes files, evaluates and logs.

The launcher (torchrun, `accelerate launch`, or `tunelab train --nproc N`, which runs torchrun) sets RANK,
WORLD_SIZE, LOCAL_RANK and the rendezvous; without them everything here is a no-op for one process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from itertools import accumulate
from typing import Any

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT = timedelta(hours=6)
"""How long the other processes wait for the main one (it evaluates and generates alone)."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """The main process runs the block first (it fills caches: converted models, tokenised data), then the
        others, which find them; if it fails, the others run into the same error themselves."""
        if not self.is_main:
            self.barrier()
        try:
            yield
        finally:
            if self.is_main:
                self.barrier()

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over processes (float64, so token counts stay exact)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(list(values), dtype=torch.float64, device=_collective_device())
        dist.all_reduce(tensor)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """True on every process when it is True on any."""
        return bool(self.sum([float(flag)])[0]) if self.distributed else flag

    def share(self, rows: list) -> list:
        """This process's contiguous share of a step's rows: sizes differ by at most one, earlier ranks first."""
        if not self.distributed:
            return rows
        base, extra = divmod(len(rows), self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return rows[start:start + base + (1 if self.rank < extra else 0)]

    def gather(self, obj: object) -> list[object]:
        """Every process's `obj`, in rank order (on every process)."""
        if not self.distributed:
            return [obj]
        gathered: list[object] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def gather_rows(self, columns: dict[str, torch.Tensor],
                    sizes: Sequence[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(every process's rows of `columns`, in the order one process holding the whole step has them; where this
        process's rows lie in that order [n]). Each column holds this process's n rows [n, ...] in chunks of
        `sizes` (a step's micro-batches, the same number on every process): chunk i of every process, rank by rank,
        comes before chunk i + 1, as Ranks.share cuts each micro-batch. Gathered rows come back on the CPU."""
        if not self.distributed:
            return columns, torch.arange(sum(sizes))
        everyone = self.gather((list(sizes), {name: column.detach().cpu() for name, column in columns.items()}))
        starts = [[0, *accumulate(their_sizes)] for their_sizes, _ in everyone]
        pieces: dict[str, list[torch.Tensor]] = {name: [] for name in columns}
        positions, at = [], 0
        for chunk in range(len(sizes)):
            for rank, (their_sizes, theirs) in enumerate(everyone):
                start, size = starts[rank][chunk], their_sizes[chunk]
                for name, parts in pieces.items():
                    parts.append(theirs[name][start:start + size])
                if rank == self.rank:
                    positions.append(torch.arange(at, at + size))
                at += size
        return {name: torch.cat(parts) for name, parts in pieces.items()}, torch.cat(positions)

    def broadcast(self, obj: object) -> object:
        """The main process's `obj`, on every process."""
        if not self.distributed:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]


def launched_ranks() -> Ranks:
    """The ranks a launcher gave this process (none: one process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Ranks()
    return Ranks(rank=int(os.environ["RANK"]), world_size=world_size,
                 local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def start(ranks: Ranks) -> torch.device:
    """Join the process group (NCCL on CUDA, else gloo) and return this process's device. A process other than the
    main one stops writing to standard output from here (its errors still show): under torchrun or `accelerate
    launch` every process has the terminal, and the main one speaks for all (see launch.quiet_standard_output)."""
    if not ranks.is_main:
        from tunelab.train.launch import quiet_standard_output

        quiet_standard_output()
    if torch.cuda.is_available():
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if ranks.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT,
                                rank=ranks.rank, world_size=ranks.world_size)
    return device


def stop(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


class ObjectiveModule(torch.nn.Module):
    """The model with its objective's loss as forward, so that a data-parallel wrapper sees (and hooks) the whole
    computation whatever the objective calls inside the model."""

    def __init__(self, model: torch.nn.Module, objective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: dict[str, torch.Tensor] | Callable[[], Any]):
        """(loss_sum, metrics) of a micro-batch; or, given a function, its result (whatever else must run the
        model, such as evaluation, runs here when the model is sharded: see train/sharding.py)."""
        if callable(batch):
            return batch()
        return self.objective.loss_sum(self.model, batch)


def loss_module(model: torch.nn.Module, objective, ranks: Ranks, device: torch.device,
                strategy: str = "ddp") -> torch.nn.Module:
    """What the loop calls for a micro-batch's (loss_sum, metrics): with several processes DDP-wrapped, or, with
    strategy `fsdp` or `zero2`, sharded (FSDP2)."""
    module = ObjectiveModule(model, objective)
    if not ranks.distributed:
        return module
    if strategy in ("fsdp", "zero2"):
        from tunelab.train.sharding import shard

        shard(module, model, reshard_after_forward=strategy == "fsdp")
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False)


@contextlib.contextmanager
def accumulating(module: torch.nn.Module, last: bool) -> Iterator[None]:
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP2) on every micro-batch but the step's last."""
    if last:
        yield
    elif hasattr(module, "no_sync"):
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield
