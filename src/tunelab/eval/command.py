"""`tunelab eval`: loss, perplexity and task metrics of a run or model on any supported data file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tunelab.config import DataConfig
from tunelab.data.prepare import prepare_eval_file
from tunelab.errors import ConfigError
from tunelab.eval.evaluate import evaluate_generations, evaluate_loss
from tunelab.eval.metrics import METRICS, is_custom_metric
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
) -> dict:
    """Evaluate `spec` on `data_path`. Returns the metrics; with `output`, writes eval.json and the
    per-sample replies (eval_samples.jsonl) there."""
    check_metric_names(metrics)
    loaded = load_for_inference(spec)
    data_config = DataConfig(train=data_path, eval_split=0, max_length=max_length, overlong="truncate")
    if loaded.run_config is not None:
        data_config = data_config.model_copy(
            update={"chat_template": loaded.run_config.data.chat_template, "train_on": loaded.run_config.data.train_on}
        )
    tokenized, samples = prepare_eval_file(data_path, data_config, loaded.tokenizer)
    if limit:
        tokenized, samples = tokenized[:limit], samples[:limit]
    device = next(loaded.model.parameters()).device
    requested = loaded.run_config.train.precision if loaded.run_config else "auto"
    precision = resolve_precision(requested, torch.device(device))
    result: dict = {"model": str(spec), "data": str(data_path), "samples": len(tokenized)}
    if LOSS_METRICS & set(metrics):
        losses = evaluate_loss(loaded.model, tokenized, pad_token_id=loaded.tokenizer.pad_token_id, precision=precision)
        result["loss"] = losses.get("eval_loss")
        result["perplexity"] = losses.get("eval_perplexity")
    generation_metrics = [m for m in metrics if m not in LOSS_METRICS]
    replies: list[str] = []
    if generation_metrics and samples:
        scores, replies = evaluate_generations(loaded.model, loaded.renderer, samples, generation_metrics, options)
        result.update(scores)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        (output / "eval.json").write_text(json.dumps(result, indent=2))
        with open(output / "eval_samples.jsonl", "w") as handle:
            for sample, reply in zip(samples, replies, strict=False):
                record = {"where": sample.where, "prompt": sample.messages[:-1], "reference": sample.reference,
                          "reply": reply}
                handle.write(json.dumps(record) + "\n")
    return result
