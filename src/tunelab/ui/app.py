"""`tunelab ui`: a local web app over a runs folder. FastAPI serves a page of its own (no CDN, works offline) and
the small JSON API the page is built on, which scripts can call too; live updates are server-sent events.

Everything the app shows is read from the run directories (ui/runs.py), so the CLI's runs appear, and a refresh
or a restart of the app loses nothing; trainings it starts are separate processes (ui/launcher.py).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Iterator
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, field_validator

from tunelab.infer.generate import GenerationOptions
from tunelab.infer.serve.protocol import Message
from tunelab.ui import runs as run_files
from tunelab.ui.chat import ChatModels
from tunelab.ui.compare import compare_runs
from tunelab.ui.launcher import (
    Launcher,
    LaunchError,
    check_run_name,
    launch_loading,
    launch_record,
    launch_state,
    launches,
    log_path,
)

POLL_SECONDS = 0.5
STATIC = {"app.js": "text/javascript", "app.css": "text/css"}


class StartRequest(BaseModel):
    name: str
    config_yaml: str
    overwrite: bool = False


class CheckRequest(BaseModel):
    config_yaml: str


class ChatRequest(BaseModel):
    """Checked here, so a conversation the chat template cannot render is a 422 naming the field, not an error
    event from inside the model thread. A message is `tunelab serve`'s (OpenAI's shape), so the two cannot drift."""

    messages: list[Message] = Field(min_length=1)
    against: str | None = "base"
    """`base` (the run's base model), another run's name, or null for the run alone."""
    max_new_tokens: int = Field(128, ge=1, le=1024)
    temperature: float = Field(0.0, ge=0.0, le=5.0, allow_inf_nan=False)

    @field_validator("messages")
    @classmethod
    def _ends_with_the_user(cls, messages: list[Message]) -> list[Message]:
        if messages[-1].role != "user":
            raise ValueError("the last message is the user's (the model replies to it)")
        return messages


def create_app(root: Path, *, api_key: str | None = None) -> FastAPI:
    root = Path(root)
    app = FastAPI(title="tunelab ui", docs_url=None, redoc_url=None, openapi_url=None)
    launcher = Launcher(root)
    chat_models = ChatModels()

    @app.middleware("http")
    async def _authorise(request: Request, call_next):
        if api_key and request.url.path.startswith("/api/"):
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip() \
                or request.query_params.get("token", "")
            if not secrets.compare_digest(given.encode(), api_key.encode()):
                return JSONResponse({"error": "this app needs its API key (Authorization: Bearer KEY, or ?token=KEY)"},
                                    status_code=401)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        """One readable line per bad field (`messages.1.role: ...`), in the `error` key the page shows."""
        problems = [f"{'.'.join(str(part) for part in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in err.errors()]
        return JSONResponse({"error": "; ".join(problems)}, status_code=422)

    @app.exception_handler(LaunchError)
    async def _refused(_: Request, err: LaunchError) -> JSONResponse:
        return JSONResponse({"error": str(err)}, status_code=err.status)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return _static_text("index.html")

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in STATIC:
            return JSONResponse({"error": "not found"}, status_code=404)
        return Response(_static_text(name), media_type=STATIC[name])

    @app.get("/api/runs")
    def runs() -> list[dict]:
        return all_runs(root)

    @app.get("/api/runs/{name}")
    def run(name: str) -> dict:
        folder = _run_folder(root, name)
        if folder is None:
            return _pending(root, name)
        return {**run_files.run_detail(folder, root), **_launched(root, name)}

    @app.get("/api/runs/{name}/metrics")
    def metrics(name: str, after: int = Query(0, ge=0)) -> dict:
        folder = _known_run(root, name)
        records, lines = run_files.read_metrics(folder, after) if folder else ([], 0)
        return {"records": records, "lines": lines}

    @app.get("/api/runs/{name}/log")
    def log(name: str, lines: int = Query(200, ge=1, le=100_000)) -> dict:
        _known_run(root, name)
        return {"text": _log_text(root, name, lines)}

    @app.get("/api/runs/{name}/report")
    def report(name: str) -> Response:
        folder = _run_folder(root, name)
        if folder is None or not (folder / "report.html").is_file():
            return JSONResponse({"error": f"run '{name}' has no report yet (written when training ends)"},
                                status_code=404)
        return FileResponse(folder / "report.html", media_type="text/html")

    @app.get("/api/runs/{name}/events")
    async def run_events(name: str, request: Request) -> StreamingResponse:
        check_run_name(name)
        return StreamingResponse(_run_stream(root, name, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/api/events")
    async def table_events(request: Request) -> StreamingResponse:
        return StreamingResponse(_table_stream(root, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.get("/api/schema")
    def schema() -> dict:
        from tunelab.config import RunConfig

        return RunConfig.model_json_schema()

    @app.post("/api/check")
    def check(body: CheckRequest) -> dict:
        from tunelab.ui.checks import check_config

        return check_config(body.config_yaml, root)

    @app.post("/api/runs")
    def start(body: StartRequest) -> dict:
        return launcher.start(body.name, body.config_yaml, overwrite=body.overwrite)

    @app.post("/api/runs/{name}/stop")
    def stop(name: str) -> dict:
        return launcher.stop(name)

    @app.post("/api/runs/{name}/resume")
    def resume(name: str) -> dict:
        return launcher.resume(name)

    @app.get("/api/compare")
    def compare(runs: list[str] = Query([])) -> dict:
        """`?runs=A&runs=B`, so a folder name may hold a comma (`lr=1e-3,r=8`); a single value that names no run is
        an older link's `?runs=A,B` (one run alone is no comparison)."""
        older_link = len(runs) == 1 and not _names_a_run(root, runs[0])
        names = [n for n in (runs[0].split(",") if older_link else runs) if n]
        folders = [_run_folder(root, n) for n in names]
        missing = [n for n, f in zip(names, folders, strict=True) if f is None]
        if missing or len(names) < 2:
            unknown = f" (not found: {', '.join(missing)})" if missing else ""
            return JSONResponse({"error": f"compare needs two or more runs{unknown}"}, status_code=400)
        return compare_runs(folders, names)

    @app.get("/api/runs/{name}/samples")
    def samples(name: str) -> list[dict]:
        """The held-out gallery: prompt, reference, the base model's and the fine-tuned model's replies."""
        folder = _known_run(root, name)
        return run_files.read_samples(folder) if folder else []

    @app.post("/api/runs/{name}/chat")
    def chat(name: str, body: ChatRequest) -> StreamingResponse:
        """The run's reply, then the comparison model's, streamed as server-sent events (`token` {side, text},
        then `done`); `error` {message} when a model cannot be loaded."""
        folder = _trained_run(root, name, "")
        against = body.against
        if against not in (None, "base"):
            against = str(_trained_run(root, against, " to compare with"))
        options = GenerationOptions(max_new_tokens=body.max_new_tokens, temperature=body.temperature,
                                    do_sample=body.temperature > 0)
        messages = [{"role": message.role, "content": message.text} for message in body.messages]
        return StreamingResponse(_chat_stream(chat_models, folder, against, messages, options),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    app.state.launcher = launcher
    return app


def _chat_stream(models, folder: Path, against: str | None, messages: list[dict], options) -> Iterator[str]:
    from tunelab.ui.chat import side_streams

    replies = {"run": "", "against": ""}
    try:
        for side, piece in models.in_model_thread(lambda: side_streams(models, folder, against, messages, options)):
            replies[side] += piece
            yield _event("token", {"side": side, "text": piece})
    except Exception as err:  # noqa: BLE001 - the page shows why, the app stays up
        yield _event("error", {"message": f"{type(err).__name__}: {err}"})
        return
    yield _event("done", replies)


def all_runs(root: Path) -> list[dict]:
    """The runs table: run directories, plus trainings the app started whose directory does not exist yet."""
    rows = run_files.list_runs(root)
    for row in rows:
        row.update(_launched(root, row["name"]))
    known = {row["name"] for row in rows}
    # a launch whose folder is not a run but has a status.json (its config.yaml deleted) is neither: left out.
    # Each state is read once: the training may write its status.json between two reads.
    states = {r["name"]: launch_state(root, r["name"]) for r in launches(root) if r.get("name") not in known}
    return [_pending_row(root, check_run_name(name), state) for name, state in states.items() if state] + rows


def _launched(root: Path, name: str) -> dict:
    """Whether the app started this run; a training it started over the run's old files (a resume, an overwrite)
    shows as `starting` until it takes the run over, not as how the old one ended."""
    overlay: dict = {"launched_by_app": launch_record(root, name) is not None}
    if launch_loading(root, name):
        overlay["status"] = "starting"
    return overlay


def _pending(root: Path, name: str) -> dict:
    """The row of a launched training without a run directory; LaunchError (404) when there is none."""
    check_run_name(name)
    state = launch_state(root, name)
    if state is None:
        raise LaunchError(f"no run '{name}'", status=404)
    return _pending_row(root, name, state)


def _pending_row(root: Path, name: str, state: str) -> dict:
    """A launched training without a run directory: starting, or failed before it made one (the log says why)."""
    error = _log_text(root, name, 12) if state == "failed" else None
    record = launch_record(root, name) or {}
    return {"name": name, "status": state, "error": error, "started": record.get("started_at"),
            "launched_by_app": True, "steps": None, "config_yaml": ""}


def _run_folder(root: Path, name: str) -> Path | None:
    check_run_name(name)
    folder = run_files.run_folder_of(root, name)
    return folder if run_files.is_run_dir(folder) else None


def _names_a_run(root: Path, name: str) -> bool:
    """Whether `name` is a run's folder, so a comma in it is part of the name."""
    try:
        return _run_folder(root, name) is not None
    except LaunchError:  # not even a folder name (`.a,b`): an older link's list
        return False


def _trained_run(root: Path, name: str, role: str) -> Path:
    """The folder of a run whose training ended (summary.json written next to its model); a 404 before the chat's
    stream starts otherwise, rather than an error event from the model thread halfway through it."""
    folder = _run_folder(root, name)
    if folder is None:
        raise LaunchError(f"no run '{name}'{role}", status=404)
    if not (folder / "summary.json").is_file():
        raise LaunchError(f"run '{name}' has no trained model yet{role} (it is saved when training ends)", status=404)
    return folder


def _known_run(root: Path, name: str) -> Path | None:
    """The run's folder; None for a training the app launched that has none yet; 404 for a name it knows nothing
    of."""
    folder = _run_folder(root, name)
    if folder is None and launch_record(root, name) is None:
        raise LaunchError(f"no run '{name}'", status=404)
    return folder


def _log_text(root: Path, name: str, lines: int) -> str:
    """The console log of a run the app started (it includes failures before the run directory existed), else
    the run's own train.log."""
    check_run_name(name)
    path = log_path(root, name)
    if not path.is_file():
        path = run_files.run_folder_of(root, name) / run_files.LOG_FILE
    if not path.is_file():
        return ""
    text = path.read_bytes()[-256 * 1024:].decode("utf-8", errors="replace").replace("\r", "\n")
    return "\n".join(line for line in text.splitlines()[-lines:])


def _event(kind: str, data) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


async def _run_stream(root: Path, name: str, request: Request) -> AsyncIterator[str]:
    """One run's live feed: new metrics records, its row when it changes (status, steps), the log when it grows."""
    lines, last_row, last_log = 0, None, None
    while not await request.is_disconnected():
        folder = _run_folder(root, name)
        if folder is not None:
            records, lines_now = run_files.read_metrics(folder, lines)
            reset = lines_now < lines  # a resumed run rewrote the log from its checkpoint's step
            if reset:
                records, lines_now = run_files.read_metrics(folder, 0)
            if records or reset:
                yield _event("metrics", {"records": records, "lines": lines_now, "reset": reset})
            lines = lines_now
            row = {**run_files.run_summary(folder, root), **_launched(root, name)}
        else:
            try:
                row = _pending(root, name)
            except LaunchError:
                row = {"name": name, "status": "missing"}
        if row != last_row:
            yield _event("run", row)
            last_row = row
        log = _log_text(root, name, 200)
        if log != last_log:
            yield _event("log", {"text": log})
            last_log = log
        yield ": keep-alive\n\n"
        await asyncio.sleep(POLL_SECONDS)


async def _table_stream(root: Path, request: Request) -> AsyncIterator[str]:
    last = None
    while not await request.is_disconnected():
        rows = await asyncio.to_thread(all_runs, root)
        if rows != last:
            yield _event("runs", rows)
            last = rows
        yield ": keep-alive\n\n"
        await asyncio.sleep(POLL_SECONDS * 2)


def _static_text(name: str) -> str:
    return (resources.files("tunelab.ui") / "static" / name).read_text(encoding="utf-8")
