"""Training objectives: how rows become a batch, what the loss is divided by, and the loss.

Every objective offers:
    data_kind                             `sft`, `preference`, `feedback` or `prompts`: the rows it trains on
    collate(rows, pad_token_id, padding_free) -> batch   tensors of one micro-batch (rows of items)
    count(batch) -> int                   what the step's loss is divided by (trained tokens, pairs, rows)
    input_tokens(item) -> int             tokens of one item, for throughput
    sequences_per_item                    sequences one item becomes (2 for a pair), for memory and attention
    loss_sum(model, batch) -> (loss_sum, metrics)   metrics as (sum, count), logged as sum / count
    model_head                            `lm` (the output head) or `reward` (a scalar head: sequence classification)
and, when it compares against a reference model:
    reference: Reference                  live (the adapter switched off) or precomputed per row
    sequences(item) -> (first, second)    the two sequences whose reference log-probs a row stores
and, when it trains on what the model itself generates (GRPO, RLOO, online DPO; distill with lmbda or seq_kd):
    rollout(model, step_rows, step, epoch, weights=) -> (step_rows, metrics)   the step's prompts in, its
                                          completions out; weights: the loop's per micro-batch (0: a stand-in)
and, for GRPO, RLOO and online DPO:
    prepare(model)                        called once before a checkpoint loads (keep the starting model)
    evaluate(model, rows) -> metrics      the held-out evaluation (eval_loss and the objective's own)
    set_progress(step, epoch)             what reward functions see as trainer_state at an evaluation
    rows_per_item(model) -> int           rows one item runs as at once, when not sequences_per_item
and, for GRPO and RLOO, whose updates may reuse a rollout (updates_per_rollout):
    draws_rows(step) -> bool              whether step `step` samples anew (else rollout gets step_rows None)
    rollout_weights                       the kept rollout's micro-batch weights, checkpointed with it
    state_dict() / load_state_dict(t)     the kept rollout, in the checkpoint
and, when its held-out loss is not SFT's token cross-entropy though it trains on SFT rows (distill):
    evaluate(model, rows) -> metrics      as above
    planned_lengths(samples)              each sample's longest sequence in training (sampled replies may be longer)
The loop in train/ knows no objective by name.
"""

from __future__ import annotations

from functools import partial

from tunelab.config import ROLLOUT_OBJECTIVES, ObjectiveConfig
from tunelab.methods import METHODS
from tunelab.objectives.distill import DISTILL_METRICS, DistillObjective, load_teacher
from tunelab.objectives.dpo import dpo_losses
from tunelab.objectives.grpo import GRPO_EVAL_METRICS, GrpoObjective
from tunelab.objectives.kto import KTO_METRICS, KtoObjective
from tunelab.objectives.online_dpo import OnlineDpoObjective
from tunelab.objectives.orpo import orpo_losses
from tunelab.objectives.pairs import PAIR_METRICS, PairObjective, Reference
from tunelab.objectives.reward import REWARD_METRICS, RewardObjective
from tunelab.objectives.rewards import build_rewards, reward_names
from tunelab.objectives.sft import SftObjective
from tunelab.objectives.simpo import simpo_losses


def rows_per_item(objective, model) -> int:
    """Rows one item puts through the model side by side: what the attention and memory budgets count."""
    rows = getattr(objective, "rows_per_item", None)
    return rows(model) if rows is not None else objective.sequences_per_item


PAIR_LOSSES = {"dpo": dpo_losses, "orpo": orpo_losses, "simpo": simpo_losses}
"""Objectives on preference pairs: each a function (policy, reference, config) -> PairLosses."""


def objective_metrics(config: ObjectiveConfig) -> tuple[str, ...]:
    """The metrics the objective logs at every evaluation, as eval_<key> (what train.best_metric may follow)."""
    if config.name in ROLLOUT_OBJECTIVES:
        return (*GRPO_EVAL_METRICS, *(f"rewards/{name}/mean" for name in reward_names(config)))
    own = {"sft": (), "kto": KTO_METRICS, "reward": REWARD_METRICS, "distill": DISTILL_METRICS}
    return own.get(config.name, PAIR_METRICS)


def reference_for(config: ObjectiveConfig, method_name: str) -> Reference:
    """Where the objective's reference log-probabilities come from (see config.ReferenceMode)."""
    switch_off = getattr(METHODS[method_name], "without_adapter", None)
    mode = getattr(config, "reference", "auto")
    if mode == "precompute" or switch_off is None:
        return Reference(switch_off=None)
    return Reference(switch_off=switch_off)


def build_objective(config: ObjectiveConfig, method_name: str, packing: bool, *, tokenizer=None, seed: int = 0,
                    precision: str = "fp32", device="cpu", batch_size: int = 8, ranks=None):
    """The objective `config` names, for a model trained with `method_name` (GRPO also samples with `tokenizer`
    from a generator seeded by `seed`, in `precision`, and gathers a step's statistics over `ranks`; distill loads
    its teacher onto `device` and evaluates `batch_size` rows at a time). Raises ConfigError for a reward or a
    teacher it cannot use."""
    if config.name == "distill":
        teacher = load_teacher(config.teacher, tokenizer, device=device, precision=precision)
        return DistillObjective(config, teacher, pad_token_id=tokenizer.pad_token_id, precision=precision,
                                batch_size=batch_size, tokenizer=tokenizer, seed=seed)
    if config.name in ROLLOUT_OBJECTIVES:
        switch_off = getattr(METHODS[method_name], "without_adapter", None)
        sampler = GrpoObjective(config, build_rewards(config), tokenizer, seed=seed, switch_off=switch_off,
                                precision=precision, method_name=method_name, ranks=ranks)
        return OnlineDpoObjective(config, sampler) if config.name == "online_dpo" else sampler
    if config.name == "sft":
        return SftObjective(packing)
    if config.name == "reward":
        return RewardObjective()
    if config.name == "kto":
        return KtoObjective(config, reference_for(config, method_name))
    reference = reference_for(config, method_name) if hasattr(config, "reference") else None
    return PairObjective(config.name, partial(PAIR_LOSSES[config.name], config=config), reference)
