"""Chat with a run next to its base model (or another run) in the web app: the same loading, chat template and
streaming as `tunelab chat`, so a reply here is the reply the CLI gives.

Models stay loaded between messages (the two most recent); a LoRA run's base is the same model with its adapter
switched off, so comparing costs no second copy. Generation holds a lock per model: two browser tabs take turns.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from tunelab.infer.chat import stream_reply
from tunelab.infer.generate import GenerationOptions
from tunelab.infer.load import LoadedModel, load_generator

KEEP_LOADED = 2
T = TypeVar("T")


class ChatModels:
    """Loaded models by spec (a run folder or a model name), least recently used dropped first. A run folder whose
    weights changed since it was loaded (retrained with --overwrite, resumed to its end) is loaded afresh.

    `in_model_thread` runs chats (loading included) in one thread of their own. The web server would otherwise
    step a streamed reply from whichever pool thread is free, and every thread that runs torch ops gets its own
    OpenMP team; once there are more such threads than CPUs, libgomp cuts its idle workers' spin-wait to 1000
    iterations and every matmul waits for sleeping ones (see infer/serve/engine.py: 1.7x slower batch-1 decoding
    on 2 cores)."""

    def __init__(self) -> None:
        self._loaded: OrderedDict[tuple[str, tuple], tuple[LoadedModel, threading.Lock]] = OrderedDict()
        self._guard = threading.Lock()
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        threading.Thread(target=self._work, name="tunelab-chat", daemon=True).start()

    def _work(self) -> None:
        while True:
            self._jobs.get()()

    def in_model_thread(self, make: Callable[[], Iterator[T]]) -> Iterator[T]:
        """The items of `make()`, produced in the model thread (one chat at a time); stopping early stops it."""
        out: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        stopped = threading.Event()

        def job() -> None:
            try:
                for item in make():
                    if stopped.is_set():
                        break
                    out.put(("item", item))
                out.put(("end", None))
            except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
                out.put(("error", err))

        self._jobs.put(job)
        try:
            while True:
                kind, value = out.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise value
                yield value
        finally:
            stopped.set()

    def get(self, spec: str) -> tuple[LoadedModel, threading.Lock]:
        key = (spec, _weights_stamp(Path(spec)))
        with self._guard:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
            for stale in [k for k in self._loaded if k[0] == spec]:
                del self._loaded[stale]
        loaded = load_generator(spec)
        with self._guard:
            self._loaded[key] = (loaded, threading.Lock())
            while len(self._loaded) > KEEP_LOADED:
                self._loaded.popitem(last=False)
            return self._loaded[key]


def _weights_stamp(folder: Path) -> tuple:
    """(name, size, mtime) of a folder's weight files: what changes when a run is trained again."""
    if not folder.is_dir():
        return ()
    return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.glob("*.safetensors")))


def side_streams(models: ChatModels, run_dir: Path, against: str | None, messages: list[dict],
                 options: GenerationOptions) -> Iterator[tuple[str, str]]:
    """(side, text piece) of the run's reply, then of `against`'s (`base`: the run's base model; a run folder or
    model name otherwise), one after the other: two generations at once would only slow each other down."""
    loaded, lock = models.get(str(run_dir))
    with lock:
        for piece in stream_reply(loaded, messages, options):
            yield "run", piece
    if not against:
        return
    if against == "base":
        if loaded.run_config is None:
            raise ValueError("'base' compares a run with the model it was trained from; this is not a run")
        if hasattr(loaded.model, "disable_adapter"):  # a PEFT run: its base is the same weights, adapter off
            with lock, loaded.model.disable_adapter():
                for piece in stream_reply(loaded, messages, options):
                    yield "against", piece
            return
        other, other_lock = models.get(loaded.run_config.model)
        # the run's template for its base, so both see the same prompt tokens (as `tunelab eval --baseline` does)
        other = LoadedModel(other.model, other.tokenizer, loaded.renderer, None)
    else:
        other, other_lock = models.get(str(against))
    with other_lock if other_lock is not lock else contextlib.nullcontext():
        for piece in stream_reply(other, messages, options):
            yield "against", piece
