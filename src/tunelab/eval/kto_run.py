"""`tunelab eval` of a KTO run: its loss on feedback rows as KTO defines it, and the rewards, log-probabilities
and KL estimate its before/after table shows, computed by the code its training evaluates with (evaluate_objective
on the objective it trains with, in micro-batches of train.batch_size, since KTO's KL reference point is a
micro-batch's mean).

The reference is the run's: its starting model, the adapter switched off where the method has one, else loaded
as training loaded it. Its log-probabilities are computed once (precompute_reference) and shared by the run and a
baseline, so a baseline's numbers say how far that model stands from the same reference (`--baseline base` gives
the run's numbers before training: loss 0.5 x the label's weight, rewards and KL 0)."""

from __future__ import annotations

from pathlib import Path

from tunelab.config import RunConfig
from tunelab.errors import ConfigError
from tunelab.eval.preference import evaluate_objective
from tunelab.eval.run_rows import baseline_spec, data_label, keep_result, rows_to_score, run_device_precision
from tunelab.infer.load import load_generator
from tunelab.models.load import load_tokenizer
from tunelab.objectives import reference_for
from tunelab.objectives.kto import KtoObjective
from tunelab.objectives.pairs import Reference
from tunelab.objectives.reference import precompute_reference


def check_kto_inputs(spec: str, run_config: RunConfig, data_path: Path | None, metrics: list[str] | None,
                     limit: int | None) -> None:
    """Refuse before any model loads: metrics other than the objective's own, rows that cannot be read."""
    _check_metrics(metrics)
    rows_to_score(run_config, data_path, load_tokenizer(Path(spec)), _objective(run_config), limit)


def evaluate_kto_run(spec: str, run_config: RunConfig, data_path: Path | None, metrics: list[str] | None = None, *,
                     limit: int | None = None, output: Path | None = None, baseline: str | None = None) -> dict:
    """The run's KTO loss and metrics on the rows (and `baseline`'s, a model spec or `base`, against the same
    reference, with the differences). Writes eval.json under `output` and keeps the result with the run."""
    _check_metrics(metrics)
    device, precision = run_device_precision(run_config)
    tokenizer = load_tokenizer(Path(spec))
    objective = _objective(run_config)
    rows = rows_to_score(run_config, data_path, tokenizer, objective, limit)
    data = data_label(run_config, data_path)
    model = load_generator(spec, device).model
    against = baseline_spec(baseline, run_config)
    scoring = {"pad_token_id": tokenizer.pad_token_id, "precision": precision,
               "batch_size": run_config.train.batch_size}
    starting = _score_reference(model, run_config, objective, rows, device, scoring)
    result = _result(spec, data, rows, evaluate_objective(model, objective, rows, **scoring))
    if against is not None:
        loaded = starting if starting is not None and against == run_config.model else load_generator(against, device)
        if loaded.tokenizer.get_vocab() != tokenizer.get_vocab():
            raise _other_tokenizer(against)
        base = _result(against, data, rows, evaluate_objective(loaded.model, objective, rows, **scoring))
        result["baseline"] = base
        result["comparison"] = {"differences": {key: {"difference": value - base[key]} for key, value in
                                                result.items() if key in base and _is_number(value)
                                                and _is_number(base[key]) and key != "samples"}}
    return keep_result(spec, result, ["kto"], output)


def check_kto_baseline(spec: str, against: str, tokenizer_folder: Path) -> None:
    """Refuse, before the run is evaluated, a baseline whose tokenizer (in `tokenizer_folder`) is not the run's."""
    if load_tokenizer(tokenizer_folder).get_vocab() != load_tokenizer(Path(spec)).get_vocab():
        raise _other_tokenizer(against)


def _other_tokenizer(against: str) -> ConfigError:
    return ConfigError(f"{against} has another tokenizer than the run: KTO compares log-probabilities of the same "
                       "tokens under the run's reference model", where="--baseline")


def _check_metrics(metrics: list[str] | None) -> None:
    if metrics is not None and set(metrics) - {"loss"}:
        raise ConfigError("a KTO run is scored by its own evaluation on feedback rows (loss, rewards/chosen, "
                          "rewards/rejected, logps/chosen, logps/rejected, kl); leave --metrics out",
                          where="--metrics")


def _objective(run_config: RunConfig) -> KtoObjective:
    """The objective the run trains with, reading reference log-probabilities from its rows (_score_reference)."""
    return KtoObjective(run_config.objective, Reference(switch_off=None))


def _score_reference(model, run_config: RunConfig, objective: KtoObjective, rows: list, device: str,
                     scoring: dict):
    """Give every row its reference log-probabilities, as the run's reference computes them (reference_for): the
    run's model with its adapter switched off, or its starting model loaded (full fine-tuning, or
    objective.reference: precompute). Returns that loaded starting model (None when the adapter served)."""
    reference = reference_for(run_config.objective, run_config.method.name)
    if reference.switch_off is not None:
        with reference.switch_off(model):
            precompute_reference(model, objective, [rows], **scoring)
        return None
    starting = load_generator(run_config.model, device)
    precompute_reference(starting.model, objective, [rows], **scoring)
    return starting


def _result(spec: str, data: str, rows: list, metrics: dict[str, float]) -> dict:
    """One model's numbers, named as its training logs them without eval_ (loss, rewards/chosen, ..., kl)."""
    result: dict = {"model": str(spec), "data": data, "objective": "kto", "samples": len(rows)}
    result.update({key.removeprefix("eval_"): value for key, value in metrics.items()})
    return result


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
