"""`tunelab eval`: loss, perplexity and task metrics of a run or model on any supported data file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tunelab.config import DataConfig
from tunelab.data.prepare import prepare_eval_file
from tunelab.data.template import ChatRenderer
from tunelab.errors import ConfigError
from tunelab.eval.evaluate import evaluate_generations, evaluate_loss
from tunelab.eval.metrics import METRICS, is_custom_metric
from tunelab.eval.paired import compare_replies
from tunelab.infer.generate import GenerationOptions
from tunelab.infer.load import load_for_inference
from tunelab.train.precision import resolve_precision

LOSS_METRICS = {"loss", "perplexity"}


def check_metric_names(names: list[str]) -> None:
    unknown = [n for n in names if n not in LOSS_METRICS and n not in METRICS and not is_custom_metric(n)]
    if unknown:
        known = ", ".join(sorted(LOSS_METRICS | set(METRICS))) + " or path/to/file.py:function"
        raise ConfigError(f"unknown metric(s) {', '.join(unknown)}; known: {known}", where="--metrics")


def evaluate_model(
    spec: str,
    data_path: Path,
    metrics: list[str],
    *,
    options: GenerationOptions,
    limit: int | None = None,
    max_length: int = 1024,
    output: Path | None = None,
    baseline: str | None = None,
) -> dict:
    """Evaluate `spec` on `data_path`. Returns the metrics; with `output`, writes eval.json and the
    per-sample replies (eval_samples.jsonl) there. With `baseline` (a model spec, or `base` for a run's base
    model), the baseline is evaluated on the same samples and the differences come with 95% intervals."""
    check_metric_names(metrics)
    result, samples, replies, run_config = _score(spec, data_path, metrics, options, limit, max_length)
    if baseline is not None:
        if baseline == "base":
            if run_config is None:
                raise ConfigError("--baseline base needs a tunelab run directory", where="--baseline")
            baseline = run_config.model
        base_result, _, base_replies, _ = _score(baseline, data_path, metrics, options, limit, max_length,
                                                 run_config=run_config)
        result["baseline"] = base_result
        if replies:
            names = [m for m in metrics if m not in LOSS_METRICS]
            references = [s.reference for s in samples]
            result["comparison"] = compare_replies(names, references, replies, base_replies,
                                                   [s.where for s in samples])
        if "loss" in result:
            result.setdefault("comparison", {}).setdefault("differences", {})["loss"] = {
                "difference": result["loss"] - base_result["loss"]
            }
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        (output / "eval.json").write_text(json.dumps(result, indent=2))
        with open(output / "eval_samples.jsonl", "w") as handle:
            for sample, reply in zip(samples, replies, strict=False):
                record = {"where": sample.where, "prompt": sample.messages[:-1], "reference": sample.reference,
                          "reply": reply}
                handle.write(json.dumps(record) + "\n")
    return result


def _score(spec, data_path, metrics, options, limit, max_length, run_config=None):
    """(metrics, samples, replies, the run's config) of one model; `run_config` fixes the template settings
    when a baseline is scored for a run, so both see identical prompts."""
    loaded = load_for_inference(spec)
    run_config = loaded.run_config or run_config
    data_config = DataConfig(train=data_path, eval_split=0, max_length=max_length, overlong="truncate")
    if run_config is not None:
        data_config = data_config.model_copy(
            update={"chat_template": run_config.data.chat_template, "train_on": run_config.data.train_on}
        )
    tokenized, samples = prepare_eval_file(data_path, data_config, loaded.tokenizer)
    if limit:
        tokenized, samples = tokenized[:limit], samples[:limit]
    device = next(loaded.model.parameters()).device
    precision = resolve_precision(run_config.train.precision if run_config else "auto", torch.device(device))
    result: dict = {"model": str(spec), "data": str(data_path), "samples": len(tokenized)}
    if LOSS_METRICS & set(metrics):
        losses = evaluate_loss(loaded.model, tokenized, pad_token_id=loaded.tokenizer.pad_token_id, precision=precision)
        result["loss"] = losses.get("eval_loss")
        result["perplexity"] = losses.get("eval_perplexity")
    generation_metrics = [m for m in metrics if m not in LOSS_METRICS]
    replies: list[str] = []
    if generation_metrics and samples:
        renderer = ChatRenderer(loaded.tokenizer, data_config.chat_template)
        scores, replies = evaluate_generations(loaded.model, renderer, samples, generation_metrics, options)
        result.update(scores)
    return result, samples, replies, loaded.run_config
