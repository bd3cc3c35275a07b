"""KTO: alignment from unpaired binary feedback (thumbs up / thumbs down), no pairs needed.

Kahneman-Tversky optimisation (Ethayarajh et al. 2024) scores each (prompt x, response y) by its
log-ratio to the reference and compares it with a reference point z_0, the policy's current drift:

    r(x, y) = log pi(y|x) - log pi_ref(y|x)                          (response log-probs, summed)
    z_0     = max(0, mean_j [log pi(y'_j|x_j) - log pi_ref(y'_j|x_j)])   (detached; y'_j mismatched)
    loss    = lambda_D (1 - sigma(beta (r - z_0)))     for a desirable y   (label true)
              lambda_U (1 - sigma(beta (z_0 - r)))     for an undesirable y (label false)

averaged over the batch (`alignkit.losses.kto_loss`, eq. 7 of the paper). ``desirable_weight`` and
``undesirable_weight`` are lambda_D and lambda_U: with unbalanced data the paper (and TRL) advise
``lambda_D n_D / (lambda_U n_U)`` in [1, 4/3]; the run notes say when the weights fall outside it.

Data: rows ``{"prompt", "completion", "label"}`` (also what ``alignkit label export --format kto``
writes), or preference pairs (each gives a desirable and an undesirable example). See
``alignkit/data/unpaired.py`` for how the mismatched pairs y'_j are chosen.

What the recipe reuses from DPO, and why: each example is a pair sharing its prompt (its own
completion, a mismatched completion), so one forward computes both log-probs with the prompt once
(``share_prompt``, ``padding_free``), and DPO's reference machinery (`DPORecipe.setup_reference`)
computes the reference log-probs of both once before training and caches them on disk, or runs the
reference live (``precompute_reference_logprobs: false``): adapters off for LoRA, a frozen copy for
full fine-tuning, or ``reference_model``. The policy's mismatched log-probs are only the baseline z_0
(detached), as in TRL, which computes them without gradient.

Metrics: ``loss``, ``kl`` (z_0), ``reward_desirable`` / ``reward_undesirable`` (mean beta * r),
``reward_margin`` (their difference), ``logp_desirable`` / ``logp_undesirable``, and
``reward_accuracy``: the share of examples on the side of z_0 their label asks for (r > z_0 for
desirable, r < z_0 for undesirable; ties count one half, so the starting policy reads 50%).
"""
from __future__ import annotations

import torch
from pydantic import Field, model_validator

from alignkit import distributed
from alignkit.data.errors import DataError
from alignkit.data.pairs import split_pairs
from alignkit.data.unpaired import tokenize_unpaired
from alignkit.losses import kto_loss, preference_accuracy
from alignkit.methods.base import BatchSchedule, policy_and_data
from alignkit.methods.dpo import DPORecipe
from alignkit.methods.preference import PreferenceJob
from alignkit.methods.registry import register_method
from alignkit.model.forward import response_logprob_sums


class KTOJob(PreferenceJob):
    DATA_KIND = "unpaired"
    ALIASES = {**PreferenceJob.ALIASES, "precompute_ref_log_probs": "precompute_reference_logprobs",
               "ref_model": "reference_model"}

    beta: float = Field(0.1, gt=0, description="how far the policy may move from the reference")
    desirable_weight: float = Field(1.0, gt=0, description="lambda_D: weight of the desirable examples' loss")
    undesirable_weight: float = Field(1.0, gt=0, description="lambda_U: weight of the undesirable examples' loss")
    precompute_reference_logprobs: bool = Field(True, description="compute reference log-probs once, cache them")
    reference_model: str | None = Field(None, description="reference model path; default: the starting policy")
    reference_cache_dir: str | None = Field(None, description="default: $ALIGNKIT_HOME/cache/reference")
    reference_batch_size: int | None = Field(None, gt=0, description="examples per reference pass (default batch_size)")
    logprob_chunk_size: int = Field(1024, gt=0, description="tokens per output-layer chunk")
    share_prompt: bool = Field(True, description="compute each prompt once for its completion and its "
                                                 "mismatched completion")
    padding_free: bool = Field(True, description="pack the examples of a batch into rows without padding")

    @property
    def effective_beta(self) -> float:
        return self.beta

    @model_validator(mode="after")
    def _two_per_batch(self):
        if self.training.batch_size < 2:
            raise ValueError("kto: training.batch_size must be at least 2 (z_0 is a mean over a batch's "
                             "mismatched pairs)")
        return self


def weight_balance_note(desirable: int, undesirable: int, desirable_weight: float,
                        undesirable_weight: float) -> str | None:
    """A note when ``lambda_D n_D / (lambda_U n_U)`` is outside [1, 4/3] (Ethayarajh et al. 2024, sec. 4.2),
    with the desirable_weight range that would bring it back; None when it is inside."""
    if not desirable or not undesirable:
        return None
    ratio = desirable_weight * desirable / (undesirable_weight * undesirable)
    if 1.0 <= ratio <= 4 / 3 + 1e-9:
        return None
    low = undesirable_weight * undesirable / desirable
    return (f"KTO weights: lambda_D n_D / (lambda_U n_U) = {ratio:.2f} ({desirable} desirable, {undesirable} "
            f"undesirable); the paper advises 1 to 1.33: desirable_weight in [{low:.2f}, {low * 4 / 3:.2f}] "
            f"with undesirable_weight {undesirable_weight:g}")


def kto_objective(job: KTOJob, sums: torch.Tensor, reference_sums: torch.Tensor, labels: torch.Tensor,
                  shared_reference_point: bool = False, padding: bool = False):
    """Loss and metrics from the ``[2B]`` response log-prob sums of a KTO batch (own completions first,
    then the mismatched ones) and their reference sums. Pure tensor code, shared by training,
    evaluation and the tests.

    ``shared_reference_point``: under several processes, z_0 is the mean over the mismatched pairs of
    every process's micro-batch of this round (what one process would see in the whole micro-batch);
    a ``padding`` repeat adds nothing to it."""
    policy, policy_mismatched = split_pairs(sums)
    reference, reference_mismatched = split_pairs(reference_sums.to(sums.device))
    if shared_reference_point and distributed.world_size() > 1:
        drift = policy_mismatched.detach().float() - reference_mismatched.float()
        totals = distributed.sum_across({"sum": 0.0 if padding else float(drift.sum()),
                                         "count": 0.0 if padding else float(drift.numel())})
        policy_mismatched = torch.full((1,), totals["sum"] / max(1.0, totals["count"]), device=sums.device)
        reference_mismatched = torch.zeros(1, device=sums.device)
    desirable = labels.to(sums.device).bool()
    losses, rewards, reference_point = kto_loss(
        policy, reference, desirable, policy_mismatched.detach(), reference_mismatched, beta=job.beta,
        desirable_weight=job.desirable_weight, undesirable_weight=job.undesirable_weight)
    shifted = (rewards - job.beta * reference_point)
    zero = torch.zeros_like(shifted)
    metrics = {"kl": float(reference_point),
               "reward_accuracy": preference_accuracy(torch.where(desirable, shifted, zero),
                                                      torch.where(desirable, zero, shifted))}
    for name, mask in (("desirable", desirable), ("undesirable", ~desirable)):
        if mask.any():
            metrics[f"reward_{name}"] = float(rewards[mask].mean())
            metrics[f"logp_{name}"] = float(policy[mask].detach().mean())
    if desirable.any() and (~desirable).any():
        metrics["reward_margin"] = metrics["reward_desirable"] - metrics["reward_undesirable"]
    return losses.mean(), metrics


@register_method("kto", job=KTOJob, help="KTO on unpaired thumbs-up/down feedback (prompt/completion/label)")
class KTORecipe(DPORecipe):
    """Engine recipe for ``alignkit kto``: DPO's batches and reference, KTO's objective."""

    def __init__(self, job: KTOJob, model=None, tokenizer=None, train=None, validation=None,
                 reference_model=None):
        self.job = job
        model, tokenizer, train, validation, self.notes = policy_and_data(job, model, tokenizer, train, validation,
                                                                          kind="unpaired")
        self.model, self.tokenizer = model, tokenizer
        self.device = distributed.model_device(model)
        data = job.data
        self.train_pairs, self.train_labels, report = tokenize_unpaired(
            tokenizer, train, data.max_length, data.max_prompt_length, seed=data.seed)
        self.notes.append(f"train {report.summary()}")
        self.validation_pairs, self.validation_labels = [], []
        if validation and len(validation) >= 2:
            self.validation_pairs, self.validation_labels, vreport = tokenize_unpaired(
                tokenizer, validation, data.max_length, data.max_prompt_length, seed=data.seed + 1)
            self.notes.append(f"validation {vreport.summary()}")
        if len(self.train_pairs) < 2:
            raise DataError("KTO needs at least 2 training examples left after tokenization and truncation")
        note = weight_balance_note(report.desirable, report.undesirable, job.desirable_weight,
                                   job.undesirable_weight)
        if note:
            self.notes.append(note)
        self.lengths = [len(pair) for pair in self.train_pairs]
        self.batch_size = job.training.batch_size
        self.schedule = BatchSchedule(self.lengths, self.batch_size, job.training.gradient_accumulation_steps,
                                      job.training.seed, job.group_by_length)
        self.needs_reference = True
        self.setup_reference(reference_model)

    def training_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        batch = super().training_batch(indices)
        batch["labels"] = torch.tensor([self.train_labels[i] for i in indices], dtype=torch.bool,
                                       device=self.device)
        return batch

    def loss(self, batch):
        reference = batch.get("reference")
        if reference is None:
            reference = self._reference_logps(batch, self.reference)[0]
        sums, _ = response_logprob_sums(self.model, batch, self.job.logprob_chunk_size)
        return kto_objective(self.job, sums, reference, batch["labels"], shared_reference_point=True,
                             padding=batch.get("padding", False))

    def padding_batch(self, batch):
        """The weight-0 repeat the engine runs while other processes finish: it adds nothing to z_0."""
        return {**batch, "padding": True}

    def evaluate(self) -> dict[str, float]:
        """The objective over the whole validation set at once (z_0 from all its mismatched pairs); each
        process computes the log-probs of its share and the shares are gathered."""
        if not self.validation_pairs:
            return {}
        size = max(1, self.batch_size)
        policy, reference = [], []
        first, stop = distributed.shard_range(len(self.validation_pairs))
        for start in range(first, stop, size):
            chunk = self.validation_pairs[start:min(start + size, stop)]
            batch = self.collate(chunk)
            sums, _ = response_logprob_sums(self.model, batch, self.job.logprob_chunk_size)
            if self.precomputed is not None and "validation" in self.precomputed:
                cached = self.precomputed["validation"][start:start + len(chunk)]
                reference_sums = torch.cat([cached[:, 0], cached[:, 1]])
            else:
                reference_sums = self._reference_logps(batch, self.reference)[0]
            policy.append(split_pairs(sums.float().cpu()))
            reference.append(split_pairs(reference_sums.float().cpu()))
        shares = distributed.gather_objects((policy, reference))  # in process order: the validation order
        policy = [p for share, _ in shares for p in share]
        reference = [r for _, share in shares for r in share]
        sums = torch.cat([torch.cat([p[0] for p in policy]), torch.cat([p[1] for p in policy])])
        reference_sums = torch.cat([torch.cat([r[0] for r in reference]), torch.cat([r[1] for r in reference])])
        loss, metrics = kto_objective(self.job, sums, reference_sums, torch.tensor(self.validation_labels))
        return {"loss": float(loss.detach()), **metrics}
