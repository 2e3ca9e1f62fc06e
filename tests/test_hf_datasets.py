"""Data from the `datasets` library: save_to_disk folders and `hf:` datasets (a local dataset repository here: the
code path of a hub id, without the network) read, validated, cached and trained exactly like files."""

from __future__ import annotations

import json
import subprocess
import sys

import datasets
import pytest
from safetensors.torch import load_file

from tunelab.config import DataConfig, DataSource, load_config
from tunelab.data import hf_datasets
from tunelab.data.prepare import prepare_data
from tunelab.data.sources import read_records, source_name
from tunelab.errors import DataError
from tunelab.train.run import train_run

ROWS = [{"question": f"what is {a} plus {b}?", "answer": f"{a + b}"} for a in range(6) for b in range(6)]


@pytest.fixture(autouse=True)
def quiet_datasets():
    datasets.disable_progress_bars()


@pytest.fixture
def sources(tmp_path):
    """The same 36 rows as JSONL, as a save_to_disk Dataset folder, as a DatasetDict folder (train + test) and as
    a dataset repository (parquet files by split, two configurations declared in its README)."""
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    table = datasets.Dataset.from_list(ROWS)
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": table.select(range(30)), "test": table.select(range(30, 36))}).save_to_disk(
        str(tmp_path / "saved-dict"))
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    table.select(range(30)).to_parquet(str(repo / "data" / "train.parquet"))
    table.select(range(30, 36)).to_parquet(str(repo / "data" / "test.parquet"))
    (repo / "small").mkdir()
    table.select(range(4)).to_parquet(str(repo / "small" / "train.parquet"))
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train.parquet\n"
        "  - split: test\n    path: data/test.parquet\n- config_name: small\n  data_files:\n  - split: train\n"
        "    path: small/train.parquet\n---\n# arithmetic\n")
    return tmp_path


def test_every_kind_of_dataset_reads_the_rows_with_their_index(sources):
    cases = {
        "saved": 36, "saved-dict": 30, "saved-dict?split=test": 6,
        "hf:repo": 30, "hf:repo?split=test": 6, "hf:repo?subset=small": 4, "hf:repo?split=test&streaming=true": 6,
    }
    for ref, count in cases.items():
        text = f"hf:{sources / ref[3:]}" if ref.startswith("hf:") else str(sources / ref)
        records = read_records(text)
        assert len(records) == count, ref
        assert records[-1].where == f"{text}[{count - 1}]"
        first = 30 if "test" in ref else 0
        assert records[0].row == ROWS[first], ref
    assert source_name(f"hf:{sources / 'repo'}?split=test") == "repo-test"
    assert source_name(sources / "saved") == "saved"


def test_a_saved_folder_trains_like_the_same_rows_as_jsonl(sources, tiny_model_dir, tiny_tokenizer, home):
    settings = {"eval_split": 0.2, "max_length": 64}
    from_file = prepare_data(DataConfig(train=sources / "rows.jsonl", **settings), tiny_tokenizer, seed=3)
    from_folder = prepare_data(DataConfig(train=sources / "saved", **settings), tiny_tokenizer, seed=3)
    assert [s.input_ids for s in from_folder.train] == [s.input_ids for s in from_file.train]
    assert [s.labels for s in from_folder.eval] == [s.labels for s in from_file.eval]

    runs = {}
    for name, data in (("file", sources / "rows.jsonl"), ("folder", sources / "saved")):
        out = sources / f"run-{name}"
        train_run(load_config(None, [
            f"model={tiny_model_dir}", f"data.train={data}", "data.eval_split=0.2", "data.max_length=64",
            f"output_dir={out}", "train.batch_size=4", "train.max_steps=3", "train.precision=fp32",
            "eval.before_after=false", "eval.generate_samples=0", "eval.show_samples=0"]))
        lines = (out / "metrics.jsonl").read_text().splitlines()
        runs[name] = ([json.loads(line).get("loss") for line in lines], load_file(out / "adapter_model.safetensors"))
    assert runs["folder"][0] == runs["file"][0]
    assert all((runs["folder"][1][k] == v).all() for k, v in runs["file"][1].items())


def test_datasets_are_cached_by_content(sources, tiny_tokenizer, home):
    repo, saved = f"hf:{sources / 'repo'}", f"{sources / 'saved-dict'}?split=test"
    config = DataConfig(train=repo, eval=saved, max_length=64)
    first = prepare_data(config, tiny_tokenizer, seed=0)
    assert set(first.cache.values()) == {"miss"}
    assert set(prepare_data(config, tiny_tokenizer, seed=0).cache.values()) == {"hit"}
    changed = datasets.Dataset.from_list([{"question": "what is 9 plus 9?", "answer": "18"}] * 30)
    changed.to_parquet(str(sources / "repo" / "data" / "train.parquet"))
    again = prepare_data(config, tiny_tokenizer, seed=0)
    assert again.cache == {repo: "miss", saved: "hit"}
    assert [s.input_ids for s in again.train] != [s.input_ids for s in first.train] and len(again.train) == 30


def test_data_source_fields_are_the_path_options(sources):
    source = DataSource(path=f"hf:{sources / 'repo'}", split="test", revision="main")
    assert str(source.path) == f"hf:{sources / 'repo'}?split=test&revision=main"
    assert len(read_records(source.path)) == 6
    with pytest.raises(ValueError, match="split given twice"):
        DataSource(path=f"{sources / 'saved-dict'}?split=train", split="test")


def test_bad_dataset_references_name_the_reference_and_the_choices(sources, monkeypatch):
    def message(text: str) -> str:
        with pytest.raises(DataError) as caught:
            read_records(text)
        return str(caught.value)

    assert "no split 'valid' (splits: train, test)" in message(f"{sources / 'saved-dict'}?split=valid")
    assert "Unknown split" in message(f"hf:{sources / 'repo'}?split=valid")
    assert "'zz' not found" in message(f"hf:{sources / 'repo'}?subset=zz")
    assert "unknown dataset option 'shuffle=1'" in message(f"{sources / 'saved'}?shuffle=1")
    assert "not one written by datasets' save_to_disk" in message(str(sources / "repo" / "data"))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert "HF_HUB_OFFLINE is set and 'tunelab-tests/nothing' is not in the datasets cache" in message(
        "hf:tunelab-tests/nothing")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_datasets, "hub_resolvable", lambda timeout=5.0: False)  # this machine's own state
    offline = message("hf:tunelab-tests/nothing")
    assert offline.startswith("hf:tunelab-tests/nothing: cannot reach the Hugging Face hub")
    assert "save_to_disk" in offline


def test_a_bad_row_is_named_by_dataset_and_index(sources, tiny_tokenizer, home):
    rows = [dict(r) for r in ROWS]
    rows[7]["answer"] = ""
    datasets.Dataset.from_list(rows).save_to_disk(str(sources / "bad"))
    with pytest.raises(DataError, match=rf"{sources / 'bad'}\[7\]: "):
        prepare_data(DataConfig(train=sources / "bad"), tiny_tokenizer, seed=0)


def test_inspect_and_relative_config_paths_take_datasets(sources, tmp_path, tiny_model_dir):
    config = tmp_path / "configs" / "run.yaml"
    config.parent.mkdir()
    config.write_text("data:\n  train: hf:../repo?split=train\n  eval: ../saved-dict?split=test\n")
    loaded = load_config(config)
    assert str(loaded.data.train) == f"hf:{config.parent / '../repo'}?split=train"
    assert str(loaded.data.eval) == f"{config.parent / '../saved-dict'}?split=test"
    done = subprocess.run([sys.executable, "-m", "tunelab", "data", "inspect", f"{sources / 'saved-dict'}?split=test",
                           "--model", str(tiny_model_dir)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "6" in done.stdout and "qa" in done.stdout
