"""GRPO: reinforcement fine-tuning with rewards from code, a reward model or a judge.

What the algorithm really is (Shao et al. 2024, "DeepSeekMath"), for one rollout batch:

    for each of P prompts q, sample G completions o_1..o_G from the current policy (no grad)
    r_i   = sum_k w_k * reward_k(q, o_i)                        (CombinedReward)
    A_i   = (r_i - mean(r_1..G)) / (std(r_1..G) + eps)         (scale_rewards: false -> no division)
    then num_iterations times, one optimizer step over all P*G completions:
        ratio_t = pi(o_t) / pi_old(o_t)                         (pi_old: the sampling policy)
        L_t     = -min(ratio_t A, clip(ratio_t, 1 - epsilon, 1 + epsilon_high) A)
                  + beta * k3(pi, pi_ref)_t                     (skipped entirely when beta = 0)
        loss    = mean of L_t over all completion tokens        (loss_aggregation: token, as DAPO)
               or mean over completions of each one's token mean (loss_aggregation: sequence, as the paper)

There is no value model: the group is the baseline. A group whose rewards are all equal has
zero advantages and teaches nothing; its share is logged as ``rollout/zero_spread_share``.

Simplifications chosen, and why:
- With ``num_iterations: 1`` (the default) pi_old is the policy itself, so the ratio is exactly 1
  and its gradient is the plain policy gradient: we skip the sampling log-prob pass and use the
  detached current log-probs (no extra forward). With more iterations pi_old is the log-probs the
  backend recomputed at sampling time.
- All P*G completions form one optimizer step, split into micro-batches of ``training.batch_size``
  completions (whole groups) for memory; each micro-batch is weighted by its tokens (or sequences)
  over those of the whole step (``loss_weight``), so the step's gradient is the same whatever the
  micro-batch size and the number of processes sharing the prompts.
- The G completions of a prompt share it: sampling prefills each prompt once, and the training
  forward runs each prompt once and lets its G completions attend to that KV cache
  (``share_prompt_forward``), which is exact and saves (G-1)/G of the prompt's compute.
- Log-probs are those of the temperature-scaled distribution (sampling and training agree);
  top-p / top-k only decide which tokens can be sampled.
- The reference is the policy with LoRA adapters disabled (no second copy), or a frozen copy of
  the starting weights for full fine-tuning; its log-probs are computed once per rollout.

Managed-RFT job keys (``samplesPerPrompt``, ``batchSize``, ``learningRateMultiplier``,
``thinkingLevel``...) are accepted; ``docs/online_rl.md`` has the table.
"""
from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field, model_validator

from alignkit.losses import group_advantages, kl_k3, masked_mean, ppo_clip_loss
from alignkit.memory import uses_gradient_checkpointing
from alignkit.methods.online import (
    CompletionBatch,
    GroupedCompletionBatch,
    OnlineJob,
    OnlineRecipe,
    Rollout,
    aggregate,
)
from alignkit.methods.registry import register_method


class GRPOJob(OnlineJob):
    METHOD = "grpo"
    num_generations: int = Field(8, ge=2, description="completions per prompt (the group); at least 2")
    beta: float = Field(0.0, ge=0, description="KL coefficient to the reference; 0 = no reference at all")
    epsilon: float = Field(0.2, gt=0, lt=1, description="lower clip: ratio >= 1 - epsilon")
    epsilon_high: float | None = Field(None, gt=0, description="upper clip (DAPO clip-higher); default epsilon")
    num_iterations: int = Field(1, gt=0, description="optimizer steps on each rollout batch")
    loss_aggregation: Literal["token", "sequence"] = "token"
    scale_rewards: bool = Field(True, description="divide group-centred rewards by the group's std")
    share_prompt_forward: bool = Field(
        True, description="run each prompt once per group in the training forward (exact; off with gradient checkpointing)")

    @model_validator(mode="after")
    def _one_accumulation(self):
        if self.training.gradient_accumulation_steps != 1:
            raise ValueError("grpo: training.gradient_accumulation_steps is not used (every optimizer step covers "
                             "the whole rollout batch, split into micro-batches of training.batch_size); leave it at 1")
        return self


@register_method("grpo", job=GRPOJob, help="reinforcement fine-tuning with reward functions (GRPO)")
class GRPORecipe(OnlineRecipe):
    def __init__(self, job: GRPOJob, **parts):
        super().__init__(job, **parts)
        self.setup_reference(job.beta > 0)

    def rollout_steps(self) -> int:
        return self.job.num_iterations

    @torch.no_grad()
    def make_rollout(self, index: int) -> Rollout:
        job = self.job
        rollout = self.sample_and_score(index, job.num_generations, with_logprobs=job.num_iterations > 1)
        advantages, zero_spread = group_advantages(rollout.rewards, job.num_generations,
                                                   scale_by_std=job.scale_rewards)
        rollout.per_sample["advantages"] = advantages
        rollout.metrics["rollout/zero_spread_share"] = float(zero_spread.float().mean())
        if job.num_iterations > 1:
            rollout.per_token["old_logps"] = rollout.sampling_logprobs
        if job.beta > 0:
            started = time.perf_counter()
            rollout.per_token["ref_logps"] = self.reference_logprobs(rollout.layout, rollout.completion_ids.shape[1],
                                                                     job.training.batch_size)
            self.timings["time/reference"] = time.perf_counter() - started
        return rollout

    def grouped(self) -> bool:
        return self.job.share_prompt_forward and not uses_gradient_checkpointing(self.policy)

    def micro_batches(self, rollout: Rollout, position: int) -> list[CompletionBatch | GroupedCompletionBatch]:
        job, group = self.job, self.job.num_generations
        targets = {**rollout.per_sample, **rollout.per_token}
        if self.grouped():  # micro-batches of whole groups: each prompt runs once
            per = max(1, job.training.batch_size // group)
            groups = list(range(rollout.size // group))
            group_chunks = [groups[i:i + per] for i in range(0, len(groups), per)]
            chunks = [[g * group + i for g in chunk for i in range(group)] for chunk in group_chunks]
            weights = self.weights(chunks, rollout.completion_mask, job.loss_aggregation)
            return [self.grouped_micro_batch(rollout, chunk, group, weight, targets)
                    for chunk, weight in zip(group_chunks, weights)]
        chunks = self.split_rows(list(range(rollout.size)))
        weights = self.weights(chunks, rollout.completion_mask, job.loss_aggregation)
        return [self.micro_batch(rollout, chunk, weight, targets) for chunk, weight in zip(chunks, weights)]

    def loss(self, batch: CompletionBatch | GroupedCompletionBatch) -> tuple[torch.Tensor, dict[str, float]]:
        job = self.job
        mask = batch.completion_mask
        logps, entropy = batch.logprobs(self.model, self.logprob_temperature(), job.logprob_chunk_size)
        old_logps = batch.targets.get("old_logps", logps.detach())
        loss, clip = ppo_clip_loss(logps, old_logps, batch.targets["advantages"], mask, epsilon_low=job.epsilon,
                                   epsilon_high=job.epsilon_high, aggregation=job.loss_aggregation)
        metrics = {"policy_loss": float(loss.detach()), "clip_fraction": float(clip["clip_fraction"]),
                   "entropy": float(masked_mean(entropy, mask))}
        if job.beta > 0:
            kl = kl_k3(logps, batch.targets["ref_logps"])
            loss = loss + job.beta * aggregate(kl, mask, job.loss_aggregation)
            metrics["kl"] = float(masked_mean(kl.detach(), mask))
        return loss, metrics
