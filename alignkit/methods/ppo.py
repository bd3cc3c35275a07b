"""PPO: RLHF from an SFT model and a reward model (Ouyang et al. 2022; Ziegler et al. 2019).

Four roles: the actor (the policy we train), the critic (a value per token: its own backbone
with a scalar head, or a head on the actor's backbone), the reward model (or any reward
functions), and the frozen reference (the starting policy). For one rollout batch:

    sample completions o from the actor (no grad); keep their log-probs  logp_old_t
    V_t      = critic value of the state before token t          (no grad: old values)
    score    = reward(prompt, o)  - missing_eos_penalty * [o was cut at max_completion_length]
    r_t      = -kl_coef * (logp_old_t - logp_ref_t)  +  [t is the last token] * score
    A_t, R_t = GAE(r, V; gamma, lam);   A whitened over the batch (whiten_advantages)
    then ppo_epochs passes, each over num_mini_batches shuffled minibatches, one optimizer step each:
        L = -min(ratio_t A_t, clip(ratio_t, 1 - cliprange, 1 + cliprange) A_t)              (policy)
          + vf_coef * 0.5 * max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, +-cliprange_value) - R_t)^2)
        both averaged over every completion token of the minibatch

Simplifications chosen, and why:
- The KL penalty is the per-token k1 estimate (logp_old - logp_ref), folded into the reward as in
  the InstructGPT recipe; its coefficient is fixed (no adaptive KL controller).
- A separate critic starts as a copy of the starting policy's backbone (with its own LoRA when
  the actor uses LoRA) plus a fresh scalar head, or from a saved scalar model (``critic: PATH``,
  e.g. the reward model); ``critic: shared`` puts the head on the actor's own hidden states (one
  forward pass for both, the value loss then also shapes the actor's features).
- Actor and critic are one module for the engine, so one optimizer and one learning rate update
  both; ``vf_coef`` sets their balance.
- The reference is the actor with adapters disabled (LoRA) or a frozen copy (full weights).

The value head starts at zero (``value_head_init: zeros``). A head drawn at random on a pretrained
backbone gives values of a few units per token (SmolLM2-135M: up to ~3) against a 0/1 reward; GAE
with lam < 1 does not cancel them, so the first advantages are mostly critic noise (explained variance
-20 on the arithmetic task), and value clipping (``cliprange_value``, in reward units) lets the critic
move only that much per rollout, so it never catches up in a short run. With a zero head the first
advantages are the whitened returns (REINFORCE with a batch baseline) and the critic learns from there.
``docs/online_rl.md`` has the measured ablations. ``critic_warmup_rollouts`` trains only the critic on
the first rollouts (a shared head then reads detached hidden states, so the actor stays put).
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from safetensors.torch import save_file

from alignkit import distributed
from alignkit.errors import UsageError
from alignkit.losses import (
    gae,
    masked_mean,
    masked_var,
    ppo_clip_loss,
    value_loss,
    whiten,
)
from alignkit.methods.online import CompletionBatch, OnlineJob, OnlineRecipe, Rollout
from alignkit.methods.registry import register_method
from alignkit.model.forward import completion_hidden_states, head_logprobs
from alignkit.model.heads import ScalarHeadModel, load_scalar_model


class PPOJob(OnlineJob):
    METHOD = "ppo"
    num_generations: int = Field(1, gt=0, description="completions per prompt")
    reward_model: str | None = Field(None, description="a saved reward model folder (alignkit rm); added to rewards")
    critic: str = Field("separate", description="separate | shared | PATH of a saved scalar model (e.g. the reward model)")
    kl_coef: float = Field(0.05, ge=0, description="per-token KL penalty in the reward; 0 = no reference")
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    vf_coef: float = Field(0.1, ge=0)
    cliprange: float = Field(0.2, gt=0, lt=1)
    cliprange_value: float | None = Field(0.2, gt=0)
    ppo_epochs: int = Field(4, gt=0)
    num_mini_batches: int = Field(1, gt=0)
    whiten_advantages: bool = True
    loss_aggregation: Literal["token", "sequence"] = "token"
    value_head_init: Literal["zeros", "normal"] = Field(
        "zeros", description="a fresh value head starts at 0 (zeros) or random (normal, std 1/sqrt(hidden))")
    critic_warmup_rollouts: int = Field(0, ge=0, description="first rollouts that train only the critic")
    missing_eos_penalty: float | None = Field(
        None, ge=0, description="subtracted from the score of a completion cut at max_completion_length")

    def reward_labels(self) -> list[str]:
        return super().reward_labels() + (["reward_model"] if self.reward_model else [])


def initialise_value_head(head: torch.nn.Linear, how: str) -> None:
    """``zeros``: V = 0 everywhere at the start, so the first advantages are the (whitened) returns
    themselves; ``normal``: weights N(0, 1/(hidden + 1)), which on a pretrained backbone gives values
    of a few units per token (measured on SmolLM2-135M: |V| up to ~3), noise far above a 0/1 reward."""
    if how == "zeros":
        torch.nn.init.zeros_(head.weight)
    else:
        torch.nn.init.normal_(head.weight, std=1.0 / (head.in_features + 1) ** 0.5)
    torch.nn.init.zeros_(head.bias)


class ActorCritic(torch.nn.Module):
    """The actor and the critic as one module: what the engine optimizes and checkpoints."""

    def __init__(self, actor, critic=None, value_head=None):
        super().__init__()
        self.actor = actor
        self.critic = critic            # a ScalarHeadModel with its own backbone, or None
        self.value_head = value_head    # a Linear on the actor's hidden states, or None


@register_method("ppo", job=PPOJob, help="RLHF with PPO: actor, critic, reward model, reference")
class PPORecipe(OnlineRecipe):
    def __init__(self, job: PPOJob, critic=None, **parts):
        super().__init__(job, **parts)
        if len(self.train_examples) < job.prompts_per_step:
            self.notes.append(f"only {len(self.train_examples)} prompts for prompts_per_step={job.prompts_per_step}: "
                              "prompts repeat within a batch")
        if job.num_mini_batches > job.prompts_per_step * job.num_generations:
            raise UsageError("ppo: num_mini_batches exceeds the samples of a rollout batch")
        value_head = None
        if critic is None and job.critic == "shared":
            hidden = self.policy.config.hidden_size
            value_head = torch.nn.Linear(hidden, 1, device=self.device, dtype=torch.float32)
            initialise_value_head(value_head, job.value_head_init)
        elif critic is None and job.critic == "separate":
            critic = ScalarHeadModel(copy.deepcopy(self.policy), kind="critic")
            initialise_value_head(critic.head, job.value_head_init)
        elif critic is None:
            critic, _ = load_scalar_model(job.critic, device=self.device, is_trainable=True)
            critic.kind = "critic"
        if critic is not None:
            critic.train()
        self.model = ActorCritic(self.policy, critic, value_head)
        self.setup_reference(job.kl_coef > 0)

    def extra_reward_terms(self) -> list[dict]:
        if self.job.reward_model:
            return [{"name": "reward_model", "kwargs": {"path": self.job.reward_model}, "label": "reward_model"}]
        return []

    def rollout_steps(self) -> int:
        return self.job.ppo_epochs * self.job.num_mini_batches

    # -- values
    def _values(self, input_ids, attention_mask, position_ids, prompt_width, length, hidden=None):
        """Critic value of the state before each completion token, ``[N, length]`` float32."""
        if self.model.critic is not None:
            values = self.model.critic.values(input_ids, attention_mask, position_ids)
            return values[:, prompt_width - 1:prompt_width - 1 + length]
        if hidden is None:
            hidden = completion_hidden_states(self.policy, input_ids, attention_mask, position_ids, prompt_width, length)
        return self.model.value_head(hidden.float()).squeeze(-1)

    def warming_up(self) -> bool:
        """During the first ``critic_warmup_rollouts`` rollouts only the critic learns."""
        return self.current is not None and self.current.index < self.job.critic_warmup_rollouts

    def _forward(self, batch: CompletionBatch):
        """(logps, entropy, values) of a micro-batch; one decoder pass when the critic is shared.
        While the critic warms up, a shared value head reads detached hidden states (the actor stays put)."""
        length = batch.completion_mask.shape[1]
        args = (batch.input_ids, batch.attention_mask, batch.position_ids, batch.prompt_width, length)
        if self.model.critic is not None:
            logps, entropy = batch.logprobs(self.policy, self.logprob_temperature(), self.job.logprob_chunk_size)
            return logps, entropy, self._values(*args)
        hidden = completion_hidden_states(self.policy, *args)
        targets = batch.input_ids[:, batch.prompt_width:batch.prompt_width + length]
        logps, entropy, _ = head_logprobs(self.policy, hidden, targets, self.logprob_temperature(),
                                          self.job.logprob_chunk_size, with_entropy=True)
        return logps, entropy, self._values(*args, hidden=hidden.detach() if self.warming_up() else hidden)

    # -- the rollout
    @torch.no_grad()
    def make_rollout(self, index: int) -> Rollout:
        job = self.job
        rollout = self.sample_and_score(index, job.num_generations, with_logprobs=True)
        mask = rollout.completion_mask
        length = mask.shape[1]
        started = time.perf_counter()
        old_logps = rollout.sampling_logprobs * mask
        critic_model = self.model.critic if self.model.critic is not None else self.policy

        def values_of(model, *args):
            return self._values(*args)

        values = self.forward_in_batches(critic_model, rollout.layout, length, job.training.batch_size,
                                         values_of) * mask
        if job.kl_coef > 0:
            ref_logps = self.reference_logprobs(rollout.layout, length, job.training.batch_size) * mask
            kl = (old_logps - ref_logps) * mask
        else:
            kl = torch.zeros_like(old_logps)
        self.timings["time/reference"] = time.perf_counter() - started
        scores = rollout.rewards
        if job.missing_eos_penalty:
            scores = scores - job.missing_eos_penalty * rollout.truncated.float()
        rewards = -job.kl_coef * kl
        last = (mask.sum(-1).long() - 1).clamp(min=0)
        rewards[torch.arange(len(last)), last] += scores
        advantages, returns = gae(rewards, values, mask, gamma=job.gamma, lam=job.lam)
        if job.whiten_advantages and distributed.world_size() > 1:  # over the whole rollout: every share
            mean, variance = distributed.masked_moments(advantages, mask)
            advantages = whiten(advantages, mask, mean=mean, variance=variance)
        elif job.whiten_advantages:
            advantages = whiten(advantages, mask)
        residual_var = masked_var(returns - values, mask)
        returns_var = masked_var(returns, mask)
        rollout.per_token.update(old_logps=old_logps, values=values, advantages=advantages, returns=returns)
        rollout.metrics.update({
            "rollout/score": float(scores.mean()),
            "rollout/kl": float(kl.sum(-1).mean()),
            "rollout/non_score_reward": float((-job.kl_coef * kl).sum(-1).mean()),
            "rollout/value_mean": float(masked_mean(values, mask)),
            "rollout/explained_variance": float(1 - residual_var / returns_var.clamp(min=1e-8)),
        })
        return rollout

    def micro_batches(self, rollout: Rollout, position: int) -> list[CompletionBatch]:
        """The minibatch ``position`` of the rollout: a seeded permutation of the *whole* rollout's rows
        (every process's share, in process order), cut into ``num_mini_batches``; each process trains
        on the rows of it that it holds (none: one row with weight 0, so it still takes part)."""
        job = self.job
        epoch, part = divmod(position, job.num_mini_batches)
        generator = torch.Generator().manual_seed(job.training.seed * 1_000_003 + rollout.index * 101 + epoch)
        first = distributed.rank() * rollout.size  # every process holds the same number of samples
        order = torch.randperm(rollout.size * distributed.world_size(), generator=generator)
        rows = [row - first for row in torch.tensor_split(order, job.num_mini_batches)[part].tolist()
                if first <= row < first + rollout.size]
        if not rows:  # this process holds none of the minibatch: it takes part with nothing to add
            return [self.micro_batch(rollout, [0], 0.0, rollout.per_token)]
        chunks = self.split_rows(rows)
        weights = self.weights(chunks, rollout.completion_mask, job.loss_aggregation)
        return [self.micro_batch(rollout, chunk, weight, rollout.per_token) for chunk, weight in zip(chunks, weights)]

    def loss(self, batch: CompletionBatch) -> tuple[torch.Tensor, dict[str, float]]:
        job = self.job
        mask = batch.completion_mask
        targets = batch.targets
        logps, entropy, values = self._forward(batch)
        policy_loss, clip = ppo_clip_loss(logps, targets["old_logps"], targets["advantages"], mask,
                                          epsilon_low=job.cliprange, aggregation=job.loss_aggregation)
        critic_loss, value_clip = value_loss(values, targets["values"], targets["returns"], mask,
                                             clip_range=job.cliprange_value)
        loss = job.vf_coef * critic_loss if self.warming_up() else policy_loss + job.vf_coef * critic_loss
        metrics = {
            "policy_loss": float(policy_loss.detach()), "value_loss": float(critic_loss.detach()),
            "clip_fraction": float(clip["clip_fraction"]), "value_clip_fraction": float(value_clip["clip_fraction"]),
            "approx_kl": float(clip["approx_kl"]), "entropy": float(masked_mean(entropy, mask)),
        }
        return loss, metrics

    def save_final(self, directory) -> None:
        super().save_final(directory)
        if self.model.critic is not None:
            self.model.critic.save(Path(directory) / "critic", self.tokenizer)
        else:
            state = {k: v.detach().cpu().contiguous() for k, v in self.model.value_head.state_dict().items()}
            save_file(state, str(Path(directory) / "value_head.safetensors"))
