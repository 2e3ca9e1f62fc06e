"""Config: validated once, unknown keys name the nearest valid key, overrides are typed."""

from __future__ import annotations

import pytest

from tunelab.config import LoraMethod, QLoraMethod, load_config, parse_override
from tunelab.errors import ConfigError


def test_defaults_work_without_a_file():
    config = load_config(None)
    assert config.model == "smollm2-135m-instruct"
    assert isinstance(config.method, LoraMethod)


def test_overrides_are_read_as_yaml_values():
    assert parse_override("train.lr=1e-4") == (["train", "lr"], 1e-4)
    assert parse_override("eval.metrics=[bleu, rouge]") == (["eval", "metrics"], ["bleu", "rouge"])
    config = load_config(None, ["method=qlora", "method.bits=8", "train.max_steps=3"])
    assert isinstance(config.method, QLoraMethod) and config.method.bits == 8 and config.train.max_steps == 3


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.learning_rate=1", "did you mean 'lr'?"),
        ("method.rank=4", "did you mean 'r'?"),
        ("dat.train=x", "did you mean 'data'?"),
        ("data.max_len=5", "did you mean 'max_length'?"),
    ],
)
def test_unknown_key_names_the_nearest_valid_key(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


def test_method_fields_exist_only_for_their_method():
    with pytest.raises(ConfigError, match="unknown key 'method.r'"):
        load_config(None, ["method.name=full", "method.r=4"])


def test_bad_values_and_combinations_fail_before_anything_loads(tmp_path):
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(None, ["train.lr=-1"])
    with pytest.raises(ConfigError, match="early_stopping_patience needs eval data"):
        load_config(None, ["train.early_stopping_patience=2", "data.eval_split=0"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_data_paths_are_found_next_to_the_config_file(tmp_path):
    (tmp_path / "train.jsonl").write_text("{}\n")
    (tmp_path / "c.yaml").write_text("data:\n  train: train.jsonl\n")
    assert load_config(tmp_path / "c.yaml").data.train == tmp_path / "train.jsonl"


def test_tokenizer_without_pad_token_gets_one_and_keeps_its_vocabulary():
    from conftest import build_tokenizer
    from tunelab.models.resolve import ensure_pad_token

    tokenizer = build_tokenizer()
    tokenizer.pad_token = None
    size = len(tokenizer)
    ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token and len(tokenizer) == size


def test_unknown_generation_metric_fails_at_the_door():
    with pytest.raises(ConfigError, match="eval.metrics.*unknown metric\\(s\\) blue"):
        load_config(None, ["eval.metrics=[exact_match, blue]"])
    assert load_config(None, ["eval.metrics=[my.py:score]"]).eval.metrics == ["my.py:score"]
