"""What every `tunelab` command shares: the consoles, quiet third-party libraries, and user errors as exit 2."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from tunelab.errors import ConfigError, UserError

console = Console()
errors = Console(stderr=True)


def quiet_libraries() -> None:
    """Keep third-party progress bars and advice out of the user's terminal."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def fail(err: UserError) -> None:
    errors.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def check_port(host: str, port: int) -> None:
    """Refuse a port that cannot be listened on before the work of loading anything (uvicorn would only say so
    after a model loaded and the banner claimed it serves). SO_REUSEADDR as uvicorn binds, so a port that merely
    has closed connections lingering passes."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err}", where="--port") from None


def check_output_file(path: Path, where: str) -> None:
    """Make the folder of an output file now, so a path that cannot be written fails before the work, naming the
    option."""
    _check_writable_parent(path, where)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give a file name", where=where)


def check_output_folder(path: Path, where: str) -> None:
    """check_output_file for an output that is a folder (a merged model): refuse a file in its place, or a place
    that cannot be written, before the work."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is a file; give a folder name", where=where)
    _check_writable_parent(path, where)


def _check_writable_parent(path: Path, where: str) -> None:
    """Make `path`'s folder and write a scratch file there: a parent that is a file, a read-only or virtual file
    system (/proc) fail now, not after the work."""
    blocking = next((above for above in path.parents if above.exists() and not above.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"cannot write {path}: {blocking} is a file, not a folder", where=where)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as err:
        raise ConfigError(f"cannot write {path}: {err.strerror or err}", where=where) from None
