"""`tunelab data`: look at data the way training will see it (inspect, check-template)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from tunelab.cli_common import check_output_file, console, fail, quiet_libraries
from tunelab.config import ROLLOUT_OBJECTIVES
from tunelab.errors import UnknownFormat, UserError

data_app = typer.Typer(help="Look at data the way training will see it.", no_args_is_help=True)


@data_app.command("inspect")
def data_inspect(
    target: Path = typer.Argument(..., help="A data file, or a run config (YAML) whose data.train is inspected."),
    model: str | None = typer.Option(None, help="Model whose tokenizer and chat template to use (default: the "
                                     "config's model, else smollm2-135m-instruct)."),
    max_length: int | None = typer.Option(None, min=8, help="data.max_length to check against."),
    samples: int = typer.Option(2, min=0, help="Samples rendered with their trained tokens marked."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    histogram: Path | None = typer.Option(None, help="Write a token-length histogram PNG here."),
    column: list[str] = typer.Option(None, "--column", help="FIELD=COLUMN: read the file's COLUMN as tunelab's "
                                     "FIELD (data.columns), e.g. --column 'prompt=Consumer complaint narrative'."),
) -> None:
    """Formats, invalid rows, token lengths, duplicates, train/eval overlap and loss masks of a dataset."""
    quiet_libraries()
    from tunelab.config import DataConfig, load_config
    from tunelab.data.columns import parse_column_options
    from tunelab.data.inspect import inspect_data, is_run_config, render_text, write_length_histogram
    from tunelab.models.load import load_tokenizer
    from tunelab.models.resolve import resolve_model

    try:
        if histogram is not None:
            check_output_file(histogram, "--histogram")
        run_config = load_config(target) if is_run_config(target) else None
        data_config = run_config.data if run_config else DataConfig(train=target)
        if max_length is not None:
            data_config = data_config.model_copy(update={"max_length": max_length})
        if column:
            data_config = data_config.model_copy(update={"columns": parse_column_options(column)})
        spec = model or (run_config.model if run_config else "smollm2-135m-instruct")
        tokenizer = load_tokenizer(resolve_model(spec))
        seed = run_config.train.seed if run_config else None
        grpo = run_config is not None and run_config.objective.name in ROLLOUT_OBJECTIVES
        report = inspect_data(target, tokenizer=tokenizer, data_config=data_config, seed=seed,
                              samples_to_show=samples,
                              completion_tokens=run_config.objective.max_new_tokens if grpo else 0)
    except UnknownFormat as unknown:  # still a report: rows, columns, and the mappings that would work
        _profile(unknown, as_json)
        return
    except UserError as err:
        fail(err)
    if histogram is not None:
        write_length_histogram(report, histogram)
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        typer.echo(render_text(report, color=console.is_terminal))


def _profile(unknown, as_json: bool) -> None:
    from tunelab.data.profile import profile_file, render_profile

    try:
        profile = profile_file(unknown.where, unknown.message)
    except UserError as err:
        fail(err)
    print(json.dumps(profile.to_json(), indent=2)) if as_json else typer.echo(render_profile(profile))


@data_app.command("check-template")
def data_check_template(
    target: Path = typer.Argument(..., help="A chat data file, or a run config (YAML) whose data is checked."),
    model: str | None = typer.Option(None, help="Model whose tokenizer, chat template and stop tokens to use "
                                     "(default: the config's model, else smollm2-135m-instruct)."),
    limit: int | None = typer.Option(None, min=1, help="Check a seeded sample of N conversations (default: all)."),
    train_on: str | None = typer.Option(None, help="data.train_on to check: all_assistant, last_assistant, all."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check that training tokenises each conversation exactly as `generate` builds its prompt and trains every
    assistant reply with its end-of-turn token and nothing else. Exit code 2 when a check fails."""
    quiet_libraries()
    from tunelab.config import DataConfig, load_config
    from tunelab.data.inspect import is_run_config
    from tunelab.data.template_check import check_data
    from tunelab.data.template_report import render_check_text
    from tunelab.models.load import load_tokenizer
    from tunelab.models.resolve import resolve_model

    try:
        run_config = load_config(target) if is_run_config(target) else None
        data_config = run_config.data if run_config else DataConfig(train=target, eval_split=0)
        if train_on is not None:
            if train_on not in ("all_assistant", "last_assistant", "all"):
                raise UserError("must be all_assistant, last_assistant or all", where="--train-on")
            data_config = data_config.model_copy(update={"train_on": train_on})
        spec = model or (run_config.model if run_config else "smollm2-135m-instruct")
        model_path = resolve_model(spec)
        report = check_data(data_config, tokenizer=load_tokenizer(model_path), model_path=model_path,
                            model_name=spec, target=str(target), seed=run_config.train.seed if run_config else 0,
                            limit=limit)
    except UserError as err:
        fail(err)
    typer.echo(json.dumps(report.to_json(), indent=2) if as_json else render_check_text(report))
    if not report.ok:
        raise typer.Exit(2)
