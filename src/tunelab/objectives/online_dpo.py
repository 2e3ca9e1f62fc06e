"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback") as TRL 1.16's
OnlineDPOTrainer computes it: GRPO's rollout machinery (objectives/grpo.py: seeded sampling in the training
precision, the rewards, the held-out evaluation) samples two completions per prompt and scores them, and DPO's loss
(objectives/dpo.py, on objectives/pairs.py's batches) trains on the pair, the higher-scored completion chosen.

- A completion's score is the weighted total of its rewards (nansum, as GRPO's), minus missing_eos_penalty where it
  was cut before its stop token. On a tie the first sample is chosen (TRL: `first >= second`). A pair with a
  completion no reward judged (TRL would score it 0) is left out: it stays in its micro-batch with weight 0.
- The reference log-probabilities (the starting model: the adapter switched off, or a frozen copy of the starting
  weights for full and freeze) are computed in the rollout, with no gradient, and carried on each pair, as a
  precomputed reference is (objectives/reference.py); the policy's are computed in the step. Both at temperature 1,
  summed over the completion's tokens through its stop token (TRL's OnlineDPOTrainer does not divide by the
  sampling temperature, and takes ipo on sums too).
- Logged as TRL names them: objective/scores, objective/scores_margin, objective/kl (a completion's summed log-ratio
  to the reference), objective/entropy (minus its summed log-probability), objective/non_score_reward (-beta x kl),
  objective/rlhf_reward (score - beta x kl), rewards/chosen|rejected|margins|accuracies, logps/chosen|rejected,
  val/contain_eos_token and beta; each over the pairs that count. TRL sums its kl and entropy over padding after the
  stop token as well; here only the completion's own tokens count.
A step samples with a generator seeded by (train.seed, step), so a resumed run trains on the very pairs the
uninterrupted one did; there is no rollout to keep between steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch

from tunelab.config import DpoObjective as DpoConfig
from tunelab.config import OnlineDpoObjective as OnlineDpoConfig
from tunelab.data.prompts import PromptRow
from tunelab.data.template import IGNORE_INDEX, TokenizedSample
from tunelab.models.logprobs import sequence_logprobs
from tunelab.objectives.dpo import dpo_losses
from tunelab.objectives.grpo import GreedyEvaluation, GrpoObjective, weighted_total
from tunelab.objectives.grpo_loss import counted_completions
from tunelab.objectives.metrics import Metrics
from tunelab.objectives.pairs import PairLogps, PairLosses, PairObjective, Reference
from tunelab.objectives.reference import precompute_reference


@dataclass
class SampledPair:
    """Two completions of one prompt, ordered by their scores: what an online DPO step trains on."""

    chosen: TokenizedSample
    """Prompt ids (untrained) followed by the chosen completion's ids through its stop token (trained)."""
    rejected: TokenizedSample
    scores: tuple[float, float]
    """(chosen, rejected) total rewards, missing_eos_penalty taken off; NaN where no reward judged one."""
    counted: bool
    """Whether the pair trains and is logged: both completions scored, in a micro-batch of this process's own (and
    not tied, under skip_ties)."""
    tied: bool = False
    """Both completions scored, and alike."""
    reference_logps: tuple[float, float] | None = None
    """The reference's summed log-probabilities of (chosen, rejected), set by the rollout."""


def dpo_config(config: OnlineDpoConfig) -> DpoConfig:
    """DPO's config with online DPO's beta and loss type (built once: pydantic validates every construction)."""
    return DpoConfig(name="dpo", beta=config.beta, loss_type=config.loss_type)


def pair_losses(policy: PairLogps, reference: PairLogps, config: DpoConfig) -> PairLosses:
    """Each pair's loss (sigmoid or ipo on summed log-probabilities, as TRL's OnlineDPOTrainer takes both) and the
    implied rewards of its completions: DPO's arithmetic with online DPO's beta (`config`: dpo_config's)."""
    return dpo_losses(policy, reference, config, averaged=False)


def ranked_pairs(totals: torch.Tensor, truncated: Sequence[bool], penalty: float | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(whether each pair's first completion is chosen [P] bool, the (chosen, rejected) scores [P, 2]) from the
    completions' total rewards [2P] (a prompt's two side by side; NaN where none judged), with `penalty` taken off
    the scores of completions cut before their stop token."""
    scores = totals.clone()
    if penalty is not None:
        scores[torch.tensor(list(truncated), dtype=torch.bool)] -= penalty
    pairs = scores.view(-1, 2)  # [P, 2]
    first_chosen = pairs[:, 0] >= pairs[:, 1]  # TRL's tie rule: the first sample is chosen
    ordered = torch.where(first_chosen[:, None], pairs, pairs.flip(1))
    return first_chosen, ordered


class OnlineDpoObjective:
    """Online DPO on prompt-only rows: the loop hands each step's prompts to `rollout`, which returns the step's
    micro-batches as rows of SampledPair items; `collate` and `loss_sum` then train on them as DPO does."""

    data_kind = "prompts"
    model_head = "lm"
    sequences_per_item = 2

    def __init__(self, config: OnlineDpoConfig, sampler: GrpoObjective) -> None:
        self.config = config
        self.sampler = sampler
        """Samples, scores and evaluates (GRPO's machinery, with this config's group_size 2)."""
        self.pairs = PairObjective("online_dpo", partial(pair_losses, config=dpo_config(config)),
                                   Reference(switch_off=None))
        """DPO's layout of the pairs and its loss; its reference reads each pair's reference_logps."""

    @property
    def share_prefix(self) -> bool:
        """Whether a padding-free batch holds each pair's prompt once (set by the run: see PairObjective)."""
        return self.pairs.share_prefix

    @share_prefix.setter
    def share_prefix(self, value: bool) -> None:
        self.pairs.share_prefix = value

    # --- what the sampler knows: the rows, the rewards, the reference model, the evaluation --------------------

    def check_row(self, row: PromptRow) -> str | None:
        return self.sampler.check_row(row)

    @property
    def check_key(self) -> str:
        return self.sampler.check_key

    @property
    def reference_column(self) -> str | None:
        return self.sampler.reference_column

    def prepare(self, model) -> None:
        """Keep the starting model as the reference when no adapter can be switched off (before a checkpoint
        loads)."""
        self.sampler.prepare(model)

    def set_progress(self, step: int, epoch: float) -> None:
        self.sampler.set_progress(step, epoch)

    def evaluate(self, model, rows: Sequence[PromptRow], *, batch_size: int = 16) -> dict[str, float]:
        """GRPO's held-out evaluation: greedy replies scored by the rewards (eval_reward, eval_loss = -eval_reward)."""
        return self.sampler.evaluate(model, rows, batch_size=batch_size)

    def evaluate_replies(self, model, rows: Sequence[PromptRow], *, batch_size: int = 16) -> GreedyEvaluation:
        return self.sampler.evaluate_replies(model, rows, batch_size=batch_size)

    def sequences(self, pair: SampledPair) -> tuple[TokenizedSample, TokenizedSample]:
        return pair.chosen, pair.rejected

    # --- rollout -----------------------------------------------------------------------------------------------

    def rollout(self, model, step_rows: list[list[list[PromptRow]]], step: int, epoch: float | None = None,
                weights: Sequence[float] | None = None) -> tuple[list, Metrics]:
        """Sample two completions of every prompt of the step, score them, rank each pair and give it its reference
        log-probabilities; returns the step's micro-batches as rows of SampledPair and the rollout's metrics.
        `weights`: per micro-batch, 0 for a stand-in (the loop's share_weights), whose pairs are not scored."""
        sampler, tokenizer = self.sampler, self.sampler.tokenizer
        prompts = [item for rows in step_rows for row in rows for item in row]
        started = time.perf_counter()
        ids, truncated = sampler.sample(model, [p.prompt_ids for p in prompts], step)  # prompt i: 2i, 2i + 1
        generated = time.perf_counter()
        texts = [tokenizer.decode(c, skip_special_tokens=True).strip() for c in ids]
        sampler.set_progress(step, epoch)
        sizes = [sum(len(row) for row in rows) for rows in step_rows]  # prompts per micro-batch
        _, kept = counted_completions([2 * size for size in sizes], weights)
        scores = torch.full((len(ids), len(sampler.rewards)), math.nan)  # [2P, R]
        if kept:
            scores[kept] = sampler.score([prompts[i // 2] for i in kept], [texts[i] for i in kept],
                                         [ids[i] for i in kept])
        first_chosen, ordered = ranked_pairs(weighted_total(scores, [r.weight for r in sampler.rewards]),
                                             truncated, self.config.missing_eos_penalty)
        scored = time.perf_counter()
        pairs = []
        for index, (prompt, first) in enumerate(zip(prompts, first_chosen.tolist(), strict=True)):
            replies = [_sample(prompt, ids[2 * index + j]) for j in ((0, 1) if first else (1, 0))]
            chosen_score, rejected_score = ordered[index].tolist()
            judged = not (math.isnan(chosen_score) or math.isnan(rejected_score))
            tied = judged and chosen_score == rejected_score
            pairs.append(SampledPair(replies[0], replies[1], (chosen_score, rejected_score),
                                     counted=judged and not (tied and self.config.skip_ties), tied=tied))
        out, at = [], 0
        for size in sizes:
            out.append([[pair] for pair in pairs[at : at + size]])
            at += size
        self._score_with_reference(model, out)
        metrics = self._rollout_metrics(pairs, scores, ids, truncated, kept)
        metrics |= {"seconds/generate": (generated - started, 1), "seconds/reward": (scored - generated, 1),
                    "seconds/reference": (time.perf_counter() - scored, 1)}
        return out, metrics

    def _score_with_reference(self, model, micro_batches: list[list[list[SampledPair]]]) -> None:
        """Give every pair its reference log-probabilities, micro-batch by micro-batch: the starting model's (the
        frozen copy, or the policy with its adapter switched off)."""
        sampler = self.sampler
        reference = sampler.frozen_reference if sampler.frozen_reference is not None else model
        for rows in micro_batches:
            pairs = [pair for row in rows for pair in row]

            def score(pairs: list[SampledPair] = pairs) -> None:
                precompute_reference(reference, self, [pairs], pad_token_id=sampler.tokenizer.pad_token_id,
                                     precision=sampler.precision, batch_size=len(pairs))

            if sampler.frozen_reference is not None:
                score()
            else:
                with sampler.switch_off(model):
                    score()

    def _rollout_metrics(self, pairs: list[SampledPair], scores: torch.Tensor, ids: list[list[int]],
                         truncated: list[bool], kept: list[int]) -> Metrics:
        """The rollout's metrics as (sum, count), so the loop adds them up over processes: the scores and their
        margin over the pairs that count, each reward's mean where it judged, stop tokens and lengths over the
        completions scored."""
        counted = [pair for pair in pairs if pair.counted]
        scored = [pair for pair in pairs if pair.counted or pair.tied]  # ties left out by skip_ties included
        metrics: Metrics = {
            "objective/tie_ratio": (sum(pair.tied for pair in scored), len(scored)),
            "objective/scores": (sum(sum(pair.scores) for pair in scored), 2 * len(scored)),
            "objective/scores_margin": (sum(pair.scores[0] - pair.scores[1] for pair in counted), len(counted)),
            "val/contain_eos_token": (sum(not truncated[i] for i in kept), len(kept)),
            "completions/mean_length": (sum(len(ids[i]) for i in kept), len(kept)),
            "beta": (self.config.beta, 1),
        }
        for index, reward in enumerate(self.sampler.rewards):
            column = scores[kept, index]
            judged = column[~column.isnan()]
            metrics[f"rewards/{reward.name}/mean"] = (float(judged.sum()), len(judged))
            for name, given in reward.take_values().items():
                metrics[f"rewards/{reward.name}/{name}"] = (sum(given), len(given))
        return metrics

    # --- the step ----------------------------------------------------------------------------------------------

    def collate(self, rows, pad_token_id: int, padding_free: bool) -> dict[str, torch.Tensor]:
        """DPO's batch of the pairs (every chosen completion, then every rejected one), with their reference
        log-probabilities, `pair_weights` [P] (0 for a pair left out) and `pair_scores` [P, 2]."""
        pairs: list[SampledPair] = [item for row in rows for item in row]
        batch = self.pairs.collate(rows, pad_token_id, padding_free)
        batch["pair_weights"] = torch.tensor([float(pair.counted) for pair in pairs])
        batch["pair_scores"] = torch.tensor([pair.scores for pair in pairs], dtype=torch.float32).nan_to_num(0.0)
        return batch

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """What the loss is divided by: the pairs that count (TRL's mean over the step's pairs)."""
        return int(batch["pair_weights"].sum())

    def input_tokens(self, pair: SampledPair) -> int:
        return len(pair.chosen.input_ids) + len(pair.rejected.input_ids)

    def loss_sum(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        policy = PairLogps.split(*sequence_logprobs(model, batch))
        reference = PairLogps.split(*self.pairs.reference.logprobs(model, batch))
        out = self.pairs.losses(policy, reference)
        weights = batch["pair_weights"].to(out.losses.dtype)
        kl = torch.stack([policy.chosen - reference.chosen, policy.rejected - reference.rejected], 1).detach()  # [P, 2]
        beta = self.config.beta
        margins = out.chosen_rewards - out.rejected_rewards
        per_pair = {  # each pair's value, or the sum over its two completions (counted twice)
            "rewards/chosen": (out.chosen_rewards, 1),
            "rewards/rejected": (out.rejected_rewards, 1),
            "rewards/margins": (margins, 1),
            "rewards/accuracies": ((margins > 0).float(), 1),
            "logps/chosen": (policy.chosen.detach(), 1),
            "logps/rejected": (policy.rejected.detach(), 1),
            "objective/kl": (kl.sum(1), 2),
            "objective/entropy": (-(policy.chosen + policy.rejected).detach(), 2),
            "objective/non_score_reward": (-beta * kl.sum(1), 2),
            "objective/rlhf_reward": ((batch["pair_scores"].to(kl.dtype) - beta * kl).sum(1), 2),
        }
        counted = int(weights.sum())
        metrics: Metrics = {name: (float((values.float() * weights).sum()), per * counted)
                            for name, (values, per) in per_pair.items()}
        return (out.losses * weights).sum(), metrics


def _sample(prompt: PromptRow, completion: list[int]) -> TokenizedSample:
    """The prompt's ids (untrained) followed by a completion's (trained)."""
    return TokenizedSample([*prompt.prompt_ids, *completion], [IGNORE_INDEX] * len(prompt.prompt_ids) + completion,
                           prompt.where, prompt.source)
