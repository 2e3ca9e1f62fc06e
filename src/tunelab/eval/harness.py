"""Standard benchmarks through EleutherAI's lm-evaluation-harness (`lm-eval`, the `lmeval` extra), before and after.

`tunelab eval RUN --tasks arc_easy,hellaswag --baseline base` hands the run's model (and the base model) to the
harness as loaded objects, so the harness's own task definitions, prompts, few-shot sampling and metrics score
them: the numbers are comparable to published ones and to `lm_eval`'s own command. What tunelab adds is the pairing:
both models answer the same documents, so each difference comes with a 95% paired-bootstrap interval, and the
result is kept in the run directory (RUN/evals/) where report.html shows it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from tunelab.data.hf_datasets import first_line, hub_resolvable
from tunelab.errors import ConfigError, UserError
from tunelab.eval.paired import bootstrap_difference

INSTALL_HINT = "pip install 'tunelab[lmeval]' (scripts/setup.sh --dev installs it)"
_NOT_METRICS = {"sample_len", "sample_count"}
"""Numbers the harness reports beside the metrics: how many documents were scored."""


@dataclass
class HarnessRun:
    """One model's harness results: aggregate metrics keyed `task/metric`, and each document's scores."""

    metrics: dict[str, float]
    per_document: dict[str, dict[int, float]]
    """`task/metric` -> {doc_id: score}: what the paired differences are computed from."""
    documents: int


def parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise ConfigError("name at least one lm-eval task (e.g. arc_easy,hellaswag)", where="--tasks")
    return tasks


def evaluate_tasks(spec: str, tasks: list[str], *, baseline: str | None = None, include_path: Path | None = None,
                   limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 8,
                   output: Path | None = None) -> dict:
    """lm-eval `tasks` on `spec` (and on `baseline`, `base` meaning a run's base model), as tunelab's evaluation
    result: `task/metric` numbers, the baseline's, and the paired differences with 95% intervals. A run directory
    keeps the result (RUN/evals/lm-eval-<tasks>.json) and its report shows it."""
    from tunelab.eval.command import check_output_files
    from tunelab.eval.recorded import record_evaluation, result_json
    from tunelab.infer.load import is_run_dir, load_generator

    if baseline == "base" and not (Path(str(spec)).is_dir() and is_run_dir(Path(str(spec)))):
        raise ConfigError("--baseline base needs a tunelab run directory", where="--baseline")
    if output is not None:
        check_output_files(output, ["eval.json"])
    loaded = load_generator(spec)
    after = _run_harness(loaded.model, loaded.tokenizer, tasks, include_path, limit, num_fewshot, batch_size)
    result: dict = {"model": str(spec), "data": f"lm-eval:{','.join(tasks)}", "samples": after.documents,
                    "harness": _harness_settings(include_path, limit, num_fewshot), **after.metrics}
    if baseline is not None:
        if baseline == "base":
            baseline = loaded.run_config.model
        del loaded  # one model in memory at a time
        base = load_generator(baseline)
        before = _run_harness(base.model, base.tokenizer, tasks, include_path, limit, num_fewshot, batch_size)
        result["baseline"] = {"model": str(baseline), **before.metrics}
        result["comparison"] = {"differences": paired_differences(after, before)}
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        (output / "eval.json").write_text(result_json(result))
    if Path(str(spec)).is_dir() and (Path(str(spec)) / "config.yaml").is_file():
        record_evaluation(Path(str(spec)), result, ["lm-eval"])
    return result


def paired_differences(after: HarnessRun, before: HarnessRun) -> dict[str, dict[str, float]]:
    """Per `task/metric`: after - before over the documents both scored, with a 95% paired-bootstrap interval."""
    differences = {}
    for key, scores in after.per_document.items():
        base = before.per_document.get(key, {})
        shared = sorted(set(scores) & set(base))
        if shared:
            differences[key] = bootstrap_difference([scores[d] for d in shared], [base[d] for d in shared])
    return differences


def _harness_settings(include_path: Path | None, limit: int | None, num_fewshot: int | None) -> dict:
    from importlib.metadata import version

    return {"lm_eval": version("lm_eval"), "include_path": str(include_path) if include_path else None,
            "limit": limit, "num_fewshot": num_fewshot}


def _run_harness(model, tokenizer, tasks: list[str], include_path: Path | None, limit: int | None,
                 num_fewshot: int | None, batch_size: int) -> HarnessRun:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(f"lm-eval is not installed: {INSTALL_HINT}", where="--tasks") from None
    if include_path is not None and not Path(include_path).exists():
        raise ConfigError("no such folder or task file", where=f"--include-path {include_path}")
    for name in ("lm-eval", "lm_eval"):  # its progress and per-request logging would bury tunelab's output
        logging.getLogger(name).setLevel(logging.ERROR)
    manager = _task_manager(TaskManager, tasks, include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or in {include_path}" if include_path else " (add your own task YAMLs with --include-path)"
        raise ConfigError(f"unknown lm-eval task(s) {', '.join(unknown)}: not in lm-eval's task list{where}",
                          where="--tasks")
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        with _offline_without_network():
            out = lm_eval.simple_evaluate(model=wrapped, tasks=tasks, task_manager=manager, limit=limit,
                                          num_fewshot=num_fewshot, log_samples=True, bootstrap_iters=0,
                                          verbosity="ERROR")
    except ConnectionError as err:
        raise ConfigError(f"a task's dataset is not on this machine and the Hugging Face hub cannot be reached "
                          f"({first_line(err)}); run it where the hub is reachable once (the datasets cache keeps "
                          "it), or use a task whose data is local (dataset_path: json with data_files, in a YAML "
                          "under --include-path)", where="--tasks") from None
    except FileNotFoundError as err:
        raise ConfigError(f"a task's data file is missing ({first_line(err)}); lm-eval reads a task's data_files "
                          f"relative to the current folder ({Path.cwd()}), not to the task's YAML: run from the "
                          "folder they are relative to, or write absolute paths", where="--tasks") from None
    except ValueError as err:
        if not str(err).startswith("Sample larger than population"):  # random.sample: more shots than documents
            raise
        raise _too_many_shots(num_fewshot) from None
    return _collect(out)


def _too_many_shots(num_fewshot: int | None) -> ConfigError:
    """The error for few-shot examples the harness cannot draw: a task has fewer documents to draw them from."""
    if num_fewshot is None:
        return ConfigError("a task asks for more few-shot examples than it has documents to draw them from; set "
                           "--num-fewshot lower", where="--tasks")
    return ConfigError(f"{num_fewshot} few-shot examples are more than a task has documents to draw them from; "
                       "choose fewer", where="--num-fewshot")


@contextlib.contextmanager
def _offline_without_network():
    """Without a network, datasets' offline mode: tasks whose data is cached load, the others fail at once instead
    of after the hub client's ~25 s of retries per file."""
    import datasets
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or hub_resolvable():
        yield
        return
    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved




def _task_manager(manager_class, tasks: list[str], include_path: Path | None):
    """The harness's task index: the user's folder alone when it defines every task asked for (indexing the
    harness's own ~15,000 task files takes ~12 s), else both; built once per process (a baseline reuses it)."""
    folder = include_path.parent if include_path is not None and include_path.is_file() else include_path
    if folder is not None:
        own = _indexed(manager_class, str(folder), False)
        if all(t in own.all_tasks for t in tasks):
            return own
    return _indexed(manager_class, str(folder) if folder else None, True)


@functools.lru_cache(maxsize=4)
def _indexed(manager_class, folder: str | None, include_defaults: bool):
    return manager_class(include_path=folder, include_defaults=include_defaults, verbosity="ERROR")


def _collect(out: dict) -> HarnessRun:
    """The harness's output as `task/metric` aggregates (`acc,none` -> `acc`; other filters keep their name) and
    per-document scores."""
    metrics: dict[str, float] = {}
    per_document: dict[str, dict[int, float]] = {}
    documents = 0
    for task, values in out["results"].items():
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if "_stderr" in metric or metric in _NOT_METRICS or not isinstance(value, (int, float)) \
                    or isinstance(value, bool):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                continue
            name = metric if filter_name in ("", "none") else f"{metric}[{filter_name}]"
            metrics[f"{task}/{name}"] = float(value)
    for task, samples in (out.get("samples") or {}).items():
        documents += len(samples)
        for sample in samples:
            filter_name = sample.get("filter", "none")
            for metric in sample.get("metrics", []):
                value = sample.get(metric)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    name = metric if filter_name in ("", "none") else f"{metric}[{filter_name}]"
                    per_document.setdefault(f"{task}/{name}", {})[int(sample["doc_id"])] = float(value)
    return HarnessRun(metrics, per_document, documents)
