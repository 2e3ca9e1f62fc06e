"""The commands that listen on a port: `tunelab serve` (an OpenAI-compatible API) and `tunelab ui` (the web app)."""

from __future__ import annotations

import threading
from pathlib import Path

import typer

from tunelab.cli_common import check_port, console, fail, quiet_libraries
from tunelab.errors import ConfigError, UserError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
COMPILE_HELP = ("Compile the single-stream decoding step (bf16 on CPU, llama-family models): ~20% faster while "
                "one request decodes; compiling takes ~20 s at start (~1 min the first time on a machine).")
COMPILING = "compiling the decoding step (~20 s; ~1 min the first time on this machine) ..."
NOT_COMPILED = "[yellow]note:[/] --compile: decoding eagerly: {}"
LOOKUP_HELP = ("Draft each reply's next tokens from its prompt and earlier replies and check them in the same pass "
               "(the same reply in fewer passes; alone and in serve's batches of up to 8); --no-lookup decodes one "
               "token a pass.")


def serve(
    model: str = typer.Argument(..., help="A run directory, preset, hub id, folder or .gguf file."),
    adapter: list[str] = typer.Option(None, "--adapter", help="NAME=RUN: also serve this LoRA run (trained on the "
                                      "same base) as model NAME, in the same batches (repeatable)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000, min=0, max=65535),
    api_key: str | None = typer.Option(None, envvar="TUNELAB_API_KEY", help="Required as 'Authorization: Bearer "
                                       "KEY' on every route but /health (also read from TUNELAB_API_KEY)."),
    max_batch: int = typer.Option(8, min=1, help="Requests decoded together."),
    max_waiting: int = typer.Option(64, min=1, help="Requests queued beyond the batch; more get 503."),
    precision: str = typer.Option("auto", help="auto (what the runs trained in, as `tunelab generate` decodes; "
                                  "fp32 if any of them did), bf16 or fp32."),
    compile_steps: bool = typer.Option(False, "--compile", help=COMPILE_HELP),
    lookup: bool = typer.Option(True, "--lookup/--no-lookup", help=LOOKUP_HELP),
) -> None:
    """Serve MODEL over an OpenAI-compatible API: /v1/chat/completions, /v1/completions (streamed or not),
    /v1/models, /health. Prompts use the run's chat template, as training and `generate` do."""
    quiet_libraries()
    import uvicorn

    from tunelab.infer.serve import create_app, load_served

    try:
        check_port(host, port)
        adapters = {}
        for option in adapter or []:
            name, sep, run = option.partition("=")
            if not sep or not name or not run:
                raise ConfigError(f"'{option}' is not NAME=RUN", where="--adapter")
            adapters[name] = run
        if precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"'{precision}' is not one of auto, bf16, fp32", where="--precision")
        if compile_steps:
            console.print(COMPILING)
        served = load_served(model, adapters=adapters, max_batch=max_batch, max_waiting=max_waiting,
                             precision=precision, start_engine=False, compile_steps=compile_steps, lookup=lookup)
    except UserError as err:
        fail(err)
    if host not in LOOPBACK and not api_key:
        console.print(f"[yellow]warning:[/] listening on {host} without --api-key: anyone who can reach this "
                      "port can use the model")
    if compile_steps and not served.engine.compiled:
        console.print(NOT_COMPILED.format(served.engine.eager_reason))
    names = ", ".join(f"'{name}'" for name in served.models)
    console.print(f"serving {names} on http://{host}:{port}/v1 (context {served.context} tokens, "
                  f"{served.precision})")
    server = uvicorn.Server(uvicorn.Config(create_app(served, api_key=api_key), host=host, port=port,
                                           log_level="warning"))
    failed: list[BaseException] = []

    def listen() -> None:
        try:
            server.run()
        except BaseException as err:  # noqa: BLE001 - uvicorn exits (SystemExit) when it cannot bind the port
            failed.append(err)
        finally:
            served.engine.close()

    web = threading.Thread(target=listen, name="tunelab-http", daemon=True)
    web.start()
    try:
        served.engine.run_here()  # the model decodes in the thread that loaded it (see Engine: OpenMP's workers)
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        served.engine.close()
        web.join(timeout=10)
    if failed:
        raise typer.Exit(1)


def ui(
    runs: Path = typer.Option(Path("runs"), "--runs", help="The runs folder to show (runs started here land in it)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (127.0.0.1: this machine only)."),
    port: int = typer.Option(7860, min=0, max=65535),
    api_key: str | None = typer.Option(None, envvar="TUNELAB_API_KEY", help="Required by the API as 'Authorization: "
                                       "Bearer KEY' (the page asks for it once); needed to listen beyond loopback."),
) -> None:
    """A local web app over RUNS: every run with live curves, start/stop/resume, compare, chat."""
    quiet_libraries()
    import uvicorn

    from tunelab.ui.app import create_app

    if host not in LOOPBACK and not api_key:
        fail(ConfigError(f"listening on {host} lets anyone who reaches this port start trainings on this machine; "
                         "give --api-key (or TUNELAB_API_KEY), or keep the default 127.0.0.1", where="--host"))
    try:
        if runs.exists() and not runs.is_dir():
            raise ConfigError(f"{runs} is a file, not a runs folder", where="--runs")
        check_port(host, port)
        runs.mkdir(parents=True, exist_ok=True)
    except UserError as err:
        fail(err)
    console.print(f"tunelab ui over {runs.resolve()} on http://{host}:{port}/")
    uvicorn.run(create_app(runs, api_key=api_key), host=host, port=port, log_level="warning")
