"""`tunelab train --nproc N`: run the same command in N processes on this machine, the way torchrun would, but
with tunelab's exit codes and signals: Ctrl-C or SIGTERM reaches every process once (they stop together at a
step boundary and the main one saves), a failing process takes the others down, and the exit code is that of
the first process to fail (2 for bad input, 143 after SIGTERM), not a launcher traceback. Only the main process
talks to the terminal: the others' output would repeat its own (a config error once per process, --json twice),
so their error output is held back and shown only for a failure of their own, not when the main process ended on
bad input or a stop request (they then only fail after it, in a collective whose peer is gone).
For several machines, use torchrun or `accelerate launch` with their own rendezvous instead; under those, each
process other than the main one silences its own standard output when it joins the group (quiet_standard_output),
so the terminal sees progress once there too, while every process's errors still show."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import IO

FORWARDED = (signal.SIGINT, signal.SIGTERM)
STOPPED = (128 + signal.SIGINT, 128 + signal.SIGTERM)
"""Exit codes of a process that stopped on request: the others are stopping too (and the main one is saving)."""
FAILURE_GRACE_SECONDS = 10.0
HELD_OUTPUT_SHOWN = 20_000
"""Bytes of a failed non-main process's error output shown (the end, where its traceback is)."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def quiet_standard_output() -> None:
    """Send this process's standard output (file descriptor 1: Python's prints, rich consoles, C extensions, child
    processes) nowhere, as launch_local does for every process but the main one; standard error, where errors go,
    stays. For a process that is not the main one under an external launcher (torchrun, `accelerate launch`),
    which gives every process the terminal: its progress, the dry run's plan and --json would repeat the main
    one's."""
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # a stdout without a descriptor (captured, replaced): its object
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process
    finally:
        os.close(devnull)


def launch_local(nproc: int, arguments: list[str]) -> int:
    """Run `python -m tunelab.cli ARGUMENTS` as ranks 0..nproc-1 and return the exit code for the whole run."""
    with contextlib.ExitStack() as files:
        held = [None] + [files.enter_context(tempfile.TemporaryFile()) for _ in range(1, nproc)]
        return _run_ranks(nproc, arguments, held)


def _run_ranks(nproc: int, arguments: list[str], held: list[IO[bytes] | None]) -> int:
    """launch_local with `held[rank]` receiving the error output of each rank but the main one."""
    port = str(free_port())
    threads = str(max(1, (os.cpu_count() or 1) // nproc))
    workers = []
    for rank in range(nproc):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(nproc),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(nproc)}
        env.setdefault("OMP_NUM_THREADS", threads)  # the cores are shared, not oversubscribed
        # Their own session: a terminal's Ctrl-C reaches only this launcher, which passes it on exactly once.
        workers.append(subprocess.Popen([sys.executable, "-m", "tunelab.cli", *arguments], env=env,
                                        start_new_session=True, stdout=subprocess.DEVNULL if rank else None,
                                        stderr=held[rank]))

    def forward(signum, frame) -> None:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED}
    try:
        code = _wait_for_ranks(workers)
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
        _show_other_failures(workers, held)
        return code
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for worker in workers:
            if worker.poll() is None:
                worker.kill()


def _wait_for_ranks(workers: list[subprocess.Popen]) -> int:
    """The run's exit code: that of the first process in rank order to fail, else 0."""
    failed_at = None
    while True:
        codes = [worker.poll() for worker in workers]
        if all(code is not None for code in codes):
            return next((code for code in codes if code), 0)
        failures = [code for code in codes if code not in (None, 0, *STOPPED)]
        if failures:  # the others may wait for the failed one in a collective forever: end them
            failed_at = failed_at or time.monotonic()
            if time.monotonic() - failed_at > FAILURE_GRACE_SECONDS:
                return failures[0]
        time.sleep(0.2)


def _show_other_failures(workers: list[subprocess.Popen], held: list[IO[bytes] | None]) -> None:
    """The error output of each non-main process that failed by itself (not killed here), unless the main process
    ended on a user error (exit 2) or a stop request: then the others only failed after it, in a collective whose
    peer was gone, or repeat its message."""
    if workers[0].wait() in (2, *STOPPED):
        return
    for rank, worker in enumerate(workers[1:], start=1):
        code = worker.wait()
        if code > 0 and code not in STOPPED:
            held[rank].seek(0)
            text = held[rank].read()[-HELD_OUTPUT_SHOWN:].decode("utf-8", errors="replace")
            sys.stderr.write(f"process {rank} failed (exit {code}):\n{text}")
            sys.stderr.flush()
