"""`tunelab eval` of a GRPO or KTO run on the rows its objective trains on: the run's own held-out rows (no --data),
or a --data file of that kind, read as its training reads data (template, system prompt, columns, max_length,
overlong) and scored whole. What each objective measures there is its training's own evaluation: eval/grpo_run.py,
eval/kto_run.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

from tunelab.config import ROLLOUT_OBJECTIVES, DataConfig, RunConfig, load_config
from tunelab.data.preference import data_kind
from tunelab.errors import ConfigError, ModelError, UserError
from tunelab.eval.recorded import record_evaluation, result_json
from tunelab.infer.load import is_run_dir, refuse_unfinished_run
from tunelab.models.resolve import resolve_model
from tunelab.track.jsonl import finite_or_null
from tunelab.train.precision import resolve_precision
from tunelab.train.run_data import prepare_run_data

OWN_ROWS = {**dict.fromkeys(ROLLOUT_OBJECTIVES, "prompts"), "kto": "feedback"}
"""The objectives `tunelab eval` scores by their own evaluation, and the kind of rows each trains on."""

ROWS_NAMED = {"prompts": "prompt-only rows (a prompt column, no reply)",
              "feedback": "feedback rows (prompt/completion/label)"}


def scores_own_rows(run_config: RunConfig | None, data_path: Path | None) -> bool:
    """Whether `tunelab eval` scores a run by its objective's evaluation: a GRPO or KTO run, on its held-out rows
    (no data file) or on a file of the rows it trains on (any other file is scored as SFT rows are)."""
    if run_config is None or run_config.objective.name not in OWN_ROWS:
        return False
    return data_path is None or file_kind(data_path, run_config) == OWN_ROWS[run_config.objective.name]


def file_kind(data_path: Path, run_config: RunConfig | None) -> str | None:
    """`sft`, `preference`, `feedback` or `prompts`, as a run's column mapping reads the file; None when that
    cannot be told (whoever reads the file then says why)."""
    columns = run_config.data.columns if run_config is not None else {}
    try:
        return data_kind(DataConfig(train=data_path, columns=columns))
    except UserError:
        return None


def refuse_rows_of_another_objective(spec: str, data_path: Path, run_config: RunConfig | None) -> None:
    """Prompt-only or feedback rows for a model that is not a run of the objective that scores them: say which
    run does, instead of the training hint reading them as SFT rows would give."""
    kind = file_kind(data_path, run_config)
    objective = next((name for name, rows in OWN_ROWS.items() if rows == kind), None)
    if objective is None:
        return
    how = ("its rewards score each prompt's reply" if objective in ROLLOUT_OBJECTIVES
           else "its loss scores the labelled replies")
    raise ConfigError(f"{data_path} holds {ROWS_NAMED[kind]}, which `tunelab eval` scores for a {objective} run "
                      f"({how}); {spec} is not one: evaluate it on rows with reference replies", where="--data")


def eval_run_config(run_config: RunConfig, data_path: Path | None) -> RunConfig:
    """The run's config with `data_path` as its only data, none of it held out (the run's own without one)."""
    if data_path is None:
        return run_config
    data = run_config.data.model_copy(update={"train": Path(data_path), "eval": None, "eval_split": 0.0})
    return run_config.model_copy(update={"data": data})


def rows_to_score(run_config: RunConfig, data_path: Path | None, tokenizer, objective, limit: int | None) -> list:
    """The rows to evaluate on, prepared by the objective's training data path (prepare_run_data: its checks,
    its cache): the run's held-out rows, or every row of `data_path` in file order; the first `limit`. Raises
    DataError naming file:line for bad rows, ConfigError when there is nothing to score."""
    kind = OWN_ROWS[run_config.objective.name]
    if data_path is not None and (found := file_kind(data_path, run_config)) not in (kind, None):
        raise ConfigError(f"{data_path} holds {found} rows; a {run_config.objective.name} run is scored on "
                          f"{ROWS_NAMED[kind]}", where="--data")
    prepared = prepare_run_data(eval_run_config(run_config, data_path), tokenizer, objective)
    rows = list(prepared.train if data_path is not None else prepared.eval)
    if not rows:
        raise ConfigError(f"the run holds out no {ROWS_NAMED[kind]} (data.eval_split: 0 and no data.eval); "
                          "give --data FILE", where="--data")
    return rows[:limit] if limit else rows


def data_label(run_config: RunConfig, data_path: Path | None) -> str:
    """What an evaluation result names as its data: the file, or which of the run's rows were held out."""
    if data_path is not None:
        return str(data_path)
    if run_config.data.eval is not None:
        return str(run_config.data.eval)
    train = run_config.data.train
    sources = str(train) if isinstance(train, Path | str) else ", ".join(str(s.path) for s in train)
    return f"held-out {run_config.data.eval_split:.0%} of {sources}"


def run_device_precision(run_config: RunConfig) -> tuple[str, str]:
    """(device, precision) an evaluation computes in: where load_for_inference puts a model, in the run's
    train.precision there."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return device, resolve_precision(run_config.train.precision, torch.device(device))


def baseline_spec(baseline: str | None, run_config: RunConfig | None) -> str | None:
    """The model a baseline names: `base` is the run's own starting model."""
    return run_config.model if baseline == "base" else baseline


REWARD_MODEL_BASELINE = {
    "replies": "it scores replies (tunelab score) and cannot write them",
    "log-probabilities": "it has a score head and no language-model head to give the rows' replies the "
    "log-probabilities they are scored by",
}
"""Why a reward model cannot be the --baseline of an evaluation, by what the evaluation needs of it."""


def check_baseline(baseline: str | None, run_config: RunConfig | None, *,
                   needs: Literal["replies", "log-probabilities"] | None = "replies") -> Path | None:
    """The folder holding the tokenizer of the model `--baseline` names (a run directory, or where a preset, hub id,
    folder or .gguf file resolves to), found before the evaluation of the run itself, so that a baseline that names
    no model (or a reward model, when the evaluation `needs` replies written or log-probabilities of them; None:
    scores alone) costs no evaluation. None without a baseline. Raises ConfigError or ModelError naming
    --baseline."""
    if baseline is None:
        return None
    if baseline == "base" and run_config is None:
        raise ConfigError("--baseline base needs a tunelab run directory", where="--baseline")
    spec = baseline_spec(baseline, run_config)
    path = Path(str(spec)).expanduser()
    try:
        if path.is_dir() and is_run_dir(path):
            if needs is not None and load_config(path / "config.yaml").objective.name == "reward":
                raise ConfigError(f"{spec} is a reward model: {REWARD_MODEL_BASELINE[needs]}", where="--baseline")
            return path
        refuse_unfinished_run(path)
        return resolve_model(str(spec))
    except ModelError as err:
        raise ModelError(str(err), where="--baseline") from None


def keep_result(spec: str, result: dict, names: list[str], output: Path | None,
                samples: list[dict] | None = None) -> dict:
    """Write eval.json (and eval_samples.jsonl, one line per scored row) under `output`, and keep the result with
    the run (RUN/evals/, shown by its report)."""
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        (output / "eval.json").write_text(result_json(result))
        if samples is not None:
            with open(output / "eval_samples.jsonl", "w") as handle:
                for record in samples:
                    handle.write(json.dumps(finite_or_null(record), allow_nan=False) + "\n")
    record_evaluation(Path(spec), result, names)
    return result


def in_run_config(run_dir: str, err: ConfigError) -> ConfigError:
    """A config error of the run's saved config, naming that file before the key."""
    return ConfigError(err.message, where=f"{Path(run_dir) / 'config.yaml'}: {err.where}" if err.where
                       else str(Path(run_dir) / "config.yaml"))
