"""The schema of a run: YAML + `key.sub=value` overrides, validated once at the door.

Everything below the CLI receives a `RunConfig`, never a raw dict. Unknown keys are errors that name
the nearest valid key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tunelab.config_base import Strict
from tunelab.config_load import (  # noqa: F401 - loading is part of the config's interface
    apply_override,
    dump_config,
    load_config,
    parse_override,
    with_absolute_paths,
)
from tunelab.method_config import (  # noqa: F401 - method schemas are part of the config's interface
    METHOD_CLASSES,
    AdapterMethod,
    FreezeMethod,
    FullMethod,
    IA3Method,
    LoraMethod,
    MethodConfig,
    PrefixMethod,
    PromptMethod,
    QLoraMethod,
)
from tunelab.objective_config import (  # noqa: F401 - objective schemas are part of the config's interface
    OBJECTIVE_CLASSES,
    ROLLOUT_OBJECTIVES,
    DistillObjective,
    DpoObjective,
    GrpoObjective,
    KtoObjective,
    ObjectiveConfig,
    OnlineDpoObjective,
    OrpoObjective,
    RewardObjective,
    RewardSpec,
    RlooObjective,
    RolloutObjective,
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
    """A .jsonl, .json, .csv, .parquet, .txt or .md file, a folder written by datasets' save_to_disk, `hf:NAME` (a
    hub dataset id or a local dataset repository folder, read by datasets' load_dataset) or `tunelab:NAME`."""
    weight: float = Field(1.0, gt=0)
    """Relative sampling weight in the mix."""
    format: DataFormat | None = None
    """Overrides `data.format` for this source."""
    split: str | None = None
    """For a dataset: which split (default `train`, or its only split). Same as `PATH?split=NAME`."""
    subset: str | None = None
    """For an hf: dataset with several configurations: which one. Same as `PATH?subset=NAME`."""
    revision: str | None = None
    """For an hf: dataset: a branch, tag or commit (a commit pins the rows). Same as `PATH?revision=REV`."""
    streaming: bool = False
    """For an hf: dataset: read rows as they download instead of preparing the whole split first."""

    @model_validator(mode="after")
    def _fold_dataset_options(self) -> DataSource:
        """The dataset fields become the path's `?key=value` options, the one form every reader sees."""
        from tunelab.data.hf_datasets import with_options

        folded = with_options(str(self.path), split=self.split, subset=self.subset, revision=self.revision,
                              streaming=self.streaming)
        object.__setattr__(self, "path", Path(folded))
        return self


class DataConfig(Strict):
    train: Path | list[DataSource] = Path("tunelab:support_tickets")
    """Training data: a file path, a save_to_disk folder, `hf:NAME` (a hub dataset or a local dataset repository;
    options as in `hf:NAME?split=train&subset=S&revision=R&streaming=true`), `tunelab:NAME` for a bundled dataset,
    or a list of sources."""
    eval: Path | None = None
    """A separate evaluation file or dataset (e.g. `hf:NAME?split=test`). When absent, `eval_split` of the
    training rows are held out."""
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


class TrainConfig(Strict):
    epochs: float = Field(1, gt=0)
    max_steps: int | None = Field(None, ge=1)
    """Optimiser steps; overrides epochs when set."""
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    """adamw: PyTorch's AdamW (its fused kernel on CPU and CUDA). adamw_8bit: bitsandbytes' AdamW with both moments
    kept in 8 bits (blockwise quantised; 2 bytes a parameter instead of 8, for tensors of 4096+ elements), for full
    fine-tuning of models whose optimizer state would not fit; fast on CUDA, ~15x slower an update than the fused
    kernel on CPU. paged_adamw_8bit: the same with its state in CUDA unified memory, paged out under memory
    pressure (on CPU, adamw_8bit)."""
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
    distributed: Literal["ddp", "fsdp", "zero2"] = "ddp"
    """With several processes (`--nproc`, torchrun, `accelerate launch`): `ddp` keeps a whole model in each; `fsdp`
    shards each decoder block's parameters, gradients and optimiser state across them (FSDP2, as DeepSpeed ZeRO-3),
    for models one device cannot hold; `zero2` shards them too but keeps a block's gathered parameters from its
    forward to its backward (as ZeRO-2's peak memory, with half of `fsdp`'s parameter traffic)."""
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
    neftune_alpha: float | None = Field(None, gt=0)
    """NEFTune: uniform noise of scale alpha / sqrt(L * d) on the input embeddings of training forwards (L a
    sample's length, d the hidden size; models/neftune.py), for supervised fine-tuning. The paper used 5-15 on
    instruction data; off when absent."""
    log_every: int = Field(1, ge=1)
    group_by_length: bool = False
    """Batch samples of similar length together to cut padding."""
    attention: Literal["auto", "sdpa", "matmul", "varlen"] = "auto"
    """Attention in training: sdpa, or matmul (plain matmuls with float32 scores, llama-style attention only),
    whose backward beats CPU flash attention on short rows, or varlen (CUDA, bf16, torch 2.10+: flash attention
    over padding-free batches, models/varlen.py). auto: matmul on CPU for llama-style models when its kept
    probabilities stay small (batch x heads x max_length^2, summed over layers, at most 512 MB), else the
    model's own."""
    activation_checkpointing: int = Field(0, ge=0)
    """Recompute decoder layers' activations in backward instead of keeping them: 0 off, 1 every layer, N every
    N-th layer (less memory saved, less recomputed). Costs about one extra forward pass; for long rows or big
    batches that would not fit otherwise."""
    profile_steps: int = Field(0, ge=0)
    """Profile this many optimiser steps from the third on (torch.profiler): where the step's time goes (matmul,
    attention, head, casts, elementwise, allocation, optimizer, unaccounted) lands in summary.json's
    step_breakdown and RUN/profile.txt. Those steps run a little slower."""
    fused_lora: bool = True
    """LoRA linear layers (plain, not DoRA or quantised) as one autograd function, frozen weights cast to bf16
    once instead of every forward, and the input shared by q/k/v and gate/up cast once (methods/fused_lora.py);
    RMSNorm as one function with a closed-form backward (models/fused_norm.py). Same arithmetic; off only to
    compare against PEFT's and transformers' own layers."""
    share_prefix: bool = True
    """Padding-free batches on the matmul attention path (CPU) hold once the leading tokens that all their samples
    share and none trains on (a chat template's system prompt, a fixed instruction; each preference pair's prompt
    for DPO-style and reward objectives; KTO replies' common prefix), each sample attending to that one copy: the
    same loss and gradients from fewer tokens (the main job: 32% fewer, a step 17% faster eager, 28% compiled).
    Not while dropout is on (LoRA's or the model's): the samples would share one dropout mask over the prefix.
    summary.json's shared_prefix_fraction says how much was shared. Off only to compare."""
    kernels: Literal["auto", "compiled", "liger", "none"] = "auto"
    """compiled: each decoder layer's forward and backward compiled by torch.compile (its elementwise work fused
    into a few loops) and the head's log-softmax fused, for training only (models/fused_ops.py): ~15% faster steps
    on the default model, after a compile of ~1 minute on a machine's first run (~4 s once torch's caches hold
    it). liger: Liger Kernel's Triton RMSNorm, rotary and SwiGLU kernels (CUDA, llama/mistral/qwen2/qwen3 models,
    the liger-kernel package; models/liger.py). auto: liger on CUDA where it is installed; compiled on CPU for
    bf16 supervised runs of llama-style models of 50M+ parameters with LoRA or full fine-tuning and 120+ steps,
    where even the first compile pays back, on torch 2.13+ (where it was tested); none: eager PyTorch."""


class EvalConfig(Strict):
    before_after: bool = True
    """Evaluate the base model before training so the summary compares before and after."""
    generate_samples: int = Field(64, ge=0)
    """Held-out samples on which generations are made and task metrics computed (0: none)."""
    max_new_tokens: int = Field(64, ge=1)
    generate_batch_size: int = Field(64, ge=1)
    """Held-out prompts decoded together (KV cache memory grows with it; label scoring keeps batches of 16): on the
    default model 64 decoded the main job's 60 prompts 1.49x faster than 16 did (bf16, AMD EPYC)."""
    metrics: list[str] = ["exact_match"]
    """Task metrics computed on the held-out samples: built-in names or `path/to/file.py:function`;
    `label_accuracy` scores the likelihood of each label in `labels` instead of generating. Scales differ: bleu
    and chrf are 0-100 (sacrebleu's); exact_match, accuracy, label_accuracy, rouge (rouge1, rouge2, rougeL,
    rougeLsum F-measures) and json_field_accuracy's scores are 0-1."""
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
            why = ("scores each row's replies against its teacher's" if self.objective.name == "distill"
                   else "compares whole replies")
            raise ValueError(f"objective.name={self.objective.name} {why} and cannot use data.packing; set "
                             "data.packing: false")
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
        if self.train.neftune_alpha is not None and self.objective.name != "sft":
            raise ValueError(f"train.neftune_alpha adds noise to supervised fine-tuning's inputs; "
                             f"objective.name={self.objective.name} scores replies against each other or a "
                             "reference and takes none")
        samples_replies = self.objective.name == "distill" and (self.objective.lmbda > 0 or self.objective.seq_kd)
        if samples_replies and self.data.train_on == "all":
            raise ValueError("objective.lmbda and objective.seq_kd sample a reply after each row's prompt, and "
                             "data.train_on=all trains every token (no prompt to sample from); use all_assistant "
                             "or last_assistant")
        if self.train.early_stopping_patience and not (self.data.eval or self.data.eval_split > 0):
            raise ValueError("train.early_stopping_patience needs eval data: set data.eval or data.eval_split")
        from tunelab.objectives import objective_metrics
        from tunelab.train.best import best_metric_problem

        problem = best_metric_problem(self.train, self.eval, has_eval_data=bool(self.data.eval or self.data.eval_split),
                                      objective_keys=objective_metrics(self.objective))
        if problem:
            raise ValueError(problem)
        return self


