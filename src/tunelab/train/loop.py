"""The training loop: batch in, forward, objective, backward, step, log, eval, checkpoint.

One optimiser step takes `grad_accum` micro-batches; the loss of each is divided by what the objective counts
in the whole step (trained tokens for SFT, pairs for DPO, ...), so every token or pair weighs the same whatever
micro-batch it falls in. The objective (objectives/) builds the batches and computes the loss; one that trains on
its own generations (GRPO) first turns the step's prompts into completions (its rollout), and may reuse a rollout
for several steps. The loop knows none by name.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunelab.config import RunConfig
from tunelab.data.batching import plan_epoch
from tunelab.data.template import IGNORE_INDEX
from tunelab.errors import TrainingFault
from tunelab.objectives.metrics import MetricTotals
from tunelab.track.jsonl import MetricsLog
from tunelab.train import sharding
from tunelab.train.best import BestTracker
from tunelab.train.checkpoint import (
    TrainerState,
    latest_checkpoint,
    load_checkpoint,
    rng_snapshot,
    save_checkpoint,
)
from tunelab.train.distributed import ObjectiveModule, Ranks, accumulating
from tunelab.train.faults import ROLLBACK_LR_FACTOR, SPIKE_FACTOR, FaultGuard, scale_learning_rate
from tunelab.train.precision import autocast


@dataclass
class LoopContext:
    """Everything the loop touches, built by the caller (see train/run.py)."""

    config: RunConfig
    model: torch.nn.Module
    objective: object
    """What is minimised (see objectives/__init__.py): batches, the loss and what it is divided by."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_samples: Sequence
    """Training items in order: SFT samples, preference pairs or feedback rows (whatever the objective reads)."""
    pad_token_id: int
    precision: str
    device: torch.device
    run_dir: Path
    log: MetricsLog
    total_steps: int
    evaluate: Callable[[], dict[str, float]]
    """Returns eval metrics ({} when there is no eval data)."""
    on_step: Callable[[TrainerState, dict], None] = lambda state, record: None
    """Progress display hook."""
    on_batches: Callable[[int, list[list[list[int]]]], None] = lambda step, batches: None
    """Called after each finished step with its number and its micro-batches as rows of train_samples ids:
    what a resumed run must see again."""
    padding_free: bool = False
    """Lay each micro-batch out as one row of its samples back to back (position ids restart per sample), for
    an attention that keeps samples apart by itself (tunelab's matmul attention): no layer computes padding."""
    rng_at_last_step: dict | None = None
    """Random state when the last finished step ended: what an interruption checkpoint must restore."""
    warn: Callable[[str], None] = lambda message: None
    """Shows a warning to the user (skipped steps, loss spikes, rollbacks); they are logged in metrics.jsonl too."""
    ranks: Ranks = field(default_factory=Ranks)
    """This process among the training processes (one by default)."""
    loss_module: torch.nn.Module | None = None
    """Calls the objective's loss on the model (train/distributed.py): DDP-wrapped with several processes."""
    evaluate_everywhere: bool = False
    """Every process calls `evaluate` (a sharded model), not only the main one."""
    share_weights: list[float] = field(default_factory=list)
    """Per micro-batch of the last drawn step: 1, or 0 where this process had no rows and computed a stand-in."""
    check_stop: Callable[[], None] = lambda: None
    """Called at every step boundary; raises to stop there (see train/stop.py)."""
    updating: bool = False
    """True from the optimiser step until the trainer state records it: an interruption then leaves weights that
    match no step, so nothing may be saved from them."""


def epoch_plan(ctx: LoopContext, epoch: int):
    """The batches of `epoch` (deterministic in seed and epoch, so a resumed run sees the same ones)."""
    data = ctx.config.data
    return plan_epoch(
        ctx.train_samples,
        batch_size=ctx.config.train.batch_size * ctx.ranks.world_size,  # each process trains on its share
        seed=ctx.config.train.seed,
        epoch=epoch,
        shuffle=data.shuffle,
        group_by_length=ctx.config.train.group_by_length,
        packing=data.packing,
        max_length=data.max_length,
    )


def micro_batches(ctx: LoopContext, epoch: int, batch_in_epoch: int) -> Iterator[tuple[int, int, int, list]]:
    """(epoch, index, batches in that epoch, rows) from the saved data position onwards."""
    while True:
        batches = epoch_plan(ctx, epoch).batches
        for index in range(batch_in_epoch, len(batches)):
            yield epoch, index, len(batches), batches[index]
        epoch, batch_in_epoch = epoch + 1, 0


def fit(ctx: LoopContext, state: TrainerState) -> TrainerState:
    """Train from `state` to the last step; returns the final state. Stops early when train.best_metric stops
    improving, and ends with the best step's weights when early stopping or keep_best is on."""
    cfg = ctx.config.train
    model, optimizer, scheduler = ctx.model, ctx.optimizer, ctx.scheduler
    # The optimizer's own parameters: a zero2 model the base evaluation left gathered would list whole tensors
    # whose .grad never fills, so clipping did nothing and grad_norm read 0.
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    batches = micro_batches(ctx, state.epoch, state.batch_in_epoch)
    best = BestTracker(cfg, ctx.run_dir, model)
    # A loss that trains on its own samples (GRPO) sits near 0 and swings with the rollout: no spikes to watch.
    guard = FaultGuard(cfg.max_bad_steps, cfg.max_rollbacks, watch_spikes=not hasattr(ctx.objective, "rollout"))
    module = ctx.loss_module or ObjectiveModule(model, ctx.objective)
    model.train()
    while state.step < ctx.total_steps:
        started = time.perf_counter()
        # An objective that trains on its own generations may update several times on one rollout: then it
        # draws no new rows until the next rollout (and its checkpointed state holds the rollout).
        draws = getattr(ctx.objective, "draws_rows", lambda step: True)(state.step)
        step_batches = [next(batches) for _ in range(cfg.grad_accum)] if draws else []
        step_rows = None
        if draws:  # this process's share of each micro-batch; one without a share computes a 0-weighted row
            shares = [ctx.ranks.share(rows) for _, _, _, rows in step_batches]
            ctx.share_weights = [1.0 if share else 0.0 for share in shares]
            step_rows = [_rows(ctx, share or rows[:1]) for share, (_, _, _, rows) in zip(shares, step_batches,
                                                                                          strict=True)]
        metrics_of_step = MetricTotals()
        rollout_seconds = 0.0
        if hasattr(ctx.objective, "rollout"):  # an objective that trains on what the model generates (GRPO)
            # TRL's trainer_state.epoch: micro-batches trained / those in an epoch, as of the last finished step
            epoch = step_batches[0][0] + step_batches[0][1] / step_batches[0][2] if step_batches else None
            step_rows, rollout_metrics = ctx.objective.rollout(model, step_rows, state.step, epoch,
                                                                 weights=ctx.share_weights)
            if not draws:  # a kept rollout trains its own micro-batches' weights (a resumed run has no others)
                ctx.share_weights = list(getattr(ctx.objective, "rollout_weights", None) or [])
            metrics_of_step.add(rollout_metrics)
            rollout_seconds = time.perf_counter() - started
        totals = _forward_backward(ctx, module, step_rows, metrics_of_step)
        loss = totals.loss_sum / totals.count
        step_tokens = totals.trained_tokens
        grad_norm = _grad_norm(trainable, cfg.max_grad_norm) if math.isfinite(loss) else None
        bad = guard.bad_step_reason(loss, grad_norm)
        lr = scheduler.get_last_lr()[0]
        ctx.updating = True
        if bad is None:
            optimizer.step()
        scheduler.step()  # a skipped step still counts: the schedule and data order stay those of a clean run
        optimizer.zero_grad(set_to_none=True)

        elapsed = time.perf_counter() - started
        if rollout_seconds:
            metrics_of_step.add({"seconds/rollout": (rollout_seconds, 1),
                                 "seconds/update": (elapsed - rollout_seconds, 1)})
        state.step += 1
        if step_batches:
            last_epoch, last_index, _, _ = step_batches[-1]
            state.epoch, state.batch_in_epoch = last_epoch, last_index + 1
            ctx.on_batches(state.step, [rows for _, _, _, rows in step_batches])
        epoch_length = len(epoch_plan(ctx, state.epoch).batches) if not step_batches else step_batches[-1][2]
        progress = state.epoch + state.batch_in_epoch / epoch_length  # TRL's fractional trainer_state.epoch
        state.extra["epoch_progress"] = progress
        state.tokens_seen += step_tokens
        state.train_seconds += elapsed
        state.extra["computed_tokens"] = state.extra.get("computed_tokens", 0) + totals.computed_tokens
        state.extra["real_tokens"] = state.extra.get("real_tokens", 0) + totals.real_tokens
        if totals.shared_tokens:
            state.extra["shared_tokens"] = state.extra.get("shared_tokens", 0) + totals.shared_tokens
        ctx.rng_at_last_step = rng_snapshot()
        ctx.updating = False
        record = {
            "step": state.step,
            "epoch": round(progress, 4),
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": state.tokens_seen,
            "tokens_per_second": step_tokens / elapsed if elapsed else 0.0,
            **_merged(ctx, metrics_of_step).means(),
        }
        if guard.record(state.step, loss, bad is not None):
            record["loss_spike"] = True
            ctx.warn(f"loss spike at step {state.step}: {loss:.4g}, over {SPIKE_FACTOR:g}x the recent median")
        if bad is not None:
            record.update(loss=loss if math.isfinite(loss) else None, skipped=bad)
            state.extra["skipped_steps"] = state.extra.get("skipped_steps", 0) + 1
            ctx.warn(f"step {state.step} skipped: {bad}")
            if guard.needs_rollback(state.step):
                ctx.log.write(record)
                state = _roll_back(ctx, state, guard)
                batches = micro_batches(ctx, state.epoch, state.batch_in_epoch)
                continue
        stop = False
        last = state.step == ctx.total_steps
        if (cfg.eval_every and state.step % cfg.eval_every == 0) or last:
            # The main process evaluates while the others wait at their next collective; a sharded model needs
            # every process for each forward, so there all evaluate and the main one keeps the result.
            if ctx.ranks.is_main or ctx.evaluate_everywhere:
                if hasattr(ctx.objective, "set_progress"):  # rewards read the steps done, as TRL's evaluation
                    ctx.objective.set_progress(state.step, progress)
                metrics = ctx.evaluate()
                state.extra["last_eval"] = metrics
                if ctx.ranks.is_main:
                    record.update(metrics)
                    stop = best.observe(state, metrics)
            stop = ctx.ranks.broadcast(stop)
        if state.step % cfg.log_every == 0 or last or "eval_loss" in record or stop or bad is not None:
            ctx.log.write(record)
        ctx.on_step(state, record)
        if cfg.save_every and state.step % cfg.save_every == 0 and not last:
            save_from_main(ctx, state)
        if stop:
            state.extra["early_stopped_at"] = state.step
            break
        ctx.check_stop()
    best.restore(state)
    return state


@dataclass
class StepTotals:
    """What one optimiser step computed, summed over its micro-batches and every process."""

    loss_sum: float
    count: float
    """What the loss is divided by (trained tokens, pairs, ...), at least 1."""
    trained_tokens: int
    computed_tokens: int
    real_tokens: int
    shared_tokens: int = 0
    """Samples' tokens not computed: shared prefixes held once (data/batching.py's shared_layout, GRPO's prompts
    run once per group); a batch's `computed_positions`, where given, counts the positions it does compute."""


def _forward_backward(ctx: LoopContext, module: torch.nn.Module, step_rows: list[list],
                      metrics_of_step: MetricTotals) -> StepTotals:
    """Forward and backward every micro-batch of the step, each scaled so the summed gradient is that of the
    step's mean loss over all processes (DDP averages gradients over processes, hence the world_size factor)."""
    weights = ctx.share_weights if len(ctx.share_weights) == len(step_rows) else [1.0] * len(step_rows)
    tensors = [_to_device(batch_tensors(ctx, rows), ctx.device) for rows in step_rows]
    local = [
        sum(weight * ctx.objective.count(batch) for batch, weight in zip(tensors, weights, strict=True)),
        sum(weight * ctx.objective.input_tokens(item)
            for rows, weight in zip(step_rows, weights, strict=True) for row in rows for item in row),
        sum(weight * int((batch["targets"] != IGNORE_INDEX).sum()) for batch, weight in zip(tensors, weights,
                                                                                            strict=True)),
        sum(weight * int(batch.get("computed_positions", batch["input_ids"].numel()))
            for batch, weight in zip(tensors, weights, strict=True)),
        sum(weight * int(batch.get("shared_tokens", 0)) for batch, weight in zip(tensors, weights, strict=True)),
    ]
    count, real_tokens, trained_tokens, computed_tokens, shared_tokens = ctx.ranks.sum(local)
    count = max(1.0, count)
    loss_total = 0.0
    for index, (batch, weight) in enumerate(zip(tensors, weights, strict=True)):
        with accumulating(module, last=index == len(tensors) - 1):
            with autocast(ctx.precision, ctx.device):
                loss_sum, metrics = module(batch)
            (loss_sum * (weight * ctx.ranks.world_size / count)).backward()
        if weight:
            loss_total += float(loss_sum.detach())
            metrics_of_step.add(metrics)
    (loss_total,) = ctx.ranks.sum([loss_total])
    return StepTotals(loss_total, count, int(trained_tokens), int(computed_tokens), int(real_tokens),
                      int(shared_tokens))


def _merged(ctx: LoopContext, totals: MetricTotals) -> MetricTotals:
    """The step's logged metrics over every process."""
    if not ctx.ranks.distributed:
        return totals
    merged = MetricTotals()
    for part in ctx.ranks.gather(totals.totals):
        merged.add({name: (total, count) for name, (total, count) in part.items()})
    return merged


def save_from_main(ctx: LoopContext, state: TrainerState, rng: dict | None = None) -> Path | None:
    """A checkpoint of `state`, written by the main process with every process's random and objective state;
    collective (every process calls it), and no process goes on before it is complete."""
    objective_state = ctx.objective.state_dict() if hasattr(ctx.objective, "state_dict") else {}
    everyone = ctx.ranks.gather({"rng": rng or rng_snapshot(), "objective": objective_state})
    trainable = optimizer_state = None
    if sharding.is_sharded(ctx.model):  # every process hands over its shards
        trainable = sharding.trainable_state(ctx.model)
        optimizer_state = sharding.optimizer_state(ctx.loss_module, ctx.optimizer)
    saved = None
    if ctx.ranks.is_main:
        saved = save_checkpoint(ctx.run_dir, ctx.model, ctx.optimizer, ctx.scheduler, state,
                                ctx.config.train.keep_checkpoints, rng=everyone[0]["rng"], objective=ctx.objective,
                                other_ranks=everyone[1:], trainable=trainable, optimizer_state=optimizer_state)
    ctx.ranks.barrier()
    return saved


def _grad_norm(trainable: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """The gradients' total norm, clipped to max_norm when set (a non-finite norm leaves them for skipping)."""
    if max_norm:
        return float(sharding.whole(torch.nn.utils.clip_grad_norm_(trainable, max_norm)))
    return float(sharding.whole(torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])))


def _roll_back(ctx: LoopContext, state: TrainerState, guard: FaultGuard) -> TrainerState:
    """Continue from the newest checkpoint with a lower learning rate, or stop when that is not possible."""
    bad = len(guard.bad_steps)
    checkpoint = latest_checkpoint(ctx.run_dir)
    if checkpoint is None or not guard.can_roll_back():
        every = ctx.config.train.save_every
        saving = (f"the first checkpoint is due at step {every}" if every else "set train.save_every to keep them")
        why = (f"no checkpoint to roll back to ({saving})" if checkpoint is None
               else f"after {guard.rollbacks} rollback(s) with the learning rate halved each time")
        raise TrainingFault(f"{bad} steps up to step {state.step} had a non-finite loss or gradient norm, {why}; "
                            "try a lower train.lr or check the data")
    rolled_from, done = state.step, state.extra.get("rollbacks", 0)
    state = load_checkpoint(checkpoint, ctx.model, ctx.optimizer, ctx.scheduler, ctx.objective, ctx.ranks.rank,
                            sharded_root=ctx.loss_module if sharding.is_sharded(ctx.model) else None)
    # The checkpoint's schedule holds the halvings made before it was written; those since (back to this same
    # checkpoint) are made again, so each rollback halves the rate once more.
    factor = ROLLBACK_LR_FACTOR ** (done - state.extra.get("rollbacks", 0) + 1)
    scale_learning_rate(ctx.optimizer, ctx.scheduler, factor)
    guard.rolled_back()
    state.extra["rollbacks"] = done + 1
    ctx.rng_at_last_step = rng_snapshot()
    ctx.log.truncate_after(state.step)
    ctx.log.write({"step": state.step, "rollback_from": rolled_from, "bad_steps": bad,
                   "lr": ctx.scheduler.get_last_lr()[0]})
    ctx.warn(f"{bad} bad steps up to step {rolled_from}: rolled back to {checkpoint.name}, learning rate x"
             f"{factor:g} the checkpoint's (rollback {guard.rollbacks} of at most {guard.max_rollbacks})")
    return state


def batch_tensors(ctx: LoopContext, rows: list[list]) -> dict[str, torch.Tensor]:
    """The micro-batch as tensors: padded or packed rows, or one padding-free row."""
    return ctx.objective.collate(rows, ctx.pad_token_id, ctx.padding_free)


def _rows(ctx: LoopContext, rows: list[list[int]]) -> list[list]:
    return [[ctx.train_samples[i] for i in row] for row in rows]


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}
