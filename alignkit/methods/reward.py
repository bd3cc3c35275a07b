"""Reward model: a causal-LM backbone with a scalar head, trained on ranked pairs (Bradley-Terry).

The reward of a (prompt, response) is the head's value at the last non-padding token of the
conversation ``prompt + response`` (the end-of-turn marker), ``r = w^T h_last + b``. Pairs are
scored in one forward pass (by default each pair's prompt is computed once for both responses, and
pairs are packed without padding: ``share_prompt``, ``padding_free``) and trained with

    L = -mean_b log sigma(r_c - r_r - m_b)  +  center_rewards_coefficient * mean_b (r_c + r_r)^2

``m_b`` is the pair's ``margin`` column when the data has one (``use_margin``), else 0. The
pairwise loss only sees differences, so rewards can drift to any offset; the optional centring
term keeps them near zero, which makes rewards of different runs comparable and PPO happier.

The backbone is full-weight or LoRA (``lora:``); the head is always trained. The final model is
saved with ``ScalarHeadModel.save`` (backbone or adapter + ``head.safetensors``), so
``alignkit score``, best-of-N and PPO load it with ``alignkit.model.heads.load_scalar_model(path)``.
"""
from __future__ import annotations

import copy

import torch
from pydantic import Field

from alignkit import distributed
from alignkit.data.pairs import collate_pairs, split_pairs
from alignkit.losses import bradley_terry_loss
from alignkit.methods.preference import PreferenceJob, pair_schedule, preference_inputs
from alignkit.methods.registry import register_method
from alignkit.model import is_peft_model, merge_adapter
from alignkit.model.heads import ScalarHeadModel, pair_scores


class RewardJob(PreferenceJob):
    METHOD = "rm"
    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="weight of mean((r_chosen + r_rejected)^2), keeps rewards near 0 (e.g. 0.01)")
    use_margin: bool = Field(True, description="subtract the row's 'margin' column inside the sigmoid when present")
    share_prompt: bool = Field(True, description="compute each pair's prompt once for both responses")
    padding_free: bool = Field(True, description="pack the pairs of a batch into rows without padding")


@register_method("rm", job=RewardJob, help="train a reward model on ranked pairs (Bradley-Terry)")
class RewardRecipe:
    """Engine recipe for ``alignkit rm``; ``model`` is a `ScalarHeadModel`."""

    def __init__(self, job: RewardJob, model=None, tokenizer=None, train=None, validation=None):
        self.job = job
        model, tokenizer, self.train_pairs, self.validation_pairs, self.notes = preference_inputs(
            job, model, tokenizer, train, validation)
        if not isinstance(model, ScalarHeadModel):
            model = ScalarHeadModel(model, kind="reward")
        # scored later (PPO, best-of-N, `alignkit score`) with the cut it is trained on
        model.scoring = {"max_length": job.data.max_length, "max_prompt_length": job.data.max_prompt_length}
        self.model, self.tokenizer = model, tokenizer
        self.device = distributed.model_device(model)
        self.batch_size = job.training.batch_size
        self.schedule = pair_schedule(job, self.train_pairs)

    # -- engine interface
    def steps_per_epoch(self) -> int:
        return self.schedule.steps_per_epoch()

    def largest_micro_batch_tokens(self) -> int:
        return 2 * self.schedule.largest_batch_tokens()  # a chosen and a rejected row per pair

    def updates(self, start_step: int):
        for chunk in self.schedule.updates(start_step):
            yield [self.collate([self.train_pairs[i] for i in indices]) for indices in chunk]

    def collate(self, pairs):
        return collate_pairs(pairs, self.tokenizer.pad_token_id, self.device, padding_free=self.job.padding_free,
                             share_prompt=self.job.share_prompt)

    def rewards(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen rewards [B], rejected rewards [B]) from one forward pass over the batch."""
        return split_pairs(pair_scores(self.model, batch))

    loss_unit = "pairs"  # the engine logs the step's total

    def loss_weight(self, batch) -> float:
        """Pairs in the batch: the engine divides by their count over the whole global batch."""
        return float(batch["margin"].numel())

    def loss(self, batch):
        chosen, rejected = self.rewards(batch)
        margin = batch["margin"] if self.job.use_margin else None
        loss, metrics = bradley_terry_loss(chosen, rejected, margin=margin,
                                           center_coefficient=self.job.center_rewards_coefficient or 0.0)
        both = torch.cat([chosen, rejected]).detach()
        return loss, {"accuracy": float(metrics["accuracy"]), "margin": float(metrics["margin"]),
                      "reward_mean": float(both.mean()), "reward_std": float(both.std()) if both.numel() > 1 else 0.0}

    def evaluate(self) -> dict[str, float]:
        """Metrics over every validation pair: each process scores its share and the scores are gathered."""
        if not self.validation_pairs:
            return {}
        chosen, rejected, margins = (distributed.gather_tensors(t)
                                     for t in self.score_pairs(distributed.shard(self.validation_pairs)))
        return reward_metrics(chosen, rejected, margins if self.job.use_margin else None,
                              self.job.center_rewards_coefficient or 0.0)

    @torch.no_grad()
    def score_pairs(self, pairs):
        chosen_all, rejected_all, margins = [], [], []
        size = max(1, self.job.training.batch_size)
        for start in range(0, len(pairs), size):
            batch = self.collate(pairs[start:start + size])
            chosen, rejected = self.rewards(batch)
            chosen_all.append(chosen.float().cpu())
            rejected_all.append(rejected.float().cpu())
            margins.append(batch["margin"].cpu())
        if not chosen_all:  # no pairs (e.g. this process's share of a tiny validation set)
            return torch.zeros(0), torch.zeros(0), torch.zeros(0)
        return torch.cat(chosen_all), torch.cat(rejected_all), torch.cat(margins)

    def save_final(self, directory) -> None:
        self.model.save(directory, self.tokenizer)
        if self.job.lora is not None and self.job.lora.merge_on_save:

            if is_peft_model(self.model.backbone):
                _save_merged(self.model, self.tokenizer, f"{directory}-merged")


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                   center_coefficient: float = 0.0) -> dict[str, float]:
    """Loss, accuracy (r_c > r_r), mean margin r_c - r_r, and the mean/std of all rewards."""

    loss, metrics = bradley_terry_loss(chosen, rejected, margin=margin, center_coefficient=center_coefficient)
    both = torch.cat([chosen, rejected])
    return {"loss": float(loss), "accuracy": float(metrics["accuracy"]), "margin": float(metrics["margin"]),
            "reward_mean": float(both.mean()), "reward_std": float(both.std()) if both.numel() > 1 else 0.0,
            "pairs": float(chosen.numel())}


def _save_merged(model, tokenizer, directory) -> None:
    """Write the reward model with its LoRA adapter merged into a full backbone."""


    merged = copy.deepcopy(model)
    plain = ScalarHeadModel.__new__(ScalarHeadModel)
    torch.nn.Module.__init__(plain)
    plain.backbone = merge_adapter(merged.backbone)
    plain.head = merged.head
    plain.kind = merged.kind
    plain.scoring = dict(model.scoring)
    plain.save(directory, tokenizer)
