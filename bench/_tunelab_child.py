"""One tunelab training run for bench/compare_peer.py, in its own process: `python _tunelab_child.py SPEC.json`.

Trains through the public Python API (`load_config` + `train_run`), then measures the held-out loss with the
harness's own code on the reloaded run directory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import _child_common as common
import torch

TRAIN_DATA = {"sft": "train_chat", "dpo": "train_pairs", "grpo": "train_prompts", "rloo": "train_prompts"}
"""The spec key of each objective's training file."""
REWARD = Path(__file__).resolve().parent / "_grpo_reward.py"


def overrides(spec: dict) -> list[str]:
    """The tunelab config for the spec: same data, order, steps, schedule and adapter as the peer."""
    method = spec["method"]
    objective = spec.get("objective", "sft")
    items = [
        f"model={spec['model_path']}",
        f"data.train={spec[TRAIN_DATA[objective]]}",
        f"objective.name={objective}",
        "data.eval_split=0",
        f"data.max_length={spec['max_length']}",
        "data.shuffle=false",
        f"data.packing={str(spec['packing']).lower()}",
        f"method.name={method}",
        f"train.batch_size={spec['batch_size']}",
        "train.grad_accum=1",
        f"train.max_steps={spec['steps']}",
        f"train.lr={spec['lr']}",
        "train.scheduler=constant",
        "train.warmup_ratio=0",
        "train.weight_decay=0",
        "train.max_grad_norm=1.0",
        f"train.seed={spec['seed']}",
        f"train.precision={spec['precision']}",
        "train.log_every=1",
        "eval.before_after=false",
        "eval.generate_samples=0",
        f"output_dir={spec['run_dir']}",
    ]
    if method != "full":
        lora = spec["lora"]
        items += [f"method.r={lora['r']}", f"method.alpha={lora['alpha']}", f"method.dropout={lora['dropout']}",
                  "method.target_modules=all-linear"]
    if objective == "dpo":
        items += [f"objective.beta={spec['beta']}", "objective.loss_type=sigmoid"]
    if objective == "grpo":
        items += [f"objective.rewards=[{REWARD}:json_reward]", f"objective.group_size={spec['group_size']}",
                  f"objective.max_new_tokens={spec['max_new_tokens']}", "objective.temperature=1.0",
                  "objective.beta=0", "objective.loss_type=dapo", "objective.scale_rewards=group"]
    if objective == "rloo":
        items += [f"objective.rewards=[{REWARD}:json_reward]", f"objective.group_size={spec['group_size']}",
                  f"objective.max_new_tokens={spec['max_new_tokens']}", "objective.temperature=1.0",
                  f"objective.beta={spec['beta']}", "objective.normalize_advantages=false"]
    return items + list(spec.get("tunelab_overrides", []))


def batching(spec: dict, summary: dict) -> str:
    """How tunelab laid out its batches, from what the run computed (padding-free on its matmul attention)."""
    if spec.get("objective") in ("grpo", "rloo"):
        return ("each prompt run once for its group (its KV cache shared by the completions, in the update too), "
                "completions sampled from a merged bf16 copy")
    if summary.get("shared_prefix_fraction"):
        what = "each pair's shared prompt" if spec.get("objective") == "dpo" else "its samples' shared prefix"
        return (f"padding-free, each batch one row holding {what} once "
                f"({100 * summary['shared_prefix_fraction']:.0f}% of their tokens), attention within each sample")
    if summary.get("non_padding_fraction") == 1.0:
        return ("padding-free: each batch one row of its samples (packed rows first, when packing), attention "
                "within each sample")
    if spec["packing"]:
        return "packed rows (first-fit), position ids restart per sample"
    return "padded to the longest row of each batch"


def main() -> None:
    spec = common.read_spec()
    device = common.training_device()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    clock = common.StepClock()

    import tunelab
    import tunelab.objectives.pairs as pairs
    import tunelab.objectives.sft as sft
    from tunelab.config import load_config
    from tunelab.objectives.grpo import GrpoObjective
    from tunelab.train.run import train_run

    # Benchmark instrumentation only: count the tokens of each batch the objective collates. Both objective
    # modules look `collate` up at call time, so wrapping the name there sees every training batch.
    collate = sft.collate

    def counting_collate(rows, pad_token_id, packed):
        batch = collate(rows, pad_token_id, packed)
        if not torch.is_grad_enabled():  # the reference scoring before training, or evaluation
            return batch
        clock.record_batch(
            trained=int((batch["targets"] != common.IGNORE_INDEX).sum()),
            nonpad=sum(len(sample.input_ids) for row in rows for sample in row),
            computed=batch["input_ids"].numel(),
        )
        return batch

    sft.collate = pairs.collate = counting_collate
    def record_shared(batch, samples) -> None:  # nonpad: the samples' tokens, a shared prefix in each
        if torch.is_grad_enabled():
            clock.record_batch(trained=int((batch["targets"] != common.IGNORE_INDEX).sum()),
                               nonpad=sum(len(sample.input_ids) for sample in samples),
                               computed=batch["input_ids"].numel())

    shared_collate, pairs_collate = sft.collate_shared_prefix, pairs.collate_shared_prompts

    def counting_shared_collate(samples, pad_token_id):
        batch = shared_collate(samples, pad_token_id)
        record_shared(batch, samples)
        return batch

    def counting_pairs_collate(chosen, rejected, reference=None):  # each pair's prompt held once
        batch = pairs_collate(chosen, rejected, reference)
        record_shared(batch, [*chosen, *rejected])
        return batch

    sft.collate_shared_prefix, pairs.collate_shared_prompts = counting_shared_collate, counting_pairs_collate
    grpo_collate = GrpoObjective.collate

    def counting_grpo_collate(self, rows, pad_token_id, padding_free):  # completions, counted as the peer's are
        batch = grpo_collate(self, rows, pad_token_id, padding_free)
        clock.record_batch(trained=int((batch["targets"] != common.IGNORE_INDEX).sum()),
                           nonpad=sum(len(c.sample.input_ids) for row in rows for c in row),
                           computed=batch["input_ids"].numel())
        return batch

    GrpoObjective.collate = counting_grpo_collate

    started = time.perf_counter()
    config = load_config(None, overrides(spec))
    with common.step_profiler(spec) as profiler:
        summary = train_run(config, overwrite=True)
    wall = time.perf_counter() - started
    peak = common.peak_memory_mb(device)
    peak_rss = common.rss_mb()

    run_dir = Path(spec["run_dir"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in records if "loss" in r]
    rewards = [r["reward"] for r in records if "reward" in r and "loss" in r]

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    evaluation = common.evaluate(spec, run_dir, tokenizer, device)
    result = {
        "tool": "tunelab",
        "version": getattr(tunelab, "__version__", "unknown"),
        "precision": summary["precision"],
        "device": summary["device"],
        "batching": batching(spec, summary),
        "kernels": summary.get("kernels"),  # what train.kernels resolved to (auto: liger on CUDA where installed)
        **common.run_measurements(steps=summary["steps"], wall=wall, peak=peak, peak_rss=peak_rss, losses=losses,
                                  evaluation=evaluation, clock=clock, planned_steps=spec["steps"]),
        **common.breakdown(profiler),
        "first_step_reward": rewards[0] if rewards else None,
        "mean_step_reward": sum(rewards) / len(rewards) if rewards else None,
        "tool_reported": {
            "train_tokens": summary["train_tokens"],
            "train_seconds": summary["train_seconds"],
            "tokens_per_second": summary["tokens_per_second"],
            "padding_efficiency": summary["padding_efficiency"],
            "peak_memory_mb": summary["peak_memory_mb"],
            "trainable_parameters": summary["trainable_parameters"],
            "total_parameters": summary["total_parameters"],
            "train_samples": summary["data"]["train_samples"],
            "truncated_samples": summary["data"].get("truncated_samples", summary["data"].get("truncated_rows")),
        },
        **common.environment(),
    }
    common.write_result(spec, result)


if __name__ == "__main__":
    main()
