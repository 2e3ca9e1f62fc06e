"""`tunelab train --nproc N`: run the same command in N processes on this machine, the way torchrun would, but
with tunelab's exit codes and signals: Ctrl-C or SIGTERM reaches every process once (they stop together at a
step boundary and the main one saves), a failing process takes the others down, and the exit code is that of
the first process to fail (2 for bad input, 143 after SIGTERM), not a launcher traceback.
For several machines, use torchrun or `accelerate launch` with their own rendezvous instead."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

FORWARDED = (signal.SIGINT, signal.SIGTERM)
STOPPED = (128 + signal.SIGINT, 128 + signal.SIGTERM)
"""Exit codes of a process that stopped on request: the others are stopping too (and the main one is saving)."""
FAILURE_GRACE_SECONDS = 10.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_local(nproc: int, arguments: list[str]) -> int:
    """Run `python -m tunelab.cli ARGUMENTS` as ranks 0..nproc-1 and return the exit code for the whole run."""
    port = str(free_port())
    threads = str(max(1, (os.cpu_count() or 1) // nproc))
    workers = []
    for rank in range(nproc):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(nproc),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(nproc)}
        env.setdefault("OMP_NUM_THREADS", threads)  # the cores are shared, not oversubscribed
        # Their own session: a terminal's Ctrl-C reaches only this launcher, which passes it on exactly once.
        workers.append(subprocess.Popen([sys.executable, "-m", "tunelab.cli", *arguments], env=env,
                                        start_new_session=True))

    def forward(signum, frame) -> None:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED}
    try:
        failed_at = None
        while True:
            codes = [worker.poll() for worker in workers]
            if all(code is not None for code in codes):
                return next((code for code in codes if code), 0)
            failures = [code for code in codes if code not in (None, 0, *STOPPED)]
            if failures:  # the others may wait for the failed one in a collective forever: end them
                failed_at = failed_at or time.monotonic()
                if time.monotonic() - failed_at > FAILURE_GRACE_SECONDS:
                    for worker in workers:
                        if worker.poll() is None:
                            worker.kill()
                    return failures[0]
            time.sleep(0.2)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
