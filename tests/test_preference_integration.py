"""DPO on the real default model and the bundled preference pairs: the README's recipe, a few steps of it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tunelab.config import load_config
from tunelab.train.run import train_run

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).parent.parent / "examples" / "dpo.yaml"


def test_dpo_recipe_starts_at_ln2_and_moves_the_models_preference(default_model_dir, tmp_path):
    out = tmp_path / "dpo"
    config = load_config(EXAMPLE, ["train.max_steps=4", "train.eval_every=100", "data.eval_split=0.02",
                                   "eval.generate_samples=0", "train.warmup_ratio=0", f"output_dir={out}"])
    summary = train_run(config)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["loss"] == pytest.approx(math.log(2), abs=2e-3)  # bf16 policy vs the same model's reference
    before, after = summary["eval_before"], summary["eval_after"]
    assert before["eval_loss"] == pytest.approx(math.log(2), abs=2e-3)
    assert after["eval_loss"] < before["eval_loss"] - 0.05
    assert after["eval_rewards/margins"] > 0 and after["eval_logps/margins"] > before["eval_logps/margins"]
