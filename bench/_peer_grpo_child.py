"""One peer GRPO or RLOO run (TRL GRPOTrainer or RLOOTrainer + PEFT LoRA) for bench/compare_peer.py, in its own
process: `python _peer_grpo_child.py SPEC.json`.

Configured as a TRL user would for the same job, with the settings that differ from tunelab's made equal: fp32
master weights with bf16 autocast, no gradient checkpointing, prompts in order, constant lr without warm-up, the
same group size, completion length, temperature (top_p 1, top_k off), beta 0 (no reference pass), dapo loss, one
update per generation, and the same reward function (bench/_grpo_reward.py). RLOO: the spec's beta (the
reference is the base with the adapter off, as in tunelab), advantages not normalised (TRL's default). TRL
generates with transformers' `generate` and the KV cache, each prompt repeated group-size times.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import _child_common as common
import torch
from _grpo_reward import json_reward


def main() -> None:
    spec = common.read_spec()
    device = common.training_device()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    clock = common.StepClock()

    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    started = time.perf_counter()
    attention = common.peer_attention(spec)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"], padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lora = spec["lora"]
    peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                             target_modules="all-linear", task_type="CAUSAL_LM")
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32, use_kernels=False).to(device)
    rows = [json.loads(line) for line in Path(spec["train_prompts"]).read_text().splitlines() if line]
    train = Dataset.from_list(rows)
    run_dir = Path(spec["run_dir"])
    group = spec["group_size"]
    rloo = spec.get("objective") == "rloo"
    objective_args = ({"beta": spec["beta"], "normalize_advantages": False} if rloo else
                      {"beta": 0.0, "loss_type": "dapo", "scale_rewards": "group"})
    args = (RLOOConfig if rloo else GRPOConfig)(
        output_dir=str(run_dir / "trainer"),
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch_size"] * group,  # completions per step
        num_generations=group,
        gradient_accumulation_steps=1,
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=spec["seed"],
        data_seed=spec["seed"],
        bf16=spec["precision"] == "bf16",
        use_cpu=device.type == "cpu",
        gradient_checkpointing=spec.get("peer_gradient_checkpointing", False),
        shuffle_dataset=False,
        max_completion_length=spec["max_new_tokens"],
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        epsilon=0.2,
        num_iterations=1,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        **objective_args,
    )
    trainer = (RLOOTrainer if rloo else GRPOTrainer)(model=model, reward_funcs=[json_reward], args=args,
                                                     train_dataset=train, processing_class=tokenizer,
                                                     peft_config=peft_config)

    generate_and_score = trainer._generate_and_score_completions

    def counting(inputs):  # benchmark instrumentation only: the tokens of each step's completions
        output = generate_and_score(inputs)
        trained = int(output["completion_mask"].sum())
        prompt = int(output["prompt_mask"].sum())
        clock.record_batch(trained=trained, nonpad=trained + prompt,
                           computed=output["completion_ids"].numel() + output["prompt_ids"].numel())
        return output

    trainer._generate_and_score_completions = counting
    with common.step_profiler(spec) as profiler:
        output = trainer.train()
    trainer.save_model(str(run_dir))
    tokenizer.save_pretrained(run_dir)
    wall = time.perf_counter() - started
    peak = common.peak_memory_mb(device)
    peak_rss = common.rss_mb()
    logs = trainer.state.log_history
    losses = [r["loss"] for r in logs if "loss" in r]
    rewards = [r["reward"] for r in logs if "reward" in r]
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    del trainer, model

    evaluation = common.evaluate(spec, run_dir, tokenizer, device)
    result = {
        "tool": "peer",
        "attention": attention,
        **common.breakdown(profiler),
        "version": f"trl {trl.__version__}",
        "precision": "bf16" if args.bf16 else "fp32",
        "device": str(device),
        "batching": f"prompt + completion rows padded (TRL {'RLOO' if rloo else 'GRPO'}), each prompt generated "
                    "group-size times",
        **common.run_measurements(steps=output.global_step, wall=wall, peak=peak, peak_rss=peak_rss, losses=losses,
                                  evaluation=evaluation, clock=clock, planned_steps=spec["steps"]),
        "first_step_reward": rewards[0] if rewards else None,
        "mean_step_reward": sum(rewards) / len(rewards) if rewards else None,
        "tool_reported": {
            "train_runtime": output.metrics.get("train_runtime"),
            "trainable_parameters": trainable,
            "train_samples": len(train),
            "first_logged": next((r for r in logs if "loss" in r), None),
        },
        **common.environment(),
    }
    common.write_result(spec, result)


if __name__ == "__main__":
    main()
