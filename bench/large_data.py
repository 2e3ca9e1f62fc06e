"""Large data: a ~1 GB JSONL trains with bounded memory, and a second run skips tokenising.

    .venv/bin/python bench/large_data.py                    # 1 GB, default model's tokenizer, 3 training steps
    .venv/bin/python bench/large_data.py --size-gb 0.05     # a quick look

Writes a JSONL of instruction pairs (alpaca rows) of the asked size into --dir, then runs, each in its own
process (so each peak RSS is that run's alone):

1. `prepare (miss)`: tokenised-data cache empty: stream, validate, tokenise and write the Arrow tables, then plan
   epoch 0 with packing (what a training run does before its first step);
2. `prepare (hit)`: the same again: hash the file, memory-map the tables, split, plan;
3. `train, small data` and `train, large data`: `tunelab train` on the default model for --steps steps with
   packing, on a small file of the same rows and on the large file (cache hit), so their peak RSS differ only
   by what the data costs.

Peak RSS is ru_maxrss (it counts the pages of the memory-mapped tables a run touched). The cache goes to a
scratch TUNELAB_HOME under --dir; it and the data file are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

WORDS = (
    "the a customer order refund shipping desk chair lamp monitor keyboard cable warranty invoice account "
    "password reset delivery address late broken missing replace return label package carrier tracking number "
    "please help me with my why when where how can could would should will is are was were be been not "
    "today tomorrow yesterday week month year price discount coupon code payment card bank transfer failed "
    "charged twice cancel subscription upgrade plan support agent thanks hello sorry quickly soon again"
).split()


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_rows(path: Path, target_bytes: int, seed: int) -> tuple[int, int]:
    """Alpaca rows of random support-desk words until the file holds target_bytes. Returns (rows, bytes)."""
    rng = random.Random(seed)
    rows = written = 0
    with open(path, "w", encoding="utf-8") as handle:
        while written < target_bytes:
            row = {
                "instruction": " ".join(rng.choices(WORDS, k=rng.randint(12, 60))),
                "input": " ".join(rng.choices(WORDS, k=rng.randint(0, 20))),
                "output": " ".join(rng.choices(WORDS, k=rng.randint(20, 110))),
            }
            line = json.dumps(row) + "\n"
            handle.write(line)
            written += len(line)
            rows += 1
    return rows, written


def child_prepare(args) -> dict:
    started = time.perf_counter()
    from tunelab.config import DataConfig
    from tunelab.data.batching import plan_epoch
    from tunelab.data.cache import file_digest
    from tunelab.data.prepare import prepare_data
    from tunelab.models.load import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    after_imports = rss_mb()
    config = DataConfig(train=args.data, eval_split=0.001, max_length=args.max_length, packing=True)
    clock = time.perf_counter()
    data = prepare_data(config, tokenizer, seed=42)
    prepare_seconds = time.perf_counter() - clock
    clock = time.perf_counter()
    plan = plan_epoch(data.train, batch_size=8, seed=42, epoch=0, packing=True, max_length=args.max_length)
    plan_seconds = time.perf_counter() - clock
    first = data.train[int(plan.ids[0])]  # a row is built on demand from the memory map
    clock = time.perf_counter()
    file_digest(Path(args.data))
    hash_seconds = time.perf_counter() - clock
    return {
        "prepare_seconds": round(prepare_seconds, 1),
        "plan_seconds": round(plan_seconds, 1),
        "hash_seconds": round(hash_seconds, 2),
        "batches_epoch_0": len(plan.batches),
        "first_row_tokens": len(first.input_ids),
        "stats": {k: v for k, v in data.stats.items() if k != "formats"},
        "rss_after_imports_mb": round(after_imports, 1),
        "rss_end_mb": round(rss_mb(), 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "process_seconds": round(time.perf_counter() - started, 1),
    }


def child_train(args) -> dict:
    from tunelab.config import load_config
    from tunelab.train.run import train_run

    after_imports = rss_mb()
    overrides = [
        f"model={args.model}",
        f"data.train={args.data}",
        f"data.eval={args.eval}",
        f"data.max_length={args.max_length}",
        "data.packing=true",
        f"train.max_steps={args.steps}",
        "train.batch_size=2",
        "eval.before_after=false",
        "eval.generate_samples=0",
        f"output_dir={args.out}",
    ]
    clock = time.perf_counter()
    summary = train_run(load_config(None, overrides), overwrite=True)
    return {
        "wall_seconds": round(time.perf_counter() - clock, 1),
        "train_seconds": summary["train_seconds"],
        "steps": summary["steps"],
        "train_samples": summary["data"]["train_samples"],
        "tokenized_cache": summary["data"]["tokenized_cache"],
        "rss_after_imports_mb": round(after_imports, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def run_child(kind: str, args, home: Path, **extra) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--model",
        str(args.model),
        "--max-length",
        str(args.max_length),
        "--steps",
        str(args.steps),
    ]
    for key, value in extra.items():
        command += [f"--{key}", str(value)]
    env = {
        **os.environ,
        "TUNELAB_HOME": str(home),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "RAYON_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{kind} child failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["child_wall_seconds"] = round(time.perf_counter() - started, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--dir", type=Path, default=Path("/tmp"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--model", default=None, help="model folder (default: tunelab's smollm2-135m-instruct)")
    parser.add_argument("--keep", action="store_true", help="keep the data file and the cache")
    parser.add_argument("--child", choices=["prepare", "train"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--eval", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child_prepare(args) if args.child == "prepare" else child_train(args)
        print(json.dumps(result))
        return
    if args.model is None:
        from tunelab.models.resolve import resolve_model

        args.model = resolve_model("smollm2-135m-instruct")
    work = args.dir / f"tunelab-large-data-{os.getpid()}"
    home = work / "home"
    work.mkdir(parents=True)
    big, small, held = work / "large.jsonl", work / "small.jsonl", work / "eval.jsonl"
    try:
        clock = time.perf_counter()
        rows, size = write_rows(big, int(args.size_gb * 1e9), seed=0)
        print(f"wrote {big}: {size / 1e9:.2f} GB, {rows:,} rows in {time.perf_counter() - clock:.0f} s", flush=True)
        write_rows(small, 2_000_000, seed=1)
        write_rows(held, 20_000, seed=2)
        results: dict = {"file_bytes": size, "file_rows": rows, "max_length": args.max_length, "steps": args.steps}
        for name in ("prepare_miss", "prepare_hit"):
            results[name] = run_child("prepare", args, home, data=big)
            print(name, json.dumps(results[name]), flush=True)
        for name, data in (("train_small", small), ("train_large", big)):
            results[name] = run_child("train", args, home, data=data, eval=held, out=work / name)
            print(name, json.dumps(results[name]), flush=True)
        cache_bytes = sum(f.stat().st_size for f in (home / "cache").rglob("*") if f.is_file())
        results["cache_bytes"] = cache_bytes
        report(results)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def report(r: dict) -> None:
    gb = r["file_bytes"] / 1e9
    miss, hit, small, large = r["prepare_miss"], r["prepare_hit"], r["train_small"], r["train_large"]
    lines = [
        f"file: {gb:.2f} GB JSONL, {r['file_rows']:,} rows -> {miss['stats']['train_samples']:,} train samples, "
        f"{miss['stats']['train_tokens']:,} tokens; cache on disk {r['cache_bytes'] / 1e9:.2f} GB",
        "",
        "| run | wall s | peak RSS MB | RSS after imports MB |",
        "|---|---:|---:|---:|",
        f"| prepare, cache miss (read+tokenise+write, then plan epoch 0) | {miss['prepare_seconds']} + "
        f"{miss['plan_seconds']} | {miss['peak_rss_mb']} | {miss['rss_after_imports_mb']} |",
        f"| prepare, cache hit (hash+map+split, then plan epoch 0) | {hit['prepare_seconds']} + "
        f"{hit['plan_seconds']} | {hit['peak_rss_mb']} | {hit['rss_after_imports_mb']} |",
        f"| train {r['steps']} steps, small file (2 MB) | {small['wall_seconds']} | {small['peak_rss_mb']} | "
        f"{small['rss_after_imports_mb']} |",
        f"| train {r['steps']} steps, large file (cache {large['tokenized_cache']}) | {large['wall_seconds']} | "
        f"{large['peak_rss_mb']} | {large['rss_after_imports_mb']} |",
        "",
        f"hashing the file: {hit['hash_seconds']} s; data's share of training peak RSS: "
        f"{large['peak_rss_mb'] - small['peak_rss_mb']:.0f} MB",
    ]
    print("\n".join(lines))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(__file__).parent / "results" / f"{stamp}-large-data"
    out.with_suffix(".json").write_text(json.dumps(r, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}.md/.json")


if __name__ == "__main__":
    main()
