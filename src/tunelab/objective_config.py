"""The `objective:` section of a run config: what training minimises, one schema per objective (a union on
`name`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from tunelab.config_base import Strict


class SftObjective(Strict):
    """Supervised fine-tuning: next-token cross-entropy on the trained tokens (the default)."""

    name: Literal["sft"]


ReferenceMode = Literal["auto", "adapter", "precompute"]
"""Where the reference log-probabilities come from. `adapter`: the model with its adapter switched off, live in
every step (one model in memory; adapter methods only). `precompute`: the starting model scores every row once
before training (any method; no reference pass in the steps). `auto`: adapter for adapter methods, precompute
for full and freeze."""


class DpoObjective(Strict):
    """Direct preference optimisation on preference rows (prompt/chosen/rejected), against a frozen reference."""

    name: Literal["dpo"]
    beta: float = Field(0.1, gt=0)
    """How far the policy may move from the reference (larger: closer to it)."""
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "exo_pair", "nca_pair", "bco_pair",
                       "sppo_hard", "apo_zero", "apo_down", "discopop"] = "sigmoid"
    """sigmoid: DPO's log-sigmoid; ipo: squared distance to 1/(2 beta), on per-token averaged log-probs; hinge:
    SLiC's max(0, 1 - beta x margin); robust: conservative DPO, unbiased under label_smoothing flipped labels;
    sigmoid_norm: sigmoid on per-token averaged log-probs; exo_pair: EXO (label_smoothing is its epsilon, > 0;
    1e-3 in its paper); nca_pair and bco_pair: each reply's own log-ratio pushed up (chosen) or down (rejected);
    sppo_hard: SPPO with hard labels; apo_zero / apo_down: APO for chosen replies better / worse than the
    model's own; discopop: DiscoPOP's blend of log-sigmoid and exponential losses (discopop_tau; not convex: at
    tau 0.05 it has a local minimum at beta x margin -0.1 behind a rise to +0.07, so from the reference, where the
    margin is 0, it first moves towards the rejected reply). As TRL names them (objectives/dpo.py)."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """Assumed fraction of pairs whose labels are flipped (sigmoid and robust; exo_pair's epsilon)."""
    discopop_tau: float = Field(0.05, gt=0)
    """DiscoPOP's temperature of the blend (its paper's 0.05)."""
    sft_weight: float = Field(0.0, ge=0)
    """Adds this times the chosen reply's per-token cross-entropy to each pair's loss (RPO)."""
    reference: ReferenceMode = "auto"

    @model_validator(mode="after")
    def _exo_needs_epsilon(self) -> DpoObjective:
        if self.loss_type == "exo_pair" and self.label_smoothing == 0:
            raise ValueError("loss_type exo_pair needs objective.label_smoothing > 0 (its epsilon; the EXO paper uses "
                             "1e-3)")
        return self


class OrpoObjective(Strict):
    """ORPO: cross-entropy on the chosen reply plus an odds-ratio penalty on the rejected one; no reference."""

    name: Literal["orpo"]
    beta: float = Field(0.1, gt=0)
    """Weight of the odds-ratio term (ORPO's lambda)."""


class SimpoObjective(Strict):
    """SimPO: a margin between the chosen and rejected replies' per-token average log-probs; no reference."""

    name: Literal["simpo"]
    beta: float = Field(2.0, gt=0)
    """Scale of the average log-prob difference."""
    gamma: float = Field(0.5, ge=0)
    """Target reward margin (in units of beta x average log-prob)."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    sft_weight: float = Field(0.0, ge=0)
    """Adds this times the chosen reply's per-token cross-entropy to each pair's loss (CPO-SimPO)."""


class KtoObjective(Strict):
    """KTO on feedback rows (prompt/completion/label): each reply pushed up or down against a frozen reference."""

    name: Literal["kto"]
    beta: float = Field(0.1, gt=0)
    desirable_weight: float = Field(1.0, gt=0)
    """Loss weight of good replies; raise it when they are rarer than bad ones."""
    undesirable_weight: float = Field(1.0, gt=0)
    reference: ReferenceMode = "auto"


class RewardObjective(Strict):
    """A reward model: a scalar head on the model, trained on preference pairs so that the chosen reply scores
    above the rejected one (Bradley-Terry; a row's optional `margin` column is the gap it must clear)."""

    name: Literal["reward"]


class DistillObjective(Strict):
    """Knowledge distillation on SFT rows: at every trained token the student's next-token distribution is pulled
    towards a frozen teacher's, over the whole vocabulary (the generalized Jensen-Shannon divergence of TRL's
    GKDTrainer and DistillationTrainer). On the data's replies by default (GKD with lmbda 0); lmbda and seq_kd
    train on sampled replies instead, as GKD does. The teacher must share the student's tokenizer."""

    name: Literal["distill"]
    teacher: str = Field(min_length=1)
    """The model to learn from, loaded as `model:` is: a run folder (an adapter run is folded into its base), a
    preset, a hub id, a model folder or a .gguf file. Its tokenizer must be the student's (the same tokens and
    ids); it runs frozen, in eval mode, in the training precision, on the training device."""
    beta: float = Field(0.0, ge=0, le=1)
    """Which divergence: 0 the forward KL(teacher || student) (mode-covering: classic distillation on given replies),
    1 the reverse KL(student || teacher) (mode-seeking), between them the generalized JSD with the mixture (1 - beta)
    student + beta teacher; 0.5 the symmetric JSD. TRL defaults to 0.5 (GKDTrainer) and 1 (DistillationTrainer),
    both for the student's own samples; on the support tickets' replies 0 reached 85% field accuracy in one epoch
    where 0.5 reached 64% (README, Distillation)."""
    temperature: float = Field(1.0, gt=0)
    """Both models' logits are divided by it before the divergence (above 1: softer distributions, more weight on
    the teacher's runner-up tokens). As in TRL, the divergence is not multiplied by temperature^2. Sampled replies
    (lmbda, seq_kd) are drawn at this temperature too, as TRL's DistillationTrainer does (GKDTrainer samples at
    its own temperature, default 0.9, and takes the divergence at 1)."""
    alpha: float = Field(0.0, ge=0, le=1)
    """Weight of the ordinary cross-entropy on the reply tokens: each token's loss is alpha x CE + (1 - alpha) x
    divergence. 0: the teacher alone says what to learn; raise it when the data's replies are better than the
    teacher's. Not on the student's own samples (lmbda), whose loss is the divergence alone, as everywhere in TRL's
    GKDTrainer (it has no cross-entropy term); on the teacher's samples (seq_kd) it is sequence-level KD."""
    lmbda: float = Field(0.0, ge=0, le=1)
    """The probability that a micro-batch's replies are replaced by the student's own samples from its prompts
    (on-policy distillation, GKD's lambda; TRL's GKDTrainer defaults to 0.5). The divergence is then taken on the
    sampled tokens (a row's last reply is replaced; earlier turns become prompt, untrained, as in TRL). 0: always
    the data's replies; 1: always the student's. Which micro-batches are drawn follows from train.seed and the
    step, so a resumed run draws the same ones. Needs prompts: refused with data.train_on=all and under FSDP (a
    sharded student cannot decode); a raw-text row (no prompt) keeps its own text."""
    seq_kd: bool = False
    """Replace the replies of the micro-batches lmbda does not draw by the teacher's own samples from their prompts
    (sequence-level KD, TRL's seq_kd), sampled at `temperature`."""
    max_new_tokens: int = Field(128, ge=1)
    """Longest sampled reply, in tokens (lmbda, seq_kd; TRL's max_new_tokens). A sample that finished ends with its
    stop token (trained); one cut here has none. A sampled sequence (its prompt and reply) may be longer than the
    data's row: the memory estimate plans for prompt + max_new_tokens."""


class RewardSpec(Strict):
    """One reward of a GRPO run."""

    reward: str = Field(min_length=1)
    """A built-in (exact_match, json_field_accuracy, json_valid, accuracy, chrf: each in [0, 1] against the row's
    `column`), `file.py:function` with TRL's signature `fn(prompts, completions, **columns)
    -> list[float]`, or the folder of a reward-model run (objective.name: reward)."""
    weight: float = 1.0
    """Its weight in the total reward (rewards are added, each times its weight)."""
    column: str = "answer"
    """Built-ins only: the column holding each row's reference answer."""


class RolloutObjective(Strict):
    """What GRPO and RLOO share: prompt-only rows, `group_size` completions sampled per prompt from the policy and
    scored by the rewards, each completion pushed up or down by how its reward compares with its siblings'."""

    rewards: list[str | RewardSpec] = Field(min_length=1)
    """What a completion is worth: each entry a built-in name, `file.py:function`, a reward-model run folder, or
    `{reward: ..., weight: W, column: C}`."""
    group_size: int = Field(8, ge=2)
    """Completions sampled per prompt (TRL's num_generations): their rewards are compared with each other."""
    max_new_tokens: int = Field(128, ge=1)
    """Longest completion (TRL's max_completion_length)."""
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    beta: float = Field(0.0, ge=0)
    """Weight of the KL penalty to the reference (the starting model). 0: no reference pass at all."""
    epsilon: float = Field(0.2, gt=0)
    """Clip range of the probability ratio to the policy that sampled the completions."""
    epsilon_high: float | None = Field(None, gt=0)
    """Upper clip range (DAPO's clip-higher: 0.28); default epsilon."""
    mask_truncated_completions: bool = False
    """Leave completions cut off at max_new_tokens out of the loss (DAPO)."""
    updates_per_rollout: int = Field(1, ge=1)
    """Optimiser steps per batch of completions (TRL's num_iterations, GRPO's mu). 1: the completions are always
    the current policy's, so the ratio is exactly 1. More: later steps reuse the rollout and draw no new prompts,
    and the ratio to the sampling policy (its log-probs kept from the rollout's first update) is clipped."""

    def reward_specs(self) -> list[RewardSpec]:
        """Every reward as a RewardSpec (bare strings get weight 1)."""
        return [RewardSpec(reward=r) if isinstance(r, str) else r for r in self.rewards]

    @property
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


class GrpoObjective(RolloutObjective):
    """GRPO (Shao et al. 2024): each completion's advantage is its reward minus its group's mean (over the group's
    std), every completion token's ratio is clipped on its own, and beta weighs a per-token KL estimate in the
    loss."""

    name: Literal["grpo"]
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "dapo"
    """How token losses add up: grpo: mean over each completion's tokens, then over completions (favours short
    right answers); dr_grpo: sum over tokens / (completions x max_new_tokens); dapo (TRL's default): sum over
    tokens / the step's completion tokens."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide each advantage by the std of its group's rewards (`group`), of the step's (`batch`), or not at all
    (`none`, as Dr. GRPO recommends)."""


class RlooObjective(RolloutObjective):
    """RLOO (REINFORCE leave-one-out, Ahmadian et al. 2024) as TRL's RLOOTrainer computes it: each completion's
    baseline is the mean reward of the other completions of its prompt, beta x the completion's KL to the
    reference (the sum of its tokens' log-ratios) is taken off its reward, and the ratio is clipped per completion
    (the sum of its tokens' log-probabilities), the loss a mean over completions."""

    name: Literal["rloo"]
    beta: float = Field(0.05, ge=0)
    """Weight of the KL penalty in the reward (TRL's default 0.05). 0: no reference pass at all."""
    normalize_advantages: bool = False
    """Scale the step's advantages to mean 0 and std 1 (TRL's normalize_advantages)."""


class OnlineDpoObjective(RolloutObjective):
    """Online DPO (Guo et al. 2024) as TRL's OnlineDPOTrainer: two completions sampled per prompt from the policy,
    scored by the rewards; the higher-scored one (the first on a tie) is chosen, the other rejected, and the pair
    trains with DPO's loss against the reference (the starting model). A pair with a completion no reward judged is
    left out. GRPO's clipping fields and updates_per_rollout do not apply: every step samples new pairs."""

    name: Literal["online_dpo"]
    group_size: int = 2
    """Completions sampled per prompt: always 2, the pair."""
    beta: float = Field(0.1, gt=0)
    """DPO's beta: how far the policy may move from the reference (larger: closer to it); TRL's default 0.1."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: DPO's -log sigmoid(beta x margin); ipo: (margin - 1/(2 beta))^2. Both on the completions' summed
    log-probabilities, as TRL's OnlineDPOTrainer takes them (offline DPO's ipo averages per token)."""
    missing_eos_penalty: float | None = Field(None, ge=0)
    """Subtracted from the score of a completion cut at max_new_tokens before its end-of-sequence token (TRL's
    missing_eos_penalty): favours replies that finish. None: no penalty."""
    skip_ties: bool = False
    """Leave out a pair whose two completions score the same (logged as objective/tie_ratio): it says nothing about
    which is better. False, as TRL: the first sample is chosen, an arbitrary preference that rule-based rewards
    (which tie often) turn into noise."""

    @field_validator("group_size")
    @classmethod
    def _a_pair(cls, value: int) -> int:
        if value != 2:
            raise ValueError(f"online_dpo samples 2 completions per prompt (the chosen and the rejected one), not "
                             f"{value}; leave objective.group_size out (or use objective.name: grpo or rloo)")
        return value

    @field_validator("epsilon", "epsilon_high", "mask_truncated_completions", "updates_per_rollout")
    @classmethod
    def _not_for_pairs(cls, value: object, info: ValidationInfo) -> object:
        why = {"epsilon": "DPO clips no probability ratio", "epsilon_high": "DPO clips no probability ratio",
               "mask_truncated_completions": "objective.missing_eos_penalty scores cut replies down instead",
               "updates_per_rollout": "every step samples and trains on new pairs, as TRL's OnlineDPOTrainer"}
        if value != RolloutObjective.model_fields[info.field_name].default:
            raise ValueError(f"does not apply to online_dpo ({why[info.field_name]}); leave it out")
        return value


ROLLOUT_OBJECTIVES = ("grpo", "rloo", "online_dpo")
"""Objectives that train on completions sampled from the policy (prompt-only rows, rewards)."""


ObjectiveConfig = Annotated[
    SftObjective | DpoObjective | OrpoObjective | SimpoObjective | KtoObjective | RewardObjective | GrpoObjective
    | RlooObjective | OnlineDpoObjective | DistillObjective,
    Field(discriminator="name"),
]

OBJECTIVE_CLASSES = {
    "sft": SftObjective,
    "dpo": DpoObjective,
    "orpo": OrpoObjective,
    "simpo": SimpoObjective,
    "kto": KtoObjective,
    "reward": RewardObjective,
    "grpo": GrpoObjective,
    "rloo": RlooObjective,
    "online_dpo": OnlineDpoObjective,
    "distill": DistillObjective,
}
