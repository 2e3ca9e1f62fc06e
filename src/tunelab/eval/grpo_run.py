"""`tunelab eval` of a GRPO run: each prompt's greedy reply, decoded as the run's own before/after evaluation decodes
it (GrpoObjective.evaluate_replies), scored by the run's rewards as its training builds them (build_rewards on its
saved config): the mean of each reward and of their weighted total (`reward`), and task metrics on the same
replies where the rows hold a reference answer (a built-in reward's column, else answer / solution / ground_truth /
reference, as the run's own evaluation picks it)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from tunelab.config import RolloutObjective as GrpoConfig
from tunelab.config import RunConfig
from tunelab.data.prompts import PreparedPrompts, PromptRow
from tunelab.errors import ConfigError, TrainingFault
from tunelab.eval.metrics import METRICS, check_references, compute_metrics, is_custom_metric
from tunelab.eval.paired import bootstrap_difference, compare_replies
from tunelab.eval.run_rows import (
    baseline_spec,
    data_label,
    in_run_config,
    keep_result,
    rows_to_score,
    run_device_precision,
)
from tunelab.infer.load import load_generator
from tunelab.models.load import load_tokenizer
from tunelab.objectives.grpo import GreedyEvaluation, GrpoObjective
from tunelab.objectives.rewards import BUILTINS, Reward, RewardState, build_rewards, builtin_reward


def grpo_task_metrics(run_config: RunConfig, metrics: list[str] | None) -> list[str]:
    """The task metrics scored on a GRPO run's replies: `metrics` (--metrics), else the run's eval.metrics that
    score replies. Raises ConfigError for metrics prompt rows cannot give (a loss, label or pair metric)."""
    if metrics is None:
        return [m for m in run_config.eval.metrics if m in METRICS or is_custom_metric(m)]
    refused = [m for m in metrics if m not in METRICS and not is_custom_metric(m)]
    if refused:
        raise ConfigError(f"{', '.join(refused)} cannot score a GRPO run's prompt rows, which have no reply to take "
                          "a loss on and no labels or pairs; its rewards are always reported, and --metrics adds "
                          f"task metrics on its replies ({', '.join(sorted(METRICS))} or file.py:function)",
                          where="--metrics")
    return metrics


def check_grpo_inputs(spec: str, run_config: RunConfig, data_path: Path | None, metrics: list[str] | None,
                      limit: int | None) -> None:
    """Refuse before any model loads what evaluate_grpo_run would refuse after it: metrics prompt rows cannot give,
    rows that cannot be read or lack a built-in reward's column, references a metric cannot score."""
    names = grpo_task_metrics(run_config, metrics)
    checks = [builtin_reward(s) for s in run_config.objective.reward_specs() if s.reward in BUILTINS]
    tokenizer = load_tokenizer(Path(spec))
    rows = rows_to_score(run_config, data_path, tokenizer, _objective(run_config.objective, checks, tokenizer,
                                                                        "fp32", "full", 0), limit)
    _references(rows, checks, names, explicit=metrics is not None)


def evaluate_grpo_run(spec: str, run_config: RunConfig, data_path: Path | None, metrics: list[str] | None, *,
                      batch_size: int = 16, max_new_tokens: int | None = None, limit: int | None = None,
                      output: Path | None = None, baseline: str | None = None) -> dict:
    """Greedy replies of the run (and of `baseline`, a model spec or `base`) to the rows' prompts, scored by the
    run's rewards and task metrics; with a baseline, the differences with 95% paired-bootstrap intervals. Writes
    eval.json and eval_samples.jsonl under `output`, and keeps the result with the run (RUN/evals/)."""
    config = run_config.objective
    if max_new_tokens is not None:
        config = config.model_copy(update={"max_new_tokens": max_new_tokens})
    names = grpo_task_metrics(run_config, metrics)
    try:
        rewards = build_rewards(config)
    except ConfigError as err:
        raise in_run_config(spec, err) from None
    at_end = run_progress(Path(spec))
    for reward in rewards:  # a reward that reads trainer_state scores as at the run's last evaluation
        reward.trainer_state = replace(at_end)
    device, precision = run_device_precision(run_config)
    tokenizer = load_tokenizer(Path(spec))
    objective = _objective(config, rewards, tokenizer, precision, run_config.method.name, run_config.train.seed)
    rows = rows_to_score(run_config, data_path, tokenizer, objective, limit)
    references = _references(rows, rewards, names, explicit=metrics is not None)
    data = data_label(run_config, data_path)
    evaluation = _replies(spec, objective, load_generator(spec, device).model, rows, batch_size)
    result = _result(spec, data, rows, evaluation, names, references, config.name)
    samples = [_sample(row, evaluation, index, rewards, references) for index, row in enumerate(rows)]
    against = baseline_spec(baseline, run_config)
    if against is not None:
        loaded = load_generator(against, device)
        base_rows = rows
        if loaded.tokenizer.get_vocab() != tokenizer.get_vocab():  # its own tokens for the same prompts
            base_rows = _same_rows(rows_to_score(run_config, data_path, loaded.tokenizer, objective, None), rows)
        method = loaded.run_config.method.name if loaded.run_config is not None else "full"
        base_objective = _objective(config, rewards, loaded.tokenizer, precision, method, run_config.train.seed)
        base = _replies(spec, base_objective, loaded.model, base_rows, batch_size)
        result["baseline"] = _result(against, data, base_rows, base, names, references, config.name)
        result["comparison"] = _comparison(rows, evaluation, base, rewards, names, references)
    return keep_result(spec, result, [config.name, *names], output, samples)


def run_progress(run_dir: Path) -> RewardState:
    """The trainer_state the run's rewards saw at its last evaluation: its steps and fractional epochs done
    (summary.json's trainer state); RewardState() (step 0, as the evaluation of its base model) where the run
    recorded none."""
    try:
        state = json.loads((run_dir / "summary.json").read_text())["trainer_state"]
        epoch = float((state.get("extra") or {}).get("epoch_progress", state["epoch"]))
        return RewardState(int(state["step"]), epoch)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return RewardState()


def _objective(config: GrpoConfig, rewards: list[Reward], tokenizer, precision: str, method: str,
               seed: int) -> GrpoObjective:
    """The objective a run trains with, for its evaluation alone (nothing to switch off: it samples no rollout)."""
    return GrpoObjective(config, rewards, tokenizer, seed=seed, switch_off=None, precision=precision,
                         method_name=method)


def _references(rows: list[PromptRow], rewards: list[Reward], names: list[str], *, explicit: bool) -> dict[str, str]:
    """Each row's reference answer (by row), as the run's own evaluation reads it (PreparedPrompts.eval_samples);
    {} when no metric is asked. Raises ConfigError when metrics asked on --metrics have no reference to compare with,
    DataError for references a metric cannot score."""
    if not names:
        return {}
    column = next((reward.column for reward in rewards if reward.column), None)
    samples = PreparedPrompts(train=rows, eval=rows, reference_column=column).eval_samples
    if not samples and explicit:
        raise ConfigError(f"{', '.join(names)} compare replies with a reference answer, and the rows have none (an "
                          "answer, solution, ground_truth or reference column, or a built-in reward's)",
                          where="--metrics")
    check_references(names, [s.reference for s in samples], [s.where for s in samples])
    return {s.where: s.reference for s in samples}


def _replies(spec: str, objective: GrpoObjective, model, rows: list[PromptRow], batch_size: int) -> GreedyEvaluation:
    """The model's greedy replies, scored; a reward that fails on them is the run's config's to fix."""
    try:
        return objective.evaluate_replies(model, rows, batch_size=batch_size)
    except TrainingFault as fault:
        raise ConfigError(str(fault), where=f"{Path(spec) / 'config.yaml'}: objective.rewards") from None


def _result(spec: str, data: str, rows: list[PromptRow], evaluation: GreedyEvaluation, names: list[str],
            references: dict[str, str], objective: str) -> dict:
    """One model's numbers: its evaluation's (as training logs them, without eval_ and without eval_loss, which is
    -reward), and the task metrics on the replies to rows with a reference."""
    result: dict = {"model": str(spec), "data": data, "objective": objective, "samples": len(rows)}
    result.update({key.removeprefix("eval_"): value for key, value in evaluation.metrics.items()
                   if key != "eval_loss"})
    if references:
        scored = [(evaluation.replies[i], references[row.where]) for i, row in enumerate(rows)
                  if row.where in references]
        result.update(compute_metrics(names, [reply for reply, _ in scored], [ref for _, ref in scored]))
    return result


def _comparison(rows: list[PromptRow], after: GreedyEvaluation, before: GreedyEvaluation, rewards: list[Reward],
                names: list[str], references: dict[str, str]) -> dict:
    """Per-prompt differences of the total and of each reward (where both replies were judged), with 95%
    paired-bootstrap intervals; the task metrics' as compare_replies gives them."""
    paired = {"reward": (after.total, before.total)}
    for index, reward in enumerate(rewards):
        paired[f"rewards/{reward.name}/mean"] = (after.scores[:, index], before.scores[:, index])
    differences = {}
    for key, (run_values, base_values) in paired.items():
        judged = ~(run_values.isnan() | base_values.isnan())
        if bool(judged.any()):
            differences[key] = bootstrap_difference(run_values[judged].tolist(), base_values[judged].tolist())
    comparison: dict = {}
    scored = [i for i, row in enumerate(rows) if row.where in references]
    if scored:
        comparison = compare_replies(names, [references[rows[i].where] for i in scored],
                                     [after.replies[i] for i in scored], [before.replies[i] for i in scored],
                                     [rows[i].where for i in scored])
    comparison["differences"] = {**differences, **comparison.get("differences", {})}
    return comparison


def _same_rows(rows: list[PromptRow], wanted: list[PromptRow]) -> list[PromptRow]:
    """`rows` (a baseline's tokens) in the order of `wanted` (the run's); ConfigError when the baseline's tokenizer
    left a prompt out (too long for the run's data.max_length in its tokens)."""
    by_where = {row.where: row for row in rows}
    missing = [row.where for row in wanted if row.where not in by_where]
    if missing:
        raise ConfigError(f"the baseline's tokenizer makes the prompt at {missing[0]} too long for the run's "
                          "data.max_length and objective.max_new_tokens", where="--baseline")
    return [by_where[row.where] for row in wanted]


def _sample(row: PromptRow, evaluation: GreedyEvaluation, index: int, rewards: list[Reward],
            references: dict[str, str]) -> dict:
    """One line of eval_samples.jsonl: the prompt as the row gave it, the reply, its rewards and reference."""
    scores = evaluation.scores[index]
    record = {"where": row.where, "prompt": row.original, "reply": evaluation.replies[index],
              "reward": _number(evaluation.total[index]),
              "rewards": {reward.name: _number(scores[i]) for i, reward in enumerate(rewards)}}
    if row.where in references:
        record["reference"] = references[row.where]
    return record


def _number(value: torch.Tensor) -> float | None:
    """A reward as JSON: None where no reward judged the reply (NaN)."""
    return None if bool(value.isnan()) else float(value)
