"""What the start form shows before a run starts: the config validated exactly as `tunelab train` validates it,
the `data inspect` report of its data and the `check-template` verdict on a sample of its conversations."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from tunelab.errors import UserError

DRY_RUN_SECONDS = 600
TEMPLATE_CHECK_LIMIT = 32
"""Conversations the form's template check reads (training itself checks 32 too)."""


def check_config(config_yaml: str, root: Path) -> dict:
    """{ok, error} for the config; with a valid one also `inspect` (the data report as `data inspect --json`
    gives it), `template` (the check-template report) and `plan` (steps and the peak-memory estimate of a dry
    run), each replaced by {error} when it cannot be made."""
    from tunelab.config import load_config
    from tunelab.ui.launcher import in_config_box, require_config

    try:
        require_config(config_yaml)
    except UserError as err:
        return {"ok": False, "error": str(err)}
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "config.yaml"
        path.write_text(config_yaml, encoding="utf-8")
        try:
            config = load_config(path, [f"output_dir={root / '.check'}"])
        except UserError as err:
            return {"ok": False, "error": in_config_box(str(err), path)}
        except Exception as err:  # noqa: BLE001 - any parse failure is the form's to show, not a 500
            return {"ok": False, "error": in_config_box(f"{type(err).__name__}: {err}", path)}
        result: dict = {"ok": True, "error": None, "model": config.model, "method": config.method.name,
                        "objective": config.objective.name}
        try:
            tokenizer, model_path = _tokenizer(config.model)
        except UserError as err:
            return {**result, "ok": False, "error": str(err)}
        result["inspect"] = _inspect(config, tokenizer)
        result["template"] = _template(config, tokenizer, model_path)
        plan = _dry_run(path, root)
        result["plan"] = {"error": in_config_box(plan["error"], path)} if "error" in plan else plan
    return result


def _dry_run(config_file: Path, root: Path) -> dict:
    """`tunelab train --dry-run` in its own process (it loads the model; the app should not hold it): the steps
    it would take and its peak-memory estimate, or {error}."""
    done = subprocess.run([sys.executable, "-m", "tunelab", "train", str(config_file), f"output_dir={root / '.check'}",
                           "--dry-run", "--json"], capture_output=True, text=True, timeout=DRY_RUN_SECONDS)
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    message = (done.stderr.strip() or done.stdout.strip()).splitlines()
    return {"error": message[-1] if message else f"the dry run ended with code {done.returncode}"}


def _tokenizer(spec: str):
    from tunelab.models.load import load_tokenizer
    from tunelab.models.resolve import resolve_model

    model_path = resolve_model(spec)
    return load_tokenizer(model_path), model_path


def _inspect(config, tokenizer) -> dict:
    from tunelab.data.inspect import inspect_data
    from tunelab.errors import UnknownFormat

    target = config.data.train if not isinstance(config.data.train, list) else config.data.train[0].path
    try:
        report = inspect_data(target, tokenizer=tokenizer, data_config=config.data, seed=config.train.seed,
                              samples_to_show=1)
    except UnknownFormat as unknown:
        return {"error": str(unknown)}
    except UserError as err:
        return {"error": str(err)}
    return report.to_json()


def _template(config, tokenizer, model_path) -> dict:
    from tunelab.data.template_check import check_data

    if config.objective.name != "sft":
        return {"skipped": f"the template check reads SFT conversations; objective {config.objective.name} is "
                           "checked when training starts"}
    try:
        report = check_data(config.data, tokenizer=tokenizer, model_path=model_path, model_name=config.model,
                            target="data.train", seed=config.train.seed, limit=TEMPLATE_CHECK_LIMIT)
    except UserError as err:
        return {"error": str(err)}
    return report.to_json()
