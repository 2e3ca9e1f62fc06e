"""`tunelab serve` against llama-cpp-python's OpenAI server on the same model: completion tokens per second at
1, 8 and 32 concurrent clients.

    python bench/serve_throughput.py                           # the default model, bf16 both sides
    python bench/serve_throughput.py --precision fp32          # tunelab in float32, the peer on an f32 GGUF
    python bench/serve_throughput.py --model runs/support-lora --clients 1,8,32 --max-tokens 64

The model (a run, with its adapter folded in for the peer, or any model tunelab loads) is exported with
`tunelab export --format gguf` (checked on export) and served by llama-cpp-python's server
(`pip install 'llama-cpp-python[server]'`, built from source: no wheel on PyPI). Both servers get the same
chat requests (held-out support tickets), greedy, the same `max_tokens`, and every core. One server runs at a
time; each concurrency level starts with a warm server. Clients are the `openai` package's async client. Prints
a Markdown table and writes bench/results/<timestamp>-serve-throughput.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from _case_data import EVAL_EVERY, ticket_chat, ticket_rows
from compare_peer import machine_info

BENCH = Path(__file__).resolve().parent
TUNELAB = str(Path(sys.executable).parent / "tunelab")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="run directory, preset or model folder")
    parser.add_argument("--clients", default="1,8,32", help="concurrency levels, comma-separated")
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends, one after the other")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="what tunelab serve decodes in")
    parser.add_argument("--tunelab-compile", action="store_true",
                        help="serve with --compile (the one-token step compiled; its compile runs before the server "
                             "answers, so it is not in the numbers)")
    parser.add_argument("--tunelab-no-lookup", action="store_true",
                        help="serve with --no-lookup (one token a pass; lookup drafts are on by default)")
    parser.add_argument("--peer-lookup", action="store_true",
                        help="the peer with llama-cpp-python's prompt-lookup decoding (--draft_model "
                             "prompt-lookup-decoding: drafts from the request's own tokens)")
    parser.add_argument("--quant", default=None, help="GGUF type the peer serves (default: bf16 or f32, as tunelab)")
    parser.add_argument("--repeats", type=int, default=1, help="(tunelab, peer) pairs, alternating")
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the GGUF file here (default: a temp dir)")
    return parser.parse_args(argv)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s")


def server_command(tool: str, args: argparse.Namespace, gguf: Path, port: int, max_clients: int) -> list[str]:
    cores = str(len(os.sched_getaffinity(0)))
    if tool == "tunelab":
        return [TUNELAB, "serve", args.model, "--port", str(port), "--precision", args.precision,
                "--max-batch", str(max_clients), "--max-waiting", str(4 * max_clients),
                *(["--compile"] if args.tunelab_compile else []), *(["--no-lookup"] if args.tunelab_no_lookup else [])]
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
            "--n_ctx", "4096", "--n_threads", cores, "--n_threads_batch", cores, "--verbose", "false",
            *(["--draft_model", "prompt-lookup-decoding"] if args.peer_lookup else [])]


PEER_REQUEST = {"repeat_penalty": 1.0}
"""llama-cpp-python's server applies a repeat penalty of 1.1 unless told otherwise, which changes greedy replies;
the OpenAI API has no such field and tunelab applies none."""


async def one_level(base_url: str, model: str, prompts: list[list[dict]], clients: int, rounds: int,
                    max_tokens: int, extra: dict) -> dict:
    """`clients` concurrent workers, each sending `rounds` requests in turn; tokens/s over the whole level."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=3600)
    latencies: list[float] = []
    replies: dict[int, str] = {}
    tokens = 0

    async def worker(index: int) -> None:
        nonlocal tokens
        for turn in range(rounds):
            slot = (index * rounds + turn) % len(prompts)
            started = time.perf_counter()
            done = await client.chat.completions.create(model=model, messages=prompts[slot], max_tokens=max_tokens,
                                                        temperature=0.0, extra_body=extra or None)
            latencies.append(time.perf_counter() - started)
            tokens += done.usage.completion_tokens
            replies[slot] = done.choices[0].message.content or ""

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(clients)))
    wall = time.perf_counter() - started
    await client.close()
    return {"clients": clients, "requests": clients * rounds, "completion_tokens": tokens, "wall_seconds": wall,
            "tokens_per_second": tokens / wall, "median_latency_seconds": statistics.median(latencies),
            "replies": {str(k): v for k, v in sorted(replies.items())}}


def run_server(tool: str, args: argparse.Namespace, gguf: Path, prompts: list[list[dict]], levels: list[int]
               ) -> list[dict]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(server_command(tool, args, gguf, port, max(levels)), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(f"{base}/v1/models", process)
        with urllib.request.urlopen(f"{base}/v1/models") as answer:
            model = json.load(answer)["data"][0]["id"]
        extra = PEER_REQUEST if tool == "peer" else {}
        asyncio.run(one_level(f"{base}/v1", model, prompts[:1], 1, 1, 8, extra))  # warm-up
        results = []
        for clients in levels:
            level = asyncio.run(one_level(f"{base}/v1", model, prompts, clients, args.rounds, args.max_tokens, extra))
            print(f"  {tool:8s} {clients:3d} clients: {level['tokens_per_second']:7.1f} tokens/s "
                  f"({level['completion_tokens']} tokens in {level['wall_seconds']:.1f} s)", flush=True)
            results.append(level)
        return results
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        if process.returncode not in (0, -15, None) and process.stderr:
            print(process.stderr.read()[-2000:], file=sys.stderr)


def export(model: str, quant: str, folder: Path) -> tuple[Path, dict]:
    target = folder / f"served-{quant}.gguf"
    done = subprocess.run([TUNELAB, "export", model, "--quant", quant, "-o", str(target)],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    print(done.stdout.strip()[-600:])
    if done.returncode != 0:
        raise RuntimeError(f"export failed: {done.stderr.strip()[-1500:]}")
    return target, json.loads(Path(f"{target}.check.json").read_text())


def table(levels: list[int], runs: dict[str, list[list[dict]]], args: argparse.Namespace) -> str:
    def cell(values: list[float], form: str) -> str:
        middle = statistics.median(values)
        return form.format(middle) + (f" ({form.format(min(values))}-{form.format(max(values))})"
                                      if len(values) > 1 else "")

    lines = [f"Completion tokens/s, greedy, max_tokens {args.max_tokens}, {args.rounds} requests per client; "
             f"tunelab decodes in {args.precision}{' (--compile)' if args.tunelab_compile else ''}"
             f"{' (--no-lookup)' if args.tunelab_no_lookup else ''}, the peer serves the {args.quant} GGUF"
             f"{' with prompt-lookup decoding' if args.peer_lookup else ''}.", "",
             "| clients | tunelab tokens/s | peer tokens/s | ratio (tunelab / peer) | tunelab median latency s | "
             "peer median latency s | same replies |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for index, clients in enumerate(levels):
        ours = [run[index] for run in runs["tunelab"]]
        theirs = [run[index] for run in runs["peer"]]
        ratios = [a["tokens_per_second"] / b["tokens_per_second"] for a, b in zip(ours, theirs, strict=True)]
        same = sum(ours[0]["replies"][k] == theirs[0]["replies"].get(k) for k in ours[0]["replies"])
        lines.append(f"| {clients} | {cell([r['tokens_per_second'] for r in ours], '{:.1f}')} | "
                     f"{cell([r['tokens_per_second'] for r in theirs], '{:.1f}')} | {cell(ratios, '{:.2f}')}x | "
                     f"{cell([r['median_latency_seconds'] for r in ours], '{:.2f}')} | "
                     f"{cell([r['median_latency_seconds'] for r in theirs], '{:.2f}')} | "
                     f"{same}/{len(ours[0]['replies'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.quant = args.quant or {"bf16": "bf16", "fp32": "f32"}[args.precision]
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: pip install 'llama-cpp-python[server]' (builds from source)",
              file=sys.stderr)
        return 2
    levels = [int(part) for part in args.clients.split(",")]
    rows = ticket_rows()
    prompts = [ticket_chat(row)[:1] for i, row in enumerate(rows) if i % EVAL_EVERY == EVAL_EVERY - 1]
    if len(prompts) < max(levels) * args.rounds:
        prompts = (prompts * (max(levels) * args.rounds // len(prompts) + 1))
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with tempfile.TemporaryDirectory(prefix="tunelab-serve-bench-") as temp:
        folder = args.workdir or Path(temp)
        folder.mkdir(parents=True, exist_ok=True)
        gguf, check = export(args.model, args.quant, folder)
        runs: dict[str, list[list[dict]]] = {"tunelab": [], "peer": []}
        for repeat in range(args.repeats):
            for tool in ("tunelab", "peer"):
                print(f"repeat {repeat + 1}: {tool}", flush=True)
                runs[tool].append(run_server(tool, args, gguf, prompts, levels))
    info = machine_info(Path(args.model)) | {"llama_cpp_python": llama_cpp.__version__}
    text = (f"# serve throughput: tunelab serve vs llama-cpp-python server\n\n{table(levels, runs, args)}\n\n"
            f"Model: {args.model}; export check: {check['max_logit_difference']:.3g} largest logit difference, "
            f"{check['same_greedy_reply']}/{check['prompts']} greedy replies equal (transformers' loader).\n"
            f"Machine: {info['cpu']}, {info['cpus_available']} cores; llama-cpp-python {llama_cpp.__version__}.\n")
    print(text)
    (args.results / f"{stamp}-serve-throughput.md").write_text(text)
    (args.results / f"{stamp}-serve-throughput.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "machine": info, "export_check": check, "runs": runs},
        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
