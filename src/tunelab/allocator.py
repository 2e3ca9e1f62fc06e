"""Run the `tunelab` command under tcmalloc where the system has it.

PyTorch's CPU tensors come from the C library's malloc. glibc's heap keeps freed blocks of the varying tensor
sizes of padding-free batches and does not return them: on the main job (default model, LoRA, 68 steps) the
process's resident memory climbed from ~2.4 GB at the first steps to 3.3 GB by the last and peaked at 3.5 GB.
Under tcmalloc the same run peaked at 2.87 GB (the estimate printed before training said 2.84) and trained 4%
faster (106 s against 110; 24-step runs 613-642 against 580-597 input tokens/s); jemalloc held as little but
ran 9% slower (AMD EPYC, 2 cores, 2026-12-05). The allocator has to be in place before the process starts
(LD_PRELOAD), so the command starts itself once more with it; `TUNELAB_ALLOCATOR=system` keeps the C library's.
Machines with an NVIDIA driver keep it too: untested there. Library users can preload it themselves:
`LD_PRELOAD=libtcmalloc_minimal.so.4 python ...`.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

SETTING = "TUNELAB_ALLOCATOR"
"""`auto` (the default: tcmalloc where found) or `system`."""
_CHECKED = "TUNELAB_ALLOCATOR_CHECKED"
"""Set for the restarted process (and its children), so the decision is made once."""
LIBRARIES = ("tcmalloc_minimal", "tcmalloc")
"""Debian's libtcmalloc-minimal4 (scripts/setup.sh installs it where it can), or the full gperftools library."""
QUIET_LARGE_ALLOCATIONS = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(2**62)}
"""tcmalloc reports every allocation over 1 GB on stderr by default; a large model's weights are that."""


def _find_library() -> str | None:
    for name in LIBRARIES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def preload_environment(environ: Mapping[str, str], find: Callable[[], str | None] = _find_library,
                        nvidia: bool | None = None) -> dict[str, str] | None:
    """The environment to restart the command in, or None to go on as it is."""
    if environ.get(_CHECKED) or environ.get(SETTING, "auto") == "system" or not sys.platform.startswith("linux"):
        return None
    if nvidia if nvidia is not None else Path("/dev/nvidiactl").exists():
        return None
    library = find()
    if library is None or library in environ.get("LD_PRELOAD", ""):
        return None
    preload = " ".join(part for part in (library, environ.get("LD_PRELOAD", "")) if part)
    return {**QUIET_LARGE_ALLOCATIONS, **environ, "LD_PRELOAD": preload, _CHECKED: "1"}


def restart_under_tcmalloc() -> None:
    """Replace this process by the same command under tcmalloc, when preload_environment says so; returns only
    when it does not (or when the restart fails, leaving the command as it was)."""
    environment = preload_environment(os.environ)
    if environment is None:
        return
    try:  # the command line as it was given (the console script, or -m tunelab), so sys.path is as it was
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)
    except OSError:
        os.environ[_CHECKED] = "1"


def allocator_in_use() -> str:
    """`tcmalloc`, `jemalloc` or `system`: the malloc this process's tensors come from (for summary.json)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in maps:
            return name
    return "system"
