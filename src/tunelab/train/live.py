"""RUN/status.json: whether a run is training now, in which process, and how it ended, so that anything watching
the runs folder (the web app, a script) tells a live run from a finished, failed or killed one without asking it.

Written by the main process when training starts (`running`, its pid and host) and when it ends (the final status,
and for a failure the error's message). A run whose file says `running` but whose process is gone was killed
(SIGKILL, out of memory, a crashed machine): readers report it as `died`.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from tunelab.textio import replace_text

STATUS_FILE = "status.json"


def mark_running(run_dir: Path) -> None:
    _write(run_dir, {"status": "running", "pid": os.getpid(), "host": socket.gethostname(),
                     "started_at": time.time()})


def mark_ended(run_dir: Path, status: str, error: str | None = None) -> None:
    record = read_status(run_dir) or {}
    record.update(status=status, ended_at=time.time())
    if error:
        record["error"] = error
    _write(run_dir, record)


def read_status(run_dir: Path) -> dict | None:
    try:
        record = json.loads((Path(run_dir) / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def live_status(run_dir: Path) -> dict | None:
    """The status record with `running` turned into `died` when its process is gone (on this host)."""
    record = read_status(run_dir)
    if record and record.get("status") == "running" and record.get("host") == socket.gethostname() \
            and not recorded_process_alive(record):
        record = {**record, "status": "died", "error": record.get("error") or
                  "the training process ended without saying how (killed, out of memory?); --resume continues "
                  "from the newest checkpoint"}
    return record


def training_process(run_dir: Path) -> int | None:
    """The pid of another process on this host that is training `run_dir` now, else None: its status.json says
    `running`, and that process is alive and no younger than the run (a pid the system reused since is not it).
    A run written from another host cannot be checked from here and gives None."""
    record = read_status(run_dir)
    if not record or record.get("status") != "running" or record.get("host") != socket.gethostname():
        return None
    pid = recorded_pid(record)
    return pid if pid != os.getpid() and recorded_process_alive(record) else None


def recorded_pid(record: dict) -> int:
    """The pid a status or launch record names; 0 where it names none a process could have."""
    try:
        return max(0, int(record.get("pid", 0)))
    except (TypeError, ValueError):
        return 0


def recorded_process_alive(record: dict) -> bool:
    """Whether the process a record names (`pid`, and `started_at`, when it was written) is still running: alive,
    and no younger than the record (a pid the system handed out again since is another process)."""
    pid = recorded_pid(record)
    if not process_alive(pid):
        return False
    started = process_start_time(pid)
    try:
        written = float(record.get("started_at", 0))
    except (TypeError, ValueError):
        written = 0.0
    return started is None or started <= written + 2  # btime has a resolution of 1 s


def process_start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch, to ~1 s), from /proc; None where it cannot be read."""
    try:
        after_name = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks
    except (OSError, IndexError, StopIteration, ValueError):
        return None


def process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (ended, not yet reaped by its parent) is gone for our purposes
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def _write(run_dir: Path, record: dict) -> None:
    """Replace the file atomically: a reader never sees half a record."""
    replace_text(Path(run_dir) / STATUS_FILE, json.dumps(record))
