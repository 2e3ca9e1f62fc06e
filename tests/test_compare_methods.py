"""`tunelab compare-methods` on the tiny model: every method trains in its own process and lands in one table."""

from __future__ import annotations

import csv
import json

from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.config import load_config
from tunelab.train.compare import plan_runs

QA = [{"question": f"what is {a} plus {b}?", "answer": f"{a + b}"} for a in range(6) for b in range(6)]


def write_config(tmp_path, tiny_model_dir):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in QA))
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {tiny_model_dir}\n"
        f"data: {{train: {data}, eval_split: 0.2, max_length: 64}}\n"
        "method: {name: lora, r: 4, alpha: 8}\n"
        "train: {max_steps: 3, batch_size: 4, precision: fp32}\n"
        "eval: {generate_samples: 3, max_new_tokens: 4, metrics: [exact_match]}\n"
    )
    return config


def test_plan_carries_shared_options_and_each_methods_rate(tmp_path, tiny_model_dir):
    base = load_config(write_config(tmp_path, tiny_model_dir))
    runs = {run.method: run for run in plan_runs(base, ["dora", "qlora", "ia3"], tmp_path / "out",
                                                  lr_from_config=False)}
    assert runs["dora"].config.method.r == 4 and runs["qlora"].config.method.alpha == 8
    assert runs["ia3"].config.train.lr == runs["ia3"].lr != runs["dora"].lr
    assert runs["qlora"].config.output_dir == tmp_path / "out" / "qlora"
    same = plan_runs(base, ["dora", "ia3"], tmp_path / "out", lr_from_config=True)
    assert {run.config.train.lr for run in same} == {base.train.lr}


def test_compare_methods_writes_one_row_per_method(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir)
    out = tmp_path / "compare"
    result = CliRunner().invoke(app, ["compare-methods", str(config), "--methods", "lora,ia3,adapter", "-o", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "compare.csv").read_text().splitlines()))
    assert [row["method"] for row in rows] == ["lora", "ia3", "adapter"]
    for row in rows:
        summary = json.loads((out / row["method"] / "summary.json").read_text())
        assert row["status"] == "completed"
        assert int(row["trainable_parameters"]) == summary["trainable_parameters"] > 0
        assert float(row["peak_memory_mb"]) == summary["peak_memory_mb"] > 0
        assert float(row["final_eval_loss"]) == round(summary["final_eval_loss"], 4)
        # The base model is measured once (by the first run) and stands as every row's baseline.
        assert float(row["base_eval_loss"]) == float(rows[0]["base_eval_loss"])
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "compare.md").read_text()
    assert table.count("\n| ") == 4 and "exact_match" in table


def test_compare_methods_rejects_an_unknown_method_before_training(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir)
    result = CliRunner().invoke(app, ["compare-methods", str(config), "--methods", "lora,lorra", "-o",
                                      str(tmp_path / "out")])
    assert result.exit_code == 2 and "lorra" in result.output
    assert not (tmp_path / "out").exists()
