"""`tunelab serve` on a real (tiny) LoRA run: the official openai client against a live server, replies equal
to `tunelab generate`'s, streaming as clients expect it, batching without cross-talk, and every bad request a
4xx in OpenAI's error shape."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from tunelab.config import load_config
from tunelab.errors import ConfigError
from tunelab.infer.generate import GenerationOptions, encode_prompts, generate_replies
from tunelab.infer.serve import create_app, load_served
from tunelab.models.lean_decoder import lean_decoder
from tunelab.train.run import train_run

KEY = "test-key"
PROMPTS = ["hello world", "what is the answer?", "question 0123", "assistant system user", "refund desk high",
           "world hello question", "the answer is", "desk refund"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """uvicorn in a thread, on a free port."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def train_tiny_run(model_dir, folder, name: str, answer: str, lr: float):
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"question": p, "answer": answer}) + "\n" for p in PROMPTS * 3))
    config = load_config(None, [f"model={model_dir}", f"data.train={data}", "data.eval_split=0",
                                f"output_dir={folder / name}", "train.max_steps=20", "train.precision=fp32",
                                f"train.lr={lr}", "eval.generate_samples=0"])
    train_run(config)
    return folder / name


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    return train_tiny_run(tiny_model_dir, tmp_path_factory.mktemp("serve"), "run", "the answer is 42", 3e-2)


@pytest.fixture(scope="module")
def other_run(tiny_model_dir, tmp_path_factory):
    return train_tiny_run(tiny_model_dir, tmp_path_factory.mktemp("serve-other"), "other", "refund desk high", 3e-2)


@pytest.fixture(scope="module")
def served(run_dir):
    served = load_served(str(run_dir), max_batch=4, max_waiting=64)
    yield served
    served.engine.close()


@pytest.fixture(scope="module")
def server(served):
    live = LiveServer(create_app(served, api_key=KEY))
    yield live
    live.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def chat(client, prompt: str, **options):
    return client.chat.completions.create(model="run", messages=[{"role": "user", "content": prompt}],
                                          **{"temperature": 0, "max_tokens": 10, **options})


def test_a_served_reply_is_generates_reply(client, served):
    loaded_model = served.engine.model
    renderer = served.models["run"].renderer
    replies = generate_replies(loaded_model, renderer, [[{"role": "user", "content": p}] for p in PROMPTS[:3]],
                               GenerationOptions(max_new_tokens=10))
    assert all(replies)  # the run learnt to say something: equality below is not of empty strings
    for prompt, expected in zip(PROMPTS[:3], replies, strict=True):
        answer = chat(client, prompt)
        assert answer.choices[0].message.content.strip() == expected
        assert answer.choices[0].message.role == "assistant"
        prompt_tokens = encode_prompts(renderer, [[{"role": "user", "content": prompt}]])["input_ids"].shape[1]
        assert answer.usage.prompt_tokens == prompt_tokens
        assert answer.usage.completion_tokens <= 10
        assert answer.usage.total_tokens == prompt_tokens + answer.usage.completion_tokens
        assert answer.choices[0].finish_reason in ("stop", "length") and answer.model == "run"
    assert [m.id for m in client.models.list().data] == ["run"]


def test_streaming_sends_the_role_first_one_id_and_the_same_text(client):
    whole = chat(client, PROMPTS[1], max_tokens=12).choices[0]
    chunks = list(chat(client, PROMPTS[1], max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    completion = "".join(c.choices[0].text for c in client.completions.create(
        model="run", prompt="hello", max_tokens=6, temperature=0, stream=True))
    assert completion == client.completions.create(model="run", prompt="hello", max_tokens=6,
                                                   temperature=0).choices[0].text


def test_fifty_concurrent_requests_get_what_each_gets_alone(client):
    alone = {p: chat(client, p, max_tokens=8) for p in PROMPTS}
    asked = [PROMPTS[i % len(PROMPTS)] for i in range(50)]
    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(lambda p: chat(client, p, max_tokens=8), asked))
    for prompt, answer in zip(asked, answers, strict=True):
        assert answer.choices[0].message.content == alone[prompt].choices[0].message.content
        assert answer.usage == alone[prompt].usage


def test_stop_strings_seeds_and_n(client):
    full = chat(client, PROMPTS[0], max_tokens=16).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    if stop.strip():
        cut = chat(client, PROMPTS[0], max_tokens=16, stop=[stop]).choices[0]
        assert cut.message.content == full[: full.find(stop)] and cut.finish_reason == "stop"
    sampled = [chat(client, PROMPTS[2], temperature=1.0, seed=7, n=2) for _ in range(2)]
    first, again = ([c.message.content for c in s.choices] for s in sampled)
    assert first == again and len(first) == 2  # seeded: the same replies each time


def test_bad_requests_get_openai_errors_not_tracebacks(server, client):
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"{server.url}/v1/chat/completions"

    def post(body, **kwargs):
        return httpx.post(url, headers={**headers, **kwargs.pop("headers", {})}, timeout=30, **kwargs,
                          **({"content": body} if isinstance(body, bytes) else {"json": body}))

    good = {"model": "run", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cases = {
        "bad role": ({**good, "messages": [{"role": "wizard", "content": "hi"}]}, 400),
        "negative max_tokens": ({**good, "max_tokens": -1}, 400),
        "no messages": ({"model": "run"}, 400),
        "tools": ({**good, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400),
        "not json": (b"{not json", 400),
        "too long for the context": ({**good, "max_tokens": 10_000}, 400),
        "unknown model": ({**good, "model": "gpt-4"}, 404),
        "5 MB body": ({**good, "messages": [{"role": "user", "content": "x" * (5 * 2**20)}]}, 413),
    }
    for name, (body, status) in cases.items():
        response = post(body)
        assert response.status_code == status, name
        error = response.json()["error"]
        assert error["message"] and "Traceback" not in error["message"], name
    assert httpx.post(url, json=good, timeout=30).status_code == 401
    assert httpx.post(url, json=good, headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
    assert httpx.post(url, json=good, headers={"Authorization": KEY}, timeout=30).status_code == 401
    assert httpx.post(url, json=good, headers={"Authorization": f"bearer {KEY}"}, timeout=30).status_code == 200
    asked = {"model": "run", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 8, "temperature": 0}
    for _ in range(2):  # the second reply is drafted from the first
        assert post(asked).status_code == 200
    health = httpx.get(f"{server.url}/health", timeout=30).json()  # no key needed
    assert health["status"] == "ok" and health["lookup"]["drafted"] >= health["lookup"]["confirmed"] > 0
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_a_full_queue_answers_503_and_a_request_larger_than_the_queue_400(served):
    """A full queue is worth retrying (503); a request whose prompts x n could never fit is not (400), and its
    completions are queued together or not at all."""
    from tunelab.infer.serve.app import Served
    from tunelab.infer.serve.engine import Engine
    from tunelab.infer.serve.request import Request, Sampling

    # not started: what is queued stays queued
    engine = Engine(served.engine.model, served.models["run"].renderer.tokenizer, max_batch=1, max_waiting=2,
                    start=False)
    live = LiveServer(create_app(Served(served.models, engine, served.context)))
    try:
        body = {"model": "run", "prompt": ["a", "b"], "n": 2, "max_tokens": 2}
        response = httpx.post(f"{live.url}/v1/completions", json=body, timeout=30)
        assert response.status_code == 400 and "asks for 4 completions" in response.json()["error"]["message"]
        engine.submit(Request([1], Sampling(2), None, on_text=lambda text: None, on_done=lambda end: None))
        response = httpx.post(f"{live.url}/v1/completions", json={**body, "prompt": "a"}, timeout=30)
        assert response.status_code == 503 and response.json()["error"]["code"] == "overloaded"
        assert engine.load["waiting"] == 1  # neither of its two copies was queued
    finally:
        live.stop()
        engine.close()


def test_errors_outside_the_request_bodies_keep_openais_shape(server, client):
    """No such route or method, a body that is not UTF-8 or not JSON, an empty prompt (which once failed the
    whole batch with a 500), a seed past 2^64, strings or floats for integers, penalties (refused: they would
    change the answer) and the values that change nothing (null for defaults, response_format text)."""
    headers = {"Authorization": f"Bearer {KEY}"}
    completions = f"{server.url}/v1/completions"
    for method, path, status in [("GET", "/v1/nowhere", 404), ("GET", "/v1/chat/completions", 405)]:
        response = httpx.request(method, f"{server.url}{path}", headers=headers, timeout=30)
        assert response.status_code == status and response.json()["error"]["message"], path
    assert client.models.retrieve("run").id == "run"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    not_utf8 = b'{"model": "run", "prompt": "\xff\xfe", "max_tokens": 2}'
    for body in (not_utf8, b"{bad json"):
        response = httpx.post(completions, content=body, headers={**headers, "Content-Type": "application/json"},
                              timeout=30)
        assert response.status_code == 400 and response.json()["error"]["message"], body
    big = json.dumps({"model": "run", "prompt": "x" * (5 * 2**20)}).encode()
    response = httpx.post(completions, content=iter([big[:2**20], big[2**20:]]), timeout=30,  # chunked: no length
                          headers={**headers, "Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    good = {"model": "run", "prompt": "hi", "max_tokens": 2, "temperature": 0}
    for change, status in [({"prompt": ""}, 400), ({"seed": 2**70}, 400), ({"frequency_penalty": 1.5}, 400),
                           ({"max_tokens": "3"}, 400), ({"stream": "yes"}, 400), ({"max_tokens": 2.0}, 400),
                           ({"temperature": None, "top_p": None, "n": None, "stream": None, "seed": 2**64 - 1}, 200),
                           ({"response_format": {"type": "text"}, "tool_choice": "none"}, 200)]:
        response = httpx.post(completions, json={**good, **change}, headers=headers, timeout=30)
        assert response.status_code == status, (change, response.text)
        if status == 400:
            assert response.json()["error"]["message"], change


def test_a_client_that_leaves_frees_its_row(served):
    """A client waiting for a whole (not streamed) answer that goes away has its completions cancelled within about
    a second, not decoded on to max_tokens for nobody (here on an engine that is not started, so the request is
    still queued when the client leaves)."""
    from tunelab.infer.serve.app import Served
    from tunelab.infer.serve.engine import Engine

    engine = Engine(served.engine.model, served.models["run"].renderer.tokenizer, max_batch=1, start=False)
    live = LiveServer(create_app(Served(served.models, engine, served.context)))
    try:
        body = {"model": "run", "prompt": "hi", "max_tokens": 400}
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{live.url}/v1/completions", json=body, timeout=0.5)
        queued = engine._waiting[0]
        assert queued.cancelled.wait(timeout=10)
    finally:
        live.stop()
        engine.close()


def test_adapters_on_one_base_answer_as_each_run_alone(tiny_model_dir, run_dir, other_run):
    from tunelab.infer.load import load_generator

    conversations = [[{"role": "user", "content": p}] for p in PROMPTS[:4]]
    options = GenerationOptions(max_new_tokens=8)
    expected = {}
    for name, spec in (("run", run_dir), ("other", other_run), (str(tiny_model_dir), tiny_model_dir)):
        loaded = load_generator(spec)
        expected[name] = generate_replies(loaded.model, loaded.renderer, conversations, options)
    assert all(expected["run"]) and expected["run"] != expected["other"]  # the adapters differ: routing is visible
    served = load_served(str(tiny_model_dir), adapters={"run": str(run_dir), "other": str(other_run)}, max_batch=6)
    assert served.precision == "fp32"  # what the runs trained in, though the base alone would be served in bf16
    live = LiveServer(create_app(served))
    try:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == [str(tiny_model_dir), "run", "other"]
        asked = [(name, i) for name in expected for i in range(4)] * 2
        with ThreadPoolExecutor(max_workers=len(asked)) as pool:  # mixed adapters in the same batches
            answers = list(pool.map(lambda job: client.chat.completions.create(
                model=job[0], messages=conversations[job[1]], temperature=0, max_tokens=8), asked))
        for (name, i), answer in zip(asked, answers, strict=True):
            assert answer.choices[0].message.content.strip() == expected[name][i], (name, i)
    finally:
        live.stop()
        served.engine.close()
    with pytest.raises(ConfigError, match="not a tunelab run directory with an adapter"):
        load_served(str(tiny_model_dir), adapters={"x": str(tiny_model_dir)})


@pytest.mark.parametrize("compile_steps", [False, True], ids=["eager", "compiled"])
def test_bf16_serving_folds_the_run_and_its_cache_grows_as_rows_come_and_go(run_dir, monkeypatch, compile_steps):
    """--precision bf16 serves the run's adapter folded into bf16 weights, as `tunelab generate` decodes in bf16,
    and answers the same; with the KV cache reserved 3 positions at a time it grows, merges and trims many times
    over 16 requests through a batch of 4, requests joining together run their shared prefix once, and no reply
    changes. With --compile (where the CPU packs bf16 weights) one-token steps of a single row run the compiled
    graph, larger batches the eager forward."""
    import tunelab.infer.decode as decode_module
    import tunelab.infer.serve.engine as engine_module
    from tunelab.infer.load import load_generator
    from tunelab.models.packed_linear import PackedLinear, packing_available

    measure = decode_module._shared_prefix_length

    loaded = load_generator(run_dir)
    system = {"role": "system", "content": "the refund desk answers every question"}  # a prefix to share
    conversations = [[system, {"role": "user", "content": p}] for p in PROMPTS]
    expected = generate_replies(loaded.model, loaded.renderer, conversations,
                                GenerationOptions(max_new_tokens=10, precision="bf16"))
    assert all(expected)
    monkeypatch.setattr(engine_module, "ROOM", 3)
    shared = []  # requests joining together run their common template prefix once
    monkeypatch.setattr(decode_module, "_shared_prefix_length",
                        lambda prompts: shared.append(measure(prompts)) or shared[-1])
    served = load_served(str(run_dir), max_batch=4, precision="bf16", compile_steps=compile_steps)
    compiled_rows = []
    if served.engine.compiled:
        compiled = lean_decoder(served.engine.model).compiled
        graph = compiled._graph
        compiled._graph = lambda *inputs: compiled_rows.append(inputs[0].shape[0]) or graph(*inputs)
    live = LiveServer(create_app(served))
    try:
        model = served.engine.model
        assert served.precision == "bf16" and not hasattr(model, "peft_config")
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        assert any(isinstance(m, PackedLinear) for m in model.modules()) == packing_available(model)
        assert served.engine.compiled == (compile_steps and packing_available(model))
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0)
        asked = list(range(len(PROMPTS))) * 2
        with ThreadPoolExecutor(max_workers=len(asked)) as pool:
            answers = list(pool.map(lambda i: client.chat.completions.create(
                model="run", messages=conversations[i], temperature=0, max_tokens=10), asked))
        assert [a.choices[0].message.content.strip() for a in answers] == [expected[i] for i in asked]
        assert any(length >= decode_module.MIN_SHARED_PREFIX for length in shared), shared
        alone = client.chat.completions.create(model="run", messages=conversations[0], temperature=0, max_tokens=10)
        assert alone.choices[0].message.content.strip() == expected[0]
        if served.engine.compiled:  # a request alone steps a single row compiled (batches never do) ...
            assert set(compiled_rows) <= {1}
            served.engine.history = None  # ... where no lookup draft (here: the earlier same reply) runs its steps
            stepped = len(compiled_rows)
            alone = client.chat.completions.create(model="run", messages=conversations[0], temperature=0,
                                                   max_tokens=10)
            assert alone.choices[0].message.content.strip() == expected[0]
            assert len(compiled_rows) - stepped >= alone.usage.completion_tokens - 1 >= 1
            assert set(compiled_rows) == {1}
    finally:
        live.stop()
        served.engine.close()


def test_one_adapter_beside_its_base_leaves_the_base_rows_plain(tiny_model_dir, run_dir):
    from tunelab.infer.load import load_generator

    conversations = [[{"role": "user", "content": p}] for p in PROMPTS[:4]]
    options = GenerationOptions(max_new_tokens=8)
    expected = {}
    for name, spec in (("run", run_dir), (str(tiny_model_dir), tiny_model_dir)):
        loaded = load_generator(spec)
        expected[name] = generate_replies(loaded.model, loaded.renderer, conversations, options)
    assert expected["run"] != expected[str(tiny_model_dir)]
    served = load_served(str(tiny_model_dir), adapters={"run": str(run_dir)}, max_batch=8, precision="fp32")
    live = LiveServer(create_app(served))
    try:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0)
        asked = [(name, i) for name in expected for i in range(4)]
        with ThreadPoolExecutor(max_workers=len(asked)) as pool:
            answers = list(pool.map(lambda job: client.chat.completions.create(
                model=job[0], messages=conversations[job[1]], temperature=0, max_tokens=8), asked))
        for (name, i), answer in zip(asked, answers, strict=True):
            assert answer.choices[0].message.content.strip() == expected[name][i], (name, i)
        alone = client.chat.completions.create(model=str(tiny_model_dir), messages=conversations[0], temperature=0,
                                               max_tokens=8)
        assert alone.choices[0].message.content.strip() == expected[str(tiny_model_dir)][0]
    finally:
        live.stop()
        served.engine.close()


def submit_together(engine, renderer, together: list) -> list:
    """Submit (prompt, engine Sampling) requests at once; their Finished ends, in order."""
    from tunelab.infer.serve.request import Request

    finished = [threading.Event() for _ in together]
    ends: list = [None] * len(together)

    def on_done(index: int):
        return lambda end: (ends.__setitem__(index, end), finished[index].set())

    for index, (prompt, sampling) in enumerate(together):
        ids = engine.tokenizer(renderer.prompt([{"role": "user", "content": prompt}]),
                               add_special_tokens=False)["input_ids"]
        engine.submit(Request(ids, sampling, None, lambda text: None, on_done(index)))
    assert all(event.wait(60) for event in finished)
    return ends


def counting(forward, shapes: list):
    """`forward`, noting the [rows, width] of every pass it runs."""
    return lambda ids, *args, **kwargs: shapes.append(tuple(ids.shape)) or forward(ids, *args, **kwargs)


def test_lookup_drafts_leave_replies_as_they_are_alone_and_in_batches(run_dir):
    """Requests one at a time and eight at once through a batch of 4 check tokens drafted from their prompts and
    earlier replies, rows of a pass confirming different numbers of them; greedy and seeded replies are the ones
    an engine without drafts gives (float32), in fewer passes."""
    from tunelab.infer.serve.request import Sampling as EngineSampling

    greedy, seeded = EngineSampling(12, temperature=0), EngineSampling(12, temperature=1.0, seed=5)
    jobs = [[(prompt, sampling)] for prompt in PROMPTS * 2 for sampling in (greedy, seeded)]  # one at a time
    jobs += [[(prompt, greedy) for prompt in PROMPTS]] * 2  # eight at once
    replies, passes = {}, {}
    for lookup in (False, True):
        served = load_served(str(run_dir), max_batch=4, lookup=lookup)
        engine, passes[lookup] = served.engine, []
        engine._forward = counting(engine._forward, passes[lookup])  # steps only: prompts run through prefill
        try:
            ends = [end for together in jobs for end in submit_together(engine, served.models["run"].renderer,
                                                                         together)]
            replies[lookup] = [(end.text, end.completion_tokens) for end in ends]
            assert (engine.accepted > 0) == lookup
        finally:
            engine.close()
    assert replies[True] == replies[False]
    assert len({text for text, _ in replies[False]}) > 2  # greedy and sampled replies differ: seeds are compared
    assert all(width == 1 for _, width in passes[False])
    drafted = [rows for rows, width in passes[True] if width > 1]
    assert 1 in drafted and max(drafted) > 1  # drafts checked alone and in batches
    assert len(passes[True]) < len(passes[False])


def test_a_reply_cut_inside_a_character_ends_before_it(served):
    """max_tokens can end a reply between the bytes of one character, whose first bytes decode to U+FFFD: that is
    left out of a `length` reply (a stop keeps its text as decoded)."""
    from tunelab.infer.serve.engine import Engine
    from tunelab.infer.serve.request import Request, Sampling

    engine = Engine(served.engine.model, served.models["run"].renderer.tokenizer, max_batch=1, start=False)
    sent = []
    request = Request([1], Sampling(3), None, on_text=sent.append, on_done=lambda end: None)
    assert engine._finish(request, "caf\ufffd", "length", 3).text == "caf" and "".join(sent) == "caf"
    engine.close()
