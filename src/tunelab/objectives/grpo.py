"""GRPO (Shao et al. 2024) with TRL's loss variants, and RLOO (objectives/rloo.py: the same rollouts, another
advantage and loss): for each prompt the policy samples `group_size` completions,
the rewards score them, and each completion's advantage is its reward minus its group's mean (divided by the
group's std under scale_rewards: group). The loss pushes every completion token's log-probability up or down
by its advantage, through PPO's clipped ratio to the policy that sampled it, plus beta x a per-token KL estimate
to the reference (k3: exp(ref - logp) - (ref - logp) - 1).

With one update per rollout the sampling policy is the current one: the ratio is exactly 1, so the loss is
minus the mean advantage, which group normalisation makes ~0 whatever the model learns (trl#3452). The signal
is in `reward`, `rewards/<name>/mean` and the held-out eval_reward, not in the loss: tunelab logs them all.

Rollouts are sampled with the KV cache, in the training precision, with a generator seeded by (train.seed,
step), so a resumed run samples the very completions the uninterrupted one did. With updates_per_rollout > 1
the rollout is kept (and checkpointed) for the updates that follow; its tokens' log-probabilities under the
sampling policy are those its first update computed, before any weight moved, so no extra forward pass is spent.
Under several processes each samples its own prompts' groups, and the step-wide statistics are gathered from all.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch

from tunelab.config import RolloutObjective as GrpoConfig
from tunelab.data.prompts import PromptRow
from tunelab.data.template import IGNORE_INDEX, TokenizedSample
from tunelab.errors import TrainingFault
from tunelab.infer.generate import sample_token_ids
from tunelab.methods import merged_copy
from tunelab.models.attention import DECODE, attention_implementation
from tunelab.models.logprobs import can_share_prompts, shared_prompt_logprobs, trained_token_logprobs
from tunelab.objectives.grpo_loss import (  # noqa: F401 - Completion and the loss are this module's interface
    Completion,
    GreedyEvaluation,
    counted_completions,
    group_advantages,
    joined_values,
    nanstd,
    prompt_groups,
    reward_metrics,
    reward_stds,
    split_groups,
    token_losses,
)
from tunelab.objectives.metrics import Metrics
from tunelab.objectives.pairs import collate_sequences
from tunelab.objectives.rewards import Reward, raised_at
from tunelab.objectives.rloo import leave_one_out_advantages, sequence_kl, sequence_losses, zero_std_share
from tunelab.objectives.rollout_state import rollout_from_tensors, rollout_tensors
from tunelab.train.distributed import Ranks
from tunelab.train.precision import autocast


class GrpoObjective:
    """GRPO on prompt-only rows. The loop hands each step's prompts to `rollout`, which returns the step's
    micro-batches as completions; `collate` and `loss_sum` then work on those like any objective."""

    data_kind = "prompts"
    model_head = "lm"

    def __init__(self, config: GrpoConfig, rewards: list[Reward], tokenizer, *, seed: int,
                 switch_off: Callable[[object], AbstractContextManager] | None, precision: str = "fp32",
                 method_name: str = "lora", ranks: Ranks | None = None) -> None:
        self.config = config
        self.method_name = method_name
        self.rewards = rewards
        self.tokenizer = tokenizer
        self.seed, self.ranks = seed, ranks or Ranks()  # the processes whose rollouts make one step
        self.switch_off = switch_off
        self.precision = precision
        self.frozen_reference = None
        """A copy of the starting model, when beta > 0 and the method has no adapter to switch off."""
        self.rollout_batches: list | None = None
        """The last rollout's micro-batches, reused while updates_per_rollout lasts."""
        self.rollout_step, self.rollout_weights = 0, None  # its step, and its micro-batches' loop weights
        self.shares_prompts = False
        """Whether each group's prompt runs once in the step (token_logprobs); set by prepare, for the counts."""

    @property
    def sequences_per_item(self) -> int:
        return self.config.group_size

    def rows_per_item(self, model) -> int:
        """Rows one prompt puts through the model side by side: its group of completions, or just itself when
        the completions share one pass over it (see token_logprobs); what attention and memory budgets count."""
        return 1 if can_share_prompts(model) else self.config.group_size

    def check_row(self, row: PromptRow) -> str | None:
        """Why a row cannot be scored (a reward's reference column missing, ...), before anything trains."""
        return next((problem for reward in self.rewards if (problem := reward.check(row))), None)

    @property
    def check_key(self) -> str:
        """What check_row looks at (each reward and its column), for the tokenised-data cache key."""
        return json.dumps([(reward.name, reward.column) for reward in self.rewards])

    @property
    def reference_column(self) -> str | None:
        """The first built-in reward's reference column: what task metrics compare generations with."""
        return next((reward.column for reward in self.rewards if reward.column), None)

    def prepare(self, model) -> None:
        """Keep the starting model as the KL reference when nothing can be switched off (full, freeze); called
        before a checkpoint loads, so a resumed run keeps the same reference."""
        if self.config.beta and self.switch_off is None:
            self.frozen_reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.shares_prompts = can_share_prompts(model)

    # --- rollout ---------------------------------------------------------------------------------------------

    def draws_rows(self, step: int) -> bool:
        """Whether step `step` (0-based) samples a new rollout from new prompts, or updates on the last one."""
        return self.rollout_batches is None or step - self.rollout_step >= self.config.updates_per_rollout

    def rollout(self, model, step_rows: list[list[list[PromptRow]]] | None, step: int,
                epoch: float | None = None, weights: Sequence[float] | None = None) -> tuple[list, Metrics]:
        """Sample, score and normalise completions for every prompt of the step; returns the step's micro-batches
        as rows of Completion items and the rollout's metrics. Without rows (see draws_rows) the last rollout's
        micro-batches again, with no metrics. `epoch`: the epochs done before this step, fractional (TRL's
        trainer_state.epoch, which reward functions read). `weights`: per micro-batch, 0 for a stand-in (the loop's
        share_weights), left out of every statistic. The step-wide ones (scale_rewards: batch, normalize_advantages,
        what is logged) cover every process's completions, as TRL gathers them: the advantages are those one process
        holding the whole step computes (a prompt's group is sampled whole on one process)."""
        if step_rows is None:
            return self.rollout_batches, {}
        prompts = [item for rows in step_rows for row in rows for item in row]
        started = time.perf_counter()
        ids, truncated = self.sample(model, [p.prompt_ids for p in prompts], step)
        generated = time.perf_counter()
        repeated = [p for p in prompts for _ in range(self.config.group_size)]
        texts = [self.tokenizer.decode(c, skip_special_tokens=True).strip() for c in ids]
        self.set_progress(step, epoch)
        sizes = [sum(len(row) for row in rows) * self.config.group_size for rows in step_rows]
        counted, kept = counted_completions(sizes, weights)
        scores = (self.score([repeated[i] for i in kept], [texts[i] for i in kept], [ids[i] for i in kept]) if kept
                  else torch.empty(0, len(self.rewards)))  # [K, R]
        scored = time.perf_counter()
        completions = [
            Completion(TokenizedSample([*p.prompt_ids, *c], [IGNORE_INDEX] * len(p.prompt_ids) + list(c), p.where,
                                       p.source), 0.0, t, index)
            for index, (p, c, t) in enumerate(zip(repeated, ids, truncated, strict=True))
        ]
        local = {"scores": scores, "lengths": torch.tensor([len(ids[i]) for i in kept], dtype=torch.long),
                 "truncated": torch.tensor([truncated[i] for i in kept], dtype=torch.bool)}
        rloo_kl = self.config.name == "rloo" and self.config.beta
        if rloo_kl:  # RLOO's KL penalty is part of the reward
            local["kl"], kl_tokens = (self._rollout_kl(model, [completions[i] for i in kept], [n for n in counted if n])
                                      if kept else (torch.zeros(0), 0))
        ranks = self.ranks
        whole, mine = ranks.gather_rows(local, counted)  # the step's completions on every process, in step order
        total = weighted_total(whole["scores"], [r.weight for r in self.rewards])
        logged = joined_values(ranks.gather([reward.take_values() for reward in self.rewards]))
        metrics = reward_metrics(whole["scores"], total, [r.name for r in self.rewards], logged,
                                 self.config.group_size, getattr(self.config, "scale_rewards", "group"))
        if self.config.name == "rloo":
            if rloo_kl:
                total = total - self.config.beta * whole["kl"]
                metrics["kl"] = (float(local["kl"].sum()), kl_tokens)
                metrics["frac_reward_zero_std"] = (zero_std_share(total, self.config.group_size), 1)  # as TRL
            advantages = leave_one_out_advantages(total, self.config.group_size, self.config.normalize_advantages)
        else:
            advantages = group_advantages(total, self.config.group_size, self.config.scale_rewards)
        for completion, advantage in zip((completions[i] for i in kept), advantages[mine].tolist(), strict=True):
            completion.advantage = advantage  # a stand-in's completions keep 0: they train with weight 0
        metrics |= {
            "completions/mean_length": (float(whole["lengths"].sum()) / len(whole["lengths"]), 1),
            "completions/clipped_ratio": (float(whole["truncated"].sum()) / len(whole["truncated"]), 1),
        }
        if not ranks.is_main:  # the main process logs the step-wide values; the KL's sum and count add up
            metrics = {"kl": metrics["kl"]} if rloo_kl else {}
        metrics |= {"seconds/generate": (generated - started, 1), "seconds/reward": (scored - generated, 1)}
        out, at = [], 0
        for size in sizes:
            out.append([[c] for c in completions[at : at + size]])
            at += size
        if self.config.updates_per_rollout > 1:
            self.rollout_batches, self.rollout_step, self.rollout_weights = out, step, weights
        return out, metrics

    def sample(self, model, prompts: list[list[int]], step: int) -> tuple[list[list[int]], list[bool]]:
        """(group_size completions of each prompt, in prompt order; whether each was cut), seeded by (seed, step)."""
        sampler = self._sampling_model(model)
        device = next(sampler.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with attention_implementation(sampler, DECODE), autocast(self.precision, device):
                return sample_token_ids(sampler, self.tokenizer, prompts, max_new_tokens=self.config.max_new_tokens,
                                        do_sample=True, temperature=self.config.temperature, top_p=self.config.top_p,
                                        seed=self.seed * 1_000_003 + step, repeats=self.config.group_size)
        finally:
            model.train(was_training)

    def _sampling_model(self, model):
        """On CPU, a copy of the policy with its adapter folded in, in the training precision (no per-token weight
        casts, no adapter matmuls: see methods.merged_copy), its bf16 matmul weights packed (models/packed_linear);
        elsewhere, or when the method cannot fold, the policy itself."""
        if next(model.parameters()).device.type != "cpu":
            return model
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        return merged_copy(model, self.method_name, dtype) or model

    def _rollout_kl(self, model, completions: list[Completion], sizes: list[int]) -> tuple[torch.Tensor, int]:
        """(each completion's KL to the reference [C]: its tokens' log-ratios summed, under the policy that sampled
        it, 0 for one mask_truncated_completions leaves out; the tokens counted), micro-batch by micro-batch
        (`sizes` completions each)."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        kls, tokens, at = [], 0, 0
        try:
            with torch.no_grad(), autocast(self.precision, device):
                for size in sizes:
                    chunk, pad = completions[at:at + size], self.tokenizer.pad_token_id
                    batch = collate_sequences([c.sample for c in chunk], pad, False) | prompt_groups(chunk, pad)
                    batch = {key: value.to(device) for key, value in batch.items()}
                    logps, keep = self.token_logprobs(model, batch)
                    owners = batch["sequence_ids"][keep].cpu()
                    # TRL masks truncated completions before the KL: none, and no penalty, for those left out
                    left_out = torch.tensor([self.config.mask_truncated_completions and c.truncated for c in chunk])
                    kl = sequence_kl(logps.cpu(), self._reference_logps(model, batch).cpu(), owners, size)
                    kls.append(kl.masked_fill(left_out, 0.0))
                    tokens, at = tokens + int((~left_out[owners]).sum()), at + size
        finally:
            model.train(was_training)
        return torch.cat(kls), tokens

    def score(self, rows: Sequence[PromptRow], texts: list[str], ids: list[list[int]]) -> torch.Tensor:
        """Every reward of every completion [C, R] (NaN where a reward gave None). A reward that raises, returns
        the wrong count or an infinite value stops training as a TrainingFault naming it (the finished steps are
        checkpointed)."""
        columns = []
        for reward in self.rewards:
            try:
                column = torch.tensor(reward.score(list(rows), texts, ids), dtype=torch.float32)
            except Exception as err:  # noqa: BLE001 - a user's function: report whatever it raised, and where
                raise TrainingFault(f"the reward '{reward.name}' failed: {type(err).__name__}: {err}"
                                    f"{raised_at(err)}") from err
            if column.isinf().any():
                index = int(column.isinf().nonzero()[0])
                raise TrainingFault(f"the reward '{reward.name}' returned {float(column[index])} for completion "
                                    f"{index}: a reward must be finite (or None for a completion it does not judge)")
            columns.append(column)
        return torch.stack(columns, dim=1)

    # --- the step ------------------------------------------------------------------------------------------

    def collate(self, rows, pad_token_id: int, padding_free: bool) -> dict[str, torch.Tensor]:
        completions: list[Completion] = [item for row in rows for item in row]
        batch = collate_sequences([c.sample for c in completions], pad_token_id, padding_free)
        batch["advantages"] = torch.tensor([c.advantage for c in completions], dtype=torch.float32)
        keep = [not (self.config.mask_truncated_completions and c.truncated) for c in completions]
        batch["sequence_weights"] = torch.tensor(keep, dtype=torch.float32)
        if self.config.updates_per_rollout > 1:
            if all(c.old_logps is not None for c in completions):
                batch["old_logps"] = torch.tensor([v for c in completions for v in c.old_logps], dtype=torch.float32)
            batch["completion_index"] = torch.tensor([c.index for c in completions])
        batch.update(prompt_groups(completions, pad_token_id))
        if self.shares_prompts:  # what the run's FLOPs and positions count: each group's prompt once
            prompts, sizes = batch["group_prompt_lengths"], batch["group_sizes"]
            batch["shared_tokens"] = ((sizes - 1) * prompts).sum()
            batch["computed_positions"] = prompts.sum() + batch["completion_ids"].numel()
        return batch

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """What the step's loss is divided by: completions (grpo, rloo), completions x max_new_tokens (dr_grpo),
        or the completion tokens that count (dapo)."""
        sequences = int(batch["sequence_count"])
        if self.config.name == "rloo" or self.config.loss_type == "grpo":
            return sequences
        if self.config.loss_type == "dr_grpo":
            return sequences * self.config.max_new_tokens
        keep = batch["targets"] != IGNORE_INDEX
        return int(batch["sequence_weights"][batch["sequence_ids"][keep]].sum())

    def input_tokens(self, completion: Completion) -> int:
        return len(completion.sample.input_ids)

    def token_logprobs(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probability of every completion token [N], the mask of the batch's trained positions that lists
        them in the same order): each prompt run once for its group where the model allows it."""
        keep = batch["targets"] != IGNORE_INDEX
        if can_share_prompts(model):
            return shared_prompt_logprobs(model, *split_groups(batch), self.config.temperature), keep
        return trained_token_logprobs(model, batch, self.config.temperature)

    def loss_sum(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        logps, keep = self.token_logprobs(model, batch)
        owners = batch["sequence_ids"][keep]
        rloo = self.config.name == "rloo"  # its KL is in the advantages already
        reference = self._reference_logps(model, batch) if self.config.beta and not rloo else None
        if "old_logps" in batch:
            old = batch["old_logps"]
        else:  # the rollout's first update: the policy that sampled is this one, so its log-probs are these
            old = logps.detach()
            if "completion_index" in batch:
                self._keep_old_logps(batch, owners, old)
        if rloo:
            count = int(batch["sequence_count"])
            losses, clipped = sequence_losses(logps, old, owners, count, batch["advantages"], self.config)
            weights = batch["sequence_weights"]
            return (losses * weights).sum(), {"clip_ratio/region_mean": (float((clipped.float() * weights).sum()),
                                                                         float(weights.sum()))}
        losses, kl, clipped = token_losses(logps, old, batch["advantages"][owners], self.config, reference)
        weights = batch["sequence_weights"][owners]
        weighted = losses * weights
        if self.config.loss_type == "grpo":
            count = int(batch["sequence_count"])
            sums = weighted.new_zeros(count).index_add(0, owners, weighted)
            tokens = weights.new_zeros(count).index_add(0, owners, weights)
            loss_sum = (sums / tokens.clamp(min=1)).sum()
        else:
            loss_sum = weighted.sum()
        counted = float(weights.sum())
        metrics: Metrics = {"clip_ratio/region_mean": (float((clipped.float() * weights).sum()), counted)}
        if reference is not None:
            metrics["kl"] = (float((kl * weights).sum()), counted)
        return loss_sum, metrics

    def _keep_old_logps(self, batch: dict[str, torch.Tensor], owners: torch.Tensor, old: torch.Tensor) -> None:
        """Store each completion's token log-probs (in batch order: sequence by sequence) in the rollout."""
        flat = [c for rows in self.rollout_batches for row in rows for c in row]
        counts = torch.bincount(owners, minlength=int(batch["sequence_count"])).tolist()
        for index, values in zip(batch["completion_index"].tolist(), old.float().cpu().split(counts), strict=True):
            flat[index].old_logps = values.tolist()

    # --- checkpointed state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The rollout the next updates reuse (empty when every step samples its own)."""
        kept = self.rollout_batches
        return {} if kept is None else rollout_tensors(kept, self.rollout_step, self.rollout_weights)

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.rollout_batches, self.rollout_step, self.rollout_weights = rollout_from_tensors(tensors)

    def _reference_logps(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            if self.frozen_reference is not None:
                return self.token_logprobs(self.frozen_reference, batch)[0]
            with self.switch_off(model):
                return self.token_logprobs(model, batch)[0]

    # --- evaluation ----------------------------------------------------------------------------------------

    def set_progress(self, step: int, epoch: float) -> None:
        """What reward functions see as trainer_state at an evaluation: the steps and fractional epochs done (TRL
        evaluates with its trainer's state; a rollout sets the step it samples for)."""
        for reward in self.rewards:
            reward.trainer_state.global_step, reward.trainer_state.epoch = step, epoch

    def evaluate(self, model, rows: Sequence[PromptRow], *, batch_size: int = 16) -> dict[str, float]:
        """Greedy completions of the held-out prompts, scored by the rewards: eval_reward (the weighted total),
        eval_rewards/<name>/mean, eval_completions/mean_length, and eval_loss = -eval_reward (so early stopping and
        keep_best on eval_loss follow the reward)."""
        return self.evaluate_replies(model, rows, batch_size=batch_size).metrics if rows else {}

    def evaluate_replies(self, model, rows: Sequence[PromptRow], *, batch_size: int = 16) -> GreedyEvaluation:
        """`evaluate`, with what it measured: each prompt's greedy completion and its rewards (`tunelab eval` of a
        GRPO run lists them per prompt and compares them with a baseline's)."""
        sampler = self._sampling_model(model)
        device = next(sampler.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with attention_implementation(sampler, DECODE), autocast(self.precision, device):
                ids = sample_token_ids(sampler, self.tokenizer, [row.prompt_ids for row in rows],
                                       max_new_tokens=self.config.max_new_tokens, do_sample=False,
                                       batch_size=batch_size)[0]
        finally:
            model.train(was_training)
        texts = [self.tokenizer.decode(c, skip_special_tokens=True).strip() for c in ids]
        scores = self.score(rows, texts, ids)
        total = weighted_total(scores, [r.weight for r in self.rewards])
        result = {"eval_loss": -float(total.nanmean()), "eval_reward": float(total.nanmean()),
                  "eval_completions/mean_length": sum(len(c) for c in ids) / len(ids)}
        for index, reward in enumerate(self.rewards):
            result[f"eval_rewards/{reward.name}/mean"] = float(scores[:, index].nanmean())
            for name, value in reward.take_logged().items():
                result[f"eval_rewards/{reward.name}/{name}"] = value
        return GreedyEvaluation(texts, scores, total, result)


def weighted_total(scores: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Each completion's total reward: its rewards times their weights, added where not NaN (TRL's nansum); NaN
    where no reward judged it, so that it stays out of its group's mean and std."""
    total = (scores * torch.tensor(weights)).nansum(dim=1)
    return total.masked_fill(scores.isnan().all(dim=1), math.nan)


GRPO_EVAL_METRICS = ("reward", "completions/mean_length")
"""What a GRPO evaluation reports besides eval_loss and each reward (eval_rewards/<name>/mean): what
train.best_metric may follow."""
