"""Generation speed: tunelab's decoding loop against transformers' `generate` on the prompts the main job's
before/after evaluation generates for (the 60 held-out support tickets of examples/lora.yaml, 48 new tokens,
greedy, in batches of the config's eval.generate_batch_size: 64, so one batch).

    python bench/generation_speed.py                       # the default model
    python bench/generation_speed.py --model runs/support-lora --repeats 3

Cases, alternated in one process so that machine drift hits all alike:
- `generate fp32`:  transformers' `generate` on the model as loaded (float32), what tunelab used before;
- `generate bf16`:  transformers' `generate` on a bfloat16 copy (model.to(torch.bfloat16), the compute dtype on CPUs
                    with AMX/AVX512-BF16);
- `tunelab fp32` / `tunelab bf16`: generate_replies with precision fp32 / bf16 (infer/decode.py).
Reported: generated tokens/s (new tokens up to and including each reply's stop token, counted from each case's
token ids), the ratios, and how many replies equal `generate`'s in each dtype (all in fp32; in bf16 rounding
differences between the two paths can tip a token). Prints a Markdown table
and writes bench/results/<timestamp>-generation.md and .json.

The bench restarts itself under tcmalloc, as the `tunelab` command does (src/tunelab/allocator.py), so both
paths allocate as the main job's evaluation does; `TUNELAB_ALLOCATOR=system` keeps the C library's malloc.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _random_model import SHAPES, model_folder
from compare_peer import machine_info

from tunelab.allocator import allocator_in_use, restart_under_tcmalloc

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="run directory, preset or model folder; or a random-weight Llama: " + ", ".join(SHAPES))
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="a random-weight model's tokenizer folder (default: the default model's)")
    parser.add_argument("--device", default=None, help="default: cuda where there is one, else cpu")
    parser.add_argument("--config", type=Path, default=REPO / "examples" / "lora.yaml",
                        help="whose held-out generation prompts to use")
    parser.add_argument("--samples", type=int, default=None, help="default: the config's eval.generate_samples")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the config's eval.max_new_tokens")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's eval.generate_batch_size")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of all cases, alternating")
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    return parser.parse_args(argv)


def held_out_conversations(config_path: Path, tokenizer, samples: int | None) -> tuple[list, int, int]:
    """(conversations, max_new_tokens, batch size) of the config's before/after evaluation."""
    from tunelab.config import load_config
    from tunelab.data.prepare import prepare_data

    config = load_config(config_path)
    data = prepare_data(config.data, tokenizer, config.train.seed)
    count = samples or config.eval.generate_samples
    return ([s.messages for s in data.eval_samples[:count]], config.eval.max_new_tokens,
            config.eval.generate_batch_size)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    restart_under_tcmalloc()
    import torch

    from tunelab.infer.generate import GenerationOptions
    from tunelab.infer.load import load_generator

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="tunelab-generation-") as workdir:
        model_path = model_folder(args.model, Path(workdir), args.tokenizer)
        loaded = load_generator(str(model_path), device)
    model, renderer, tokenizer = loaded.model, loaded.renderer, loaded.tokenizer
    conversations, configured_tokens, configured_batch = held_out_conversations(args.config, tokenizer, args.samples)
    max_new_tokens = args.max_new_tokens or configured_tokens
    args.batch_size = args.batch_size or configured_batch
    options = GenerationOptions(max_new_tokens=max_new_tokens, batch_size=args.batch_size)
    bf16_model = copy.deepcopy(model).to(torch.bfloat16).eval()  # what a user of `generate` would decode from
    return report(args, run_cases(args, model, bf16_model, renderer, conversations, max_new_tokens, options),
                  tokenizer, conversations, max_new_tokens)


def run_cases(args, model, bf16_model, renderer, conversations, max_new_tokens: int, options) -> dict:
    """Each case's replies, its seconds per round and the tokens it generated (counted from token ids, through each
    reply's first stop token: a random-weight model's replies may decode to nothing), the cases alternating round
    by round."""
    from tunelab.infer import generate as generate_module
    from tunelab.infer.generate import GenerationOptions, _generate_batches, generate_replies, stop_token_ids

    stops = set(stop_token_ids(model, renderer.tokenizer))
    counts: dict[str, int] = {}

    def through_stop(row: list[int]) -> int:
        return next((i + 1 for i, token in enumerate(row) if token in stops), len(row))

    def with_generate(name: str, target):
        real = target.generate

        def counting(**inputs):
            output = real(**inputs)
            counts[name] += sum(through_stop(row) for row in output[:, inputs["input_ids"].shape[1]:].tolist())
            return output

        def run():
            target.generate = counting
            try:
                return [r for batch in _generate_batches(target, renderer, conversations, options) for r in batch]
            finally:
                del target.generate
        return run

    def with_tunelab(name: str, precision: str):
        chosen = GenerationOptions(max_new_tokens=max_new_tokens, batch_size=args.batch_size, precision=precision)
        real = generate_module.decode

        def counting(*arguments, **keywords):
            decoded = real(*arguments, **keywords)
            counts[name] += sum(len(tokens) for tokens in decoded.tokens)
            return decoded

        def run():
            generate_module.decode = counting
            try:
                return generate_replies(model, renderer, conversations, chosen)
            finally:
                generate_module.decode = real
        return run

    cases = {"generate fp32": with_generate("generate fp32", model),
             "generate bf16": with_generate("generate bf16", bf16_model),
             "tunelab fp32": with_tunelab("tunelab fp32", "fp32"), "tunelab bf16": with_tunelab("tunelab bf16", "bf16")}
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    replies: dict[str, list[str]] = {}
    tokens: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, run in cases.items():
            counts[name] = 0
            start = time.perf_counter()
            replies[name] = run()
            seconds[name].append(time.perf_counter() - start)
            tokens[name] = counts[name]
            print(f"{name}: {seconds[name][-1]:.1f} s", file=sys.stderr)
    return {"seconds": seconds, "replies": replies, "tokens": tokens}


def report(args, measured: dict, tokenizer, conversations, max_new_tokens: int) -> int:
    seconds, replies = measured["seconds"], measured["replies"]
    cases = list(seconds)
    same = {dtype: sum(a == b for a, b in zip(replies[f"generate {dtype}"], replies[f"tunelab {dtype}"], strict=True))
            for dtype in ("fp32", "bf16")}  # replies equal to generate's (bf16: rounding may tip a token)
    tokens = measured["tokens"]
    rate = {name: tokens[name] / statistics.median(seconds[name]) for name in cases}
    result = {
        "machine": {**machine_info(Path(str(args.model))), "allocator": allocator_in_use()},
        "model": args.model, "prompts": len(conversations), "max_new_tokens": max_new_tokens,
        "batch_size": args.batch_size, "repeats": args.repeats, "seconds": seconds, "tokens": tokens,
        "tokens_per_second": rate, "same_replies": same,
        "speedup_vs_generate_same_dtype": {d: rate[f"tunelab {d}"] / rate[f"generate {d}"] for d in ("fp32", "bf16")},
        "speedup_vs_previous_path": rate["tunelab bf16"] / rate["generate fp32"],
    }
    table = render(result)
    print(table)
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"{time.strftime('%Y%m%d-%H%M%S')}-generation"
    stem.with_suffix(".md").write_text(table)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    return 0


def render(result: dict) -> str:
    machine = result["machine"]
    lines = [f"# Generation: {result['prompts']} held-out prompts, {result['max_new_tokens']} new tokens max, "
             f"greedy, batch {result['batch_size']}", "",
             f"{machine['cpu']} ({', '.join(machine['cpu_bf16']) or 'no bf16 ISA'}), "
             f"{machine['cpus_available']} cores, malloc {machine.get('allocator', 'system')}, "
             f"torch {machine['versions']['torch']}, "
             f"transformers {machine['versions']['transformers']}, tunelab {machine['tunelab_commit']}", "",
             "| case | median s | generated tokens | tokens/s |", "|---|---:|---:|---:|"]
    for name, runs in result["seconds"].items():
        lines.append(f"| {name} | {statistics.median(runs):.2f} | {result['tokens'][name]} | "
                     f"{result['tokens_per_second'][name]:.1f} |")
    speed = result["speedup_vs_generate_same_dtype"]
    lines += ["", f"tunelab / generate, same dtype: fp32 {speed['fp32']:.2f}x, bf16 {speed['bf16']:.2f}x; "
              f"tunelab bf16 / generate fp32 (the previous evaluation path): {result['speedup_vs_previous_path']:.2f}x",
              f"replies equal to generate's: fp32 {result['same_replies']['fp32']}/{result['prompts']}, "
              f"bf16 {result['same_replies']['bf16']}/{result['prompts']}",
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
