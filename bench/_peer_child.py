"""One peer training run (TRL SFTTrainer + PEFT LoRA) for bench/compare_peer.py, in its own process:
`python _peer_child.py SPEC.json`.

Configured the way a TRL user would for the same job, with every setting that differs from tunelab's
behaviour made equal (see bench/README.md for the list): fp32 master weights with bf16 autocast, no
gradient checkpointing (TRL's default is on), sequential sampling (Trainer's default is random), constant
lr without warm-up, completion-only loss on prompt/completion conversational rows.
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
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    started = time.perf_counter()
    attention = common.peer_attention(spec)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs: dict = {"dtype": torch.float32}
    peft_config = None
    if spec["method"] != "full":
        lora = spec["lora"]
        peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    if spec["method"] == "qlora":
        compute = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
        )
        kwargs["device_map"] = str(device)
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], use_kernels=False, **kwargs)
    if spec["method"] != "qlora":
        model = model.to(device)

    rows = [json.loads(line) for line in Path(spec["train_prompt_completion"]).read_text().splitlines() if line]
    train = Dataset.from_list(rows)  # in memory: no datasets cache carried between runs
    run_dir = Path(spec["run_dir"])
    args = SFTConfig(
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
        shuffle_dataset=False,
        max_length=spec["max_length"],
        packing=spec["packing"],
        completion_only_loss=True,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                         peft_config=peft_config)

    # Benchmark instrumentation only: count the tokens of each batch the collator builds. The model shifts
    # labels by one inside, so the positions that carry loss are labels[:, 1:] != -100.
    collator = trainer.data_collator

    def counting_collator(examples):
        batch = collator(examples)
        labels = batch["labels"]
        nonpad = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        clock.record_batch(trained=int((labels[:, 1:] != common.IGNORE_INDEX).sum()), nonpad=nonpad,
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
    padding_free = bool(getattr(trainer, "padding_free", False))
    precision = "bf16" if args.bf16 else "fp32"
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    adapter_dtypes = sorted({str(p.dtype) for p in trainer.model.parameters() if p.requires_grad})
    del trainer, model

    evaluation = common.evaluate(spec, run_dir, tokenizer, device)
    result = {
        "tool": "peer",
        "attention": attention,
        **common.breakdown(profiler),
        "version": f"trl {trl.__version__}",
        "precision": precision,
        "device": str(device),
        "batching": "padding-free: each batch flattened into one row, position ids restart per sample"
        if padding_free else "padded to the longest row of each batch",
        **common.run_measurements(steps=output.global_step, wall=wall, peak=peak, peak_rss=peak_rss, losses=losses,
                                  evaluation=evaluation, clock=clock, planned_steps=spec["steps"]),
        "tool_reported": {
            "train_runtime": output.metrics.get("train_runtime"),
            "train_steps_per_second": output.metrics.get("train_steps_per_second"),
            "num_tokens": next((r["num_tokens"] for r in reversed(logs) if "num_tokens" in r), None),
            "optimizer": str(getattr(args.optim, "value", args.optim)),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "trainable_dtypes": adapter_dtypes,
            "train_samples": len(train),
        },
        **common.environment(),
    }
    common.write_result(spec, result)


if __name__ == "__main__":
    main()
