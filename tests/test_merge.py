"""`tunelab merge` and export on tiny real runs: the merged model prompts as the run did (its chat template choice
carried over), a GGUF written into its run directory loads on its own, and what would lose work is refused."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.config import load_config
from tunelab.data.template import ChatRenderer
from tunelab.errors import ConfigError, ModelError
from tunelab.infer.generate import GenerationOptions, generate_replies
from tunelab.infer.load import load_for_inference
from tunelab.infer.merge import merge_adapter
from tunelab.train.run import train_run

CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "question 1?"},
                {"role": "assistant", "content": "the answer is 1"}, {"role": "user", "content": "question 2?"}]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("merge")
    data = folder / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"question {i}?", "answer": f"the answer is {i}"}) + "\n"
                            for i in range(16)))
    made = {}
    for template in ("tunelab", "none"):
        made[template] = folder / template
        train_run(load_config(None, [f"model={tiny_model_dir}", f"data.train={data}", "data.eval_split=0.25",
                                     f"output_dir={made[template]}", f"data.chat_template={template}",
                                     "train.max_steps=6", "train.lr=3e-2", "train.precision=fp32",
                                     "eval.generate_samples=2", "eval.max_new_tokens=4", "eval.show_samples=0"]))
    return made


@pytest.mark.parametrize("template", ["tunelab", "none"])
def test_a_merged_model_prompts_and_answers_as_its_run(runs, tmp_path, template):
    run = load_for_inference(runs[template])
    merged = load_for_inference(merge_adapter(runs[template], tmp_path / "merged"))
    assert merged.renderer.prompt(CONVERSATION) == run.renderer.prompt(CONVERSATION)
    assert merged.renderer.render(CONVERSATION) == run.renderer.render(CONVERSATION)
    options = GenerationOptions(max_new_tokens=8)
    prompts = [CONVERSATION[:2], [{"role": "user", "content": "question 5?"}]]
    assert generate_replies(merged.model, merged.renderer, prompts, options) == \
        generate_replies(run.model, run.renderer, prompts, options)


def test_the_plain_template_renders_as_no_template_does(tiny_tokenizer):
    plain = ChatRenderer(tiny_tokenizer, "none")
    carrying = copy.deepcopy(tiny_tokenizer)  # the fixture is shared
    carrying.chat_template = plain.portable_template
    carried = ChatRenderer(carrying, "tokenizer")
    assert carried.render(CONVERSATION) == plain.render(CONVERSATION)
    assert carried.prompt(CONVERSATION) == plain.prompt(CONVERSATION)


def test_a_gguf_in_its_run_directory_loads_alone_and_a_run_without_a_template_exports(runs):
    import gguf

    result = CliRunner().invoke(app, ["export", str(runs["none"]), "--quant", "f32"])
    assert result.exit_code == 0, result.output
    written = runs["none"] / "none-f32.gguf"
    reader = gguf.GGUFReader(str(written))
    assert reader.fields["tokenizer.chat_template"].contents() == ChatRenderer(None, "none").portable_template
    # beside the run's adapter_config.json, which transformers' loader would otherwise follow to the base model
    loaded = load_for_inference(str(written))
    run = load_for_inference(runs["none"])
    prompts = [[{"role": "user", "content": "question 3?"}]]
    options = GenerationOptions(max_new_tokens=6)
    assert generate_replies(loaded.model, run.renderer, prompts, options) == \
        generate_replies(run.model, run.renderer, prompts, options)


def test_merging_into_the_run_or_from_a_damaged_run_is_refused(runs, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(runs["tunelab"], copy)
    for output in (copy, tmp_path):
        with pytest.raises(ConfigError, match="would replace the run"):
            merge_adapter(copy, output, overwrite=True)
    assert (copy / "adapter_model.safetensors").is_file()
    (copy / "adapter_config.json").write_text("{not json")
    result = CliRunner().invoke(app, ["merge", str(copy), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "cannot load the adapter" in result.output, result.output
    (copy / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelError, match="adapter_model.safetensors"):
        merge_adapter(copy, tmp_path / "out2")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_a_damaged_samples_file_or_a_failed_write_leaves_a_clear_result(runs, tmp_path, monkeypatch):
    from tunelab.infer import gguf_export

    copy_ = tmp_path / "copy"
    shutil.copytree(runs["tunelab"], copy_)
    with open(copy_ / "samples.jsonl", "a") as samples:
        samples.write('{"prompt": [{"role": "user", "conte\n')
    check = gguf_export.export_gguf(str(copy_), tmp_path / "ok.gguf", "f32")
    assert check.passed and check.prompts == 2 and any("1 line(s)" in w for w in check.warnings), check.warnings

    def full_disk(model, tokenizer, template, path, *args):
        path.write_bytes(b"GGUF" + b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf_export, "_write", full_disk)
    with pytest.raises(ModelError, match="No space left"):
        gguf_export.export_gguf(str(copy_), tmp_path / "full.gguf", "f16")
    assert not list(tmp_path.glob("full.gguf*"))


def test_a_full_runs_folder_as_the_next_models_prompts_as_the_run_trained(runs, tiny_model_dir, tmp_path):
    """SFT with full fine-tuning, then DPO or GRPO with `model:` that run: its folder is read as a plain model, so
    its tokenizer must carry the template the run trained with (here tunelab's, not the tokenizer's own)."""
    from tunelab.models.load import load_tokenizer
    from tunelab.models.resolve import resolve_model

    data = runs["tunelab"].parent / "qa.jsonl"
    out = tmp_path / "full"
    train_run(load_config(None, [f"model={tiny_model_dir}", f"data.train={data}", "data.eval_split=0.25",
                                 f"output_dir={out}", "data.chat_template=tunelab", "method.name=full",
                                 "train.max_steps=2", "train.precision=fp32", "eval.generate_samples=0",
                                 "eval.before_after=false"]))
    trained = ChatRenderer(load_tokenizer(tiny_model_dir), "tunelab")
    following = ChatRenderer(load_tokenizer(resolve_model(str(out))), "auto")
    assert following.prompt(CONVERSATION) == trained.prompt(CONVERSATION)
    assert following.render(CONVERSATION) == trained.render(CONVERSATION)
