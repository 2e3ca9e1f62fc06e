"""tunelab against its peer (TRL SFTTrainer, DPOTrainer or GRPOTrainer + PEFT) on the same model, data, order and
hyper-parameters.

    python bench/compare_peer.py --cases lora-short --repeats 2 --steps 20

Runs alternate (tunelab, peer, tunelab, peer, ...), each training run in its own process, so peak memory
is per run. Prints a Markdown table and writes bench/results/<timestamp>-<case>.md and .json.
See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from _case_data import write_case_data, write_preference_data, write_prompt_data
from _random_model import SHAPES, model_folder

from tunelab.allocator import preload_environment

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CHILDREN = {"tunelab": BENCH / "_tunelab_child.py", "peer": BENCH / "_peer_child.py",
            "peer-dpo": BENCH / "_peer_dpo_child.py", "peer-grpo": BENCH / "_peer_grpo_child.py",
            "peer-rloo": BENCH / "_peer_grpo_child.py"}
PEER_TRAINERS = {"sft": "SFTTrainer", "dpo": "DPOTrainer", "grpo": "GRPOTrainer", "rloo": "RLOOTrainer"}


@dataclass(frozen=True)
class Case:
    method: str
    """lora | qlora | full"""
    data: str
    """short: one ticket per sample; long: many tickets in one user message (~400-900 tokens)"""
    max_length: int
    packing: bool = False
    lr: float = 2e-4
    objective: str = "sft"
    """sft, dpo (against TRL's DPOTrainer, on the bundled preference pairs) or grpo (against GRPOTrainer, on the
    bundled support prompts; --batch-size counts prompts, each sampled GRPO_GROUP times) or rloo (against
    RLOOTrainer, on the same prompts, with its default KL penalty RLOO_BETA: a reference pass each rollout)"""


CASES = {
    "lora-short": Case("lora", "short", 256),
    "lora-long": Case("lora", "long", 1024),
    "qlora-short": Case("qlora", "short", 256),
    "full-short": Case("full", "short", 256, lr=2e-5),
    "lora-short-packed": Case("lora", "short", 256, packing=True),
    "dpo-lora": Case("lora", "pairs", 256, lr=5e-5, objective="dpo"),
    "grpo-lora": Case("lora", "prompts", 256, lr=1e-4, objective="grpo"),
    "rloo-lora": Case("lora", "prompts", 256, lr=1e-4, objective="rloo"),
}
DPO_BETA = 0.1
GRPO_GROUP = 4
RLOO_BETA = 0.05
GRPO_COMPLETION_TOKENS = 48

# (key in a child's result, label, format, what a better tunelab/peer ratio is)
METRICS = [
    ("trained_tokens_per_second", "trained tokens/s", "{:.0f}", "higher"),
    ("total_tokens_per_second", "total tokens/s (non-pad)", "{:.0f}", "higher"),
    ("median_step_total_tokens_per_second", "total tokens/s, median step", "{:.0f}", "higher"),
    ("seconds_per_step", "s/step, median of steps 2..N", "{:.3f}", "lower"),
    ("mean_seconds_per_step", "s/step, mean of steps 2..N", "{:.3f}", "lower"),
    ("first_step_seconds", "first step s", "{:.2f}", "lower"),
    ("loop_seconds", "train loop s", "{:.1f}", "lower"),
    ("wall_seconds", "wall s (load+data+train+save)", "{:.1f}", "lower"),
    ("peak_memory_mb", "peak memory MB", "{:.0f}", "lower"),
    ("first_train_loss", "train loss, step 1", "{:.4f}", "same"),
    ("first_step_loss_sum", "train loss sum, step 1 (loss × trained tokens)", "{:.2f}", "same"),
    ("final_train_loss", "train loss, last step", "{:.4f}", "lower"),
    ("mean_train_loss", "train loss, mean of steps", "{:.4f}", "lower"),
    ("eval_loss", "held-out eval loss (DPO loss for dpo cases)", "{:.4f}", "lower"),
    ("eval_reward_accuracy", "held-out reward accuracy (dpo)", "{:.3f}", "higher"),
    ("eval_preference_accuracy", "held-out preference accuracy, model alone (dpo)", "{:.3f}", "higher"),
    ("eval_reward", "held-out reward of greedy completions (grpo)", "{:.3f}", "higher"),
    ("first_step_reward", "reward of step 1's sampled completions (grpo)", "{:.3f}", "same"),
    ("mean_step_reward", "reward of sampled completions, mean of steps (grpo)", "{:.3f}", "higher"),
    ("trained_tokens", "trained tokens", "{:.0f}", "same"),
    ("total_tokens", "total tokens (non-pad)", "{:.0f}", "same"),
    ("padding_efficiency", "non-pad / computed positions", "{:.3f}", "higher"),
    ("foreign_cpu_share", "CPU used by other processes", "{:.0%}", "info"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="lora-short",
                        help=f"comma-separated, from: {', '.join(CASES)} (or 'all')")
    parser.add_argument("--repeats", type=int, default=2, help="pairs of runs (tunelab, peer) per case")
    parser.add_argument("--steps", type=int, default=20, help="optimiser steps per run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="tunelab preset, hub id or local folder; or a random-weight Llama built from a config: "
                        + ", ".join(SHAPES) + " (speed and memory only)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="a random-weight model's tokenizer folder (default: the default model's)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto: bf16 autocast where the CPU (AMX/AVX512-BF16) or GPU supports it")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--results", type=Path, default=BENCH / "results", help="where .md and .json go")
    parser.add_argument("--workdir", type=Path, default=None, help="keep data, runs and logs here (default: temp)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per training run")
    parser.add_argument("--wait-idle", type=float, default=120,
                        help="before each run, wait up to this many seconds for other processes to leave the CPU "
                        "(under 15%% use); 0 to start at once")
    parser.add_argument("--tunelab-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra tunelab config override for its runs (repeatable), e.g. train.attention=sdpa")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile N steps from the third in every run: where each tool's step time goes")
    parser.add_argument("--peer-without-cudnn-attention", action="store_true",
                        help="keep the peer's sdpa off cuDNN, as tunelab keeps its own on CUDA (cuDNN builds a plan "
                        "for every new shape); default: the peer as its users run it")
    parser.add_argument("--malloc", choices=list(MALLOC_CHOICES), default="same", help="; ".join(
        f"{name}: {what}" for name, what in MALLOC_CHOICES.items()))
    parser.add_argument("--peer-gradient-checkpointing", action="store_true",
                        help="leave the peer's gradient checkpointing on, as TRL's SFTConfig does by default "
                        "(default: off, like tunelab)")
    args = parser.parse_args(argv)
    names = list(CASES) if args.cases == "all" else [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    args.case_names = names
    return args


# ---------------------------------------------------------------------------------------------- runs


def resolve_precision(requested: str) -> str:
    """What `auto` means on this machine: the rule tunelab's own runs follow."""
    import torch

    from tunelab.train.precision import resolve_precision as tunelab_precision

    return tunelab_precision(requested, torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def cpu_ticks() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat (zeros elsewhere)."""
    try:
        fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0, 0.0
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return (sum(fields[:8]) - idle) / hz, sum(fields[:8]) / hz


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def foreign_cpu_share(seconds: float = 2.0) -> float:
    """Fraction of the machine's CPU that processes other than this one used over `seconds`."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    busy, total = cpu_ticks()
    time.sleep(seconds)
    after = resource.getrusage(resource.RUSAGE_SELF)
    busy_after, total_after = cpu_ticks()
    mine = (after.ru_utime + after.ru_stime) - (own.ru_utime + own.ru_stime)
    return max(0.0, (busy_after - busy - mine) / max(1e-9, total_after - total))


def wait_until_quiet(limit: float, threshold: float = 0.15) -> float:
    """Wait (at most `limit` seconds) until other processes use under `threshold` of the CPU; seconds waited."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit and foreign_cpu_share() > threshold:
        pass
    return time.perf_counter() - started


MALLOC_CHOICES = {
    "same": "both children under the malloc the `tunelab` command takes (tcmalloc where the system has it): the "
            "ratio measures the tools, not malloc (default)",
    "as-run": "tunelab's child as the command runs, the peer's under the system's malloc, as TRL runs by default",
    "system": "both under the system's malloc",
}


def child_environment(tool: str, malloc: str) -> dict[str, str]:
    """The children's environment: offline, quiet, and the malloc `--malloc` asks for. The peer's step is far more
    sensitive to it (under glibc it maps and zero-fills its vocabulary-sized tensors anew every step)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error"}
    if malloc == "system" or (malloc == "as-run" and tool != "tunelab"):
        env["LD_PRELOAD"] = " ".join(p for p in env.get("LD_PRELOAD", "").split() if "tcmalloc" not in p)
        return env
    return preload_environment(env) or env


def run_child(tool: str, spec: dict, workdir: Path, name: str, timeout: int, malloc: str = "same") -> dict:
    """Run one training in its own process; its result dict (with `error` when it failed)."""
    spec_path = workdir / "specs" / f"{name}.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec, indent=2))
    log_path = workdir / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    Path(spec["result"]).parent.mkdir(parents=True, exist_ok=True)
    env = child_environment(tool, malloc)
    load_before = os.getloadavg()
    busy, total = cpu_ticks()
    child_cpu = children_cpu_seconds()
    started = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            objective = spec.get("objective", "sft")
            child = CHILDREN[f"peer-{objective}" if tool == "peer" and objective != "sft" else tool]
            code = subprocess.run([sys.executable, str(child), str(spec_path)], stdout=log,
                                  stderr=subprocess.STDOUT, env=env, cwd=BENCH, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    process_seconds = time.perf_counter() - started
    busy_after, total_after = cpu_ticks()
    # CPU the rest of the machine used while this run went: a run on a shared CPU is only comparable to its
    # pair when this is near zero.
    foreign = (busy_after - busy) - (children_cpu_seconds() - child_cpu)
    foreign_share = max(0.0, foreign / max(1e-9, total_after - total))
    result_path = Path(spec["result"])
    if code != 0 or not result_path.is_file():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        return {"tool": tool, "error": f"exit {code}; log {log_path}:\n{tail}"}
    result = json.loads(result_path.read_text())
    result.update(process_seconds=process_seconds, load_average_at_start=load_before, log=str(log_path),
                  foreign_cpu_share=foreign_share)
    # Summed step-1 loss: equal for both tools when they start from the same weights and batch, whatever
    # extra tokens one of them trains that are near-free to predict (see README).
    if result.get("first_train_loss") is not None and spec.get("objective", "sft") == "sft":
        result["first_step_loss_sum"] = result["first_train_loss"] * result["step_trained_tokens"][0]
    return result


def child_spec(case: Case, data: dict, model_path: Path, args, precision: str, run_dir: Path, result: Path) -> dict:
    return {
        "model_path": str(model_path),
        "method": case.method,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "objective": case.objective,
        "beta": RLOO_BETA if case.objective == "rloo" else DPO_BETA,
        "group_size": GRPO_GROUP,
        "max_new_tokens": GRPO_COMPLETION_TOKENS,
        **{key: data[key] for key in ("train_chat", "train_prompt_completion", "eval_chat", "train_pairs",
                                      "eval_pairs", "train_prompts", "eval_prompts") if key in data},
        "max_length": case.max_length,
        "packing": case.packing,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "lr": case.lr,
        "seed": args.seed,
        "precision": precision,
        "tunelab_overrides": args.tunelab_set,
        "profile_steps": args.profile,
        "peer_gradient_checkpointing": args.peer_gradient_checkpointing,
        "peer_without_cudnn_attention": args.peer_without_cudnn_attention,
        "run_dir": str(run_dir),
        "result": str(result),
    }


def run_case(name: str, args, model_path: Path, precision: str, workdir: Path) -> dict:
    case = CASES[name]
    folder = workdir / name / "data"
    if case.objective == "dpo":
        data = write_preference_data(folder, args.steps, args.batch_size)
    elif case.objective in ("grpo", "rloo"):
        data = write_prompt_data(folder, args.steps, args.batch_size)
    else:
        data = write_case_data(case, folder, model_path, args.steps, args.batch_size, args.seed)
    runs: list[dict] = []
    for repeat in range(1, args.repeats + 1):
        for tool in ("tunelab", "peer"):
            label = f"{name}-{tool}-{repeat}"
            spec = child_spec(case, data, model_path, args, precision, workdir / name / "runs" / label,
                              workdir / name / "results" / f"{label}.json")
            waited = wait_until_quiet(args.wait_idle) if args.wait_idle else 0.0
            note = f" (waited {waited:.0f} s for other processes)" if waited >= 5 else ""
            print(f"[{name}] repeat {repeat}/{args.repeats}: {tool} ...{note}", file=sys.stderr, flush=True)
            result = run_child(tool, spec, workdir / name, label, args.timeout, args.malloc)
            result.update(repeat=repeat, waited_for_quiet_seconds=waited)
            runs.append(result)
            if "error" in result:
                print(f"[{name}] {tool} failed: {result['error']}", file=sys.stderr, flush=True)
                return {"case": name, "settings": asdict(case), "data": data, "runs": runs, "failed": True}
            print(f"[{name}] {tool}: {result['seconds_per_step']:.3f} s/step, "
                  f"{result['trained_tokens_per_second']:.0f} trained tok/s, "
                  f"eval loss {result.get('eval_loss', 0):.4f}, "
                  f"eval reward {result.get('eval_reward', 0):.3f}, "
                  f"other processes used {result['foreign_cpu_share']:.0%} of the CPU", file=sys.stderr, flush=True)
    return {"case": name, "settings": asdict(case), "data": data, "runs": runs, "failed": False}


# ---------------------------------------------------------------------------------------------- report


def spread(values: list[float], fmt: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    middle = statistics.median(values)
    return f"{fmt.format(middle)} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def summarise(outcome: dict) -> dict:
    """Per metric: tunelab and peer values over repeats, and the tunelab/peer ratio of each repeat's pair."""
    by_tool = {tool: [r for r in outcome["runs"] if r.get("tool") == tool and "error" not in r]
               for tool in ("tunelab", "peer")}
    pairs = list(zip(by_tool["tunelab"], by_tool["peer"], strict=False))
    summary = {}
    for key, _, _, better in METRICS:
        ratios = [t[key] / p[key] for t, p in pairs if t.get(key) is not None and p.get(key) and better != "info"]
        summary[key] = {
            "tunelab": [r.get(key) for r in by_tool["tunelab"]],
            "peer": [r.get(key) for r in by_tool["peer"]],
            "ratio": ratios,
            "ratio_min_median_max": [min(ratios), statistics.median(ratios), max(ratios)] if ratios else None,
        }
    return summary


def breakdown_table(runs: list[dict]) -> list[str]:
    """Each profiled run's step time by category (train/step_profile.py), as shares of the step's wall time."""
    profiled = [r for r in runs if r.get("step_breakdown")]
    if not profiled:
        return []
    from tunelab.train.step_profile import CATEGORIES

    on_device = any(r["step_breakdown"].get("device_time") for r in profiled)
    measured = ("kernels' device time; unaccounted = the device idle, waiting on the host" if on_device
                else "self time of ops; unaccounted = Python, data, framework")
    lines = ["", f"Where a step's time goes (torch.profiler, {measured}):",
             "", "| run | tool | s/step profiled | " + " | ".join(CATEGORIES) + " | non-matmul | ops/step |",
             "|---|---|---:|" + "---:|" * (len(CATEGORIES) + 2)]
    for r in profiled:
        found = r["step_breakdown"]
        shares = " | ".join(f"{100 * found['share'].get(name, 0):.1f}%" for name in CATEGORIES)
        lines.append(f"| {r['repeat']} | {r['tool']} | {found['seconds_per_step']:.3f} | {shares} | "
                     f"{100 * found['non_matmul_share']:.1f}% | {found.get('ops_per_step', '')} |")
    lines += ["", "ops/step: aten calls dispatched a step from Python or autograd (not what they call inside); "
              "where the device waits on the host, they set the step time"]
    return lines


def markdown(outcome: dict, summary: dict, machine: dict, args) -> str:
    case = outcome["settings"]
    runs = [r for r in outcome["runs"] if "error" not in r]
    first = {tool: next((r for r in runs if r["tool"] == tool), {}) for tool in ("tunelab", "peer")}
    lines = [
        f"## {outcome['case']}: tunelab vs TRL {PEER_TRAINERS[case['objective']]} + PEFT",
        "",
        f"- model `{args.model}`, method **{case['method']}**"
        + (" (r=16, alpha=32, dropout 0, all-linear)" if case["method"] != "full" else "")
        + f", {args.steps} steps, batch {args.batch_size}, max_length {case['max_length']}, lr {case['lr']} constant, "
        f"no warm-up, grad clip 1.0, seed {args.seed}, {outcome['data']['train_rows']} train / "
        f"{outcome['data']['eval_rows']} held-out rows, "
        + {"dpo": f"DPO sigmoid loss, beta {DPO_BETA}, reference = base with the adapter off",
           "grpo": f"GRPO dapo loss, {GRPO_GROUP} completions per prompt of at most {GRPO_COMPLETION_TOKENS} tokens, "
                   "temperature 1, beta 0, reward = share of the JSON fields right + 0.25 for valid JSON "
                   "(bench/_grpo_reward.py)",
           "rloo": f"RLOO, {GRPO_GROUP} completions per prompt of at most {GRPO_COMPLETION_TOKENS} tokens, "
                   f"temperature 1, beta {RLOO_BETA} (KL to the base, the adapter off), advantages not normalised, "
                   "reward = share of the JSON fields right + 0.25 for valid JSON (bench/_grpo_reward.py)",
           }.get(case["objective"], "assistant-only loss"),
        f"- precision: tunelab {first['tunelab'].get('precision', '-')} (linear layers computed in "
        f"{first['tunelab'].get('observed_compute_dtype', '-')}), peer {first['peer'].get('precision', '-')} "
        f"(computed in {first['peer'].get('observed_compute_dtype', '-')}), fp32 master weights; "
        f"device {machine['device']} ({machine['cpu']}, bf16 ISA: {', '.join(machine['cpu_bf16']) or 'none'}, "
        f"{machine['cpus_available']} cores, "
        f"torch threads {first['tunelab'].get('torch_threads', '-')}; malloc: tunelab "
        f"{first['tunelab'].get('allocator', '-')}, peer {first['peer'].get('allocator', '-')})",
        f"- batching: tunelab {first['tunelab'].get('batching', '-')}; peer {first['peer'].get('batching', '-')}",
        f"- tunelab overrides: {', '.join(args.tunelab_set) or 'none'} (kernels in use: "
        f"{first['tunelab'].get('kernels') or '-'}); peer gradient checkpointing: "
        + ("on (TRL's default)" if args.peer_gradient_checkpointing else "off (like tunelab)")
        + f"; peer attention: {first['peer'].get('attention', '-')}",
        f"- versions: tunelab {machine['tunelab_commit']}, trl {machine['versions'].get('trl')}, "
        f"transformers {machine['versions'].get('transformers')}, peft {machine['versions'].get('peft')}, "
        f"torch {machine['versions'].get('torch')}",
        f"- {len(runs) // 2} repeat(s), alternating tunelab/peer, one process per run; "
        "cells are median (min–max) over repeats; ratio = tunelab / peer per repeat pair",
        "",
        "| metric | tunelab | peer | tunelab / peer | better |",
        "|---|---:|---:|---:|---|",
    ]
    for key, label, fmt, better in METRICS:
        entry = summary[key]
        ratio = spread(entry["ratio"], "{:.3f}")
        tunelab, peer = spread(entry["tunelab"], fmt), spread(entry["peer"], fmt)
        lines.append(f"| {label} | {tunelab} | {peer} | {ratio} | {better} |")
    lines += [
        "",
        "| run | tool | s/step (median) | trained tok/s | total tok/s | peak MB | last loss | "
        "eval loss (grpo: reward) | other processes' CPU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r['repeat']} | {r['tool']} | {r['seconds_per_step']:.3f} | {r['trained_tokens_per_second']:.0f} | "
            f"{r['total_tokens_per_second']:.0f} | {r['peak_memory_mb']:.0f} | {r['final_train_loss']:.4f} | "
            f"{r.get('eval_loss', r.get('eval_reward', 0)):.4f} | {r['foreign_cpu_share']:.0%} |"
        )
    lines += breakdown_table(runs)
    busy = [r for r in runs if r["foreign_cpu_share"] > 0.10]
    if busy:
        named = ", ".join(f"{r['tool']} {r['repeat']}" for r in busy)
        lines += ["", f"**Warning:** other processes used over 10% of the CPU during {len(busy)} run(s) ({named}); "
                  "their timings are not comparable."]
    failures = [r for r in outcome["runs"] if "error" in r]
    if failures:
        lines += ["", "**Failed runs:**", ""] + [
            f"- {r['tool']}: {r['error'].splitlines()[0]} {r['error'].splitlines()[-1]}" for r in failures
        ]
    return "\n".join(lines) + "\n"


def _git(*arguments: str) -> str:
    """git's output in the repository, or "" where there is no git or no .git (a GPU machine's copy of the tree)."""
    try:
        return subprocess.run(["git", *arguments], cwd=REPO, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def machine_info(model_path: Path) -> dict:
    import torch

    from tunelab.train.flops import hardware

    found = hardware(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    versions = {}
    for package in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "tunelab"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    commit, dirty = _git("rev-parse", "--short", "HEAD"), _git("status", "--porcelain", "src")
    return {
        "cpu": found["cpu"],
        "cpu_bf16": found["cpu_bf16"],
        "cpus_available": found["cores"],
        "device": found["gpu"] or "cpu",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "tunelab_commit": (commit or "unknown") + (" (src modified)" if dirty else ""),
        "model_path": str(model_path),
        "load_average": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    precision = resolve_precision(args.precision)
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    temp = None
    if args.workdir is None:
        temp = tempfile.TemporaryDirectory(prefix="tunelab-bench-")
        workdir = Path(temp.name)
    else:
        workdir = args.workdir
    failed = False
    try:
        if args.model in SHAPES:
            print(f"building {args.model} (random weights) ...", file=sys.stderr, flush=True)
        model_path = model_folder(args.model, workdir, args.tokenizer, seed=args.seed)
        machine = machine_info(model_path)
        for name in args.case_names:
            outcome = run_case(name, args, model_path, precision, workdir)
            summary = summarise(outcome)
            text = markdown(outcome, summary, machine, args)
            print(text)
            base = args.results / f"{stamp}-{name}"
            base.with_suffix(".md").write_text(text)
            record = {"command": " ".join(sys.argv), "timestamp": stamp, "machine": machine,
                      "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                      **outcome, "summary": summary}
            base.with_suffix(".json").write_text(json.dumps(record, indent=2))
            print(f"wrote {base}.md and .json", file=sys.stderr)
            failed = failed or outcome["failed"]
    finally:
        if temp is not None:
            temp.cleanup()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
