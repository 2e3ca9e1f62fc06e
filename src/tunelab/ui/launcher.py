"""Start, stop and resume trainings from the web app: each is `tunelab train` in its own process and session,
so closing the browser or stopping the app leaves it training, and stopping it is what the CLI does (SIGTERM:
finish the step, save a checkpoint, exit 143).

What the app launched is remembered in ROOT/.tunelab-ui/ (the config it was given, the console log, the pid), so
a run that fails before its run directory exists (a bad config, a missing data file) still shows why.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tunelab.errors import UserError
from tunelab.train.checkpoint import incomplete_checkpoints, latest_checkpoint
from tunelab.train.live import read_status, recorded_pid, recorded_process_alive, training_process
from tunelab.ui.runs import is_run_dir, root_run_name, run_folder_of

UI_DIR = ".tunelab-ui"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class LaunchError(UserError):
    """A start, stop or resume the app refuses, with the reason (shown as is)."""

    def __init__(self, message: str, status: int = 400, where: str | None = None) -> None:
        super().__init__(message, where=where)
        self.status = status


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name or ""):
        raise LaunchError("a run name is letters, digits, '.', '_' and '-' (at most 100), starting with a letter or "
                          "digit", where="name")
    return name


def check_run_name(name: str) -> str:
    """The name of a run that may already exist: any folder name directly in the runs folder (a CLI run may be
    `my run` or `_scratch`; the folder itself goes by `root_run_name`); never a path out of it. New runs get
    `check_name`'s."""
    if not name or name.startswith(".") or any(c in name for c in "/\\\0") or len(name.encode()) > 255:
        raise LaunchError("a run's name is the name of its folder in the runs folder (no '/', not starting with "
                          "'.')", where="name")
    return name


def require_config(config_yaml: str) -> str:
    """The config text as given, refused when it holds nothing (blank, only comments): `tunelab train` would read it
    as "every default" and a box submitted empty by mistake would start a training nobody asked for. The form
    writes a config for the defaults (method and objective named), and `{}` asks for them in so many words."""
    try:
        tree = yaml.safe_load(config_yaml) if config_yaml.strip() else None  # a tab alone is not even YAML
    except yaml.YAMLError:
        return config_yaml  # load_config names the line that breaks it
    if tree is None:
        raise LaunchError("the config is empty: write one, load a file, or fill in the form (it writes one); "
                          "`{}` trains every default", where="config_yaml")
    return config_yaml


def in_config_box(message: str, config_file: Path) -> str:
    """`message` with the file the app wrote the config box to (`.tunelab-ui/configs/NAME.yaml:3`, a scratch file
    for Check), which the user never saw, named as what they typed into: `the config box, line 3`."""
    return re.sub(re.escape(str(config_file)) + r"(?::(\d+))?",
                  lambda found: f"the config box, line {found[1]}" if found[1] else "the config box", message)


def ui_dir(root: Path) -> Path:
    return root / UI_DIR


def log_path(root: Path, name: str) -> Path:
    return ui_dir(root) / "logs" / f"{name}.log"


def launch_record(root: Path, name: str) -> dict | None:
    try:
        record = json.loads((ui_dir(root) / "launches" / f"{name}.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def launches(root: Path) -> list[dict]:
    folder = ui_dir(root) / "launches"
    return [r for r in (launch_record(root, p.stem) for p in sorted(folder.glob("*.json"))) if r] \
        if folder.is_dir() else []


def launch_state(root: Path, name: str) -> str | None:
    """`starting` while a launched process runs without a run directory yet, `failed` when it ended so, else
    None (the run directory speaks for itself)."""
    record = launch_record(root, name)
    if record is None or (run_folder_of(root, name) / "status.json").is_file():
        return None
    return "starting" if recorded_process_alive(record) else "failed"


def launch_loading(root: Path, name: str) -> bool:
    """Whether a training the app launched for this run still runs and has not taken the run over yet: it loads
    the model while the run's status.json is still the previous one's (a resume, a start over an old run). One
    that wrote how the run ended is only exiting."""
    record = launch_record(root, name)
    if record is None or not recorded_process_alive(record):
        return False
    return recorded_pid(read_status(run_folder_of(root, name)) or {}) != recorded_pid(record)


class Launcher:
    """Starts `tunelab train` processes for one runs folder and reaps them when they end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.children: dict[str, subprocess.Popen] = {}

    def start(self, name: str, config_yaml: str, *, overwrite: bool = False) -> dict[str, Any]:
        """Validate `config_yaml` (output_dir becomes ROOT/NAME) and start training it."""
        from tunelab.config import load_config

        check_name(name)
        require_config(config_yaml)
        self.reap()
        run_dir = self.root / name
        if is_run_dir(self.root) and name == root_run_name(self.root):
            raise LaunchError(f"'{name}' is the run the runs folder itself holds; choose another name", status=409,
                              where="name")
        if self._busy(name):
            raise LaunchError(f"run '{name}' is training now; stop it first", status=409, where="name")
        if run_dir.exists() and not run_dir.is_dir():
            raise LaunchError(f"'{name}' is a file in the runs folder; choose another name", status=409, where="name")
        if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
            raise LaunchError(f"run '{name}' exists; choose another name, resume it, or replace it (overwrite)",
                              status=409, where="name")
        config_file = ui_dir(self.root) / "configs" / f"{name}.yaml"
        config_file.parent.mkdir(parents=True, exist_ok=True)
        config_file.write_text(config_yaml, encoding="utf-8")
        try:
            load_config(config_file, [f"output_dir={run_dir}"])
        except UserError as err:
            config_file.unlink(missing_ok=True)
            raise LaunchError(in_config_box(str(err), config_file)) from None
        except Exception as err:  # pydantic or YAML errors not wrapped by load_config
            config_file.unlink(missing_ok=True)
            raise LaunchError(in_config_box(f"{type(err).__name__}: {err}", config_file)) from None
        args = [str(config_file), f"output_dir={run_dir}"] + (["--overwrite"] if overwrite else [])
        return self._spawn(name, args, resume=False)

    def resume(self, name: str) -> dict[str, Any]:
        check_run_name(name)
        self.reap()
        run_dir = run_folder_of(self.root, name)
        if not (run_dir / "config.yaml").is_file():
            raise LaunchError(f"no run '{name}' to resume", status=404)
        if self._busy(name):
            raise LaunchError(f"run '{name}' is training now", status=409)
        if latest_checkpoint(run_dir) is None:  # what `train --resume` would refuse, said before it loads a model
            ignored = "".join(f"; {path.name} ignored: {why}" for path, why in incomplete_checkpoints(run_dir))
            raise LaunchError(f"run '{name}' has no complete checkpoint to resume from (train.save_every sets how "
                              f"often they are written){ignored}", status=409)
        return self._spawn(name, [str(run_dir / "config.yaml"), "--resume"], resume=True)

    def stop(self, name: str) -> dict[str, Any]:
        """SIGTERM to the run's process: it finishes its step, saves a checkpoint and exits."""
        check_run_name(name)
        run_dir = run_folder_of(self.root, name)
        pid = training_process(run_dir)
        if pid is None:
            record = launch_record(self.root, name) or {}
            pid = recorded_pid(record) if recorded_process_alive(record) else None
        if pid is None and launch_record(self.root, name) is None and not run_dir.is_dir():
            raise LaunchError(f"no run '{name}'", status=404)
        if pid is None:
            status = read_status(run_dir) or {}
            elsewhere = f" on this machine (status.json says it trains on {status.get('host')})" \
                if status.get("status") == "running" and status.get("host") != socket.gethostname() else ""
            raise LaunchError(f"run '{name}' is not training{elsewhere}", status=409)
        os.kill(pid, signal.SIGTERM)
        return {"name": name, "pid": pid, "signal": "SIGTERM"}

    def reap(self) -> None:
        """Collect ended children (no zombies); their exit is in status.json and the log."""
        for name, child in list(self.children.items()):
            if child.poll() is not None:
                del self.children[name]

    def _busy(self, name: str) -> bool:
        """Whether a process on this machine trains the run now, or one the app launched for it still runs and has
        not ended the run (it may be loading the model, with the run's old status.json still in place; one that
        wrote how the run ended is only exiting)."""
        return training_process(run_folder_of(self.root, name)) is not None or launch_loading(self.root, name)

    def _spawn(self, name: str, args: list[str], *, resume: bool) -> dict[str, Any]:
        log = log_path(self.root, name)
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "COLUMNS": "120", "PYTHONUNBUFFERED": "1"}
        with open(log, "ab") as handle:
            handle.write(f"\n$ tunelab train {' '.join(args)}\n".encode())
            handle.flush()
            child = subprocess.Popen([sys.executable, "-m", "tunelab", "train", *args], stdout=handle,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     start_new_session=True)  # its own session: the app's Ctrl-C is not its
        self.children[name] = child
        record = {"name": name, "pid": child.pid, "args": args, "resume": resume, "started_at": time.time()}
        launches_dir = ui_dir(self.root) / "launches"
        launches_dir.mkdir(parents=True, exist_ok=True)
        (launches_dir / f"{name}.json").write_text(json.dumps(record))
        return record
