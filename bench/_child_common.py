"""What both benchmark children share, so that the two tools are measured by the same code.

- `StepClock`: per-batch token counts (fed by each child's collate wrapper) and the wall-clock time at the
  end of every optimiser step (a global `torch.optim` step hook, which fires for either tool's optimiser).
- `heldout_eval_loss`: token-weighted cross-entropy over the assistant tokens of the held-out rows,
  computed here after training on the reloaded weights, independent of either tool's eval code.
- `peak_memory_mb`: ru_maxrss of the child on CPU, torch.cuda.max_memory_allocated on GPU.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from tunelab.allocator import allocator_in_use

IGNORE_INDEX = -100


def read_spec() -> dict:
    """The run spec the harness wrote (argv[1]); see compare_peer.child_spec."""
    return json.loads(Path(sys.argv[1]).read_text())


def write_result(spec: dict, result: dict) -> None:
    Path(spec["result"]).write_text(json.dumps(result, indent=2))


def training_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class StepClock:
    """Token counts per collated batch and the time each optimiser step ended."""

    def __init__(self) -> None:
        self.batches: list[dict] = []
        self.step_ends: list[float] = []
        self._hook = register_optimizer_step_post_hook(self._on_step)
        self.compute_dtype: str | None = None
        self._dtype_hook = torch.nn.modules.module.register_module_forward_hook(self._on_forward)

    def _on_forward(self, module, args, output) -> None:
        """Record the dtype the first training-time linear layer computes in: the precision actually used. By class
        name: PEFT's LoRA layers are not nn.Linear, and tunelab's frozen head is not called as a module."""
        if ("Linear" in type(module).__name__ and torch.is_grad_enabled() and isinstance(output, torch.Tensor)
                and output.is_floating_point()):
            self.compute_dtype = str(output.dtype).removeprefix("torch.")
            self._dtype_hook.remove()

    def _on_step(self, optimizer, args, kwargs) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_ends.append(time.perf_counter())

    def record_batch(self, *, trained: int, nonpad: int, computed: int) -> None:
        """trained: positions that carry loss; nonpad: real tokens; computed: tensor positions (with padding)."""
        self.batches.append({"at": time.perf_counter(), "trained": trained, "nonpad": nonpad, "computed": computed})

    def summary(self, steps: int, grad_accum: int = 1) -> dict:
        """Throughput over the whole loop (first collate to last step); per-step time as the median of steps
        2..N (robust to a burst of foreign load on a shared machine; the mean is kept too).

        Collators may run ahead of the loop (a prefetching data loader), so only the first steps x grad_accum
        batches count, in the order they were collated.
        """
        self._hook.remove()
        used = self.batches[: steps * grad_accum]
        ends = self.step_ends[:steps]
        if len(ends) < steps or len(used) < steps * grad_accum:
            raise RuntimeError(f"saw {len(ends)} optimiser steps and {len(used)} batches; expected {steps}")
        per_step = [used[i * grad_accum : (i + 1) * grad_accum] for i in range(steps)]
        trained = [sum(b["trained"] for b in group) for group in per_step]
        nonpad = [sum(b["nonpad"] for b in group) for group in per_step]
        computed = [sum(b["computed"] for b in group) for group in per_step]
        loop_seconds = ends[-1] - used[0]["at"]
        step_seconds = [b - a for a, b in zip([used[0]["at"], *ends[:-1]], ends, strict=True)]
        first = 1 if steps > 1 else 0
        steady = step_seconds[first:]
        steady_seconds = sum(steady)
        return {
            "observed_compute_dtype": self.compute_dtype,
            "loop_seconds": loop_seconds,
            "first_step_seconds": step_seconds[0],
            "seconds_per_step": statistics.median(steady),
            "mean_seconds_per_step": steady_seconds / len(steady),
            "trained_tokens": sum(trained),
            "total_tokens": sum(nonpad),
            "computed_tokens": sum(computed),
            "padding_efficiency": sum(nonpad) / max(1, sum(computed)),
            "trained_tokens_per_second": sum(trained) / loop_seconds,
            "total_tokens_per_second": sum(nonpad) / loop_seconds,
            "steady_trained_tokens_per_second": sum(trained[first:]) / steady_seconds,
            "steady_total_tokens_per_second": sum(nonpad[first:]) / steady_seconds,
            "median_step_total_tokens_per_second": statistics.median(
                n / t for n, t in zip(nonpad[first:], steady, strict=True)
            ),
            "step_seconds": step_seconds,
            "step_trained_tokens": trained,
            "step_total_tokens": nonpad,
        }


def peer_attention(spec: dict) -> str:
    """The peer's SDPA backends: PyTorch's default, or with `--peer-without-cudnn-attention` kept off cuDNN as
    tunelab keeps its own (models/attention.py: cuDNN builds a plan for every new shape), to compare against a
    peer tuned that way too. Returns what the peer ran, for the report."""
    if spec.get("peer_without_cudnn_attention") and torch.cuda.is_available():
        from tunelab.models.attention import avoid_per_shape_attention_plans

        avoid_per_shape_attention_plans(torch.device("cuda"))
        return "sdpa without cuDNN"
    return "PyTorch's default sdpa"


def step_profiler(spec: dict):
    """tunelab's StepProfiler (train/step_profile.py) over spec["profile_steps"] steps from the third, for either
    tool (it hooks the optimiser's step, not a training loop); a no-op context when not asked for."""
    from tunelab.train.step_profile import step_profiler as profiler_for

    return profiler_for(spec.get("profile_steps") or 0, spec["steps"], is_main=True)


def breakdown(profiler) -> dict:
    found = getattr(profiler, "breakdown", None)
    return {"step_breakdown": found.to_json()} if found is not None else {}


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on GPU; peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def assistant_targets(tokenizer, messages: list[dict], max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one chat row: labels are the ids of the final assistant reply through its
    end-of-turn token (the tokenizer's EOS), -100 elsewhere. Built from the tokenizer's own chat template:
    the reply is what the full rendering adds after the generation prompt."""
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
    end = len(ids)
    if tokenizer.eos_token_id in ids[len(prompt_ids) :]:
        end = ids.index(tokenizer.eos_token_id, len(prompt_ids)) + 1
    labels = [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids) : end] + [IGNORE_INDEX] * (len(ids) - end)
    return ids[:max_length], labels[:max_length]


def _forward_padded(model, chunk: list[tuple[list[int], list[int]]], pad: int, *, precision: str,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B, T, V], labels [B, T]) of (input_ids, labels) rows padded on the right."""
    width = max(len(ids) for ids, _ in chunk)
    input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
    labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(chunk), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(chunk):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention[i, : len(ids)] = 1
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
    return logits, labels


@torch.no_grad()
def heldout_eval_loss(model, tokenizer, eval_path: str, *, max_length: int, precision: str,
                      device: torch.device) -> dict:
    """Token-weighted mean cross-entropy over the assistant tokens of every held-out row."""
    rows = [json.loads(line) for line in Path(eval_path).read_text().splitlines() if line.strip()]
    samples = [assistant_targets(tokenizer, row["messages"], max_length) for row in rows]
    batch_size = max(1, 2048 // max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        logits, labels = _forward_padded(model, chunk, pad, precision=precision, device=device)
        targets = labels[:, 1:].to(device)  # [B, T-1]: position t predicts token t+1
        logits = logits[:, :-1].float()  # [B, T-1, V]
        keep = targets != IGNORE_INDEX
        total += float(torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum"))
        count += int(keep.sum())
    return {"eval_loss": total / max(1, count), "eval_tokens": count, "eval_rows": len(samples)}


@torch.no_grad()
def pair_logps(model, tokenizer, pairs: list[dict], *, max_length: int, precision: str,
               device: torch.device) -> list[tuple[float, float]]:
    """(summed log-probability of the chosen reply, of the rejected reply) for each conversational pair, each
    reply through its end-of-turn token after the prompt as the chat template renders it."""
    sequences = [assistant_targets(tokenizer, [*p["prompt"], *p[key]], max_length)
                 for p in pairs for key in ("chosen", "rejected")]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    sums: list[float] = []
    for start in range(0, len(sequences), 8):
        chunk = sequences[start : start + 8]
        logits, labels = _forward_padded(model, chunk, pad, precision=precision, device=device)
        targets = labels[:, 1:].to(device)
        logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        keep = targets != IGNORE_INDEX
        picked = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
        sums += picked.sum(dim=1).tolist()
    return list(zip(sums[0::2], sums[1::2], strict=True))


def heldout_preference(model, reference, tokenizer, eval_path: str, *, beta: float, max_length: int,
                       precision: str, device: torch.device) -> dict:
    """DPO's held-out loss and reward accuracy (margin over the untrained reference), and how often the trained
    model alone ranks the chosen reply above the rejected one, on every held-out pair."""
    pairs = [json.loads(line) for line in Path(eval_path).read_text().splitlines() if line.strip()]
    policy = pair_logps(model, tokenizer, pairs, max_length=max_length, precision=precision, device=device)
    base = pair_logps(reference, tokenizer, pairs, max_length=max_length, precision=precision, device=device)
    margins = [(pc - pr) - (rc - rr) for (pc, pr), (rc, rr) in zip(policy, base, strict=True)]
    losses = [float(torch.nn.functional.softplus(torch.tensor(-beta * m))) for m in margins]
    return {
        "eval_loss": sum(losses) / len(losses),
        "eval_reward_accuracy": sum(m > 0 for m in margins) / len(margins),
        "eval_preference_accuracy": sum(pc > pr for pc, pr in policy) / len(policy),
        "eval_preference_accuracy_base": sum(rc > rr for rc, rr in base) / len(base),
        "eval_rows": len(pairs),
    }


@torch.no_grad()
def heldout_reward(model, tokenizer, eval_path: str, *, max_new_tokens: int, precision: str,
                   device: torch.device) -> dict:
    """The mean reward (bench/_grpo_reward.py) of greedy completions of every held-out prompt, each rendered with
    the tokenizer's own chat template and generation prompt."""
    from _grpo_reward import json_reward

    rows = [json.loads(line) for line in Path(eval_path).read_text().splitlines() if line.strip()]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    texts: list[str] = []
    for start in range(0, len(rows), 16):
        chunk = rows[start : start + 16]
        prompts = [tokenizer(tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True),
                             add_special_tokens=False)["input_ids"] for r in chunk]
        width = max(map(len, prompts))
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            output = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                    do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        texts += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in output[:, width:]]
    rewards = json_reward([r["prompt"] for r in rows], texts, [r["answer"] for r in rows])
    return {"eval_reward": sum(rewards) / len(rewards), "eval_rows": len(rows)}


def evaluate(spec: dict, run_dir: Path, tokenizer, device: torch.device) -> dict:
    """The harness's held-out measurement of a finished run: SFT loss, DPO loss and accuracies, or GRPO's mean
    reward of greedy completions."""
    model = load_trained_model(spec, run_dir, device)
    if spec.get("objective") in ("grpo", "rloo"):
        return heldout_reward(model, tokenizer, spec["eval_prompts"], max_new_tokens=spec["max_new_tokens"],
                              precision=spec["precision"], device=device)
    if spec.get("objective", "sft") == "sft":
        return heldout_eval_loss(model, tokenizer, spec["eval_chat"], max_length=spec["max_length"],
                                 precision=spec["precision"], device=device)
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32, use_kernels=False)
    reference = reference.to(device)
    return heldout_preference(model, reference, tokenizer, spec["eval_pairs"], beta=spec["beta"],
                              max_length=spec["max_length"], precision=spec["precision"], device=device)


def load_trained_model(spec: dict, run_dir: Path, device: torch.device):
    """The trained model as the tool saved it: base (+ 4-bit when QLoRA) plus the PEFT adapter, or the full
    fine-tuned checkpoint. Both tools' outputs are reloaded the same way."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if spec["method"] == "full":
        return AutoModelForCausalLM.from_pretrained(run_dir, dtype=torch.float32, use_kernels=False).to(device)
    kwargs: dict = {"dtype": torch.float32}
    if spec["method"] == "qlora":
        compute = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
        )
        kwargs["device_map"] = str(device)
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(spec["model_path"], use_kernels=False, **kwargs)
    if spec["method"] != "qlora":
        base = base.to(device)
    return PeftModel.from_pretrained(base, run_dir)


def run_measurements(*, steps: int, wall: float, peak: float, peak_rss: float, losses: list[float],
                     evaluation: dict, clock, planned_steps: int) -> dict:
    """The fields every child reports the same way, so both tools' results are read by one rule."""
    return {
        "steps": steps,
        "wall_seconds": wall,
        "peak_memory_mb": peak,
        "peak_rss_mb": peak_rss,
        "losses": losses,
        "first_train_loss": losses[0] if losses else None,
        "final_train_loss": losses[-1] if losses else None,
        "mean_train_loss": sum(losses) / len(losses) if losses else None,
        **evaluation,
        **clock.summary(planned_steps),
        "allocator": allocator_in_use(),
    }


def environment() -> dict:
    """What this child ran with (threads and load matter for CPU timings)."""
    return {
        "torch_threads": torch.get_num_threads(),
        "load_average_at_end": os.getloadavg(),
        "pid": os.getpid(),
    }
