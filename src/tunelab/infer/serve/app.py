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
from fastapi.responses import JSONResponse, StreamingResponse

from tunelab.data.template import ChatRenderer
from tunelab.infer.serve.engine import Engine
from tunelab.infer.serve.protocol import ChatRequest, CompletionRequest, error_body
from tunelab.infer.serve.request import Finished, QueueFull, Request, Sampling

MAX_BODY_BYTES = 4 * 2**20


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

    @app.exception_handler(Exception)
    async def _unexpected(_: HttpRequest, err: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"{type(err).__name__}: {err}", "server_error"), status_code=500)

    @app.middleware("http")
    async def _authorise(request: HttpRequest, call_next):
        if api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return JSONResponse(error_body("missing or wrong API key (Authorization: Bearer KEY)",
                                               code="invalid_api_key"), status_code=401)
        return await call_next(request)

    app.add_middleware(_BodyLimit, limit=max_body_bytes)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": list(served.models), **served.engine.load, "lookup": served.engine.lookup}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "tunelab"}
                                           for name in served.models]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        route = _route(served, body.model)
        messages = [{"role": m.role, "content": m.text} for m in body.messages]
        text = route.renderer.prompt(messages)
        prompt = list(route.renderer.tokenizer(text, add_special_tokens=False)["input_ids"])
        return await _answer(served, route, body, [prompt], chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        route = _route(served, body.model)
        prompts = [list(route.renderer.tokenizer(p)["input_ids"]) for p in body.prompts]
        return await _answer(served, route, body, prompts, chat=False)

    return app


def _describe(problem: dict) -> str:
    where = ".".join(str(part) for part in problem.get("loc", ())[1:]) or "body"
    return f"{where}: {problem.get('msg', 'invalid')}"


def _route(served: Served, name: str) -> Route:
    if name not in served.models:
        raise ApiError(404, f"the model '{name}' does not exist; this server serves {', '.join(served.models)}",
                       param="model", code="model_not_found")
    return served.models[name]


async def _answer(served: Served, route: Route, body: ChatRequest | CompletionRequest, prompts: list[list[int]], *,
                  chat: bool):
    """Submit n completions per prompt and answer with the whole result, or stream it."""
    for prompt in prompts:
        if len(prompt) >= served.context:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens; the model's context is {served.context}",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
    limit = body.token_limit
    longest = max(len(p) for p in prompts)
    if limit is not None and longest + limit > served.context:
        raise ApiError(400, f"the prompt ({longest} tokens) and max_tokens ({limit}) exceed the model's context "
                       f"of {served.context} tokens", param="max_tokens", code="context_length_exceeded")
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    requests: list[Request] = []
    for p_index, prompt in enumerate(prompts):
        for copy in range(body.n):
            choice = p_index * body.n + copy
            seed = None if body.seed is None else body.seed + copy
            sampling = Sampling(limit or served.context - len(prompt), body.temperature, body.top_p, body.stops, seed)
            requests.append(Request(
                prompt, sampling, route.adapter,
                on_text=lambda text, c=choice: loop.call_soon_threadsafe(events.put_nowait, (c, text)),
                on_done=lambda end, c=choice: loop.call_soon_threadsafe(events.put_nowait, (c, end))))
    try:
        for request in requests:
            served.engine.submit(request)
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
            choice, event = await events.get()
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


class _TooLarge(Exception):
    pass


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
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send) -> None:
        body = json.dumps(error_body(f"the request body is larger than {self.limit} bytes",
                                     code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
