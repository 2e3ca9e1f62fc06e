"""What a run leaves besides weights: generations before/after, the model card, memory figures."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

from tunelab.config import RunConfig
from tunelab.data.formats import Sample
from tunelab.data.template import ChatRenderer


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on GPU; peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if sys.platform.startswith("linux"):
        # VmHWM starts afresh at exec; ru_maxrss does not (Linux carries it over from the forked parent, so a run
        # started by a large process, a test runner say, would report the parent's size).
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def write_samples(path: Path, samples: list[Sample], before: list[str], after: list[str]) -> None:
    """samples.jsonl: prompt, reference, base reply and fine-tuned reply per held-out sample."""
    with open(path, "w") as handle:
        for i, sample in enumerate(samples):
            record = {
                "where": sample.where,
                "prompt": sample.messages[:-1],
                "reference": sample.reference,
                "base": before[i] if i < len(before) else None,
                "fine_tuned": after[i] if i < len(after) else None,
            }
            handle.write(json.dumps(record) + "\n")


def write_model_card(run_dir: Path, config: RunConfig, summary: dict) -> None:
    """A short README.md for the run: what was trained on what, and how it scored."""
    method = config.method.name
    lines = [
        f"# {run_dir.name}",
        "",
        f"Fine-tuned from `{config.model}` with **{method}** by tunelab.",
        "",
        "| | base model | fine-tuned |",
        "|---|---:|---:|",
        f"| eval loss | {_fmt(summary['base_eval_loss'])} | {_fmt(summary['final_eval_loss'])} |",
    ]
    for name, value in summary["metrics_after"].items():
        lines.append(f"| {name} | {_fmt(summary['metrics_before'].get(name))} | {_fmt(value)} |")
    data = summary["data"]
    lines += [
        "",
        f"- data: {', '.join(data['formats'])} ({data['train_samples']} train / {data['eval_samples']} eval samples)",
        f"- steps: {summary['steps']}, trained tokens: {summary['train_tokens']:,}, "
        f"{summary['tokens_per_second']:.0f} tokens/s, {summary['precision']} on {summary['device']}",
        f"- trainable parameters: {summary['trainable_parameters']:,} of {summary['total_parameters']:,}",
        "",
        "Use it:",
        "",
        "```",
        f"tunelab chat {run_dir}",
        f"tunelab generate {run_dir} --input prompts.jsonl --output replies.jsonl",
        "```",
        "",
    ]
    if method in ("lora", "dora", "rslora", "qlora", "ia3"):
        lines[-2:-2] = [f"tunelab merge {run_dir} --output {run_dir}-merged"]
    (run_dir / "README.md").write_text("\n".join(lines))


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def save_weights(model, tokenizer, run_dir: Path, method, config: RunConfig,
                  whole_state: dict[str, torch.Tensor] | None = None) -> None:
    """The adapter (PEFT format, or the method's own) or the full model, as safetensors, and the tokenizer
    with its template. `whole_state` is the model's state gathered from its shards (FSDP)."""
    if hasattr(method, "save"):
        method.save(model, run_dir, config.method)
    elif whole_state is not None:
        model.save_pretrained(run_dir, safe_serialization=True, state_dict=whole_state)
    else:
        model.save_pretrained(run_dir, safe_serialization=True)
    # The template the run trained with travels in its tokenizer: a run used as the next stage's model (a full run's
    # folder is read as it is) or read by other tools then prompts as training did.
    own = tokenizer.chat_template
    tokenizer.chat_template = ChatRenderer(tokenizer, config.data.chat_template).portable_template
    try:
        tokenizer.save_pretrained(run_dir)
    finally:
        tokenizer.chat_template = own
