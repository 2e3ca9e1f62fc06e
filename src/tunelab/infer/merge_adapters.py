"""Fold several LoRA-family runs trained on one base into one plain model (multi-task merging).

Each run's change to a weight, its task vector ΔW = (base with the adapter folded in) - base, is computed exactly
(B·A·scale for LoRA and rsLoRA; through PEFT's own merge for DoRA, whose magnitudes rescale whole columns), then
the task vectors are combined and added to the base, as mergekit merges task vectors of full models: linear and
dare_linear with PEFT's merge functions (peft.utils.merge_utils, the ones add_weighted_adapter calls), ties and
dare_ties with PEFT's pruning and mergekit's weighted disjoint merge (PEFT's elects the sign from the unweighted
task vectors and divides by the number of agreeing runs, so a run of weight 0 still halves the others' changes).

Why not PEFT's add_weighted_adapter: it mixes the A and B factors separately and multiplies the results, so its
`linear`, `ties` and `dare_*` carry cross terms B_i·A_j (with weights 0.5, 0.5 as large as the changes
themselves; its docstring calls `linear` "a very rough approximation"); the adapter it builds takes lora_alpha = r,
which under rsLoRA scales it by sqrt(r); and a DoRA run's trained magnitudes are replaced by fresh ones. Folded
task vectors have none of these problems and no rank to respect, because the result is folded anyway.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.errors import ConfigError
from tunelab.infer.merge import (
    adapter_load_refused,
    check_adapter_weights,
    check_merge_output,
    check_run_dir,
    save_merged,
)

COMBINATIONS = ("linear", "ties", "dare_linear", "dare_ties", "svd", "cat")
PRUNING = ("ties", "dare_linear", "dare_ties")
"""The combinations that keep only a fraction (`density`) of each task vector."""
SIGN_ELECTING = ("ties", "dare_ties")
"""The combinations that keep, entry by entry, only the runs agreeing with the elected sign, weighted-averaged."""
RANDOM = ("dare_linear", "dare_ties")
"""The combinations that drop changes at random (`seed`)."""
RECORD_FILE = "merge.json"
MAX_SEED = 2**63
"""torch.manual_seed takes a signed 64-bit seed; a larger one is an overflow traceback, not a user error."""


@dataclass(frozen=True)
class Combination:
    """How the runs' task vectors become one: the merged weight is W + combine(w_1·ΔW_1, ..., w_n·ΔW_n).

    `weights` None: equal weights as mergekit's defaults give, 1/n each for the summing combinations (linear,
    dare_linear, svd, cat: the average task vector) and 1 each for ties and dare_ties, whose disjoint merge divides
    each entry by the summed weights of the runs agreeing on its sign (so only the weights' ratios and signs matter
    there). Options a combination does not use are None, and refused when given; `kind` None is linear."""

    kind: str | None = None
    """One of COMBINATIONS (default linear)."""
    weights: tuple[float, ...] | None = None
    density: float | None = None
    """Fraction of each task vector kept by ties (largest magnitudes) and dare (at random, the rest rescaled)."""
    majority_sign: str | None = None
    """ties/dare_ties sign election (default total): `total` (sign of the summed weighted changes) or `frequency`
    (the sign most runs' weighted changes have)."""
    seed: int | None = None
    """Seeds DARE's random drops (default 0): the same runs, weights and seed give the same model."""

    def options_given(self) -> list[str]:
        """The `tunelab merge` options this combination sets, in the order of its --help: one run refuses them."""
        return [option for option, value in (("--combination", self.kind), ("--weights", self.weights),
                                             ("--density", self.density), ("--majority-sign", self.majority_sign),
                                             ("--seed", self.seed)) if value is not None]

    def check(self, runs: int) -> Combination:
        """This combination with its defaults filled in for `runs` runs; ConfigError naming the option if bad."""
        kind = self.kind or "linear"
        if kind not in COMBINATIONS:
            raise ConfigError(f"'{kind}' is not one of {', '.join(COMBINATIONS)}", where="--combination")
        weights = self.weights
        if weights is None:
            weights = (1.0,) * runs if kind in SIGN_ELECTING else (1.0 / runs,) * runs
        if len(weights) != runs:
            raise ConfigError(f"{len(weights)} weight(s) for {runs} runs: give one weight per run, in the order of "
                              "the runs", where="--weights")
        if not all(math.isfinite(w) for w in weights):
            raise ConfigError("weights must be finite numbers", where="--weights")
        density = self.density
        if kind in PRUNING:
            density = 0.5 if density is None else density
            if not 0 < density <= 1:
                raise ConfigError(f"{density} is not a fraction in (0, 1]: the share of each run's changes kept",
                                  where="--density")
        elif density is not None:
            raise ConfigError(f"{kind} keeps every change; --density applies to {', '.join(PRUNING)}",
                              where="--density")
        majority_sign = self.majority_sign
        if kind in SIGN_ELECTING:
            majority_sign = majority_sign or "total"
            if majority_sign not in ("total", "frequency"):
                raise ConfigError(f"'{majority_sign}' is not total or frequency", where="--majority-sign")
        elif majority_sign is not None:
            raise ConfigError(f"{kind} elects no sign; --majority-sign applies to {', '.join(SIGN_ELECTING)}",
                              where="--majority-sign")
        seed = self.seed
        if kind in RANDOM:
            seed = 0 if seed is None else seed
            if not 0 <= seed < MAX_SEED:
                raise ConfigError(f"{seed} is not a seed in [0, 2**63): give a smaller non-negative whole number",
                                  where="--seed")
        elif seed is not None:
            raise ConfigError(f"{kind} drops nothing at random; --seed applies to {', '.join(RANDOM)}",
                              where="--seed")
        return Combination(kind, tuple(float(w) for w in weights), density, majority_sign, seed)


def parse_weights(text: str | None) -> tuple[float, ...] | None:
    """`0.6,0.4` as numbers; ConfigError naming --weights when a part is not a number."""
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"'{text}' is not comma-separated numbers such as 0.6,0.4", where="--weights") from None


@dataclass(frozen=True)
class RunToMerge:
    """What merging needs from one run, read and checked before the base and the adapters are loaded."""

    path: Path
    base: Path
    method: str
    rank: int
    portable_template: str | None


def check_runs(run_dirs: list[Path]) -> list[RunToMerge]:
    """Each run read, and refused (naming it) unless all are finished LoRA-family adapter runs of one method on one
    base model, with one chat template. Comparing bases resolves each run's `model:` as training did, which may
    download a hub id, convert a .gguf or fold a chained run into the model cache (loading a model to do so)."""
    from tunelab.config import LoraMethod, QLoraMethod, load_config
    from tunelab.data.template import ChatRenderer
    from tunelab.infer.load import refuse_unfinished_run
    from tunelab.methods import has_frozen_base
    from tunelab.models.load import load_tokenizer
    from tunelab.models.resolve import resolve_model

    runs = []
    for run_dir in run_dirs:
        refuse_unfinished_run(run_dir)
        check_run_dir(run_dir)
        config = load_config(run_dir / "config.yaml")
        method = config.method
        if isinstance(method, QLoraMethod):
            raise ConfigError(f"{run_dir} is a QLoRA run: its adapter learned to correct a {method.bits}-bit base, so "
                              "its change to the full-precision weights is not exact and combining it with other runs "
                              "compounds that; merge it alone (`tunelab merge RUN`) or train with method.name=lora",
                              where="merge")
        if not isinstance(method, LoraMethod):
            what = f"a {method.name} adapter" if has_frozen_base(method.name) else "full weights, not an adapter"
            raise ConfigError(f"{run_dir} holds {what}: only LoRA, DoRA and rsLoRA runs combine (their changes are "
                              "weight matrices)", where="merge")
        if config.objective.name == "reward":
            raise ConfigError(f"{run_dir} is a reward model: its score head is trained whole, not as an adapter, and "
                              "heads do not combine; merge it alone", where="merge")
        check_adapter_weights(run_dir)
        template = ChatRenderer(load_tokenizer(run_dir), config.data.chat_template).portable_template
        runs.append(RunToMerge(run_dir, resolve_model(config.model).resolve(), method.name, method.r, template))
    first = runs[0]
    for run in runs[1:]:
        if run.base != first.base:
            raise ConfigError(f"{run.path} was trained on {run.base}, {first.path} on {first.base}: only runs on the "
                              "same base model combine", where="merge")
        if run.method != first.method:
            raise ConfigError(f"{run.path} is a {run.method} run, {first.path} a {first.method} run: combine runs "
                              "of one method", where="merge")
        if run.portable_template != first.portable_template:
            raise ConfigError(f"{run.path} trained with another chat template than {first.path} (data.chat_template"
                              "): the merged model can prompt only one way", where="merge")
    return runs


@dataclass(frozen=True)
class MergePlan:
    """A merge checked whole before the runs' adapters are loaded: the runs, the combination with its defaults, the
    output."""

    runs: list[RunToMerge]
    combination: Combination
    output: Path


def plan_merge(run_dirs: list[Path], output: Path, combination: Combination, *, overwrite: bool = False) -> MergePlan:
    """The merge of `run_dirs` into `output`, checked (ConfigError or ModelError naming the option or run) before
    the runs' adapters are loaded or `output` is written. Not free of side effects: resolving the runs' base model
    (check_runs) may download, convert or fold it into the model cache, as training on it would have."""
    if len(run_dirs) < 2:
        raise ConfigError("give two or more runs to combine", where="merge")
    combination = combination.check(len(run_dirs))
    seen: dict[Path, Path] = {}
    for run_dir in run_dirs:
        first = seen.get(run_dir.resolve())
        if first is not None:
            same = "" if str(first) == str(run_dir) else f" (as {first})"
            raise ConfigError(f"{run_dir} is given twice{same}: a run combined with itself is that run alone; give "
                              "each run once, or merge one run with `tunelab merge RUN`", where="merge")
        seen[run_dir.resolve()] = run_dir
    for run_dir in run_dirs:
        check_merge_output(run_dir, output, overwrite)
    return MergePlan(check_runs(run_dirs), combination, output)


def merge_runs(run_dirs: list[Path], output: Path, combination: Combination, *, overwrite: bool = False) -> Path:
    """Write the runs' adapters combined and folded into their shared base to `output`: safetensors, the tokenizer
    with the chat template the runs trained with, and merge.json recording runs, weights and combination."""
    return write_merge(plan_merge(run_dirs, output, combination, overwrite=overwrite))


def write_merge(plan: MergePlan) -> Path:
    """Carry out a checked merge: load the base with every adapter, fold the combined changes, save."""
    runs, combination = plan.runs, plan.combination
    model = _load_with_adapters(runs)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(combination.seed or 0)
        for layer in _lora_layers(model):
            _fold_combined(layer, [f"run{i}" for i in range(len(runs))], combination, max(r.rank for r in runs))
    merged = model.unload()
    _save(merged, runs, combination, plan.output)
    return plan.output


def _load_with_adapters(runs: list[RunToMerge]):
    """The shared base with every run's adapter attached, named run0, run1, ... in the order given."""
    from peft import PeftModel

    from tunelab.models.load import load_model

    base = load_model(runs[0].base, device="cpu")
    model = None
    for i, run in enumerate(runs):
        with adapter_load_refused(run.path):
            if model is None:
                model = PeftModel.from_pretrained(base, run.path, adapter_name=f"run{i}")
            else:
                model.load_adapter(run.path, adapter_name=f"run{i}")
    return model


def _lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer

    return [module for module in model.modules() if isinstance(module, LoraLayer)]


def task_vector(layer, adapter: str) -> torch.Tensor:
    """The change `adapter` makes to `layer`'s base weight when folded in, in float32 (zeros where it has none)."""
    weight = layer.get_base_layer().weight
    if adapter not in layer.lora_A and adapter not in layer.lora_embedding_A:
        return torch.zeros_like(weight, dtype=torch.float32)
    if not layer.use_dora.get(adapter, False):
        return layer.get_delta_weight(adapter).float()
    before = weight.detach().clone()  # DoRA rescales whole columns: let PEFT fold it, read the change, undo it
    layer.merge(adapter_names=[adapter])
    change = layer.get_base_layer().weight.detach().float() - before.float()
    layer.unmerge()
    layer.get_base_layer().weight.data = before
    return change


def combine(vectors: list[torch.Tensor], combination: Combination, rank: int) -> torch.Tensor:
    """The runs' task vectors for one weight combined as `combination` (a checked one) says."""
    from peft.utils import merge_utils

    weights = torch.tensor(combination.weights)
    if combination.kind in ("linear", "cat", "svd"):
        mixed = merge_utils.task_arithmetic(vectors, weights)
        return _truncated(mixed, rank) if combination.kind == "svd" else mixed
    if combination.kind == "dare_linear":
        return merge_utils.dare_linear(vectors, weights, combination.density)
    density = combination.density
    if density < 1:  # PEFT's prune warns at density 1, and keeps everything
        drop = "magnitude" if combination.kind == "ties" else "random"  # DARE rescales what it keeps; TIES does not
        vectors = [merge_utils.prune(vector, density, method=drop, rescale=drop == "random") for vector in vectors]
    return disjoint_merge(torch.stack(vectors), weights, combination.majority_sign)


def disjoint_merge(vectors: torch.Tensor, weights: torch.Tensor, majority_sign: str) -> torch.Tensor:
    """TIES' elect-and-average as mergekit weights it: entry by entry, the sign of the weighted changes' sum
    (`total`) or of most of them (`frequency`) is elected, and the weighted changes with that sign are summed and
    divided by their runs' summed |weights| (1 where none agrees). A run of weight 0 neither votes nor counts, so
    weights (1, 0) give the first run exactly.

    vectors: (runs, *weight shape); weights: (runs,). mergekit divides by the summed signed weights, the same for
    weights >= 0; with a negative weight that sum can be 0 or flip the run's change back, and |w| keeps it
    subtracting."""
    from peft.utils import merge_utils

    weights = weights.to(vectors.dtype).view(-1, *(1,) * (vectors.dim() - 1))
    weighted = vectors * weights
    agrees = merge_utils.calculate_majority_sign_mask(weighted, method=majority_sign)
    divisor = (weights.abs() * agrees).sum(dim=0)
    return (weighted * agrees).sum(dim=0) / torch.where(divisor == 0, 1.0, divisor)


def _truncated(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """`matrix`'s best rank-`rank` approximation (what PEFT's `svd` keeps: the largest adapter rank)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def _fold_combined(layer, adapters: list[str], combination: Combination, rank: int) -> None:
    vectors = [task_vector(layer, adapter) for adapter in adapters]
    weight = layer.get_base_layer().weight
    weight.data = (weight.detach().float() + combine(vectors, combination, rank)).to(weight.dtype)


def _save(model, runs: list[RunToMerge], combination: Combination, output: Path) -> None:
    from tunelab.models.load import load_tokenizer

    record = {"runs": [str(run.path.resolve()) for run in runs], "weights": list(combination.weights),
              "combination": combination.kind, "density": combination.density,
              "majority_sign_method": combination.majority_sign, "seed": combination.seed,
              "base_model": str(runs[0].base), "method": runs[0].method}
    save_merged(model, load_tokenizer(runs[0].path), runs[0].portable_template, output,
                {RECORD_FILE: json.dumps(record, indent=2) + "\n"})
