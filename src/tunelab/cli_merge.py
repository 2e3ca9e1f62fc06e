"""`tunelab merge`: fold one run's adapter into its base, or combine several runs' adapters into one model."""

from __future__ import annotations

from pathlib import Path

import typer

from tunelab.cli_common import check_output_folder, console, fail, quiet_libraries
from tunelab.errors import ConfigError, UserError

COMBINATION_HELP = (
    "How several runs combine (each run's change to a weight is its task vector ΔW): linear (default) adds "
    "w·ΔW of each run, exactly; ties keeps each run's largest --density of changes, elects a sign per weight and "
    "averages the runs that agree; dare_linear / dare_ties drop changes at random (keeping --density, rescaled) "
    "before linear / ties; svd is linear cut to the largest adapter rank; cat is PEFT's concatenation, which "
    "folded is linear exactly.")
WEIGHTS_HELP = (
    "One weight per run, comma-separated (e.g. 0.6,0.4), used as given (negative subtracts). Default: equal, "
    "summing to 1 (an average) for linear, dare_linear, svd and cat; 1 each for ties and dare_ties, which already "
    "average the runs that agree.")


def merge(
    runs: list[Path] = typer.Argument(..., help="A run directory holding an adapter; several to combine them "
                                      "(LoRA, DoRA or rsLoRA runs of one method on the same base model)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the merged model."),
    overwrite: bool = typer.Option(False, "--overwrite"),
    combination: str | None = typer.Option(None, "--combination", help=COMBINATION_HELP),
    weights: str | None = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    density: float | None = typer.Option(None, "--density", help="ties and dare: fraction of each run's changes "
                                         "kept (default 0.5)."),
    majority_sign: str = typer.Option("total", "--majority-sign", help="ties and dare_ties: a weight's sign is "
                                      "that of the runs' summed changes (total) or the one most runs have "
                                      "(frequency)."),
    seed: int = typer.Option(0, "--seed", help="Seeds DARE's random drops: the same seed gives the same model."),
) -> None:
    """Fold a run's adapter into its base model and save a plain model folder; given several runs, combine their
    adapters first (multi-task merging) and record how in merge.json."""
    quiet_libraries()
    from tunelab.infer.load import refuse_unfinished_run
    from tunelab.infer.merge import merge_adapter
    from tunelab.infer.merge_adapters import Combination, merge_runs, parse_weights

    try:
        if len(runs) == 1:
            given = [name for name, value in (("--combination", combination), ("--weights", weights),
                                              ("--density", density)) if value is not None]
            if given:
                raise ConfigError(f"{given[0]} combines several runs; one run's adapter is folded in as trained",
                                  where=given[0])
            refuse_unfinished_run(runs[0])
            check_output_folder(output, "--output")
            merge_adapter(runs[0], output, overwrite=overwrite)
        else:
            check_output_folder(output, "--output")
            recipe = Combination(combination or "linear", parse_weights(weights), density, majority_sign, seed)
            merge_runs(runs, output, recipe, overwrite=overwrite)
    except UserError as err:
        fail(err)
    console.print(f"merged model saved to {output}")
