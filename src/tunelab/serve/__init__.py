"""`tunelab serve`: an OpenAI-compatible API (app.py) over a continuously batching engine (engine.py)."""

from __future__ import annotations

from pathlib import Path

from tunelab.serve.app import Served, create_app
from tunelab.serve.engine import Engine

__all__ = ["Served", "create_app", "load_served"]


def load_served(spec: str, *, max_batch: int = 8, max_waiting: int = 64, device: str | None = None) -> Served:
    """A run directory or model spec loaded for serving, named as clients must name it in `model`: the run
    folder's name, or the spec as given."""
    from tunelab.infer.load import is_run_dir, load_generator

    loaded = load_generator(spec, device)
    path = Path(spec)
    name = path.resolve().name if path.is_dir() and is_run_dir(path) else str(spec)
    base = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else loaded.model
    context = int(getattr(base.config, "max_position_embeddings", 2048))
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=max_batch, max_waiting=max_waiting)
    return Served(name, engine, loaded.renderer, context)
