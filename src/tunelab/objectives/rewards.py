"""What a GRPO completion is worth: built-in rewards against a reference column, a user's Python function with
TRL's signature, or a reward-model run.

A user's function is called as TRL 1.16 calls it, `fn(prompts=..., completions=..., completion_ids=...,
trainer_state=..., log_extra=..., log_metric=..., **columns)`, with every other column of the rows as a keyword list,
so reward functions written for TRL's GRPOTrainer work unchanged: prompts and completions are text for text prompts,
and message lists for chat prompts (each completion `[{"role": "assistant", "content": text}]`). It may be
`async def` (run with asyncio) and may return a list, a tuple, a numpy array or a torch tensor. `trainer_state` has
TRL's `global_step` (the optimiser steps finished) and `epoch`; `log_metric(name, value)` logs the step's mean of
the values under `rewards/<reward>/<name>`; `log_extra(column, values)` is accepted and ignored (tunelab keeps no
completions table). A reward may return None for a completion it does not judge: the total then adds the rewards
that did (TRL's nansum), and a completion no reward judged is left out of its group (advantage 0).
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import math
import numbers
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config import RewardSpec, RolloutObjective
from tunelab.data.prompts import PromptRow
from tunelab.errors import ConfigError
from tunelab.eval.metrics import _first_json_object, normalize_text, per_sample_json_field_accuracy

RewardCall = Callable[[list[PromptRow], list[str], list[list[int]]], list[float]]


@dataclass
class RewardState:
    """Where training stands, as TRL's reward functions read it from transformers' TrainerState (for reward shaping
    by training progress). A rollout sees the step it samples for; an evaluation the steps and epochs done, as TRL
    evaluates (GrpoObjective.set_progress), and `tunelab eval RUN` the run's last ones (summary.json)."""

    global_step: int = 0
    """Optimiser steps finished before this rollout (0-based step being sampled) or evaluation, TRL's
    global_step."""
    epoch: float | None = None
    """Epochs done before this rollout, fractional as TRL's (0.5: half the first epoch's batches trained); None
    only when a rollout is sampled outside the training loop."""


@dataclass
class Reward:
    """One named, weighted reward: `score(rows, completions, completion_ids)` -> one float (or NaN) each."""

    name: str
    weight: float
    score: RewardCall
    check: Callable[[PromptRow], str | None] = lambda row: None
    """Why a row cannot be scored by this reward (a missing reference column, ...), checked before training."""
    column: str | None = None
    """The reference column a built-in compares against."""
    trainer_state: RewardState = field(default_factory=RewardState)
    """What a user's function gets as TRL's `trainer_state`; the objective keeps it current."""
    logged: dict[str, list[float]] = field(default_factory=dict)
    """Values a user's function gave `log_metric` since the objective last collected them."""

    def log_metric(self, name: str, value: float) -> None:
        """TRL's `log_metric` for this reward: the value joins the step's mean under rewards/<reward>/<name>."""
        self.logged.setdefault(name, []).append(float(value))

    def take_values(self) -> dict[str, list[float]]:
        """Every value logged by name since the last call, emptied for the next step (a rollout gathers them from
        every process before averaging)."""
        values = {name: list(given) for name, given in self.logged.items() if given}
        self.logged.clear()
        return values

    def take_logged(self) -> dict[str, float]:
        """The mean of each metric logged since the last call, emptied for the next step."""
        return {name: sum(values) / len(values) for name, values in self.take_values().items()}


def _exact_match(completion: str, reference: str) -> float:
    return float(normalize_text(completion) == normalize_text(reference))


def _json_valid(completion: str, reference: str) -> float:
    return float(_first_json_object(completion) is not None)


def _accuracy(completion: str, reference: str) -> float:
    form = normalize_text(completion.replace("_", " ").replace("-", " "))
    return float(form == normalize_text(reference.replace("_", " ").replace("-", " ")))


def _chrf(completion: str, reference: str) -> float:
    import sacrebleu

    return sacrebleu.sentence_chrf(completion, [reference]).score / 100


BUILTINS: dict[str, Callable[[str, str], float]] = {
    "exact_match": _exact_match,
    "json_field_accuracy": per_sample_json_field_accuracy,
    "json_valid": _json_valid,
    "accuracy": _accuracy,
    "chrf": _chrf,
}
"""Per-completion scores in [0, 1] against the row's reference (json_valid ignores it)."""


def reference_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def builtin_reward(spec: RewardSpec) -> Reward:
    metric = BUILTINS[spec.reward]
    column = spec.column

    def score(rows: list[PromptRow], completions: list[str], completion_ids) -> list[float]:
        return [metric(c, reference_text(row.columns.get(column, ""))) for row, c in zip(rows, completions,
                                                                                          strict=True)]

    def check(row: PromptRow) -> str | None:
        if spec.reward == "json_valid":
            return None
        if row.columns.get(column) is None:
            return f"missing column '{column}': the reward {spec.reward} compares completions against it"
        if spec.reward == "json_field_accuracy":
            value = row.columns[column]
            parsed = value if isinstance(value, dict) else _json_or_none(value)
            if not isinstance(parsed, dict):
                return f"column '{column}' is not a JSON object, which json_field_accuracy compares fields of"
        return None

    uses_column = spec.reward != "json_valid"
    return Reward(spec.reward, spec.weight, score, check, column if uses_column else None)


def _json_or_none(value: Any) -> Any:
    try:
        return json.loads(value)
    except (TypeError, json.JSONDecodeError):
        return None


def raised_at(err: BaseException) -> str:
    """` (at FILE:LINE)`, the deepest frame of `err`'s traceback in the user's own code (not tunelab's, not an
    installed library's), so a reward that fails mid-training points at the line to fix; '' when none is."""
    libraries = (str(Path(__file__).parents[1]), sys.prefix, sys.base_prefix)
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith(libraries)]
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def _load_module(path: str, where: str):
    """The user's reward file as a module, its folder on sys.path while it loads so that it can import the modules
    next to it (as a script run with TRL can)."""
    folder = str(Path(path).resolve().parent)
    module_spec = importlib.util.spec_from_file_location(f"tunelab_reward_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, folder)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - a user's file: report whatever it raised
        raise ConfigError(f"{path} could not be imported: {type(err).__name__}: {err}{raised_at(err)}",
                          where=where) from None
    finally:
        sys.path.remove(folder)
    return module


def _ignore_extra(column: str, values: list) -> None:
    """TRL's `log_extra` (a column of its completions table): tunelab keeps no such table, so it is ignored."""


def _awaited(values: Any) -> Any:
    """An `async def` reward's result, run to completion (TRL gathers them on its own event loop)."""
    if not inspect.isawaitable(values):
        return values

    async def wait() -> Any:
        return await values

    return asyncio.run(wait())


def reward_values(values: Any, count: int) -> list[float]:
    """A user's reward result as one float per completion (NaN for None): a list, tuple, numpy array or tensor of
    `count` numbers. Raises ValueError saying what came back instead."""
    if hasattr(values, "tolist") and not isinstance(values, list | tuple):
        values = values.tolist()
    if not isinstance(values, list | tuple):
        raise ValueError(f"returned {type(values).__name__}, not a list of one reward per completion ({count})")
    if len(values) != count:
        raise ValueError(f"returned {len(values)} values for {count} completions")
    for index, value in enumerate(values):
        if value is not None and not isinstance(value, numbers.Real):
            raise ValueError(f"returned {type(value).__name__} for completion {index}, not a number or None")
    return [math.nan if v is None else float(v) for v in values]


def python_reward(spec: RewardSpec, where: str) -> Reward:
    """`file.py:function`, called with TRL's keyword arguments."""
    path, _, function = spec.reward.rpartition(":")
    if not Path(path).is_file():
        raise ConfigError(f"reward file {path} does not exist", where=where)
    fn = getattr(_load_module(path, where), function, None)
    if not callable(fn):
        raise ConfigError(f"{path} has no function '{function}'", where=where)

    def score(rows: list[PromptRow], completions: list[str], completion_ids) -> list[float]:
        prompts = [row.original for row in rows]
        given = [[{"role": "assistant", "content": c}] if row.conversational else c
                 for row, c in zip(rows, completions, strict=True)]
        columns = {key: [row.columns.get(key) for row in rows] for key in dict.fromkeys(k for r in rows
                                                                                       for k in r.columns)}
        values = fn(prompts=prompts, completions=given, completion_ids=completion_ids,
                    trainer_state=reward.trainer_state, log_extra=_ignore_extra, log_metric=reward.log_metric,
                    **columns)
        return reward_values(_awaited(values), len(rows))

    reward = Reward(function, spec.weight, score)  # named by build_rewards
    return reward


def model_reward(spec: RewardSpec, where: str) -> Reward:
    """A reward-model run: its score of the prompt followed by the completion, rendered with its own template."""
    from tunelab.data.preference import tokenize_prompt, tokenize_reply
    from tunelab.infer.load import load_for_inference
    from tunelab.infer.score import reward_scores

    loaded = load_for_inference(spec.reward)
    if loaded.run_config is None or loaded.run_config.objective.name != "reward":
        raise ConfigError(f"{spec.reward} is not a reward model run (objective.name: reward)", where=where)

    def score(rows: list[PromptRow], completions: list[str], completion_ids) -> list[float]:
        sequences = []
        for row, completion in zip(rows, completions, strict=True):
            text, ids = tokenize_prompt(row.prompt, loaded.renderer)
            sequences.append(tokenize_reply(row.prompt, completion, loaded.renderer, text, ids))
        return reward_scores(loaded.model, sequences, pad_token_id=loaded.tokenizer.pad_token_id)

    return Reward(Path(spec.reward).name, spec.weight, score)


def build_rewards(config: RolloutObjective) -> list[Reward]:
    """The rewards objective.rewards names. Raises ConfigError naming the entry that cannot be used."""
    rewards = []
    for index, spec in enumerate(config.reward_specs()):
        where = f"objective.rewards[{index}]"
        if spec.reward in BUILTINS:
            rewards.append(builtin_reward(spec))
        elif spec.reward.rpartition(":")[0].endswith(".py"):
            rewards.append(python_reward(spec, where))
        elif Path(spec.reward).is_dir():
            rewards.append(model_reward(spec, where))
        else:
            raise ConfigError(f"'{spec.reward}' is not a built-in reward ({', '.join(BUILTINS)}), a file.py:function "
                              "or the folder of a reward-model run", where=where)
    for reward, name in zip(rewards, reward_names(config), strict=True):
        reward.name = name
    return rewards


def reward_names(config: RolloutObjective) -> list[str]:
    """The name each reward is logged under (rewards/<name>/mean): the built-in's, the function's or the run
    folder's, with its position appended when two rewards would share one."""
    names = [spec.reward.rpartition(":")[2] if spec.reward.rpartition(":")[0].endswith(".py")
             else Path(spec.reward).name for spec in config.reward_specs()]
    return [f"{name}_{index}" if names.count(name) > 1 else name for index, name in enumerate(names)]
