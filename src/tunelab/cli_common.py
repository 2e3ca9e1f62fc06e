"""What every `tunelab` command shares: the consoles, quiet third-party libraries, and user errors as exit 2."""

from __future__ import annotations

import os

import typer
from rich.console import Console
from rich.markup import escape

from tunelab.errors import UserError

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
