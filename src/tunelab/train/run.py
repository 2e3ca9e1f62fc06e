"""`tunelab train`: everything around the loop. Validate first (nothing is written for bad input), load,
evaluate the base model, train, evaluate again, save the run directory."""

from __future__ import annotations

import math
import os
import random
import shutil
from collections.abc import Callable

import numpy as np
import torch
from rich.console import Console

from tunelab.config import RunConfig, dump_config, with_absolute_paths
from tunelab.data.preference import PreparedPairs
from tunelab.data.prepare import PreparedData
from tunelab.data.template import ChatRenderer
from tunelab.errors import SaveFailed, UserError
from tunelab.eval.during_training import RunEvaluator
from tunelab.eval.preference import evaluate_objective
from tunelab.eval.report import write_report
from tunelab.infer.generate import GenerationOptions
from tunelab.methods import METHODS, count_parameters
from tunelab.methods.fused_lora import fuse_lora_layers, fuse_norms
from tunelab.models.attention import MATMUL, attention_implementation, shares_prefixes, training_attention
from tunelab.models.fused_ops import enable_training_kernels, training_kernels
from tunelab.models.load import enable_activation_checkpointing, load_model, load_tokenizer
from tunelab.models.logprobs import uses_virtual_tokens
from tunelab.models.neftune import add_neftune
from tunelab.models.resolve import resolve_model
from tunelab.models.varlen import VARLEN
from tunelab.objectives import build_objective, rows_per_item
from tunelab.objectives.reference import precompute_reference
from tunelab.objectives.reward import make_head_trainable
from tunelab.track.fanout import NullLog, RunLog, check_trackers
from tunelab.train import sharding
from tunelab.train.checkpoint import (
    TrainerState,
    check_same_data,
    check_same_parameters,
    check_same_schedule,
    checkpoint_step,
    data_order_fingerprint,
    incomplete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
)
from tunelab.train.console_log import RunConsole
from tunelab.train.device_checks import refuse_what_the_device_cannot_run
from tunelab.train.distributed import Ranks, launched_ranks, loss_module, start, stop
from tunelab.train.launcher_env import apply_launcher_sharding
from tunelab.train.live import mark_ended, mark_running, read_status
from tunelab.train.loop import LoopContext, TrainingFault, epoch_plan, fit, save_from_main
from tunelab.train.memory import MemoryEstimate, estimate_peak_memory
from tunelab.train.outputs import save_weights, write_model_card, write_samples
from tunelab.train.precision import resolve_precision
from tunelab.train.progress import TrainingProgress
from tunelab.train.run_data import prepare_run_data
from tunelab.train.run_dir import check_not_training, check_output_dir, remove_untrained_run
from tunelab.train.schedule import build_optimizer
from tunelab.train.step_profile import step_profiler
from tunelab.train.stop import StopOnSignal, StopRequested, TerminateAsInterrupt
from tunelab.train.summary import (
    base_measurement,
    check_best_metric_is_logged,
    print_outcome,
    report_data,
    write_summary,
)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def train_run(
    config: RunConfig, *, resume: bool = False, overwrite: bool = False, console: Console | None = None,
    on_batches: Callable[[int, list], None] | None = None, dry_run: bool = False,
) -> dict:
    """Run a whole fine-tune as `config` says and return its summary (also written to summary.json).
    The trackers in `track.to` are checked before anything is written and closed however the run ends.
    `on_batches(step, micro_batches)` sees the sample ids of every finished step (see LoopContext)."""
    ranks = launched_ranks()
    console = RunConsole(console or Console(quiet=True)) if ranks.is_main else Console(quiet=True)
    folder_existed = config.output_dir.is_dir()
    if not dry_run:
        check_output_dir(config.output_dir, resume=resume, overwrite=overwrite)
        if resume:
            check_same_parameters(config.output_dir, config)
    check_trackers(config.track)
    if ranks.distributed:
        train_config, notice = apply_launcher_sharding(config.train, os.environ)
        config = config.model_copy(update={"train": train_config})
        if notice:
            console.print(notice)
    sharding.check_several_processes(config, ranks)
    device = start(ranks) if ranks.distributed else _training_device()
    refuse_what_the_device_cannot_run(config, device)
    log = RunLog(config.output_dir / "metrics.jsonl", console) if ranks.is_main else NullLog()
    status, error, refused = "failed", None, False
    try:
        with TerminateAsInterrupt():
            summary = _train(config, log, ranks, device, resume=resume, overwrite=overwrite, console=console,
                             on_batches=on_batches, dry_run=dry_run)
        status = summary["status"]
        ranks.barrier()  # the others wait until the main process has written everything
        stop(ranks)
        return summary
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except Exception as err:
        refused = isinstance(err, UserError)
        error = str(err) if refused else f"{type(err).__name__}: {err}"
        raise
    finally:
        log.close(status)
        wrote_folder = ranks.is_main and (read_status(config.output_dir) or {}).get("pid") == os.getpid()
        if wrote_folder:
            mark_ended(config.output_dir, status, error)
        if isinstance(console, RunConsole):
            if error:
                console.to_log_only(f"failed: {error}")
            console.detach()
        if wrote_folder and refused and not resume:
            remove_untrained_run(config.output_dir, folder_existed)


def _train(config: RunConfig, log: RunLog, ranks: Ranks, device: torch.device, *, resume: bool,
           overwrite: bool, console: Console, on_batches: Callable[[int, list], None] | None,
           dry_run: bool = False) -> dict:
    run_dir = config.output_dir
    seed_everything(config.train.seed)

    config = with_absolute_paths(config)  # local paths recorded absolute: the run loads from anywhere
    precision = resolve_precision(config.train.precision, device)
    with ranks.main_first():  # one process converts the model and tokenises the data; the others read the caches
        model_path = resolve_model(config.model)
        tokenizer = load_tokenizer(model_path)
        objective = build_objective(config.objective, config.method.name, config.data.packing, tokenizer=tokenizer,
                                    seed=config.train.seed, precision=precision, device=device,  # a teacher's too
                                    batch_size=config.train.batch_size, ranks=ranks)
        data = prepare_run_data(config, tokenizer, objective)
    data_order = data_order_fingerprint(config, data.fingerprint, ranks.world_size)
    if resume:
        check_same_data(latest_checkpoint(run_dir), data_order)
    report_data(console, data)

    method = METHODS[config.method.name]
    quantization = method.quantization(config.method, torch.bfloat16 if precision == "bf16" else torch.float32)
    base = load_model(model_path, quantization=quantization, device=str(device), head=objective.model_head,
                      pad_token_id=tokenizer.pad_token_id)
    model = method.apply(base, config.method)
    if objective.model_head == "reward":
        make_head_trainable(model)
    if config.train.activation_checkpointing:
        enable_activation_checkpointing(model, config.train.activation_checkpointing)
    sharded = ranks.distributed and config.train.distributed in sharding.SHARDED
    if config.train.fused_lora and not sharded:
        fuse_lora_layers(model)
    elif config.train.fused_lora:
        fuse_norms(model)
        if config.method.name in ("lora", "rslora"):
            console.print("fused LoRA layers are off under FSDP (each process would hold whole frozen weights)")
    trainable, total = count_parameters(model)
    console.print(
        f"[bold]{config.method.name}[/] on {config.model}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.2f}%), {precision} on {device}"
    )
    renderer = ChatRenderer(tokenizer, config.data.chat_template)
    generation = GenerationOptions(max_new_tokens=config.eval.max_new_tokens, seed=config.train.seed,
                                   precision=precision, batch_size=config.eval.generate_batch_size)
    evaluate = RunEvaluator(config, model, renderer, data, precision, generation,  # checks eval.labels
                            loss=_objective_loss(objective, model, data, tokenizer, precision, config))

    # A reward model scores replies; it has no output head to generate them with.
    gen_samples = data.eval_samples[: config.eval.generate_samples] if objective.model_head == "lm" else []

    ctx = LoopContext(
        config=config, model=model, objective=objective, optimizer=None, scheduler=None, train_samples=data.train,
        pad_token_id=tokenizer.pad_token_id, precision=precision, device=device, run_dir=run_dir, log=log,
        total_steps=0, evaluate=evaluate, ranks=ranks, evaluate_everywhere=sharded,
    )
    if on_batches is not None:
        ctx.on_batches = on_batches
    steps_per_epoch = math.ceil(len(epoch_plan(ctx, 0).batches) / config.train.grad_accum)
    ctx.total_steps = config.train.max_steps or max(1, math.ceil(config.train.epochs * steps_per_epoch))
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        check_same_schedule(checkpoint, ctx.total_steps, config.train)
    # The attention budget counts what a micro-batch really holds: both sequences of a pair, and rows no longer
    # than the longest the data has (packed rows fill max_length).
    # Replies sampled in training (distill's lmbda, seq_kd) may outgrow the data's rows and max_length.
    sequences_per_batch = config.train.batch_size * rows_per_item(objective, model)
    planned = getattr(objective, "planned_lengths", None)
    lengths = planned(data.train) if planned else data.train.lengths
    longest = config.data.max_length if config.data.packing else int(np.asarray(lengths).max(initial=1))
    attention = training_attention(config.train.attention, device, precision,
                                   longest if planned else min(longest, config.data.max_length), model,
                                   sequences_per_batch)
    ctx.padding_free = attention in (MATMUL, VARLEN) and not uses_virtual_tokens(model)  # prompt tuning needs rows
    if config.train.neftune_alpha is not None:
        objective.neftune = add_neftune(model, config.train.neftune_alpha)
    if hasattr(objective, "share_prefix"):  # not with NEFTune: samples would share one draw of noise on the prefix
        objective.share_prefix = ctx.padding_free and shares_prefixes(model, attention, config.train.share_prefix) \
            and config.train.neftune_alpha is None
        evaluate.share_prefix = objective.share_prefix
    with attention_implementation(model, attention):
        memory = _estimate_memory(ctx, data, tokenizer)  # before sharding: it runs the model as it is
    kernels = training_kernels(config.train.kernels, device=device, precision=precision, model=model,
                               method=config.method.name, objective=config.objective.name, steps=ctx.total_steps,
                               sharded=sharded, checkpointing=bool(config.train.activation_checkpointing))
    # after the memory estimate, which runs the model eagerly on other shapes
    if notice := enable_training_kernels(model, kernels, config.train.kernels, precision):
        console.print(notice)
    ctx.loss_module = loss_module(model, objective, ranks, device, config.train.distributed)
    ctx.optimizer, ctx.scheduler = build_optimizer(model, config.train, ctx.total_steps,  # on the shards, if any
                                                   getattr(config.method, "loraplus_lr_ratio", None))
    # A sharded model runs only inside its root's forward, on every process (train/sharding.py).
    run_model = ctx.loss_module if sharded else (lambda function: function())
    ctx.evaluate = lambda: run_model(evaluate)
    console.print(
        f"estimated peak memory {memory.peak_mb:,.0f} MB: {memory.resident_mb:,.0f} in use now, "
        f"{memory.optimizer_mb + memory.gradients_mb:,.0f} optimizer states and gradients, "
        f"{memory.activations_mb:,.0f} activations (largest batch)"
    )
    if dry_run:  # everything a run decides before it writes anything: data, parameters, steps, memory
        return {"status": "dry-run", "steps_planned": ctx.total_steps, "trainable_parameters": trainable,
                "total_parameters": total, "precision": precision, "device": str(device),
                "peak_memory_estimate_mb": round(memory.peak_mb, 1), "memory_estimate": memory.as_dict(),
                "data": data.stats}
    if ranks.is_main:
        check_not_training(run_dir)  # again: another process may have started on it while this one loaded
        if overwrite and run_dir.exists() and not resume:
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(config))
        mark_running(run_dir)
        if isinstance(console, RunConsole):
            console.attach(run_dir)

    reference = getattr(objective, "reference", None)
    if reference is not None and reference.precomputed:  # before a checkpoint loads: the starting weights
        console.print("scoring the data with the reference model (once, before training) ...")
        run_model(lambda: precompute_reference(model, objective, [data.train, data.eval],
                                               pad_token_id=tokenizer.pad_token_id, precision=precision,
                                               batch_size=config.train.batch_size))

    if hasattr(objective, "prepare"):  # before a checkpoint loads: the starting weights
        objective.prepare(model)

    resumed_at = checkpoint_step(checkpoint) if checkpoint is not None else None
    if checkpoint is not None:
        log.truncate_after(resumed_at)
    else:
        log.clear()
    log.start(config, resumed_at=resumed_at)
    # Before a checkpoint loads: these are the base model's numbers.
    baseline = base_measurement(config, run_dir, lambda: run_model(lambda: _measure(evaluate, gen_samples, evaluate())),
                                console, measures=ranks.is_main or sharded, writes=ranks.is_main, resume=resume)
    step_zero = {"step": 0, **{k: v for k, v in baseline.items() if k.startswith("eval_")}}
    if not resume and "eval_loss" in baseline:
        log.write(step_zero)
    elif resume and ranks.is_main:  # baseline.json may have been measured again: the log's step 0 follows it
        log.replace_baseline(step_zero if "eval_loss" in baseline else None)
    check_best_metric_is_logged(config.train.best_metric, baseline)

    if ranks.distributed:  # one seed built one model everywhere; from here each process draws its own dropout masks
        torch.manual_seed(config.train.seed + ranks.rank)  # and NEFTune noise (a checkpoint restores each one's state)
    state = TrainerState(extra={"data_fingerprint": data_order, "total_steps": ctx.total_steps})
    if checkpoint is not None:
        for path, why in incomplete_checkpoints(run_dir):
            console.print(f"[yellow]ignoring {path}: {why}[/]")
        state = load_checkpoint(checkpoint, model, ctx.optimizer, ctx.scheduler, objective, ranks.rank,
                                sharded_root=ctx.loss_module if sharded else None)
        state.extra.setdefault("data_fingerprint", data_order)
        state.extra["total_steps"] = ctx.total_steps  # check_same_schedule let only a length-free schedule change
        console.print(f"resuming from {checkpoint} (step {state.step} of {ctx.total_steps})")

    progress = TrainingProgress(console, ctx.total_steps, state.step)
    ctx.on_step = progress.update
    status = "completed"
    stop_on_signal = StopOnSignal(console)
    ctx.check_stop = lambda: stop_on_signal.check(ranks)
    ctx.warn = lambda message: console.print(f"[yellow]{message}[/]")
    profiler = step_profiler(config.train.profile_steps, ctx.total_steps - state.step, ranks.is_main)
    try:
        with progress, attention_implementation(model, attention), stop_on_signal, profiler:
            state = fit(ctx, state)
    except KeyboardInterrupt as stopped:
        status = "interrupted"
        model.zero_grad(set_to_none=True)
        # Inside an optimiser step the weights belong to no step; with several processes only a stop that all
        # of them reached together (StopRequested) can be saved.
        if ctx.updating or (ranks.distributed and not isinstance(stopped, StopRequested)):
            saved = latest_checkpoint(run_dir)
            console.print(f"[yellow]stopped inside step {state.step + 1}; nothing saved from it. "
                          f"Continue with --resume from {saved or 'the start'}[/]")
        else:
            saved = save_from_main(ctx, state, rng=ctx.rng_at_last_step)
            console.print(f"[yellow]interrupted at step {state.step}; saved {saved}. Continue with --resume[/]")
        if ranks.is_main:
            write_summary(run_dir, model, config, data, state, baseline, {}, trainable, total, precision, device,
                          status, memory)
            write_report(run_dir)
        raise
    except TrainingFault as fault:
        status = "failed"
        if state.step and not isinstance(fault, SaveFailed):
            save_from_main(ctx, state, rng=ctx.rng_at_last_step)
        if ranks.is_main:
            write_summary(run_dir, model, config, data, state, baseline, {}, trainable, total, precision, device,
                          status, memory)
        raise

    if config.train.save_every:
        save_from_main(ctx, state)
    # The weights are written before the last evaluation, which may take long (generation) or fail: an
    # interruption or error there must not cost the training.
    whole_state = sharding.full_model_state(model) if sharded else None  # every process takes part
    if ranks.is_main:
        save_weights(model, tokenizer, run_dir, method, config, whole_state)
    del whole_state
    try:
        if sharded:  # every process takes part in the last evaluation
            console.print("evaluating the fine-tuned model ...")
            after = run_model(lambda: _measure(evaluate, gen_samples, state.extra.get("last_eval", {})))
        if not ranks.is_main:
            return {"status": status, "steps": state.step, "rank": ranks.rank}
        if not sharded:
            # The loop evaluated at its last step; only restored best weights need a fresh measurement.
            final_loss = evaluate() if "restored_best_step" in state.extra else state.extra.get("last_eval", {})
            console.print("evaluating the fine-tuned model ...")
            after = _measure(evaluate, gen_samples, final_loss)
    except (KeyboardInterrupt, Exception) as err:
        ended = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        if ranks.is_main:
            console.print(f"[yellow]the last evaluation {'was interrupted' if ended == 'interrupted' else 'failed'}; "
                          f"the fine-tuned weights are saved in {run_dir} (`tunelab eval {run_dir}` measures "
                          "them)[/]")
            write_summary(run_dir, model, config, data, state, baseline, {}, trainable, total, precision, device,
                          ended, memory)
            write_report(run_dir)
        raise
    write_samples(run_dir / "samples.jsonl", gen_samples, baseline.get("replies", []), after.get("replies", []))
    breakdown = getattr(profiler, "breakdown", None)
    if breakdown is not None:
        (run_dir / "profile.txt").write_text(breakdown.render() + "\n")
    summary = write_summary(run_dir, model, config, data, state, baseline, after, trainable, total, precision, device,
                            status, memory, step_breakdown=breakdown.to_json() if breakdown else None)
    write_model_card(run_dir, config, summary)
    write_report(run_dir)
    print_outcome(console, summary, gen_samples, baseline.get("replies", []), after.get("replies", []),
                   config.eval.show_samples)
    return summary


def _objective_loss(objective, model, data, tokenizer, precision: str, config: RunConfig):
    """The held-out loss of a non-SFT objective (None: RunEvaluator's token-level loss and perplexity)."""
    if hasattr(objective, "evaluate"):
        return lambda: objective.evaluate(model, data.eval)
    if objective.data_kind == "sft":
        return None
    return lambda: evaluate_objective(model, objective, data.eval, pad_token_id=tokenizer.pad_token_id,
                                      precision=precision, batch_size=config.train.batch_size)


def _estimate_memory(ctx: LoopContext, data: PreparedData | PreparedPairs, tokenizer) -> MemoryEstimate:
    """Peak memory this run should reach, from the shapes of the first epoch's batches."""
    lengths = ctx.train_samples.lengths
    if hasattr(ctx.objective, "planned_lengths"):  # replies sampled in training may outgrow the data's
        lengths = ctx.objective.planned_lengths(ctx.train_samples)
    per_item = rows_per_item(ctx.objective, ctx.model)
    shares = [ctx.ranks.share(rows) or rows[:1] for rows in epoch_plan(ctx, 0).batches]  # what this process holds
    shapes = [(len(rows) * per_item, max(sum(int(lengths[i]) for i in row) for row in rows)) for rows in shares]
    return estimate_peak_memory(
        ctx.model, shapes, packed=ctx.config.data.packing, precision=ctx.precision, device=ctx.device,
        pad_token_id=tokenizer.pad_token_id, max_length=ctx.config.data.max_length,
        trained_fraction=float(data.stats["trainable_fraction"]), optimizer=ctx.config.train.optimizer,
    )


def _training_device() -> torch.device:
    """The device accelerate would place this process on (CUDA when present, else CPU)."""
    from accelerate import PartialState

    return PartialState().device


def _measure(evaluate: RunEvaluator, gen_samples, loss_metrics: dict) -> dict:
    """Eval loss metrics plus task metrics and replies on the held-out generation samples."""
    result: dict = dict(loss_metrics)
    if gen_samples:
        metrics, replies = evaluate.task(gen_samples)
        result.update({"metrics": metrics, "replies": replies})
    return result
