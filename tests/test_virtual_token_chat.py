"""`tunelab chat` on prompt- and prefix-tuning runs streams the reply `tunelab generate` writes (the same cached
loop over PEFT's learned inputs, infer/generate.py's decode_with_virtual_tokens), greedy or sampled with the same
seed (`tunelab serve` answers them from the same loop: tests/test_serve_virtual_tokens.py)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.config import load_config
from tunelab.infer.chat import stream_reply
from tunelab.infer.generate import GenerationOptions, generate_replies
from tunelab.infer.load import load_generator
from tunelab.models.logprobs import uses_virtual_tokens
from tunelab.train.run import train_run

QUESTIONS = ["What is 2+2?", "Write one sentence about the sea, the wind and the moon at night.", "Say hi."]
GREEDY = GenerationOptions(max_new_tokens=12, batch_size=1)
SAMPLED = GenerationOptions(max_new_tokens=12, batch_size=1, do_sample=True, temperature=1.0, top_p=0.95, seed=3)


@pytest.fixture(scope="module", params=["prompt", "prefix"])
def virtual_run(request, tiny_model_dir, tmp_path_factory):
    """A prompt- or prefix-tuning run on the tiny model, trained a few steps."""
    folder = tmp_path_factory.mktemp(request.param)
    data = folder / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "the answer is 42"}) + "\n" for q in QUESTIONS * 4))
    config = load_config(None, [f"model={tiny_model_dir}", f"data.train={data}", "data.eval_split=0",
                                f"method.name={request.param}", "method.num_virtual_tokens=4", "train.max_steps=3",
                                "train.lr=3e-2", "train.precision=fp32", "eval.generate_samples=0",
                                f"output_dir={folder / 'run'}"])
    train_run(config)
    return folder / "run"


def test_a_chat_reply_is_generates_reply_greedy_and_sampled(virtual_run):
    loaded = load_generator(virtual_run, "cpu")
    assert uses_virtual_tokens(loaded.model)
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    conversations.append([{"role": "system", "content": "Answer briefly."}, *conversations[0]])
    replies = {}
    for options in (GREEDY, SAMPLED):
        # one conversation at a time: a sampled reply draws from its completion's generator, the first one here
        expected = [generate_replies(loaded.model, loaded.renderer, [c], options)[0] for c in conversations]
        streamed = ["".join(stream_reply(loaded, conversation, options)).strip() for conversation in conversations]
        assert streamed == expected, options
        replies[options.do_sample] = expected
    assert replies[True] != replies[False]  # the sampled replies were drawn, not argmax


def test_tunelab_chat_answers_as_tunelab_generate(virtual_run):
    """Through the CLI: a greedy turn and a sampled one (chat's first turn samples with seed + 1: a new draw per
    turn) print generate_replies' reply to the same conversation."""
    question = QUESTIONS[1]
    loaded = load_generator(virtual_run, "cpu")
    conversation = [{"role": "user", "content": question}]
    for flags, options in (([], GREEDY), (["--sample", "--temperature", "1.0", "--top-p", "0.95"],
                                          replace(SAMPLED, seed=1))):
        expected = generate_replies(loaded.model, loaded.renderer, [conversation], options)[0]
        result = CliRunner().invoke(app, ["chat", str(virtual_run), "--max-new-tokens", "12", *flags],
                                    input=f"{question}\n/exit\n")
        assert result.exit_code == 0, result.output
        printed = result.output.split("assistant> ", 1)[1].rsplit("\nyou> ", 1)[0]
        assert printed.strip() == expected, flags



def test_the_context_a_chat_fits_into_leaves_room_for_the_virtual_tokens(virtual_run):
    from tunelab.infer.generate import context_length

    loaded = load_generator(virtual_run, "cpu")
    positions = loaded.model.get_base_model().config.max_position_embeddings
    assert context_length(loaded.model) == positions - 4  # method.num_virtual_tokens=4 take the first positions
