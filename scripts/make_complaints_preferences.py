"""Preference pairs from the consumer complaints (scripts/fetch_complaints.py writes them first): for every
complaint the default model labels wrongly, the correct product label is the chosen reply and the model's own
greedy reply (SmolLM2-135M-Instruct before any fine-tuning) the rejected one. Complaints it already labels right
are left out: such a pair would teach nothing.

The rejected replies are real mistakes of a real model on data tunelab's developers never wrote: the majority
label for everything, labels that are not on the list, the question echoed back. Train and held-out pairs come
from the same train/eval rows as the SFT files, so no held-out complaint is trained on.

Written beside the complaints files:
  complaints-pairs-train.jsonl, complaints-pairs-eval.jsonl   prompt / chosen / rejected (text)

Greedy decoding in float32, 8 new tokens (the labels are 1-3 tokens); about 5 minutes on 2 CPU cores.

    python scripts/make_complaints_preferences.py [--folder data/complaints] [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tunelab.eval.metrics import accuracy
from tunelab.infer.generate import GenerationOptions, generate_replies
from tunelab.infer.load import load_for_inference

ROOT = Path(__file__).resolve().parent.parent


def pairs_of(path: Path, loaded, labels: list[str]) -> tuple[list[dict], int]:
    """(pairs for the rows the model labels wrongly, rows read). A reply is right when the first label it names
    is the complaint's (as `accuracy` with the label list scores it)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    prompts = [row["messages"][:-1] for row in rows]
    started = time.perf_counter()
    replies = generate_replies(loaded.model, loaded.renderer, prompts,
                               GenerationOptions(max_new_tokens=8, batch_size=16))
    print(f"{len(replies)} base replies to {path.name} in {time.perf_counter() - started:.0f}s")
    pairs = []
    for row, reply in zip(rows, replies, strict=True):
        label = row["messages"][-1]["content"]
        if not reply.strip() or accuracy([reply], [label], labels=labels) == 1.0:
            continue
        pairs.append({"prompt": row["messages"][-2]["content"], "chosen": label, "rejected": reply})
    return pairs, len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=ROOT / "data/complaints")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()
    loaded = load_for_inference(args.model, device="cpu")
    labels = list(json.loads((args.folder / "labels.json").read_text())["labels"])
    for part in ("train", "eval"):
        pairs, read = pairs_of(args.folder / f"complaints-{part}.jsonl", loaded, labels)
        out = args.folder / f"complaints-pairs-{part}.jsonl"
        out.write_text("".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs), encoding="utf-8")
        print(f"wrote {len(pairs)} pairs to {out} ({read - len(pairs)} complaints the model already labels right "
              "or left empty)")


if __name__ == "__main__":
    main()
