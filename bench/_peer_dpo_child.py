"""One peer DPO run (TRL DPOTrainer + PEFT LoRA) for bench/compare_peer.py, in its own process:
`python _peer_dpo_child.py SPEC.json`.

Configured as a TRL user would for the same job, with the settings that differ from tunelab's made equal: fp32
master weights with bf16 autocast, no gradient checkpointing (TRL's default is on), sequential sampling, constant
lr without warm-up, sigmoid loss with the same beta, the reference as the base with the adapter switched off (TRL's
default for a PEFT model), computed in every step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import _child_common as common
import torch


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
    from trl import DPOConfig, DPOTrainer

    started = time.perf_counter()
    attention = common.peer_attention(spec)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lora = spec["lora"]
    peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                             target_modules="all-linear", task_type="CAUSAL_LM")
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32, use_kernels=False).to(device)
    rows = [json.loads(line) for line in Path(spec["train_pairs"]).read_text().splitlines() if line]
    train = Dataset.from_list(rows)
    run_dir = Path(spec["run_dir"])
    args = DPOConfig(
        output_dir=str(run_dir / "trainer"),
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch_size"],
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
        train_sampling_strategy="sequential",
        max_length=spec["max_length"],
        beta=spec["beta"],
        loss_type=["sigmoid"],
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                         peft_config=peft_config)

    collator = trainer.data_collator

    def counting_collator(examples):
        batch = collator(examples)
        nonpad = int(batch["attention_mask"].sum())
        clock.record_batch(trained=int(batch["completion_mask"].sum()), nonpad=nonpad,
                           computed=batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting_collator
    with common.step_profiler(spec) as profiler:
        output = trainer.train()
    trainer.save_model(str(run_dir))
    tokenizer.save_pretrained(run_dir)
    wall = time.perf_counter() - started
    peak = common.peak_memory_mb(device)
    peak_rss = common.rss_mb()
    logs = trainer.state.log_history
    losses = [r["loss"] for r in logs if "loss" in r]
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
        "batching": "chosen and rejected rows padded to the longest of the batch (TRL DPO collator)",
        **common.run_measurements(steps=output.global_step, wall=wall, peak=peak, peak_rss=peak_rss, losses=losses,
                                  evaluation=evaluation, clock=clock, planned_steps=spec["steps"]),
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
