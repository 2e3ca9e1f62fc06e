"""Where a training step's time goes: torch.profiler over a few optimiser steps, its ops sorted into matmul,
attention, output head (log-softmax / cross-entropy), casts, other elementwise work (compiled graphs' fused loops
included), allocation and the optimizer, plus what no op accounts for (Python, data, framework).

Used by `train.profile_steps` (the breakdown lands in summary.json and RUN/profile.txt) and by the bench's two
children alike, so tunelab and its peer are measured by the same code. The profiler starts and stops on the
optimiser's step hook, so it needs nothing from the training loop it watches (it works around TRL's too).
On CUDA the categories are computed from the kernels' device time instead of the ops' CPU time.

It also counts the ops a step dispatches (top-level aten calls, whatever they call inside not counted again):
where the device waits on the host, as a small model's GPU step does (~11-20 us of Python and launch a
dispatch on an H200's host), that count, not the FLOPs, sets the step time.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

CATEGORIES = ("matmul", "attention", "head", "casts", "elementwise", "allocation", "optimizer", "unaccounted")

_MATMUL = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::_int_mm",
           "aten::_weight_int4pack_mm", "aten::_weight_int8pack_mm", "aten::mkldnn_linear")
_ATTENTION = ("aten::_softmax", "aten::_softmax_backward_data", "aten::_scaled_dot_product",
              "aten::_flash_attention", "aten::_efficient_attention")
_HEAD = ("aten::_log_softmax", "aten::_log_softmax_backward_data", "aten::nll_loss", "aten::cross_entropy")
_CASTS = ("aten::copy_", "aten::_to_copy")
_ALLOCATION = ("aten::empty", "aten::empty_strided", "aten::resize_", "aten::zeros", "aten::zero_")


_COMPILED = "## Call CompiledFxGraph"
"""A torch.compile'd graph (train.kernels: compiled): its self time is inductor's fused loops, its matmuls are
aten ops of their own."""
_CPU_WORK = ("aten::", _COMPILED)


def category(name: str, under_optimizer: bool) -> str:
    if under_optimizer:
        return "optimizer"
    if name.startswith(_COMPILED):
        return "elementwise"
    if name.startswith(_MATMUL):
        return "matmul"
    if name.startswith(_ATTENTION):
        return "attention"
    if name.startswith(_HEAD):
        return "head"
    if name in _CASTS:
        return "casts"
    if name in _ALLOCATION:
        return "allocation"
    return "elementwise"


def kernel_category(name: str) -> str:
    lowered = name.lower()
    # attention first: its kernels are cutlass templates too (fmha_cutlassB_...)
    if any(word in lowered for word in ("flash", "fmha", "attention", "softmax", "sdpa")):
        return "attention" if "log_softmax" not in lowered else "head"
    if any(word in lowered for word in ("gemm", "cutlass", "cublas", "matmul", "sm90_xmma", "nvjet")):
        return "matmul"
    if "copy" in lowered or "cast" in lowered:
        return "casts"
    if "adam" in lowered or "foreach" in lowered:
        return "optimizer"
    return "elementwise"


@dataclass
class StepBreakdown:
    steps: int
    seconds: float
    """Wall time of the profiled steps."""
    by_category: dict[str, float] = field(default_factory=dict)
    """Seconds per category over the profiled steps (unaccounted: wall time no op covers)."""
    top_ops: list[tuple[str, float]] = field(default_factory=list)
    device_time: bool = False
    """True on CUDA: categories are kernels' device time, and unaccounted is the device idle, waiting on the host
    (Python, kernel launches, data)."""
    ops_dispatched: int = 0
    """Top-level aten ops over the profiled steps, the optimizer's included."""
    top_dispatched: list[tuple[str, int]] = field(default_factory=list)

    def shares(self) -> dict[str, float]:
        return {name: seconds / self.seconds for name, seconds in self.by_category.items()} if self.seconds else {}

    def to_json(self) -> dict:
        return {"steps": self.steps, "seconds_per_step": self.seconds / max(1, self.steps),
                "share": {k: round(v, 4) for k, v in self.shares().items()},
                "seconds": {k: round(v, 4) for k, v in self.by_category.items()},
                "non_matmul_share": round(1 - self.shares().get("matmul", 0.0), 4), "device_time": self.device_time,
                "top_ops": [[name, round(seconds, 4)] for name, seconds in self.top_ops],
                "ops_per_step": round(self.ops_dispatched / max(1, self.steps)),
                "top_dispatched_per_step": [[name, round(count / max(1, self.steps))]
                                            for name, count in self.top_dispatched]}

    def render(self) -> str:
        shares = self.shares()
        measured = ("kernels' device time; unaccounted: the device idle, waiting on the host" if self.device_time
                    else "ops' self time on the CPU; unaccounted: Python, data, framework")
        lines = [f"{self.steps} profiled steps, {self.seconds / max(1, self.steps):.3f} s each ({measured})"]
        lines += [f"  {name:<12} {100 * shares.get(name, 0.0):5.1f}%" for name in CATEGORIES]
        lines += ["  top ops (self time, s):"] + [f"    {name:<44} {seconds:.3f}" for name, seconds in self.top_ops]
        steps = max(1, self.steps)
        lines += [f"  ops dispatched a step (top-level aten calls): {self.ops_dispatched / steps:.0f}"]
        lines += [f"    {name:<44} {count / steps:.0f}" for name, count in self.top_dispatched]
        return "\n".join(lines)


def step_profiler(count: int, steps_left: int, is_main: bool):
    """A StepProfiler over `count` steps from the third (the second when the run is shorter), on the main process
    only; a no-op context when not asked for or the run has too few steps."""
    first = 3 if steps_left >= count + 2 else 2
    if not count or not is_main or steps_left < first + count - 1:
        return contextlib.nullcontext()
    return StepProfiler(first, count)


class StepProfiler:
    """Profiles optimiser steps `first` .. `first + count - 1` (1-based) of whatever trains in this process.
    Enter before training; `breakdown` is set once the last profiled step ends."""

    def __init__(self, first: int = 3, count: int = 3) -> None:
        if first < 2 or count < 1:
            raise ValueError("profile from step 2 on (the step before the first profiled one warms the profiler)")
        self.first, self.count = first, count
        activities = [torch.profiler.ProfilerActivity.CPU]
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        schedule = torch.profiler.schedule(wait=first - 2, warmup=1, active=count, repeat=1)
        self.profiler = torch.profiler.profile(activities=activities, schedule=schedule,
                                               on_trace_ready=self._collect)
        self.step_ends: list[float] = []
        self.breakdown: StepBreakdown | None = None
        self._hook = None

    def __enter__(self) -> StepProfiler:
        self.profiler.__enter__()
        self._hook = register_optimizer_step_post_hook(self._on_step)
        return self

    def __exit__(self, *exc) -> None:
        if self._hook is not None:
            self._hook.remove()
        self.profiler.__exit__(*exc)

    def _on_step(self, optimizer, args, kwargs) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.step_ends.append(time.perf_counter())
        if len(self.step_ends) <= self.first + self.count - 1:
            self.profiler.step()

    def _collect(self, profiler) -> None:
        last = self.first + self.count - 1
        if len(self.step_ends) < last:
            return
        wall = self.step_ends[last - 1] - self.step_ends[self.first - 2]
        self.breakdown = summarise(profiler.events(), wall, self.count, self.cuda)


def summarise(events, wall_seconds: float, steps: int, cuda: bool) -> StepBreakdown:
    totals = dict.fromkeys(CATEGORIES, 0.0)
    per_op: dict[str, float] = {}
    dispatched: dict[str, int] = {}
    for event in events:
        if event.device_type == torch.autograd.DeviceType.CPU and _top_level_op(event):
            dispatched[event.name] = dispatched.get(event.name, 0) + 1
        if cuda:
            # user annotations (ProfilerStep#, Optimizer.step#...) also have device time: the whole span, no kernel
            if event.device_type != torch.autograd.DeviceType.CUDA or event.is_user_annotation:
                continue
            seconds = event.self_device_time_total / 1e6
            kind = kernel_category(event.name)
        else:
            if event.device_type != torch.autograd.DeviceType.CPU or not event.name.startswith(_CPU_WORK):
                continue
            seconds = event.self_cpu_time_total / 1e6
            kind = category(event.name, _under_optimizer(event))
        totals[kind] += seconds
        name = "compiled graphs (fused loops)" if event.name.startswith(_COMPILED) else event.name
        per_op[name] = per_op.get(name, 0.0) + seconds
    totals["unaccounted"] = max(0.0, wall_seconds - sum(totals.values()))
    top = sorted(per_op.items(), key=lambda item: -item[1])[:12]
    top_dispatched = sorted(dispatched.items(), key=lambda item: -item[1])[:8]
    return StepBreakdown(steps, wall_seconds, totals, top, device_time=cuda,
                         ops_dispatched=sum(dispatched.values()), top_dispatched=top_dispatched)


def _top_level_op(event) -> bool:
    """An aten op no other aten op called (from Python, or from autograd's engine in backward): one trip through
    the dispatcher, and on a GPU at least one kernel launch unless it only makes a view."""
    return event.name.startswith("aten::") and not _called_under(event, "aten::")


def _under_optimizer(event) -> bool:
    return _called_under(event, "Optimizer.step")


def _called_under(event, prefix: str) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(prefix):
            return True
        parent = parent.cpu_parent
    return False
