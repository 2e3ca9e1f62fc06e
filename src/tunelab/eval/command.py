"""`tunelab eval`: loss, perplexity and task metrics of a run or model on any supported data file; a GRPO or KTO
run on its own kind of rows is scored by its objective's evaluation instead (eval/run_rows.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from tunelab.cli_common import check_output_file, check_output_folder
from tunelab.config import ROLLOUT_OBJECTIVES, DataConfig, load_config
from tunelab.data.preference import data_kind, prepare_preference_data
from tunelab.data.prepare import load_samples, prepare_eval_file, raise_problems
from tunelab.data.template import ChatRenderer
from tunelab.errors import ConfigError, UserError
from tunelab.eval.evaluate import evaluate_loss, evaluate_task
from tunelab.eval.grpo_run import check_grpo_inputs, evaluate_grpo_run
from tunelab.eval.kto_run import check_kto_baseline, check_kto_inputs, evaluate_kto_run
from tunelab.eval.labels import LABEL_METRICS, LabelScore, resolve_labels
from tunelab.eval.metrics import METRICS, check_custom_metrics, check_references, is_custom_metric
from tunelab.eval.paired import bootstrap_difference, compare_replies
from tunelab.eval.preference import pair_margins
from tunelab.eval.recorded import record_evaluation, result_json
from tunelab.eval.run_rows import (
    baseline_spec,
    check_baseline,
    refuse_rows_of_another_objective,
    scores_own_rows,
)
from tunelab.infer.generate import GenerationOptions
from tunelab.infer.load import is_run_dir, load_for_inference, load_generator
from tunelab.models.attention import MATMUL, training_attention
from tunelab.models.logprobs import uses_virtual_tokens
from tunelab.track.jsonl import finite_or_null
from tunelab.train.precision import resolve_precision

DEFAULT_METRICS = ["loss", "perplexity", "exact_match"]
"""What --metrics is when not given (a GRPO run: its eval.metrics beside its rewards; a KTO run: its objective's)."""
LOSS_METRICS = {"loss", "perplexity"}
PREFERENCE_METRICS = {"preference_accuracy", "reward_margin"}
"""On preference files: how often the model ranks the chosen reply above the rejected one, and the mean
difference: summed log-probabilities of each reply's tokens, or a reward model's scores."""


def check_metric_names(names: list[str]) -> None:
    """Refuse unknown metric names, custom metric files or functions that are missing, and mixes that cannot go
    together, naming --metrics."""
    known_names = LOSS_METRICS | set(METRICS) | set(LABEL_METRICS) | PREFERENCE_METRICS
    unknown = [n for n in names if n not in known_names and not is_custom_metric(n)]
    if unknown:
        known = ", ".join(sorted(known_names)) + " or path/to/file.py:function"
        raise ConfigError(f"unknown metric(s) {', '.join(unknown)}; known: {known}", where="--metrics")
    check_custom_metrics(names, "--metrics")
    if PREFERENCE_METRICS & set(names) and not set(names) <= PREFERENCE_METRICS:
        raise ConfigError("preference_accuracy and reward_margin score preference files and go alone; evaluate "
                          "other metrics in a second call", where="--metrics")


def _refuse_pairs_without_pair_metrics(data_path: Path) -> None:
    """A preference file asked for reply metrics: point at the metrics that score pairs, not at training."""
    try:
        kind = data_kind(DataConfig(train=data_path))
    except UserError:  # columns only a run's data.columns maps, say: scoring reads the file with them
        return
    if kind == "preference":
        raise ConfigError(f"{data_path} holds preference pairs; score them with --metrics "
                          "preference_accuracy,reward_margin", where="--metrics")


def check_eval_inputs(spec: str, data_path: Path | None, metrics: list[str] | None, *, baseline: str | None = None,
                      output: Path | None = None, limit: int | None = None, max_length: int = 1024,
                      labels: list[str] | None = None) -> None:
    """Refuse now, before any model is loaded, what evaluate_model would otherwise refuse after its work: unknown
    or missing metrics, `--baseline base` without a run, data rows that cannot be read or scored, an output folder
    that cannot be written. `metrics` None: DEFAULT_METRICS, or a GRPO or KTO run's own."""
    run_config = saved_run_config(spec)
    if scores_own_rows(run_config, data_path):
        _check_own_rows(spec, run_config, data_path, metrics, limit=limit, output=output, labels=labels,
                        baseline=baseline)
        return
    if data_path is None:
        raise UserError("say what to evaluate on: --data FILE, --tasks TASKS (lm-eval), or both (a GRPO or KTO "
                        "run without them is scored on its held-out rows)", where="eval")
    metrics = list(DEFAULT_METRICS if metrics is None else metrics)
    if labels is not None and "label_accuracy" not in metrics:
        metrics = [*metrics, "label_accuracy"]
    check_metric_names(metrics)
    pairs = bool(PREFERENCE_METRICS & set(metrics))
    if baseline == "base":
        _check_base_baseline(run_config, pairs=pairs)
    if not pairs:  # pairs are read with the model's tokenizer (evaluate_pairs)
        refuse_rows_of_another_objective(spec, data_path, run_config)
        _refuse_pairs_without_pair_metrics(data_path)
        samples = _read_samples(data_path, _eval_data_config(data_path, max_length, run_config))
        scored = samples[:limit] if limit else samples
        check_references(metrics, [s.reference for s in scored], [s.where for s in scored])
        if any(m in LABEL_METRICS for m in metrics):
            resolve_labels(labels, [s.reference for s in samples], where="--labels")
    if output is not None:
        check_output_files(output, ["eval.json", "eval_samples.jsonl"])
    check_baseline(baseline, run_config, needs=None if pairs else "replies")  # last: a hub id or preset may be fetched


def _check_own_rows(spec: str, run_config, data_path: Path | None, metrics: list[str] | None, *,
                    limit: int | None, output: Path | None, labels: list[str] | None,
                    baseline: str | None = None) -> None:
    """What `tunelab eval` of a GRPO or KTO run on its own rows refuses before any model loads: unknown metrics, a
    label set (no reply to classify), rows that cannot be read or scored, an output folder that cannot be
    written, a baseline that names no model (or, for KTO, one with another tokenizer)."""
    if metrics is not None:
        check_metric_names(metrics)
    if labels is not None:
        raise ConfigError(f"{run_config.objective.name} runs are scored on their own rows, which have no labelled "
                          "reply for label_accuracy; leave --labels out", where="--labels")
    rollout = run_config.objective.name in ROLLOUT_OBJECTIVES
    check = check_grpo_inputs if rollout else check_kto_inputs
    check(spec, run_config, data_path, metrics, limit)
    if output is not None:
        kept = ["eval.json", "eval_samples.jsonl"] if rollout else ["eval.json"]
        check_output_files(output, kept)
    # a GRPO baseline writes replies; a KTO one gives the feedback rows' replies their log-probabilities
    tokenizer_folder = check_baseline(baseline, run_config, needs="replies" if rollout else "log-probabilities")
    if tokenizer_folder is not None and not rollout:
        check_kto_baseline(spec, baseline_spec(baseline, run_config), tokenizer_folder)


def check_output_files(output: Path, names: list[str]) -> None:
    """Refuse an --output folder the evaluation's files cannot be written into, before the work."""
    check_output_folder(output, "--output")
    for name in names:
        if (output / name).is_dir():
            raise ConfigError(f"{output / name} is a folder; remove it or choose another folder", where="--output")
        check_output_file(output / name, "--output")


def saved_run_config(spec: str):
    """The config of the tunelab run directory `spec` (RunConfig), or None when `spec` names another model."""
    path = Path(str(spec))
    return load_config(path / "config.yaml") if path.is_dir() and is_run_dir(path) else None


def _check_base_baseline(run_config, *, pairs: bool) -> None:
    """`--baseline base` of a reward model on pairs: its base has no score head (check_baseline: the rest)."""
    if pairs and run_config is not None and run_config.objective.name == "reward":
        raise ConfigError("a reward model's base has no score head to compare with; its held-out accuracy "
                          "before training is in the run's summary.json (eval_before)", where="--baseline")


def _eval_data_config(data_path: Path, max_length: int, run_config) -> DataConfig:
    """How an evaluation reads its data file: whole, truncated to `max_length`, with a run's template settings."""
    data_config = DataConfig(train=data_path, eval_split=0, max_length=max_length, overlong="truncate")
    if run_config is None:
        return data_config
    return data_config.model_copy(update={"chat_template": run_config.data.chat_template,
                                          "train_on": run_config.data.train_on, "columns": run_config.data.columns})


def _read_samples(data_path: Path, data_config: DataConfig) -> list:
    """The samples with a reply of the evaluation file (DataError listing its invalid rows): what is scored."""
    problems: list[str] = []
    samples, *_ = load_samples(data_path, data_config.format, data_config.system_prompt, problems,
                               columns=data_config.columns)
    raise_problems(problems)
    return [s for s in samples if s.messages]


def evaluate_model(
    spec: str,
    data_path: Path | None,
    metrics: list[str] | None,
    *,
    options: GenerationOptions,
    limit: int | None = None,
    max_length: int = 1024,
    output: Path | None = None,
    baseline: str | None = None,
    labels: list[str] | None = None,
    label_score: LabelScore = "sum",
    max_new_tokens: int | None = None,
) -> dict:
    """Evaluate `spec` on `data_path`. Returns the metrics; with `output`, writes eval.json and the
    per-sample replies (eval_samples.jsonl) there. With `baseline` (a model spec, or `base` for a run's base
    model), the baseline is evaluated on the same samples and the differences come with 95% intervals. When `spec`
    is a run directory the result is also kept there (RUN/evals/<data>-<metrics>.json) and its report.html shows it.
    `labels` (which adds label_accuracy) is the label set that metric scores; by default the distinct
    references of the whole file, when there are at most 50. `metrics` None: DEFAULT_METRICS.

    A GRPO run on prompt rows, or a KTO run on feedback rows (`data_path` None: the run's held-out rows), is scored
    by its objective's own evaluation: its rewards on greedy replies (plus `metrics`, else its eval.metrics, on
    the same replies), or its loss and metrics. `max_new_tokens` bounds replies (default: options.max_new_tokens;
    a GRPO run: its objective.max_new_tokens)."""
    run_config = saved_run_config(spec)
    if scores_own_rows(run_config, data_path):
        _check_own_rows(spec, run_config, data_path, metrics, limit=limit, output=output, labels=labels,
                        baseline=baseline)
        if run_config.objective.name in ROLLOUT_OBJECTIVES:
            return evaluate_grpo_run(spec, run_config, data_path, metrics, batch_size=options.batch_size,
                                     max_new_tokens=max_new_tokens, limit=limit, output=output, baseline=baseline)
        return evaluate_kto_run(spec, run_config, data_path, metrics, limit=limit, output=output, baseline=baseline)
    if max_new_tokens is not None:
        options = replace(options, max_new_tokens=max_new_tokens)
    metrics = list(DEFAULT_METRICS if metrics is None else metrics)
    if labels is not None and "label_accuracy" not in metrics:
        metrics = [*metrics, "label_accuracy"]
    check_eval_inputs(spec, data_path, metrics, baseline=baseline, output=output, limit=limit, max_length=max_length,
                      labels=labels)
    if PREFERENCE_METRICS & set(metrics):
        return _evaluate_pairs(spec, data_path, metrics, limit=limit, max_length=max_length, output=output,
                               baseline=baseline)
    scoring = {"labels": labels, "label_score": label_score}
    result, samples, replies, run_config, classified = _score(spec, data_path, metrics, options, limit, max_length,
                                                              **scoring)
    if baseline is not None:
        if baseline == "base":
            baseline = run_config.model
        base_result, _, base_replies, _, base_classified = _score(baseline, data_path, metrics, options, limit,
                                                                  max_length, run_config=run_config, **scoring)
        result["baseline"] = base_result
        names = [m for m in metrics if m not in LOSS_METRICS and m not in LABEL_METRICS]
        if replies and names:
            references = [s.reference for s in samples]
            result["comparison"] = compare_replies(names, references, replies, base_replies,
                                                   [s.where for s in samples])
        if classified is not None and classified.correct:
            result.setdefault("comparison", {}).setdefault("differences", {})["label_accuracy"] = (
                bootstrap_difference([float(c) for c in classified.correct],
                                     [float(c) for c in base_classified.correct])
            )
        if "loss" in result:
            result.setdefault("comparison", {}).setdefault("differences", {})["loss"] = {
                "difference": result["loss"] - base_result["loss"]
            }
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        (output / "eval.json").write_text(result_json(result))
        predicted = classified.predictions if classified is not None else []
        with open(output / "eval_samples.jsonl", "w") as handle:
            for i, sample in enumerate(samples):
                record = {"where": sample.where, "prompt": sample.messages[:-1], "reference": sample.reference,
                          "reply": replies[i] if i < len(replies) else None}
                if i < len(predicted):
                    record["label"] = predicted[i]
                handle.write(json.dumps(finite_or_null(record), allow_nan=False) + "\n")
    if run_config is not None and Path(str(spec)).is_dir():  # evidence about a run is kept with it
        record_evaluation(Path(str(spec)), result, metrics)
    return result


def _score(spec, data_path, metrics, options, limit, max_length, run_config=None, labels=None, label_score="sum"):
    """(metrics, samples, replies, the run's config, label classification) of one model; `run_config` fixes the
    template settings when a baseline is scored for a run, so both see identical prompts."""
    loaded = load_generator(spec)  # loss and generated replies need the output head a reward model lacks
    run_config = loaded.run_config or run_config
    data_config = _eval_data_config(data_path, max_length, run_config)
    tokenized, samples = prepare_eval_file(data_path, data_config, loaded.tokenizer)
    if any(m in LABEL_METRICS for m in metrics):
        labels = resolve_labels(labels, [s.reference for s in samples], where="--labels")
    if limit:
        tokenized, samples = tokenized[:limit], samples[:limit]
    device = next(loaded.model.parameters()).device
    precision = resolve_precision(run_config.train.precision if run_config else "auto", torch.device(device))
    options = replace(options, precision=precision)  # a baseline decodes in the run's precision too
    result: dict = {"model": str(spec), "data": str(data_path), "samples": len(tokenized)}
    if LOSS_METRICS & set(metrics):
        padding_free = _padding_free_loss(loaded.model, tokenized, device, precision)
        losses = evaluate_loss(loaded.model, tokenized, pad_token_id=loaded.tokenizer.pad_token_id, precision=precision,
                               batch_size=LOSS_BATCH_SIZE, share_prefix=padding_free)
        result["loss"] = losses.get("eval_loss")
        result["perplexity"] = losses.get("eval_perplexity")
    task_metrics = [m for m in metrics if m not in LOSS_METRICS]
    replies: list[str] = []
    classified = None
    if task_metrics and samples:
        renderer = ChatRenderer(loaded.tokenizer, data_config.chat_template)
        task = evaluate_task(loaded.model, renderer, samples, task_metrics, options, labels=labels,
                             label_score=label_score, precision=precision, max_length=max_length)
        result.update(task.metrics)
        replies, classified = task.replies, task.labels
        if classified is not None:
            result["labels"] = classified.labels
            result["label_confusion"] = classified.confusion
    return result, samples, replies, loaded.run_config, classified


LOSS_BATCH_SIZE = 8


def _padding_free_loss(model, tokenized, device: torch.device, precision: str) -> bool:
    """Whether the loss runs as a training run's held-out loss does where training would take the matmul
    attention path (CPU, llama-style models, rows short enough): padding-free batches holding their samples' shared
    prefix once. The same loss as padded batches, from fewer tokens, and the number the run itself reported. Prompt
    and prefix tuning need padded rows, as in training: their virtual tokens go before each row."""
    if not tokenized or uses_virtual_tokens(model):
        return False
    longest = max(len(sample.input_ids) for sample in tokenized)
    attention = training_attention("auto", device, precision, longest, model, LOSS_BATCH_SIZE)
    return attention == MATMUL


def _evaluate_pairs(spec, data_path: Path, metrics: list[str], *, limit, max_length, output, baseline) -> dict:
    """preference_accuracy / reward_margin of `spec` on a preference file, with a baseline's differences and
    their 95% paired-bootstrap intervals."""
    result, margins, run_config = _score_pairs(spec, data_path, metrics, limit, max_length)
    if baseline is not None:
        if baseline == "base":
            baseline = run_config.model
        base_result, base_margins, _ = _score_pairs(baseline, data_path, metrics, limit, max_length, run_config)
        result["baseline"] = base_result
        per_pair = {"preference_accuracy": lambda m: [float(x > 0) for x in m], "reward_margin": list}
        result["comparison"] = {"differences": {
            name: bootstrap_difference(per_pair[name](margins), per_pair[name](base_margins)) for name in metrics}}
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        (output / "eval.json").write_text(result_json(result))
    if run_config is not None and Path(str(spec)).is_dir():
        record_evaluation(Path(str(spec)), result, metrics)
    return result


def _score_pairs(spec, data_path: Path, metrics: list[str], limit, max_length, run_config=None):
    """(metrics, per-pair margins, the run's config) of one model on a preference file."""
    loaded = load_for_inference(spec)
    run_config = loaded.run_config or run_config
    data_config = DataConfig(train=data_path, eval_split=0, max_length=max_length, overlong="truncate")
    if run_config is not None:
        data_config = data_config.model_copy(
            update={"chat_template": run_config.data.chat_template, "columns": run_config.data.columns})
    prepared = prepare_preference_data(data_config, loaded.tokenizer, seed=0)
    if prepared.kind != "preference":
        raise ConfigError(f"{data_path} holds {prepared.kind} rows; {', '.join(metrics)} need preference pairs "
                          "(prompt/chosen/rejected)", where="--metrics")
    pairs = list(prepared.train)[:limit] if limit else list(prepared.train)
    device = next(loaded.model.parameters()).device
    precision = resolve_precision(run_config.train.precision if run_config else "auto", torch.device(device))
    if loaded.run_config is not None and loaded.run_config.objective.name == "reward":  # ranked by its scores
        from tunelab.infer.score import reward_scores

        sequences = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        scores = reward_scores(loaded.model, sequences, pad_token_id=loaded.tokenizer.pad_token_id)
        margins = [c - r for c, r in zip(scores[: len(pairs)], scores[len(pairs) :], strict=True)]
    else:  # ranked by the model's own log-probabilities
        margins = pair_margins(loaded.model, pairs, pad_token_id=loaded.tokenizer.pad_token_id,
                               precision=precision)
    result: dict = {"model": str(spec), "data": str(data_path), "samples": len(pairs)}
    if "preference_accuracy" in metrics:
        result["preference_accuracy"] = sum(m > 0 for m in margins) / max(1, len(margins))
    if "reward_margin" in metrics:
        result["reward_margin"] = sum(margins) / max(1, len(margins))
    return result, margins, loaded.run_config
