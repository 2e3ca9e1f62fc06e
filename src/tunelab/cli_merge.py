"""`tunelab merge`: fold one run's adapter into its base, or combine several runs' adapters into one model."""

from __future__ import annotations

from pathlib import Path

import typer

from tunelab.cli_common import console, fail, quiet_libraries
from tunelab.errors import UserError

COMBINATION_HELP = (
    "How several runs combine (each run's change to a weight is its task vector ΔW): linear (default) adds "
    "w·ΔW of each run, exactly; ties keeps each run's largest --density of changes, elects a sign per weight from "
    "the weighted changes and takes the weighted average of the runs that agree; dare_linear / dare_ties drop "
    "changes at random (keeping --density, rescaled) before linear / ties; svd is linear cut to the largest "
    "adapter rank; cat is PEFT's concatenation, which folded is linear exactly.")
WEIGHTS_HELP = (
    "One weight per run, comma-separated (e.g. 0.6,0.4), used as given (negative subtracts). Default: equal, "
    "summing to 1 (an average) for linear, dare_linear, svd and cat; 1 each for ties and dare_ties, which divide "
    "by the agreeing runs' summed weights, so there only their ratios count (1,0 keeps the first run's changes alone).")


def merge(
    runs: list[Path] = typer.Argument(..., help="A run directory holding an adapter; several to combine them "
                                      "(LoRA, DoRA or rsLoRA runs of one method on the same base model)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the merged model."),
    overwrite: bool = typer.Option(False, "--overwrite"),
    combination: str | None = typer.Option(None, "--combination", help=COMBINATION_HELP),
    weights: str | None = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    density: float | None = typer.Option(None, "--density", help="ties and dare: fraction of each run's changes "
                                         "kept (default 0.5)."),
    majority_sign: str | None = typer.Option(None, "--majority-sign", help="ties and dare_ties: a weight's sign "
                                             "is that of the runs' summed weighted changes (total, the default) or "
                                             "the one most runs' weighted changes have (frequency)."),
    seed: int | None = typer.Option(None, "--seed", help="dare_linear and dare_ties: seeds the random drops "
                                    "(default 0); the same seed gives the same model."),
) -> None:
    """Fold a run's adapter into its base model and save a plain model folder; given several runs, combine their
    adapters first (multi-task merging) and record how in merge.json."""
    quiet_libraries()
    from tunelab.infer import merge as merging
    from tunelab.infer.merge_adapters import Combination, parse_weights

    try:
        recipe = Combination(combination, parse_weights(weights), density, majority_sign, seed)
        merging.merge(runs, output, recipe, overwrite=overwrite)
    except UserError as err:
        fail(err)
    console.print(f"merged model saved to {output}")
