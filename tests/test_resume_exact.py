"""Resume continues from the exact data position: with packing and a two-source weighted mix, an interrupted and
resumed run trains on the very batches of an uninterrupted one and ends with the same weights."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import interrupted_at_step
from tunelab.config import load_config
from tunelab.data.prepare import prepare_data
from tunelab.errors import ConfigError
from tunelab.models.load import load_tokenizer
from tunelab.train.run import train_run

STEPS, INTERRUPT_AFTER = 10, 7


@pytest.fixture
def mixed_config(tiny_model_dir, tmp_path, monkeypatch):
    """A writer of run configs: 36 qa rows at weight 1.5 and 20 chat rows at weight 0.5, packed."""
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))
    qa = tmp_path / "qa.jsonl"
    qa.write_text(
        "".join(
            json.dumps({"question": f"what is {a} plus {b}?", "answer": str(a + b)}) + "\n"
            for a in range(6)
            for b in range(6)
        )
    )
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"say {w} twice"},
                        {"role": "assistant", "content": f"{w} {w}"},
                    ]
                }
            )
            + "\n"
            for w in "the quick brown fox jumps over lazy dog hello world".split() * 2
        )
    )

    def write(name: str, **data) -> object:
        tree = {
            "model": str(tiny_model_dir),
            "output_dir": str(tmp_path / name),
            "data": {
                "train": [{"path": str(qa), "weight": 1.5}, {"path": str(chat), "weight": 0.5}],
                "eval_split": 0.2,
                "max_length": 64,
                "packing": True,
                **data,
            },
            "method": {"name": "lora", "dropout": 0.1},  # dropout: only an exactly restored RNG matches
            "train": {"max_steps": STEPS, "batch_size": 2, "grad_accum": 2, "lr": 3e-3, "precision": "fp32", "seed": 5},
            "eval": {"before_after": False, "generate_samples": 0},
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tree))
        return load_config(path)

    return write


def recorder():
    seen: dict[int, list] = {}
    return seen, lambda step, batches: seen.__setitem__(step, batches)


def test_interrupted_and_resumed_run_sees_the_batches_of_an_uninterrupted_one(mixed_config):
    straight_seen, record = recorder()
    straight = train_run(mixed_config("straight", cache=False), on_batches=record)
    assert straight["data"]["tokenized_cache"] == "off"

    first_seen, record = recorder()
    with interrupted_at_step(INTERRUPT_AFTER):
        train_run(mixed_config("resumed"), on_batches=record)
    interrupted = json.loads((mixed_config("resumed").output_dir / "summary.json").read_text())
    assert interrupted["steps"] == INTERRUPT_AFTER and interrupted["data"]["tokenized_cache"] == "miss"
    assert interrupted["trainer_state"]["epoch"] == 1  # the run was stopped after an epoch boundary

    second_seen, record = recorder()
    resumed = train_run(mixed_config("resumed"), resume=True, on_batches=record)
    assert resumed["data"]["tokenized_cache"] == "hit" and resumed["steps"] == STEPS

    assert sorted(straight_seen) == list(range(1, STEPS + 1))
    assert {**first_seen, **second_seen} == straight_seen
    assert sorted(second_seen) == list(range(INTERRUPT_AFTER + 1, STEPS + 1))
    # The ids name the same rows in every run (cache off, miss and hit prepare identical data) ...
    config = mixed_config("straight")
    tokenizer = load_tokenizer(config.model)
    train = prepare_data(config.data, tokenizer, config.train.seed).train
    assert [s.where for s in train] == [
        s.where
        for s in prepare_data(config.data.model_copy(update={"cache": False}), tokenizer, config.train.seed).train
    ]
    # ... packed (several samples a row) from both sources.
    rows = [row for batches in straight_seen.values() for batch in batches for row in batch]
    assert max(len(row) for row in rows) > 1
    assert {train[i].source for row in rows for i in row} == {"qa", "chat"}

    for name, tensor in load_file(config.output_dir / "adapter_model.safetensors").items():
        other = load_file(mixed_config("resumed").output_dir / "adapter_model.safetensors")[name]
        torch.testing.assert_close(other, tensor, rtol=0, atol=0)
    assert resumed["final_eval_loss"] == straight["final_eval_loss"]


def test_resuming_on_other_data_is_refused_before_anything_is_written(mixed_config):
    with interrupted_at_step(3):
        train_run(mixed_config("run"))
    config_file = mixed_config("run").output_dir / "config.yaml"
    before = config_file.read_text()
    with pytest.raises(ConfigError, match="data position"):
        train_run(mixed_config("run", eval_split=0.3), resume=True)
    assert config_file.read_text() == before
