"""What `generate`, `chat`, `merge` and `export` do with outputs they cannot write, inputs they cannot use and
runs that never finished: exit 2 with one message naming the option, file or row, before any work, leaving
nothing half-written."""

from __future__ import annotations

import errno
import json
import signal
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.errors import DataError
from tunelab.infer.batch import write_rows
from tunelab.infer.chat import fit_context

runner = CliRunner()
QA = [{"question": f"what is {a} plus {b}?", "answer": f"{a + b}"} for a in range(4) for b in range(4)]
LONG_TEXT = "0123456789 hello world " * 60
"""About 300 tokens of the tiny tokenizer: two such messages pass the tiny model's context of 512."""


def _config(root: Path, model: Path, data: Path, name: str, steps: int) -> Path:
    config = root / f"{name}.yaml"
    config.write_text(
        f"model: {model}\n"
        f"data: {{train: {data}, max_length: 64}}\n"
        "method: {name: lora, r: 4}\n"
        f"train: {{max_steps: {steps}, batch_size: 4, lr: 0.003, precision: fp32}}\n"
        "eval: {before_after: false, generate_samples: 0}\n"
        f"output_dir: {root / name}\n"
    )
    return config


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """(a finished LoRA run, a run stopped by Ctrl-C at step 2 of 4 with only its checkpoint saved, the data)."""
    root = tmp_path_factory.mktemp("outputs")
    data = root / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in QA))
    result = runner.invoke(app, ["train", str(_config(root, tiny_model_dir, data, "run", 2))])
    assert result.exit_code == 0, result.output
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            signal.raise_signal(signal.SIGINT)  # the run stops once step 2 has finished
        return real_step(self, *args, **kwargs)

    torch.optim.AdamW.step = step
    try:
        result = runner.invoke(app, ["train", str(_config(root, tiny_model_dir, data, "stopped", 4))])
    finally:
        torch.optim.AdamW.step = real_step
    assert result.exit_code == 130, result.output
    return root / "run", root / "stopped", data


def _said(result) -> str:
    return " ".join(result.output.split())


def test_unwritable_outputs_exit_2_naming_the_option_before_any_work(runs, tmp_path):
    run, _, data = runs
    folder, a_file = tmp_path / "folder", tmp_path / "a-file"
    folder.mkdir()
    a_file.write_text("x")
    refused = [
        ["generate", str(run), "-i", str(data), "-o", str(folder)],
        ["generate", str(run), "-i", str(data), "-o", str(a_file / "replies.jsonl")],
        ["generate", str(run), "-i", str(data), "-o", "/proc/replies.jsonl"],
        ["merge", str(run), "-o", str(a_file)],
        ["merge", str(run), "-o", str(a_file / "merged")],
        ["export", str(run), "-o", str(a_file / "x.gguf")],
        ["export", str(run), "-o", "/proc/x.gguf"],
        ["export", str(run), "-o", str(folder)],
    ]
    for args in refused:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "error: --output:" in _said(result), (args, result.output)
    assert sorted(tmp_path.iterdir()) == sorted([folder, a_file])
    assert list(folder.iterdir()) == []


def test_a_failed_write_leaves_no_partial_file_and_names_the_file(tmp_path):
    out = tmp_path / "replies.jsonl"

    def rows():
        yield {"reply": "one"}
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DataError, match="No space left on device") as raised:
        write_rows(out, rows())
    assert str(out) in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_run_says_where_it_stopped_and_how_to_continue(runs, tmp_path):
    _, stopped, data = runs
    for args in (["generate", str(stopped), "-i", str(data), "-o", str(tmp_path / "r.jsonl")],
                 ["export", str(stopped), "-o", str(tmp_path / "s.gguf")],
                 ["export", str(stopped), "--format", "safetensors", "-o", str(tmp_path / "s")],
                 ["merge", str(stopped), "-o", str(tmp_path / "m")]):
        result = runner.invoke(app, args)
        said = _said(result)
        assert result.exit_code == 2, (args, result.output)
        assert "interrupted at step 2" in said and f"tunelab train {stopped / 'config.yaml'} --resume" in said, args
    assert list(tmp_path.iterdir()) == []


def test_export_safetensors_refuses_what_only_gguf_takes_and_overwrites_when_asked(runs, tiny_model_dir, tmp_path):
    run, _, _ = runs
    out = tmp_path / "merged"
    result = runner.invoke(app, ["export", str(run), "--format", "safetensors", "--quant", "q4_0", "-o", str(out)])
    assert result.exit_code == 2 and "--quant: q4_0 is a GGUF type" in _said(result)
    result = runner.invoke(app, ["export", str(tiny_model_dir), "--format", "safetensors", "-o", str(out)])
    assert result.exit_code == 2 and "--format:" in _said(result) and "exports only as gguf" in _said(result)
    assert not out.exists()
    out.mkdir()
    (out / "old.txt").write_text("x")
    result = runner.invoke(app, ["export", str(run), "--format", "safetensors", "-o", str(out)])
    assert result.exit_code == 2 and "pass --overwrite" in _said(result)
    result = runner.invoke(app, ["export", str(run), "--format", "safetensors", "-o", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file() and not (out / "old.txt").exists()


def test_generate_refuses_prompts_past_the_context_naming_the_row(runs, tmp_path):
    run, _, _ = runs
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": LONG_TEXT * 2}) + "\n")
    out = tmp_path / "replies.jsonl"
    result = runner.invoke(app, ["generate", str(run), "-i", str(prompts), "-o", str(out), "--max-new-tokens", "2"])
    assert result.exit_code == 2 and f"{prompts}:2: the prompt has" in _said(result)
    assert "context of 512 tokens" in _said(result) and not out.exists()


def test_generate_refuses_an_empty_input_file(runs, tmp_path):
    run, _, _ = runs
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = runner.invoke(app, ["generate", str(run), "-i", str(empty), "-o", str(tmp_path / "r.jsonl")])
    assert result.exit_code == 2 and f"{empty}: file holds no rows" in _said(result)
    assert not (tmp_path / "r.jsonl").exists()


def test_fit_context_drops_the_oldest_turns_and_keeps_the_system_message():
    conversation = [{"role": "system", "content": "s"},
                    {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
                    {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"},
                    {"role": "user", "content": "u3"}]

    def characters(messages):
        return sum(len(m["content"]) for m in messages)

    assert fit_context(conversation, characters, context=100, room=10) == (conversation, 0)
    assert fit_context(conversation, characters, context=9, room=2) == ([conversation[0], *conversation[3:]], 2)
    assert fit_context(conversation, characters, context=3, room=2) == ([conversation[0], conversation[5]], 4)


def test_chat_forgets_the_oldest_turns_once_the_context_is_full(runs):
    run, _, _ = runs
    said = f"{LONG_TEXT}\n{LONG_TEXT}\n{LONG_TEXT}\n{LONG_TEXT * 2}\n/exit\n"
    result = runner.invoke(app, ["chat", str(run), "--system", "be brief", "--max-new-tokens", "4"], input=said)
    assert result.exit_code == 0, result.output
    output = _said(result)
    assert output.count("no longer fits the model's context of 512 tokens") == 1
    assert output.count("assistant>") == 3 and "that message is too long" in output
