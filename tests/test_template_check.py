"""`tunelab data check-template` and the check `tunelab train` runs: training's tokens equal generate's prompt
tokens up to every trained reply, each reply ends with a trained end-of-turn token, and nothing else is trained.
Well-behaved templates pass; templates that misbehave are caught with file:line and the offending tokens."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import CHATML, build_tiny_model, build_tokenizer
from tunelab.cli import app
from tunelab.config import DataConfig, load_config
from tunelab.data.formats import Sample
from tunelab.data.prepare import prepare_data
from tunelab.data.template import IGNORE_INDEX, ChatRenderer, tokenize_chat
from tunelab.data.template_check import check_conversation, check_data, generation_stop_ids
from tunelab.errors import DataError

# Llama-2 style: no role headers, no {% generation %} markers; the reply follows "[/INST]" on the same line.
INST = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ '<<SYS>>' + m['content'] + '<</SYS>>\n' }}"
    "{% elif m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)
# Generation prompt ends in a space: a character prefix of the conversation, but " fox" is one token in training
# where generation sees " " on its own.
TRAILING_SPACE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'Assistant: ' + m['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)
# Trims user turns only when it builds a generation prompt: conversations whose user text has outer
# whitespace render differently for generate than for training.
TRIMS_AT_GENERATION = CHATML.replace(
    "message['content']",
    "(message['content'] | trim if add_generation_prompt and message['role'] == 'user' else message['content'])",
)
# Assistant turns end without any token generation stops on.
NO_END_OF_TURN = (
    "{% for m in messages %}{{ '### ' + m['role'] + ':\n' + m['content'] + '\n\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\n' }}{% endif %}"
)


def sharegpt(system: str | None, *turns: str) -> dict:
    """A ShareGPT row: `conversations` of {from, value}, human/gpt alternating after an optional system."""
    convo = [{"from": "system", "value": system}] if system else []
    convo += [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]
    return {"conversations": convo}


ROWS = [
    sharegpt("Be brief.", "hello", "the fox", "and?", "the dog", "why?", "the quick brown fox"),
    sharegpt(None, "question", "answer", "what is the capital of France?", "Paris"),
    sharegpt("You extract JSON.", "hello world ", "the fox", "0123", "the lazy dog", "more", "done"),
]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tokenizer_with(template: str):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


def run_check(tmp_path, template: str, train_on: str = "all_assistant", rows=ROWS):
    path = write_rows(tmp_path / "chat.jsonl", rows)
    config = DataConfig(train=path, eval_split=0, train_on=train_on)
    return check_data(config, tokenizer=tokenizer_with(template), model_path=None, model_name="tiny", target=str(path))


def statuses(report) -> dict[str, str]:
    return {name: result.status for name, result in report.checks.items()}


ALL_PASS = {"prompt_match": "pass", "end_of_turn": "pass", "masks": "pass", "no_leak": "pass"}


@pytest.mark.parametrize("template", [CHATML, INST], ids=["chatml", "no-generation-markers"])
def test_every_assistant_turn_passes_every_check(tmp_path, template):
    report = run_check(tmp_path, template)
    assert report.ok and statuses(report) == ALL_PASS
    assert (report.checked, report.replies) == (3, 8)
    assert report.checks["masks"].checked == 3
    last = run_check(tmp_path, template, "last_assistant")
    assert last.ok and statuses(last) == ALL_PASS and last.replies == 3


def test_the_check_agrees_with_the_trained_text_of_every_turn(tiny_tokenizer):
    # What passing means, spelled out: the trained tokens decode to each reply plus its end-of-turn token.
    for template in (CHATML, INST):
        tokenizer = tokenizer_with(template)
        messages = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "the fox"},
            {"role": "user", "content": "and?"},
            {"role": "assistant", "content": "the dog"},
        ]
        tokenized = tokenize_chat(Sample("x:1", messages), ChatRenderer(tokenizer))
        runs, current = [], []
        for token, label in zip(tokenized.input_ids, tokenized.labels, strict=True):
            if label != IGNORE_INDEX:
                current.append(token)
            elif current:
                runs.append(tokenizer.decode(current))
                current = []
        assert [r.strip() for r in runs + ([tokenizer.decode(current)] if current else [])] == [
            "the fox<|im_end|>",
            "the dog<|im_end|>",
        ]


def test_train_on_all_checks_prompts_and_end_of_turn_only(tmp_path):
    report = run_check(tmp_path, CHATML, "all")
    assert report.ok
    assert statuses(report) == {"prompt_match": "pass", "end_of_turn": "pass", "masks": "skipped", "no_leak": "skipped"}


def test_a_generation_prompt_ending_in_a_space_is_caught_at_token_level(tmp_path):
    # tokenize_chat accepts this template (the prompt is a character prefix), so only tokens reveal it.
    tokenizer = tokenizer_with(TRAILING_SPACE)
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the fox"}]
    tokenize_chat(Sample("x:1", messages), ChatRenderer(tokenizer))
    report = run_check(tmp_path, TRAILING_SPACE)
    assert not report.ok
    result = report.checks["prompt_match"]
    assert result.failed == 3 and result.first.where.endswith("chat.jsonl:1")
    assert "message 2 (assistant)" in result.first.message
    assert result.first.tokens["generate"][-1] == "' '"
    assert "' '" not in result.first.tokens["training"]  # the space is part of the reply's first token


def test_a_template_that_renders_prompts_differently_is_caught_with_file_and_line(tmp_path):
    # Only row 3's user turn has outer whitespace, so only its generation prompt differs.
    report = run_check(tmp_path, TRIMS_AT_GENERATION)
    result = report.checks["prompt_match"]
    assert (result.checked, result.failed) == (3, 1)
    assert result.first.where.endswith("chat.jsonl:3")
    assert "message 2 (assistant)" in result.first.message
    assert "' '" in " ".join(result.first.tokens["training"])
    # Training itself refuses the row (the character-level check) before any step.
    with pytest.raises(DataError, match=r"chat.jsonl:3"):
        prepare_data(
            DataConfig(train=tmp_path / "chat.jsonl", eval_split=0), tokenizer_with(TRIMS_AT_GENERATION), seed=0
        )


def test_a_reply_without_an_end_of_turn_token_is_caught(tmp_path):
    report = run_check(tmp_path, NO_END_OF_TURN)
    assert report.checks["prompt_match"].status == "pass"
    end = report.checks["end_of_turn"]
    assert end.failed == 3 and "no token generate stops on ('<|im_end|>')" in end.first.message
    # tokenize_chat trains the blank line after each reply (nothing marks where the turn ends).
    masks = report.checks["masks"]
    assert masks.failed == 3 and "template text" in masks.first.message


def chatml_sample():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "the fox"},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "the dog"},
    ]
    sample = Sample("chat.jsonl:7", messages)
    renderer = ChatRenderer(build_tokenizer())
    return sample, renderer, tokenize_chat(sample, renderer)


def token_index(tokenizer, ids, text: str, occurrence: int = 0) -> int:
    found = [i for i, t in enumerate(ids) if tokenizer.decode([t]) == text]
    return found[occurrence]


@pytest.mark.parametrize(
    ("corrupt", "check", "words"),
    [
        ("train_user", "masks", "message 3 (user)"),
        ("untrain_reply", "masks", "reply token(s) not trained"),
        ("train_after_end", "no_leak", "message 2 (assistant): 4 token(s) after its end-of-turn"),
        ("untrain_end", "end_of_turn", "end-of-turn token '<|im_end|>' is not trained"),
        ("left_out_reply_trained", "masks", "message 2 (assistant)"),
    ],
)
def test_wrong_masks_are_caught(corrupt, check, words):
    sample, renderer, tokenized = chatml_sample()
    tokenizer, ids, labels = renderer.tokenizer, tokenized.input_ids, list(tokenized.labels)
    end = token_index(tokenizer, ids, "<|im_end|>", 2)  # after "the fox"
    if corrupt == "train_user":
        text = renderer.render(sample.messages)
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        at = next(t for t, (begin, _) in enumerate(offsets) if begin >= text.index("and?"))
        labels[at] = ids[at]
    elif corrupt == "untrain_reply":
        labels[end - 1] = IGNORE_INDEX
    elif corrupt == "train_after_end":
        labels[end + 1 : end + 5] = ids[end + 1 : end + 5]  # "\n", "<|im_start|>", "user", "\n"
    elif corrupt == "untrain_end":
        labels[end] = IGNORE_INDEX
    tokenized.labels = labels  # left_out_reply_trained: every reply's labels, checked as last_assistant
    stop = generation_stop_ids(tokenizer)
    train_on = "last_assistant" if corrupt == "left_out_reply_trained" else "all_assistant"
    outcome, _ = check_conversation(sample, renderer, train_on, stop, tokenized)
    failed = {name for name, failure in outcome.items() if failure}
    assert failed == {check}
    assert words in outcome[check].message and outcome[check].where == "chat.jsonl:7"
    clean, _ = check_conversation(sample, renderer, "all_assistant", stop)
    assert not any(clean.values())


@pytest.fixture()
def bad_model_dir(tmp_path):
    """The tiny model with a chat template whose generation prompt ends in a space."""
    folder = tmp_path / "bad-model"
    tokenizer = tokenizer_with(TRAILING_SPACE)
    build_tiny_model(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cli_reports_pass_fail_and_exit_codes(tmp_path, tiny_model_dir, bad_model_dir):
    path = write_rows(tmp_path / "chat.jsonl", ROWS)
    runner = CliRunner()
    good = runner.invoke(app, ["data", "check-template", str(path), "--model", str(tiny_model_dir)])
    assert good.exit_code == 0, good.output
    assert good.output.count("PASS") == 4 and "result: pass" in good.output
    bad = runner.invoke(app, ["data", "check-template", str(path), "--model", str(bad_model_dir), "--json"])
    assert bad.exit_code == 2
    report = json.loads(bad.output)
    assert report["ok"] is False and report["checks"]["prompt_match"]["status"] == "fail"
    assert report["checks"]["prompt_match"]["first_failure"]["where"] == f"{path}:1"
    text = runner.invoke(app, ["data", "check-template", str(path), "--model", str(bad_model_dir), "--limit", "1"])
    assert text.exit_code == 2 and "FAIL (a)" in text.output and "checked 1 of 3" in text.output
    wrong = runner.invoke(
        app, ["data", "check-template", str(path), "--model", str(tiny_model_dir), "--train-on", "every"]
    )
    assert wrong.exit_code == 2 and "--train-on" in wrong.output


def test_training_refuses_a_mismatching_template_before_writing_anything(tmp_path, bad_model_dir):
    path = write_rows(tmp_path / "chat.jsonl", ROWS)
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {bad_model_dir}\ndata:\n  train: {path}\n  eval_split: 0\noutput_dir: {out}\n")
    load_config(config)  # a valid config: the data and template are the problem
    result = CliRunner().invoke(app, ["train", str(config)])
    assert result.exit_code == 2
    assert "chat template check failed" in result.output and f"{path}:1" in result.output
    assert "FAIL (a)" in result.output
    assert not out.exists()


def test_replies_that_repeat_template_words_are_located_after_the_generation_prompt(tmp_path):
    # "assistant" also occurs in the header before each reply; the next user turn repeats the reply.
    rows = [sharegpt(None, "say assistant", "assistant", "assistant", "user")]
    report = run_check(tmp_path, CHATML, rows=rows)
    assert report.ok and statuses(report) == ALL_PASS and report.replies == 2
