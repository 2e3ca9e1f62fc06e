"""`tunelab serve` on prompt- and prefix-tuning runs, through the official openai client against a live server:
requests decode one at a time by `tunelab generate`'s own loop over the virtual tokens (infer/generate.py), so a
served reply is generate_replies' for the same prompt, greedy or sampled with a seed, whole or streamed, chat or
plain completion; max_tokens, stop strings, finish_reason and usage as for other models; concurrent requests
each get their own reply."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx
import openai
import pytest
from test_serve import LiveServer

from tunelab.config import load_config
from tunelab.infer.generate import GenerationOptions, decode_with_virtual_tokens, generate_replies, stop_token_ids
from tunelab.infer.load import load_generator
from tunelab.infer.serve import create_app, load_served
from tunelab.train.run import train_run

QUESTIONS = ["What is 2+2?", "Write one sentence about the sea, the wind and the moon at night.", "Say hi."]
CONVERSATIONS = [[{"role": "user", "content": q}] for q in QUESTIONS]
GREEDY = GenerationOptions(max_new_tokens=12, batch_size=1)
SAMPLED = GenerationOptions(max_new_tokens=12, batch_size=1, do_sample=True, temperature=1.0, top_p=0.95, seed=3)


def train(folder, name: str, answers: list[str], *settings: str):
    data = folder / f"{name}.jsonl"
    rows = [json.dumps({"question": q, "answer": a}) for q, a in zip(QUESTIONS, answers, strict=True)]
    data.write_text("".join(row + "\n" for row in rows) * 4)
    train_run(load_config(None, [f"data.train={data}", "data.eval_split=0", "train.precision=fp32",
                                 "eval.generate_samples=0", f"output_dir={folder / name}", *settings]))
    return folder / name


@pytest.fixture(scope="module")
def answering_base(tiny_model_dir, tmp_path_factory):
    """The tiny model fully fine-tuned to answer each question its own way: the random one's greedy replies are
    newlines, and its samples random bytes, whatever the prompt."""
    return train(tmp_path_factory.mktemp("answering"), "base", ["four", "the sea is calm", "hi there"],
                 f"model={tiny_model_dir}", "method.name=full", "train.max_steps=30", "train.lr=1e-2")


@pytest.fixture(scope="module", params=["prompt", "prefix"])
def virtual_run(request, answering_base, tmp_path_factory):
    """A prompt- or prefix-tuning run on that base, taught one answer for every question."""
    return train(tmp_path_factory.mktemp(f"serve-{request.param}"), "run", ["the answer is 42"] * len(QUESTIONS),
                 f"model={answering_base}", f"method.name={request.param}", "method.num_virtual_tokens=4",
                 "train.max_steps=10", "train.lr=3e-1")


@pytest.fixture(scope="module")
def loaded(virtual_run):
    """The run loaded on its own, apart from the served copy: the reference replies come from it."""
    return load_generator(virtual_run, "cpu")


@pytest.fixture(scope="module")
def expected(loaded):
    """generate_replies' reply to each question alone: {False: greedy, True: sampled with SAMPLED's seed}."""
    return {options.do_sample: [generate_replies(loaded.model, loaded.renderer, [c], options)[0]
                                for c in CONVERSATIONS] for options in (GREEDY, SAMPLED)}


def as_served(reply: str, finish_reason: str) -> str:
    """A reply as the server sends it: one cut by max_tokens inside a character ends before that character's
    first bytes (U+FFFD when decoded; tests/test_serve.py's test_a_reply_cut_inside_a_character_ends_before_it)."""
    return reply.removesuffix("\ufffd").rstrip() if finish_reason == "length" else reply


@pytest.fixture(scope="module")
def served(virtual_run):
    served = load_served(str(virtual_run), max_batch=4)
    yield served
    served.engine.close()


@pytest.fixture(scope="module")
def server(served):
    live = LiveServer(create_app(served))
    yield live
    live.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def chat(client, question: str, options: GenerationOptions = GREEDY, **extra):
    """A chat completion asked with `options`' settings (greedy: temperature 0)."""
    sampling = ({"temperature": options.temperature, "top_p": options.top_p, "seed": options.seed}
                if options.do_sample else {"temperature": 0})
    return client.chat.completions.create(model="run", messages=[{"role": "user", "content": question}],
                                          **{"max_tokens": options.max_new_tokens, **sampling, **extra})


def streamed(chunks) -> tuple[str, str]:
    """(the text, the finish_reason) of a streamed chat completion."""
    chunks = list(chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, [c.choices[0].finish_reason for c in chunks if c.choices][-1]


def test_served_replies_are_generates_greedy_and_sampled(client, served, server, expected, loaded, answering_base):
    base = load_generator(answering_base, "cpu")
    assert expected[False] != generate_replies(base.model, base.renderer, CONVERSATIONS, GREEDY)  # tuning shows
    assert all(expected[False]) and expected[True] != expected[False]  # sampled replies are drawn, not argmax
    assert served.engine.one_at_a_time and served.precision == "fp32"
    for index, question in enumerate(QUESTIONS):
        for options in (GREEDY, SAMPLED):
            answer = chat(client, question, options)
            finish = answer.choices[0].finish_reason
            assert answer.choices[0].message.content.strip() == as_served(expected[options.do_sample][index], finish)
            prompt = loaded.tokenizer(loaded.renderer.prompt(CONVERSATIONS[index]), add_special_tokens=False)
            assert answer.usage.prompt_tokens == len(prompt["input_ids"])  # the virtual tokens are not the client's
            assert 1 <= answer.usage.completion_tokens <= 12 and finish in ("stop", "length")
    # n=2, seeded: the second completion draws with seed + 1, as batched models' do
    two = chat(client, QUESTIONS[1], SAMPLED, n=2)
    again = generate_replies(loaded.model, loaded.renderer, [CONVERSATIONS[1]], replace(SAMPLED, seed=SAMPLED.seed + 1))
    assert [c.message.content.strip() for c in two.choices] == [
        as_served(reply, c.finish_reason) for reply, c in zip([expected[True][1], again[0]], two.choices, strict=True)]
    assert chat(client, QUESTIONS[0], SAMPLED, seed=None).choices[0].finish_reason in ("stop", "length")  # unseeded
    health = httpx.get(f"{server.url}/health", timeout=30).json()
    assert health["status"] == "ok" and health["lookup"] is None and health["active"] == health["waiting"] == 0
    assert health["batching"] == {"mode": "one request at a time", "max_batch": 1}  # though served with max_batch=4


def test_streaming_and_plain_completions_give_the_same_text(client, loaded):
    for options in (GREEDY, SAMPLED):
        whole = chat(client, QUESTIONS[1], options).choices[0]
        chunks = list(chat(client, QUESTIONS[1], options, stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant" and len({c.id for c in chunks}) == 1
        assert streamed(chunks) == (whole.message.content, whole.finish_reason)
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert not any(finishes[:-1]) and chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    # /v1/completions continues the raw prompt (with the tokens the tokenizer adds) by generate's loop
    ids = loaded.tokenizer("the sea and the moon")["input_ids"]
    decoded = decode_with_virtual_tokens(loaded.model, [ids], max_new_tokens=8, pad_id=loaded.tokenizer.pad_token_id,
                                         stop_ids=stop_token_ids(loaded.model, loaded.tokenizer))
    text = loaded.tokenizer.decode(decoded.tokens[0], skip_special_tokens=True)
    asked = {"model": "run", "prompt": "the sea and the moon", "max_tokens": 8, "temperature": 0}
    whole = client.completions.create(**asked).choices[0]
    assert whole.text == (text.removesuffix("\ufffd") if whole.finish_reason == "length" else text)
    assert "".join(c.choices[0].text for c in client.completions.create(**asked, stream=True)) == whole.text


def test_max_tokens_and_stop_strings(client, expected):
    full = chat(client, QUESTIONS[1]).choices[0]
    text = full.message.content
    assert text.strip() == as_served(expected[False][1], full.finish_reason) and len(text.strip()) >= 4
    short = chat(client, QUESTIONS[1], max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    assert text.startswith(short.choices[0].message.content)
    stop = text.strip()[-3:-1]
    cut = chat(client, QUESTIONS[1], stop=[stop]).choices[0]
    assert cut.message.content == text[: text.find(stop)] and cut.finish_reason == "stop"


def test_concurrent_requests_each_get_their_own_reply(client, expected):
    """Requests sent together wait their turn (one decodes at a time) and each gets the reply it gets alone."""
    asked = [(index, options) for index in range(len(QUESTIONS)) for options in (GREEDY, SAMPLED)]

    def ask(job):
        index, options = job
        if index == 2:  # streamed beside the others
            return streamed(chat(client, QUESTIONS[index], options, stream=True))
        answer = chat(client, QUESTIONS[index], options).choices[0]
        return answer.message.content, answer.finish_reason

    with ThreadPoolExecutor(max_workers=len(asked)) as pool:
        replies = list(pool.map(ask, asked))
    for (index, options), (reply, finish) in zip(asked, replies, strict=True):
        assert reply.strip() == as_served(expected[options.do_sample][index], finish), (index, options)
