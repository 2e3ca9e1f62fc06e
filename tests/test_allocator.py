"""The `tunelab` command restarts itself under tcmalloc where the system has it (tunelab/allocator.py), once, unless
told not to; summary.json says which malloc a run had (the CLI's own run: tests/test_checkpoint.py)."""

from __future__ import annotations

import subprocess
import sys

from tunelab.allocator import allocator_in_use, preload_environment


def found() -> str:
    return "libtcmalloc_minimal.so.4"


def test_the_command_restarts_under_tcmalloc_once_and_only_where_it_may():
    env = preload_environment({"PATH": "/bin", "LD_PRELOAD": "libother.so"}, found, nvidia=False)
    assert env is not None and env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4 libother.so" and env["PATH"] == "/bin"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) > 2**40  # no stderr line per big tensor
    assert preload_environment(env, found, nvidia=False) is None  # the restarted process goes on
    assert preload_environment({"TUNELAB_ALLOCATOR": "system"}, found, nvidia=False) is None
    assert preload_environment({"LD_PRELOAD": "libtcmalloc_minimal.so.4"}, found, nvidia=False) is None
    assert preload_environment({}, lambda: None, nvidia=False) is None  # not installed
    assert preload_environment({}, found, nvidia=True) is None  # untested beside an NVIDIA driver
    user = preload_environment({"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "5"}, found, nvidia=False)
    assert user is not None and user["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == "5"  # the user's setting wins


def test_a_preloaded_process_reports_tcmalloc(tmp_path):
    env = preload_environment({"PATH": "/usr/bin:/bin"}, nvidia=False)
    if env is None:  # no tcmalloc on this machine: what a process reports is the system's malloc
        assert allocator_in_use() == "system"
        return
    child = subprocess.run([sys.executable, "-c", "from tunelab.allocator import allocator_in_use as a; print(a())"],
                           env=env, capture_output=True, text=True, check=True)
    assert child.stdout.strip() == "tcmalloc"
