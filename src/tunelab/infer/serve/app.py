"""`tunelab serve`: an OpenAI-compatible HTTP API over a run or model, for clients that already speak it.

Chat prompts are built by the run's ChatRenderer and tokenised as `generate` does (data/template.py), so a
served reply is the reply `tunelab generate` writes for the same conversation (tested). Every error, malformed
bodies included, is answered in OpenAI's `{"error": {...}}` shape with a 4xx code; nothing answers with a
traceback.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from tunelab.data.template import ChatRenderer
from tunelab.infer.serve.engine import Engine
from tunelab.infer.serve.protocol import ChatRequest, CompletionRequest, error_body
from tunelab.infer.serve.request import Finished, QueueFull, Request, Sampling

MAX_BODY_BYTES = 4 * 2**20
DISCONNECT_CHECK_SECONDS = 1.0


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(message, kind, param, code)


@dataclass(frozen=True)
class Route:
    """What one name in `model` fields answers with: its chat template, and its adapter (None: the model as
    loaded; `__base__`: the base with every adapter off)."""

    renderer: ChatRenderer
    adapter: str | None = None


@dataclass
class Served:
    """The models behind the API (by the name clients give in `model`), the engine and the context length."""

    models: dict[str, Route]
    engine: Engine
    context: int
    precision: str = "fp32"
    """The dtype the engine decodes in."""

    @property
    def name(self) -> str:
        return next(iter(self.models))


def create_app(served: Served, *, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="tunelab serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(_: HttpRequest, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body, status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: HttpRequest, err: RequestValidationError) -> JSONResponse:
        problems = err.errors()
        first = problems[0] if problems else {}
        where = ".".join(str(part) for part in first.get("loc", ())[1:])
        message = "; ".join(_describe(problem) for problem in problems[:5]) or "invalid request body"
        return JSONResponse(error_body(message, param=where or None), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http_error(_: HttpRequest, err: HTTPException) -> JSONResponse:
        """Starlette's own refusals (no such route, wrong method, a body it cannot parse) in OpenAI's shape."""
        codes = {404: "not_found", 405: "method_not_allowed"}
        return JSONResponse(error_body(str(err.detail), code=codes.get(err.status_code)), status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: HttpRequest, err: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"{type(err).__name__}: {err}", "server_error"), status_code=500)

    if api_key:
        app.add_middleware(_Authorise, api_key=api_key)
    app.add_middleware(_BodyLimit, limit=max_body_bytes)

    @app.get("/health")
    async def health() -> dict:
        engine = served.engine
        return {"status": "ok", "models": list(served.models), **engine.load, "batching": engine.batching,
                "lookup": engine.lookup}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "tunelab"}
                                           for name in served.models]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        _route(served, name)
        return {"id": name, "object": "model", "created": created, "owned_by": "tunelab"}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: HttpRequest):
        route = _route(served, body.model)
        messages = [{"role": m.role, "content": m.text} for m in body.messages]
        text = route.renderer.prompt(messages)
        prompt = list(route.renderer.tokenizer(text, add_special_tokens=False)["input_ids"])
        return await _answer(served, route, body, [prompt], chat=True, http=http)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HttpRequest):
        route = _route(served, body.model)
        prompts = [list(route.renderer.tokenizer(p)["input_ids"]) for p in body.prompts]
        return await _answer(served, route, body, prompts, chat=False, http=http)

    return app


def _describe(problem: dict) -> str:
    if problem.get("type") == "json_invalid":
        return f"the body is not valid JSON ({(problem.get('ctx') or {}).get('error', 'cannot parse it')})"
    where = ".".join(str(part) for part in problem.get("loc", ())[1:]) or "body"
    return f"{where}: {problem.get('msg', 'invalid')}"


def _route(served: Served, name: str) -> Route:
    if name not in served.models:
        raise ApiError(404, f"the model '{name}' does not exist; this server serves {', '.join(served.models)}",
                       param="model", code="model_not_found")
    return served.models[name]


async def _answer(served: Served, route: Route, body: ChatRequest | CompletionRequest, prompts: list[list[int]], *,
                  chat: bool, http: HttpRequest | None = None):
    """Submit n completions per prompt and answer with the whole result, or stream it. A client that goes away
    while its whole answer is being decoded frees its rows within DISCONNECT_CHECK_SECONDS."""
    for prompt in prompts:
        if not prompt:
            raise ApiError(400, "the prompt is empty: there is no token to continue from", param="prompt")
        if len(prompt) >= served.context:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens; the model's context is {served.context}",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
    limit = body.token_limit
    longest = max(len(p) for p in prompts)
    if limit is not None and longest + limit > served.context:
        raise ApiError(400, f"the prompt ({longest} tokens) and max_tokens ({limit}) exceed the model's context "
                       f"of {served.context} tokens", param="max_tokens", code="context_length_exceeded")
    if len(prompts) * body.n > served.engine.max_waiting:
        raise ApiError(400, f"the request asks for {len(prompts) * body.n} completions ({len(prompts)} prompt(s) x n="
                       f"{body.n}); this server queues at most {served.engine.max_waiting} (--max-waiting)", param="n")
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    requests: list[Request] = []
    for p_index, prompt in enumerate(prompts):
        for copy in range(body.n):
            choice = p_index * body.n + copy
            seed = None if body.seed is None else (body.seed + copy) % 2**64  # torch takes seeds below 2^64
            sampling = Sampling(limit or served.context - len(prompt), body.temperature, body.top_p, body.stops, seed)
            requests.append(Request(
                prompt, sampling, route.adapter,
                on_text=lambda text, c=choice: loop.call_soon_threadsafe(events.put_nowait, (c, text)),
                on_done=lambda end, c=choice: loop.call_soon_threadsafe(events.put_nowait, (c, end))))
    try:
        served.engine.submit_all(requests)
    except QueueFull as err:
        for request in requests:
            request.cancelled.set()
        raise ApiError(503, f"the server is busy ({err}); retry later", "server_error", code="overloaded") from None
    usage_prompt = sum(len(p) for p in prompts)
    kind = "chat.completion" if chat else "text_completion"
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = _stream(body.model, events, requests, ident, created, kind, usage_prompt, include_usage, chat)
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    finished: dict[int, Finished] = {}
    try:
        while len(finished) < len(requests):
            try:
                choice, event = await asyncio.wait_for(events.get(), timeout=DISCONNECT_CHECK_SECONDS)
            except TimeoutError:
                if http is not None and await http.is_disconnected():
                    return Response(status_code=499)  # nobody reads it; `finally` frees the rows
                continue
            if isinstance(event, BaseException):
                raise ApiError(500, f"generation failed: {type(event).__name__}: {event}", "server_error")
            if isinstance(event, Finished):
                finished[choice] = event
    finally:
        for request in requests:
            request.cancelled.set()
    choices = []
    for index in range(len(requests)):
        end = finished[index]
        if chat:
            choices.append({"index": index, "message": {"role": "assistant", "content": end.text},
                            "finish_reason": end.finish_reason, "logprobs": None})
        else:
            choices.append({"index": index, "text": end.text, "finish_reason": end.finish_reason, "logprobs": None})
    completion = sum(end.completion_tokens for end in finished.values())
    return {"id": ident, "object": kind, "created": created, "model": body.model, "choices": choices,
            "usage": {"prompt_tokens": usage_prompt, "completion_tokens": completion,
                      "total_tokens": usage_prompt + completion}}


async def _stream(model: str, events: asyncio.Queue, requests: list[Request], ident: str, created: int,
                  kind: str, usage_prompt: int, include_usage: bool, chat: bool) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them: the role first (chat), text deltas, each choice's finish_reason,
    a usage chunk when asked for, then [DONE]; every chunk carries the same id."""
    chunk_kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict], **extra) -> str:
        payload = {"id": ident, "object": chunk_kind, "created": created, "model": model,
                   "choices": choices, **extra}
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def choice(index: int, text: str | None, finish: str | None, role: bool = False) -> dict:
        if not chat:
            return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
        delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
        return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}

    done = 0
    completion = 0
    try:
        if chat:
            yield chunk([choice(i, None, None, role=True) for i in range(len(requests))])
        while done < len(requests):
            index, event = await events.get()
            if isinstance(event, BaseException):
                body = error_body(f"generation failed: {type(event).__name__}: {event}", "server_error")
                yield f"data: {json.dumps(body)}\n\n"
                break
            if isinstance(event, Finished):
                done += 1
                completion += event.completion_tokens
                yield chunk([choice(index, None if chat else "", event.finish_reason)])
            elif event:
                yield chunk([choice(index, event, None)])
        if include_usage:
            yield chunk([], usage={"prompt_tokens": usage_prompt, "completion_tokens": completion,
                                   "total_tokens": usage_prompt + completion})
        yield "data: [DONE]\n\n"
    finally:  # the client may have gone: free its rows
        for request in requests:
            request.cancelled.set()


async def _send_json(send, status: int, content: dict) -> None:
    body = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class _Authorise:
    """401 unless `Authorization: Bearer KEY` (but /health). Plain ASGI, not @app.middleware: Starlette's
    BaseHTTPMiddleware hides a client's disconnect from the endpoint, which must see it to free the rows."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope.get("path") != "/health":
            scheme, _, given = dict(scope.get("headers") or []).get(b"authorization", b"").partition(b" ")
            # the scheme's case does not matter (RFC 9110); the key's does
            if scheme.lower() != b"bearer" or not secrets.compare_digest(given.strip(), self.expected):
                await _send_json(send, 401, error_body("missing or wrong API key (Authorization: Bearer KEY)",
                                                       code="invalid_api_key"))
                return
        await self.app(scope, receive, send)


class _BodyLimit:
    """Refuse request bodies over `limit` bytes with 413, whether or not they declare their length."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        # Read the whole body here (FastAPI would turn an exception raised inside its own read into a 400), then
        # hand it on; later receives (a client going away) pass straight through.
        chunks, received, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            received += len(chunks[-1])
            if received > self.limit:
                await self._refuse(send)
                return
            more = message.get("more_body", False)
        whole: dict | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replayed():
            nonlocal whole
            if whole is not None:
                message, whole = whole, None
                return message
            return await receive()

        await self.app(scope, replayed, send)

    async def _refuse(self, send) -> None:
        await _send_json(send, 413, error_body(f"the request body is larger than {self.limit} bytes",
                                               code="request_too_large"))
