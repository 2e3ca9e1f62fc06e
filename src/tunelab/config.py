"""The schema of a run: YAML + `key.sub=value` overrides, validated once at the door.

Everything below the CLI receives a `RunConfig`, never a raw dict. Unknown keys are errors that name
the nearest valid key.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from tunelab.config_base import Strict
from tunelab.errors import ConfigError
from tunelab.objective_config import (  # noqa: F401 - objective schemas are part of the config's interface
    OBJECTIVE_CLASSES,
    DpoObjective,
    GrpoObjective,
    KtoObjective,
    ObjectiveConfig,
    OrpoObjective,
    RewardObjective,
    RewardSpec,
    SftObjective,
    SimpoObjective,
)

DataFormat = Literal[
    "auto", "alpaca", "chat", "prompt_completion", "qa", "text", "preference", "feedback", "preference_chosen",
    "prompts",
]
"""`preference` (prompt/chosen/rejected) and `feedback` (prompt/completion/label) rows need a preference
objective, `prompts` (a prompt column, no reply) needs grpo; `preference_chosen` trains SFT on the chosen replies
of preference rows."""



class DataSource(Strict):
    """One training dataset in a multi-task mix."""

    path: Path
    """A .jsonl, .json, .csv, .parquet, .txt or .md file."""
    weight: float = Field(1.0, gt=0)
    """Relative sampling weight in the mix."""
    format: DataFormat | None = None
    """Overrides `data.format` for this source."""


class DataConfig(Strict):
    train: Path | list[DataSource] = Path("tunelab:support_tickets")
    """Training data: a file path, `tunelab:NAME` for a bundled dataset, or a list of sources."""
    eval: Path | None = None
    """A separate evaluation file. When absent, `eval_split` of the training rows are held out."""
    eval_split: float = Field(0.1, ge=0, lt=1)
    """Fraction of training rows held out for evaluation when `eval` is not given (seeded)."""
    format: DataFormat = "auto"
    """Row format; `auto` detects it from the columns."""
    max_length: int = Field(512, ge=8)
    """Longest sample in tokens."""
    overlong: Literal["truncate", "drop", "error"] = "truncate"
    """What to do with a sample longer than max_length (raw text is always split into chunks instead)."""
    train_on: Literal["all_assistant", "last_assistant", "all"] = "all_assistant"
    """Which tokens carry loss: every assistant turn, the last one only, or every token."""
    chat_template: Literal["auto", "tokenizer", "tunelab", "none"] = "auto"
    """`auto`: the tokenizer's own, tunelab's fallback when it has none; `none`: turns concatenated."""
    system_prompt: str | None = None
    """A system turn added to samples that have none."""
    packing: bool = False
    """Pack samples into fixed-length rows (attention stays within each sample)."""
    shuffle: bool = True
    cache: bool = True
    """Keep each data file's tokenised rows on disk (TUNELAB_HOME/cache/tokenized, memory-mapped Arrow), keyed by
    its content, the tokenizer and the settings that change tokens: a second run skips reading and tokenising.
    `false`: nothing is written; the tokenised rows are held in memory."""
    columns: dict[str, str] = {}
    """Your files' column names for tunelab's fields, e.g. {prompt: "Consumer complaint narrative", completion:
    Product}: each named column is read as that field in every data file that has it (see data/columns.py)."""

    @field_validator("columns")
    @classmethod
    def _known_fields(cls, columns: dict[str, str]) -> dict[str, str]:
        from tunelab.data.columns import FIELDS

        unknown = [f for f in columns if f not in FIELDS]
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}; fields: {', '.join(FIELDS)}")
        return columns


class FullMethod(Strict):
    name: Literal["full"]


class FreezeMethod(Strict):
    name: Literal["freeze"]
    trainable_layers: int = Field(2, ge=0)
    """Train the last N transformer blocks; every other weight stays frozen."""
    trainable_modules: list[str] = []
    """Also train parameters whose name contains one of these (e.g. `lm_head`, `norm`)."""


class LoraMethod(Strict):
    """LoRA, and its variants that differ in one switch: DoRA (weight-decomposed) and rsLoRA
    (rank-stabilised scale alpha / sqrt(r))."""

    name: Literal["lora", "dora", "rslora"]
    r: int = Field(16, ge=1)
    """LoRA rank."""
    alpha: float = 32
    """LoRA scaling numerator (scale = alpha / r; alpha / sqrt(r) for rslora)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA input; off by default: on CPU it costs ~20% of step time (bench/, 8 steps).
    Raise it (0.05-0.1) for small datasets trained for several epochs."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt, or `all-linear` for every linear layer except the output head."""


class QLoraMethod(Strict):
    """LoRA on a frozen base quantised by bitsandbytes (4-bit nf4/fp4, or 8-bit)."""

    name: Literal["qlora"]
    r: int = Field(16, ge=1)
    alpha: float = 32
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    bits: Literal[4, 8] = 4
    """Bits of the frozen, quantised base model (bitsandbytes)."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    """Quantise the quantisation constants too (4-bit only)."""


class IA3Method(Strict):
    """IA3: learned scaling vectors on keys, values and feed-forward activations (fewest parameters)."""

    name: Literal["ia3"]
    target_modules: list[str] | None = None
    """Modules to scale; PEFT's defaults for the architecture when absent."""
    feedforward_modules: list[str] | None = None
    """Which of target_modules are feed-forward (scaled on their input)."""


class PromptMethod(Strict):
    """Prompt tuning: trainable virtual token embeddings put before every input; the model is frozen."""

    name: Literal["prompt"]
    num_virtual_tokens: int = Field(20, ge=1)
    init_text: str | None = None
    """Initialise the virtual tokens from this text's embeddings (random when absent)."""


class PrefixMethod(Strict):
    """Prefix tuning: trainable key/value prefixes in every attention layer; the model is frozen."""

    name: Literal["prefix"]
    num_virtual_tokens: int = Field(20, ge=1)
    projection: bool = False
    """Reparameterise the prefixes through a small MLP (more stable, more parameters while training)."""
    projection_hidden: int = Field(256, ge=1)


class AdapterMethod(Strict):
    """Bottleneck adapters after attention and/or MLP blocks; the base is frozen (tunelab's own module)."""

    name: Literal["adapter"]
    reduction_factor: int = Field(16, ge=1)
    """Bottleneck width = hidden size / reduction_factor."""
    placement: Literal["attention", "mlp", "both"] = "both"
    activation: Literal["relu", "gelu", "silu"] = "relu"


MethodConfig = Annotated[
    FullMethod | FreezeMethod | LoraMethod | QLoraMethod | IA3Method | PromptMethod | PrefixMethod | AdapterMethod,
    Field(discriminator="name"),
]


class TrainConfig(Strict):
    epochs: float = Field(1, gt=0)
    max_steps: int | None = Field(None, ge=1)
    """Optimiser steps; overrides epochs when set."""
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_grad_norm: float | None = 1.0
    seed: int = 42
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """`auto`: bf16 autocast where the hardware runs it fast (CUDA with bf16, CPUs with AMX), else fp32."""
    eval_every: int | None = Field(None, ge=1)
    """Evaluate every N optimiser steps (and always at the end)."""
    save_every: int | None = Field(None, ge=1)
    """Write a resumable checkpoint every N optimiser steps."""
    keep_checkpoints: int = Field(2, ge=1)
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """With several processes (`--nproc`, torchrun): `ddp` keeps a whole model in each; `fsdp` shards each decoder
    block's parameters, gradients and optimiser state across them (FSDP2), for models one device cannot hold."""
    max_bad_steps: int = Field(3, ge=0)
    """A step whose loss or gradient norm is not finite is skipped (logged with `skipped`); more than this many
    within 100 steps rolls back to the newest checkpoint (see save_every) with the learning rate halved."""
    max_rollbacks: int = Field(2, ge=0)
    """Rollbacks before the run stops with the reason (its finished work saved)."""
    early_stopping_patience: int | None = Field(None, ge=1)
    """Stop after this many evaluations without a better `best_metric`, and keep the best weights."""
    best_metric: str = "eval_loss"
    """What early stopping and keep_best follow: any eval key of metrics.jsonl (eval_loss, eval_exact_match, ...;
    task metrics need eval.during_training)."""
    best_mode: Literal["min", "max"] | None = None
    """Whether lower or higher best_metric is better; default min for losses and perplexity, else max."""
    keep_best: bool = False
    """End with the weights of the best evaluation, not the last (always on with early stopping)."""
    log_every: int = Field(1, ge=1)
    group_by_length: bool = False
    """Batch samples of similar length together to cut padding."""
    attention: Literal["auto", "sdpa", "matmul"] = "auto"
    """Attention in training: sdpa, or matmul (plain matmuls with float32 scores, llama-style attention only),
    whose backward beats CPU flash attention on short rows. auto: matmul on CPU for llama-style models when its
    kept probabilities stay small (batch x heads x max_length^2, summed over layers, at most 512 MB), else the
    model's own."""
    activation_checkpointing: int = Field(0, ge=0)
    """Recompute decoder layers' activations in backward instead of keeping them: 0 off, 1 every layer, N every
    N-th layer (less memory saved, less recomputed). Costs about one extra forward pass; for long rows or big
    batches that would not fit otherwise."""
    fused_lora: bool = True
    """LoRA linear layers (plain, not DoRA or quantised) as one autograd function, frozen weights cast to bf16
    once instead of every forward, and the input shared by q/k/v and gate/up cast once (methods/fused_lora.py).
    Same arithmetic; off only to compare against PEFT's own layers."""


class EvalConfig(Strict):
    before_after: bool = True
    """Evaluate the base model before training so the summary compares before and after."""
    generate_samples: int = Field(64, ge=0)
    """Held-out samples on which generations are made and task metrics computed (0: none)."""
    max_new_tokens: int = Field(64, ge=1)
    metrics: list[str] = ["exact_match"]
    """Task metrics computed on the held-out samples: built-in names or `path/to/file.py:function`;
    `label_accuracy` scores the likelihood of each label in `labels` instead of generating."""
    labels: list[str] | None = Field(None, min_length=1)
    """The label set of label_accuracy (setting it adds that metric); default: the distinct references of the
    eval data when there are at most 50."""
    label_score: Literal["sum", "mean"] = "sum"
    """A label's score: summed log-probability of its tokens and end-of-turn token, or the per-token mean."""
    during_training: bool = False
    """Also compute `metrics` at every evaluation (train.eval_every, the end, and step 0 for the base model when
    before_after is on) on a fixed subset, logged as eval_<key> in metrics.jsonl."""
    during_training_samples: int = Field(32, ge=1)
    """The first N held-out samples form that subset (generation cost per evaluation grows with N)."""

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, names: list[str]) -> list[str]:
        from tunelab.eval.metrics import LABEL_METRICS, METRICS, is_custom_metric

        unknown = [n for n in names if n not in METRICS and n not in LABEL_METRICS and not is_custom_metric(n)]
        if unknown:
            known = sorted([*METRICS, *LABEL_METRICS])
            raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(known)} "
                             "or path/to/file.py:function")
        return names

    @model_validator(mode="after")
    def _labels_imply_label_accuracy(self) -> EvalConfig:
        if self.labels is not None and "label_accuracy" not in self.metrics:
            self.metrics = [*self.metrics, "label_accuracy"]
        return self

    show_samples: int = Field(3, ge=0)
    """Before/after generations printed at the end of training."""


TrackerName = Literal["tensorboard", "wandb", "mlflow"]
TRACKERS: tuple[str, ...] = ("tensorboard", "wandb", "mlflow")


class TrackConfig(Strict):
    """Experiment trackers that receive the metrics too; metrics.jsonl is always written.
    `track: [tensorboard, wandb]` is shorthand for `track: {to: [tensorboard, wandb]}`."""

    to: list[TrackerName] = []
    """Trackers to log to: tensorboard (RUN/tensorboard), wandb (RUN/wandb), mlflow (RUN/mlruns)."""
    project: str = "tunelab"
    """W&B project / MLflow experiment name."""
    run_name: str | None = None
    """Run name in the trackers; the output_dir folder name when absent."""
    wandb_mode: Literal["offline", "online"] = "offline"
    """`offline` writes RUN/wandb only (upload later with `wandb sync`); `online` needs `wandb login`."""
    mlflow_uri: str | None = None
    """MLflow tracking URI (a path, file:, sqlite: or http(s):); a file store in RUN/mlruns when absent."""

    @model_validator(mode="before")
    @classmethod
    def _list_shorthand(cls, value: Any) -> Any:
        return {"to": value} if isinstance(value, (list, str)) else value

    @field_validator("to", mode="before")
    @classmethod
    def _known_trackers(cls, names: Any) -> Any:
        names = [names] if isinstance(names, str) else names
        if isinstance(names, list):
            unknown = [str(n) for n in names if n not in TRACKERS]
            if unknown:
                raise ValueError(f"unknown tracker(s) {', '.join(unknown)}; known: {', '.join(TRACKERS)}")
            return list(dict.fromkeys(names))
        return names


class RunConfig(Strict):
    model: str = "smollm2-135m-instruct"
    """A preset name, a hub id, a local folder or a .gguf file."""
    data: DataConfig = DataConfig()
    method: MethodConfig = LoraMethod(name="lora")
    objective: ObjectiveConfig = SftObjective(name="sft")
    """What training minimises: `sft` (default), or a preference objective (dpo, orpo, simpo on preference rows;
    kto on feedback rows), `reward` (a reward model on preference rows) or `grpo` (reinforcement learning from
    rewards of sampled completions, on prompt-only rows). `objective: dpo` is shorthand for
    `objective: {name: dpo}`."""
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    track: TrackConfig = TrackConfig()
    output_dir: Path = Path("runs/latest")

    @model_validator(mode="after")
    def _check_combinations(self) -> RunConfig:
        if self.data.packing and self.method.name in ("prompt", "prefix"):
            raise ValueError("data.packing cannot be used with prompt or prefix tuning: the virtual tokens would be "
                             "shared across packed samples; set data.packing: false")
        if self.objective.name != "sft" and self.data.packing:
            raise ValueError(f"objective.name={self.objective.name} compares whole replies and cannot use "
                             "data.packing; set data.packing: false")
        from tunelab.methods import has_frozen_base

        if getattr(self.objective, "reference", None) == "adapter" and not has_frozen_base(self.method.name):
            raise ValueError(f"objective.reference=adapter needs an adapter method, and method.name={self.method.name} "
                             "trains the base weights; use objective.reference: precompute")
        if self.objective.name == "reward" and self.method.name in ("prompt", "prefix", "adapter"):
            raise ValueError(f"objective.name=reward trains a scalar head beside the model, which "
                             f"method.name={self.method.name} cannot save with it; use lora, dora, rslora, qlora, "
                             "ia3, freeze or full")
        if self.objective.name == "reward" and self.eval.during_training:
            raise ValueError("eval.during_training generates replies, which a reward model cannot; its held-out "
                             "pairwise accuracy (eval_rewards/accuracies) is measured at every evaluation anyway")
        if self.train.early_stopping_patience and not (self.data.eval or self.data.eval_split > 0):
            raise ValueError("train.early_stopping_patience needs eval data: set data.eval or data.eval_split")
        from tunelab.objectives import objective_metrics
        from tunelab.train.best import best_metric_problem

        problem = best_metric_problem(self.train, self.eval, has_eval_data=bool(self.data.eval or self.data.eval_split),
                                      objective_keys=objective_metrics(self.objective))
        if problem:
            raise ValueError(problem)
        return self


# Names other tools use for our keys, so the error can point users coming from them to the right one.
_KEY_ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "learning_rate": "lr",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "gradient_accumulation_steps": "grad_accum",
    "per_device_train_batch_size": "batch_size",
    "micro_batch_size": "batch_size",
    "sequence_len": "max_length",
    "max_seq_length": "max_length",
}


def _nearest_key(section: type[BaseModel], key: str) -> str | None:
    names = list(section.model_fields)
    if _KEY_ALIASES.get(key) in names:
        return _KEY_ALIASES[key]
    found = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    return found[0] if found else None


def _section_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `loc` (used to suggest a key)."""
    section: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        field = section.model_fields.get(str(part))
        if field is None:
            return section if str(part) in _METHOD_CLASSES else None
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            section = annotation
        elif str(part) in _UNIONS:
            continue
        else:
            return None
    return section


_METHOD_CLASSES = {
    "full": FullMethod,
    "freeze": FreezeMethod,
    "lora": LoraMethod,
    "dora": LoraMethod,
    "rslora": LoraMethod,
    "qlora": QLoraMethod,
    "ia3": IA3Method,
    "prompt": PromptMethod,
    "prefix": PrefixMethod,
    "adapter": AdapterMethod,
}


_OBJECTIVE_CLASSES = OBJECTIVE_CLASSES
_UNIONS: dict[str, dict[str, type[BaseModel]]] = {"method": _METHOD_CLASSES, "objective": _OBJECTIVE_CLASSES}
"""Sections that are a discriminated union on `name`, and the class of each name."""


def _format_error(error: dict[str, Any], source: str) -> str:
    loc = tuple(error["loc"])
    # The discriminated union puts the chosen tag into the location: ("method", "lora", "rank").
    if len(loc) >= 2 and loc[0] in _UNIONS and loc[1] in _UNIONS[loc[0]]:
        key = ".".join([str(loc[0]), *map(str, loc[2:])])
        section: type[BaseModel] | None = _UNIONS[loc[0]][loc[1]]
    else:
        key = ".".join(map(str, loc))
        section = _section_at(loc)
    if error["type"] == "extra_forbidden":
        suggestion = _nearest_key(section, str(loc[-1])) if section else None
        hint = f"; did you mean '{suggestion}'?" if suggestion else ""
        valid = ", ".join(section.model_fields) if section else ""
        return f"{source}: unknown key '{key}'{hint} (valid keys here: {valid})"
    if error["type"] == "union_tag_invalid":  # method.name or objective.name that names nothing
        return (f"{source}: {key}.name: '{error['ctx']['tag']}' is not one of "
                f"{', '.join(_UNIONS.get(str(loc[0]), {})) or error['ctx']['expected_tags']}")
    if not loc:  # a check across sections (a model validator): its message names the keys
        return f"{source}: {error['msg'].removeprefix('Value error, ')}"
    return f"{source}: {key}: {error['msg']}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (["train", "lr"], 0.0001); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        value = _number_or_text(value)
    return key.strip().split("."), value


def _number_or_text(text: str) -> Any:
    """YAML 1.1 reads `1e-4` as text; users mean a number."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        return text


def apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def load_config(path: Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (or start from defaults), apply overrides, validate. Raises ConfigError."""
    tree: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        source = str(path)
        if not Path(path).is_file():
            raise ConfigError("config file not found", where=str(path))
        loaded = _read_yaml(Path(path))
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError("a config file must hold a mapping of keys", where=str(path))
        tree = loaded or {}
        tree = _resolve_relative_paths(tree, Path(path).parent)
    for text in overrides:
        _method_as_mapping(tree)
        _track_as_mapping(tree)
        keys, value = parse_override(text)
        apply_override(tree, keys, value)
    _method_as_mapping(tree)
    if isinstance(tree.get("method"), dict) and "name" not in tree["method"]:
        tree["method"] = {"name": "lora", **tree["method"]}
    if isinstance(tree.get("objective"), dict) and "name" not in tree["objective"]:
        tree["objective"] = {"name": "sft", **tree["objective"]}
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        messages = [_format_error(e, source) for e in err.errors()]
        raise ConfigError("\n".join(messages)) from None


def _read_yaml(path: Path) -> Any:
    """A config file's YAML, or a ConfigError naming the line that breaks it."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(f"not valid UTF-8 (byte 0x{raw[err.start]:02x}); save it as UTF-8",
                          where=f"{path}:{line}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"not valid YAML ({problem})", where=where) from None


def _method_as_mapping(tree: dict[str, Any]) -> None:
    """`method: qlora` is shorthand for `method: {name: qlora}`; `objective: dpo` for `objective: {name: dpo}`."""
    for section in _UNIONS:
        if isinstance(tree.get(section), str):
            tree[section] = {"name": tree[section]}


def _track_as_mapping(tree: dict[str, Any]) -> None:
    """`track: [wandb]` is shorthand for `track: {to: [wandb]}` (so `track.project=...` can follow it)."""
    if isinstance(tree.get("track"), (list, str)):
        tree["track"] = {"to": tree["track"]}


def _resolve_relative_paths(tree: dict[str, Any], base: Path) -> dict[str, Any]:
    """Data paths in a config file are relative to the current directory when they exist there, else to
    the config file's folder, so a recipe runs from anywhere."""
    data = tree.get("data")
    if not isinstance(data, dict):
        return tree

    def fix(value: Any) -> Any:
        relative = isinstance(value, str) and not value.startswith("tunelab:") and not Path(value).is_absolute()
        if relative and not Path(value).exists() and (base / value).exists():
            return str(base / value)
        return value

    for key in ("train", "eval"):
        value = data.get(key)
        if isinstance(value, list):
            for item in value:
                if isinstance(item, dict) and "path" in item:
                    item["path"] = fix(item["path"])
        else:
            data[key] = fix(value)
    return tree


def dump_config(config: RunConfig) -> str:
    """The resolved config as YAML (written to every run directory)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
