"""Numerical faults in training: skip a bad step, roll back when they keep coming, warn on loss spikes.

A step whose loss or gradient norm is not finite would poison the weights and the optimiser's moments, so its
update is skipped (its batch is still consumed, so the data order stays that of an uninterrupted run). One bad
batch is noise; several within a short window mean the run has diverged, and the remedy that works at scale
(restart from the last good checkpoint with a lower learning rate) is applied a bounded number of times before
the run stops with the reason.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

BAD_STEP_WINDOW = 100
"""Steps over which train.max_bad_steps is counted."""
ROLLBACK_LR_FACTOR = 0.5
"""Each rollback multiplies the learning rate (the whole schedule) by this."""
SPIKE_HISTORY = 32
SPIKE_FACTOR = 3.0
"""A loss above SPIKE_FACTOR x the median of the last SPIKE_HISTORY steps is flagged as a spike."""


class FaultGuard:
    """Watches each step's loss and gradient norm; says when to skip, roll back, or warn."""

    def __init__(self, max_bad_steps: int, max_rollbacks: int, watch_spikes: bool = True) -> None:
        self.watch_spikes = watch_spikes
        self.max_bad_steps = max_bad_steps
        self.max_rollbacks = max_rollbacks
        self.rollbacks = 0
        self.bad_steps: deque[int] = deque()
        self.recent_losses: deque[float] = deque(maxlen=SPIKE_HISTORY)

    def bad_step_reason(self, loss: float, grad_norm: float | None) -> str | None:
        """Why this step's update must be skipped, or None."""
        if not math.isfinite(loss):
            return f"loss {loss}"
        if grad_norm is not None and not math.isfinite(grad_norm):
            return f"gradient norm {grad_norm}"
        return None

    def record(self, step: int, loss: float, bad: bool) -> bool:
        """Note the finished step; True when the loss spiked (a finite loss far above the recent median)."""
        if bad:
            self.bad_steps.append(step)
            return False
        spiked = (self.watch_spikes and len(self.recent_losses) >= SPIKE_HISTORY // 2
                  and loss > SPIKE_FACTOR * statistics.median(self.recent_losses) > 0)
        self.recent_losses.append(loss)
        return spiked

    def needs_rollback(self, step: int) -> bool:
        while self.bad_steps and self.bad_steps[0] <= step - BAD_STEP_WINDOW:
            self.bad_steps.popleft()
        return len(self.bad_steps) > self.max_bad_steps

    def can_roll_back(self) -> bool:
        return self.rollbacks < self.max_rollbacks

    def rolled_back(self) -> None:
        self.rollbacks += 1
        self.bad_steps.clear()
        self.recent_losses.clear()


def scale_learning_rate(optimizer, scheduler, factor: float) -> None:
    """Multiply the learning rate now and for the rest of the schedule (LambdaLR scales base_lrs)."""
    for group in optimizer.param_groups:
        group["lr"] *= factor
    scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what the next step logs
