"""Build tunelab's bundled preference set, src/tunelab/datasets/support_preferences.jsonl, from the bundled
support tickets: for every ticket, the correct JSON is the chosen reply and the default model's own greedy
reply (SmolLM2-135M-Instruct before any fine-tuning) the rejected one. Also writes support_feedback.jsonl, the
same pairs unpaired for KTO: even rows keep the chosen reply labelled good, odd rows the rejected one labelled
bad (one reply per ticket, so no prompt is both good and bad). And support_prompts.jsonl, the tickets as
prompt-only rows for GRPO: each ticket's prompt (as in the pairs) and its correct JSON in an `answer` column,
which the built-in rewards compare completions against (no model needed for this one).

The rejected replies are real mistakes of a real model, not invented ones: wrong keys, invented labels, the
order number copied into the product, free text instead of JSON. Rows whose base reply already equals the
correct JSON (as parsed objects) are left out, since such a pair teaches nothing.

Greedy decoding in float32 (`max_new_tokens` 64, the support tickets' eval setting); rerunning it on the same
machine reproduces the file; another CPU may break a near-tie differently in a few replies.

    python scripts/make_support_preferences.py [--out PATH] [--model smollm2-135m-instruct]
    python scripts/make_support_preferences.py --feedback-only    # support_feedback.jsonl from the pairs
    python scripts/make_support_preferences.py --prompts-only     # support_prompts.jsonl from the tickets
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tunelab.data.formats import to_sample
from tunelab.data.sources import Record
from tunelab.infer.generate import GenerationOptions, generate_replies
from tunelab.infer.load import load_for_inference

ROOT = Path(__file__).resolve().parent.parent
TICKETS = ROOT / "src/tunelab/datasets/support_tickets.jsonl"


def same_json(a: str, b: str) -> bool:
    try:
        return json.loads(a) == json.loads(b)
    except ValueError:
        return False


def write_feedback(pairs_path: Path, out: Path) -> None:
    """One labelled reply per pair: the chosen one (good) on even rows, the rejected one (bad) on odd rows."""
    rows = [json.loads(line) for line in pairs_path.read_text().splitlines() if line.strip()]
    with out.open("w") as handle:
        for index, row in enumerate(rows):
            good = index % 2 == 0
            reply = row["chosen"] if good else row["rejected"]
            handle.write(json.dumps({"prompt": row["prompt"], "completion": reply, "label": good}) + "\n")
    print(f"wrote {len(rows)} feedback rows to {out}")


def write_prompts(out: Path) -> None:
    """Every ticket as a GRPO prompt row: the prompt the pairs use, and the correct JSON as `answer`."""
    rows = [json.loads(line) for line in TICKETS.read_text().splitlines()]
    with out.open("w") as handle:
        for index, row in enumerate(rows):
            sample = to_sample(Record(row, f"{TICKETS.name}:{index + 1}"), "alpaca")
            handle.write(json.dumps({"prompt": sample.messages[-2]["content"], "answer": sample.reference}) + "\n")
    print(f"wrote {len(rows)} prompt rows to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "src/tunelab/datasets/support_preferences.jsonl")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--feedback-only", action="store_true", help="only derive the feedback file from --out")
    parser.add_argument("--prompts-only", action="store_true", help="only write support_prompts.jsonl")
    args = parser.parse_args()
    feedback = args.out.with_name("support_feedback.jsonl")
    if args.prompts_only:
        write_prompts(args.out.with_name("support_prompts.jsonl"))
        return
    if args.feedback_only:
        write_feedback(args.out, feedback)
        return

    rows = [json.loads(line) for line in TICKETS.read_text().splitlines()]
    samples = [to_sample(Record(row, f"{TICKETS.name}:{i + 1}"), "alpaca") for i, row in enumerate(rows)]
    loaded = load_for_inference(args.model, device="cpu")
    started = time.perf_counter()
    replies = generate_replies(loaded.model, loaded.renderer, [s.messages for s in samples],
                               GenerationOptions(max_new_tokens=64, batch_size=16))
    print(f"{len(replies)} base replies in {time.perf_counter() - started:.0f}s")
    kept = 0
    with args.out.open("w") as out:
        for sample, reply in zip(samples, replies, strict=True):
            chosen = sample.reference
            if not reply.strip() or same_json(reply, chosen):
                continue
            prompt = sample.messages[-2]["content"]
            out.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": reply}) + "\n")
            kept += 1
    print(f"wrote {kept} pairs to {args.out} ({len(rows) - kept} left out)")
    write_feedback(args.out, feedback)


if __name__ == "__main__":
    main()
