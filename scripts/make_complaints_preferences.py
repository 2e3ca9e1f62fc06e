"""Preference pairs from the consumer complaints (scripts/fetch_complaints.py writes them first): for every
complaint, the correct product label is the chosen reply and the wrong label the default model (SmolLM2-135M-
Instruct before any fine-tuning) finds likeliest is the rejected one: the model's own mistake, in the answer
format the question asks for.

Why not the model's free-text reply as the rejected one: its greedy replies are sentences ("This complaint is
about a credit reporting company") that a summed log-probability already ranks below a 1-3 token label, so the
base model "prefers" the chosen reply on 93% of such pairs without knowing the answer. Against its likeliest
wrong label it prefers the right one exactly when its label-likelihood classification is right (about a third
of the time), so a lift in held-out preference accuracy means it learned which product a complaint is about.

Written beside the complaints files, from the same train/eval rows as the SFT files (no held-out complaint is
trained on):
  complaints-pairs-train.jsonl, complaints-pairs-eval.jsonl   prompt / chosen / rejected (text)

Label scores as `label_accuracy` computes them (summed log-probability of the label reply, float32).

    python scripts/make_complaints_preferences.py [--folder data/complaints] [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tunelab.data.formats import Sample
from tunelab.eval.labels import evaluate_labels
from tunelab.infer.load import load_for_inference

ROOT = Path(__file__).resolve().parent.parent


def pairs_of(path: Path, loaded, labels: list[str]) -> tuple[list[dict], int]:
    """(a pair for every row: its label against the likeliest other label, rows the model gets right)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    samples = [Sample(f"{path.name}:{i + 1}", row["messages"]) for i, row in enumerate(rows)]
    started = time.perf_counter()
    scored = evaluate_labels(loaded.model, loaded.renderer, samples, labels, batch_size=16)
    print(f"{len(rows)} complaints of {path.name} scored in {time.perf_counter() - started:.0f}s")
    pairs = []
    for row, scores, predicted, correct in zip(rows, scored.scores, scored.predictions, scored.correct, strict=True):
        # Wrong: the likeliest label; right: the runner-up, the likeliest of the wrong ones.
        rejected = labels[sorted(range(len(labels)), key=lambda i: -scores[i])[1]] if correct else predicted
        pairs.append({"prompt": row["messages"][-2]["content"], "chosen": row["messages"][-1]["content"],
                      "rejected": rejected})
    right = sum(scored.correct)
    return pairs, right


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=ROOT / "data/complaints")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()
    loaded = load_for_inference(args.model, device="cpu")
    labels = list(json.loads((args.folder / "labels.json").read_text())["labels"])
    for part in ("train", "eval"):
        pairs, right = pairs_of(args.folder / f"complaints-{part}.jsonl", loaded, labels)
        out = args.folder / f"complaints-pairs-{part}.jsonl"
        out.write_text("".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs), encoding="utf-8")
        print(f"wrote {len(pairs)} pairs to {out}; the model's likeliest label was right for {right} "
              f"({right / len(pairs):.1%}), so it prefers chosen over rejected on as many")


if __name__ == "__main__":
    main()
