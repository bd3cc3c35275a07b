"""Direct preference optimisation (and its variants) on preference pairs.

For a pair (prompt x, chosen y_c, rejected y_r), with sequence log-probabilities summed over the
response tokens, the policy pi is pushed to prefer y_c over y_r more than the reference pi_ref does:

    h    = [log pi(y_c|x) - log pi_ref(y_c|x)] - [log pi(y_r|x) - log pi_ref(y_r|x)]
    loss = -log sigma(beta * h)                                   (loss_type: sigmoid, Rafailov et al. 2023)

``loss_type`` picks the variant (equations in ``alignkit/losses.py``): ``sigmoid`` with
``label_smoothing`` (conservative DPO), ``robust`` (unbiased under label noise), ``hinge`` (SLiC),
``ipo`` (squared loss on *average* per-token log-ratios), and the reference-free ``simpo``
(length-normalised margin, target gap gamma) and ``orpo`` (odds ratio + NLL on the chosen response).
``nll_weight`` adds the chosen responses' NLL to any variant (1 by default for ORPO, 0 otherwise).

What the recipe does, and why:

* **One forward per step, each prompt computed once.** Chosen and rejected sequences go through the
  model together. With ``share_prompt`` (default) a pair is one segment ``prompt | chosen |
  rejected``: both responses attend to the one copy of the prompt and not to each other, positions
  continue from the prompt, so the log-probs are those of the two separate sequences while the
  prompt's tokens are processed once instead of twice. With ``padding_free`` (default) the segments
  are packed into as few rows as possible, so no compute goes to padding; batches are also grouped
  by length (``group_by_length``).
* **No full-vocabulary logits.** The decoder gives hidden states; the output layer is applied only
  at response positions, a chunk of tokens at a time (`alignkit.model.forward.response_logprob_sums`).
* **The reference is the starting policy, computed once.** With ``precompute_reference_logprobs``
  (default) the reference log-prob sums of every training and validation pair are computed before
  the first step (no grad, eval mode) and cached on disk under
  ``$ALIGNKIT_HOME/cache/reference/<key>.safetensors``; the key hashes the model's weights, the
  reference model, the tokenizer and every pair's token ids (so data, template and max lengths), and
  a resumed or repeated run reuses the file. The policy itself is the reference at that moment, so
  no second copy of the weights is ever loaded (a fresh LoRA adapter is switched off for the pass).
* **Without precomputation** the reference runs every step: for LoRA it is the same base model with
  the adapters disabled (one copy of the weights in memory); when training continues an existing
  adapter, a frozen copy of that adapter is loaded beside it; for full fine-tuning a frozen copy of
  the starting weights is kept. ``reference_model: PATH`` uses another model instead.
* **Deterministic order.** Batches come from ``BatchSchedule`` (length-bucketed), a pure function
  of (seed, step): resume reproduces the run.

Metrics: ``loss``, the implicit rewards ``reward_chosen``/``reward_rejected`` (``beta * log-ratio``;
``beta * average log-prob`` for the reference-free variants), ``reward_accuracy`` (share of pairs with
reward_chosen > reward_rejected, ties counting one half), ``reward_margin``, ``logp_chosen``/``logp_rejected`` (summed
response log-probs) and, on the validation split, ``kl``: the mean per-token k3 estimate
``exp(d) - d - 1``, ``d = log pi_ref - log pi``, over the validation responses, a measure of how far
the policy drifted from the reference (0 at the start; off-policy, so "KL-like", not a true KL).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from alignkit import distributed
from alignkit.data.pairs import collate_pairs, pairs_digest, split_pairs
from alignkit.errors import UsageError
from alignkit.losses import dpo_loss, kl_k3, orpo_loss, preference_accuracy, simpo_loss
from alignkit.methods.preference import PreferenceJob, pair_schedule, preference_inputs
from alignkit.methods.registry import register_method
from alignkit.model import alignkit_home, freeze, load_model_and_tokenizer, save_model
from alignkit.model.forward import response_logprob_sums
from alignkit.reference import ReferencePolicy

REFERENCE_FREE = ("simpo", "orpo")
AVERAGED = ("ipo", "simpo", "orpo")
DEFAULT_BETA = {"sigmoid": 0.1, "robust": 0.1, "hinge": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1}
CACHE_FORMAT = 1


class DPOJob(PreferenceJob):
    METHOD = "dpo"
    ALIASES = {**PreferenceJob.ALIASES, "precompute_ref_log_probs": "precompute_reference_logprobs",
               "ref_model": "reference_model", "rpo_alpha": "nll_weight"}

    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"] = "sigmoid"
    beta: float | None = Field(None, gt=0, description="strength of the preference (0.1; simpo: 2.0; "
                                                       "orpo: the odds-ratio weight lambda, 0.1)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="probability that a label is flipped "
                                                                  "(sigmoid: cDPO, robust, simpo)")
    gamma_beta_ratio: float = Field(0.5, ge=0, description="simpo: target margin gamma = ratio * beta")
    simpo_gamma: float | None = Field(None, ge=0, description="simpo: target margin gamma (wins over the ratio)")
    nll_weight: float | None = Field(None, ge=0, description="weight of the chosen responses' NLL "
                                                             "(default 1 for orpo, 0 otherwise)")
    precompute_reference_logprobs: bool = Field(True, description="compute reference log-probs once, cache them")
    reference_model: str | None = Field(None, description="reference model path; default: the starting policy")
    reference_cache_dir: str | None = Field(None, description="default: $ALIGNKIT_HOME/cache/reference")
    reference_batch_size: int | None = Field(None, gt=0, description="pairs per reference pass (default batch_size)")
    logprob_chunk_size: int = Field(1024, gt=0, description="tokens per output-layer chunk")
    share_prompt: bool = Field(True, description="compute each pair's prompt once for both responses "
                                                 "(same log-probs, fewer tokens)")
    padding_free: bool = Field(True, description="pack the pairs of a batch into rows without padding")

    @model_validator(mode="after")
    def _check_variant(self):
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust", "simpo"):
            raise ValueError(f"label_smoothing applies to loss_type sigmoid, robust or simpo, not {self.loss_type!r}")
        if self.reference_model and self.loss_type in REFERENCE_FREE:
            raise ValueError(f"loss_type {self.loss_type!r} is reference-free; remove reference_model")
        return self

    @property
    def effective_beta(self) -> float:
        return self.beta if self.beta is not None else DEFAULT_BETA[self.loss_type]

    @property
    def effective_nll_weight(self) -> float:
        if self.nll_weight is not None:
            return self.nll_weight
        return 1.0 if self.loss_type == "orpo" else 0.0


# ----------------------------------------------------------------------------- the objective

def preference_objective(job: DPOJob, sums: torch.Tensor, counts: torch.Tensor,
                         reference_sums: torch.Tensor | None):
    """Loss and metrics from the ``[2B]`` response log-prob sums/counts (chosen rows first).

    Pure tensor code: the same function serves training, evaluation and the tests.
    Returns ``(loss scalar, per-pair implicit rewards (chosen [B], rejected [B]), metrics dict)``.
    """

    beta = job.effective_beta
    chosen_sum, rejected_sum = split_pairs(sums)
    chosen_count, rejected_count = split_pairs(counts.clamp(min=1))
    if job.loss_type in AVERAGED:
        chosen, rejected = chosen_sum / chosen_count, rejected_sum / rejected_count
    else:
        chosen, rejected = chosen_sum, rejected_sum
    if job.loss_type == "simpo":
        gamma_ratio = job.simpo_gamma / beta if job.simpo_gamma is not None else job.gamma_beta_ratio
        losses, reward_c, reward_r = simpo_loss(chosen, rejected, beta=beta, gamma_beta_ratio=gamma_ratio,
                                                label_smoothing=job.label_smoothing)
    elif job.loss_type == "orpo":
        losses, reward_c, reward_r = orpo_loss(chosen, rejected, beta=beta)
    else:
        if reference_sums is None:
            raise UsageError(f"loss_type {job.loss_type!r} needs reference log-probs")
        reference_c, reference_r = split_pairs(reference_sums.to(sums.device))
        if job.loss_type in AVERAGED:
            reference_c, reference_r = reference_c / chosen_count, reference_r / rejected_count
        losses, reward_c, reward_r = dpo_loss(chosen, rejected, reference_c, reference_r, beta=beta,
                                              loss_type=job.loss_type, label_smoothing=job.label_smoothing)
    loss = losses.mean()
    metrics = {}
    nll_weight = job.effective_nll_weight
    if nll_weight:
        nll = -chosen_sum.sum() / chosen_count.sum()
        loss = loss + nll_weight * nll
        metrics["nll"] = float(nll.detach())
    metrics.update({
        "reward_chosen": float(reward_c.mean()), "reward_rejected": float(reward_r.mean()),
        "reward_accuracy": preference_accuracy(reward_c, reward_r),
        "reward_margin": float((reward_c - reward_r).mean()),
        "logp_chosen": float(chosen_sum.detach().mean()), "logp_rejected": float(rejected_sum.detach().mean()),
    })
    return loss, (reward_c, reward_r), metrics


# ----------------------------------------------------------------------------- the recipe

@register_method("dpo", job=DPOJob, help="direct preference optimisation and its variants")
class DPORecipe:
    """Engine recipe for ``alignkit dpo``. ``reference_model`` (a module) overrides ``job.reference_model``."""

    def __init__(self, job: DPOJob, model=None, tokenizer=None, train=None, validation=None,
                 reference_model=None):
        self.job = job
        model, tokenizer, self.train_pairs, self.validation_pairs, self.notes = preference_inputs(
            job, model, tokenizer, train, validation)
        self.model, self.tokenizer = model, tokenizer
        self.device = distributed.model_device(model)
        self.batch_size = job.training.batch_size
        self.schedule = pair_schedule(job, self.train_pairs)
        self.needs_reference = job.loss_type not in REFERENCE_FREE
        self.setup_reference(reference_model)

    def setup_reference(self, reference_model=None) -> None:
        """The reference: live (computed every step) or, by default, computed once before training
        (also KTO's, whose pairs are (completion, mismatched completion))."""
        job = self.job
        external = reference_model
        if external is None and job.reference_model:
            external = _load_reference(job, self.tokenizer, self.device)
        self.reference: ReferencePolicy | None = None
        self.precomputed: dict[str, torch.Tensor] | None = None
        if self.needs_reference and not job.precompute_reference_logprobs:
            self.reference = ReferencePolicy.for_training(self.model, external, live=True)
            self.notes.append(f"reference: {self.reference.description}")
        if (self.needs_reference and job.precompute_reference_logprobs) or (
                self.validation_pairs and self.reference is None):
            # computed once from the starting weights; no copy of them is kept afterwards
            self.precomputed = self._precompute(ReferencePolicy.for_training(self.model, external, live=False))

    def _autocast(self):
        """The engine's autocast (bf16 on a GPU that has it, or when asked), for passes run outside it."""
        precision = self.job.training.precision
        if precision == "bf16" or (precision == "auto" and self.device.type == "cuda"
                                   and torch.cuda.is_bf16_supported()):
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _reference_logps(self, batch, reference: ReferencePolicy, per_token: bool = False):
        with reference.model() as model, self._autocast():
            return response_logprob_sums(model, batch, self.job.logprob_chunk_size, per_token=per_token)

    def cache_key(self, reference: ReferencePolicy) -> str:
        key = {
            "format": CACHE_FORMAT,
            "model": self.job.model.name_or_path, "adapter": self.job.model.adapter,
            "reference_model": self.job.reference_model, "weights": reference.fingerprint(),
            "dtype": str(next(self.model.parameters()).dtype), "device": self.device.type,
            "precision": self.job.training.precision,
            "vocabulary": len(self.tokenizer), "chat_template": str(getattr(self.tokenizer, "chat_template", "")),
            "train": pairs_digest(self.train_pairs) if self.needs_reference else None,
            "validation": pairs_digest(self.validation_pairs),
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]

    def cache_path(self, reference: ReferencePolicy | None = None) -> Path:
        """Where the reference log-probs of this data under ``reference`` (default: the starting policy) are cached."""
        reference = reference or ReferencePolicy.for_training(self.model, None, live=False)
        folder = Path(self.job.reference_cache_dir) if self.job.reference_cache_dir else \
            alignkit_home() / "cache" / "reference"
        return folder / f"{self.cache_key(reference)}.safetensors"

    def _precompute(self, reference: ReferencePolicy) -> dict[str, torch.Tensor]:
        """Reference sums for every train pair (when needed) and per-token log-probs for validation.

        Under several processes the main one looks in the cache and hands a hit to the others; on a
        miss each process computes its share of the pairs and the shares are gathered, so every
        process holds every pair's reference log-probs (a step may train on any of them) and the main
        process writes the cache."""
        # (decided by the main process: with low-memory loading only it holds the weights the key reads)
        path = distributed.broadcast_object(self.cache_path(reference) if distributed.is_main_process() else None)
        cached, problem = None, None
        if distributed.is_main_process() and path.exists():
            try:
                cached = load_file(str(path))
            except Exception as error:  # a damaged file: compute again
                problem = str(error)
        cached = distributed.broadcast_object(cached)
        if cached is not None:
            self.notes.append(f"reference log-probs: loaded from cache {path}")
            return cached
        if problem is not None:
            self.notes.append(f"reference log-probs: cache {path} unreadable ({problem}); recomputing")
        out: dict[str, torch.Tensor] = {}
        if self.needs_reference:
            out["train"] = self._reference_pass(self.train_pairs, reference, per_token=False)[0]
        if self.validation_pairs:
            out["validation"], out["validation_tokens"] = self._reference_pass(self.validation_pairs, reference,
                                                                               per_token=True)
        if distributed.is_main_process():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp-{id(self)}")
            save_file({k: v.contiguous() for k, v in out.items()}, str(tmp))
            tmp.replace(path)
        self.notes.append(f"reference log-probs: computed for {len(self.train_pairs)} train and "
                          f"{len(self.validation_pairs)} validation pairs, cached at {path}")
        return out

    def _reference_pass(self, pairs, reference: ReferencePolicy, per_token: bool):
        """``[P, 2]`` (chosen, rejected) sums in pair order; with ``per_token`` also the flat per-token
        log-probs, pair by pair (chosen tokens then rejected tokens)."""
        size = self.job.reference_batch_size or self.batch_size
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i]))  # similar lengths, less padding
        processes = distributed.world_size()
        # this process's share: every N-th, lengths balanced; with low-memory loading only the main process
        # holds the weights before FSDP2 shards them, and it computes every pair
        sharers = 1 if distributed.low_memory_loading() else processes
        order = order[distributed.rank()::sharers] if distributed.rank() < sharers else []
        sums = torch.zeros(len(pairs), 2, dtype=torch.float32)
        tokens: list[list[torch.Tensor]] = [[] for _ in pairs]
        progress = tqdm(total=len(order), desc=f"reference log-probs ({'validation' if per_token else 'train'})",
                        unit="pair", dynamic_ncols=True, leave=False, disable=not distributed.is_main_process())
        for start in range(0, len(order), size):
            indices = order[start:start + size]
            batch = self.collate([pairs[i] for i in indices])
            result = self._reference_logps(batch, reference, per_token=per_token)
            progress.update(len(indices))
            chosen, rejected = split_pairs(result[0].float().cpu())
            sums[indices, 0], sums[indices, 1] = chosen, rejected
            if per_token:
                rows = _split_tokens(result[2].float().cpu(), result[1])
                for j, index in enumerate(indices):
                    tokens[index] = [rows[j], rows[j + len(indices)]]
        progress.close()
        if processes > 1:  # every process gets every pair's values
            for rows, row_sums, row_tokens in distributed.gather_objects(
                    (order, sums[order], [tokens[i] for i in order])):
                sums[rows] = row_sums
                for index, pair_tokens in zip(rows, row_tokens):
                    tokens[index] = pair_tokens
        if not per_token:
            return sums, None
        return sums, torch.cat([t for pair in tokens for t in pair]) if pairs else torch.zeros(0)

    # -- engine interface
    def steps_per_epoch(self) -> int:
        return self.schedule.steps_per_epoch()

    def largest_micro_batch_tokens(self) -> int:
        return 2 * self.schedule.largest_batch_tokens()  # a chosen and a rejected row per pair

    def updates(self, start_step: int):
        for chunk in self.schedule.updates(start_step):
            yield [self.training_batch(indices) for indices in chunk]

    def collate(self, pairs):
        return collate_pairs(pairs, self.tokenizer.pad_token_id, self.device, padding_free=self.job.padding_free,
                             share_prompt=self.job.share_prompt)

    def training_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        batch = self.collate([self.train_pairs[i] for i in indices])
        if self.precomputed is not None and "train" in self.precomputed:
            cached = self.precomputed["train"][indices]
            batch["reference"] = torch.cat([cached[:, 0], cached[:, 1]]).to(self.device)
        return batch

    loss_unit = "pairs"  # the engine logs the step's total

    def loss_weight(self, batch) -> float:
        """Pairs in the batch: the engine divides by their count over the whole global batch."""
        return float(batch["margin"].numel())

    def loss(self, batch):
        reference = batch.get("reference")
        if reference is None and self.needs_reference:
            reference = self._reference_logps(batch, self.reference)[0]
        sums, counts = response_logprob_sums(self.model, batch, self.job.logprob_chunk_size)
        loss, _, metrics = preference_objective(self.job, sums, counts, reference)
        return loss, metrics

    def evaluate(self) -> dict[str, float]:
        if not self.validation_pairs:
            return {}
        size = max(1, self.batch_size)
        totals: dict[str, float] = {}
        kl_sum, kl_tokens, pairs = 0.0, 0, 0
        cached_tokens = None
        if self.precomputed is not None and "validation_tokens" in self.precomputed:
            cached_tokens = _split_tokens(self.precomputed["validation_tokens"], self._validation_token_counts())
        first, stop = distributed.shard_range(len(self.validation_pairs))  # this process's share
        for start in range(first, stop, size):
            chunk = self.validation_pairs[start:min(start + size, stop)]
            batch = self.collate(chunk)
            sums, counts, token_logps = response_logprob_sums(self.model, batch, self.job.logprob_chunk_size,
                                                              per_token=True)
            if cached_tokens is not None:
                n = len(chunk)
                pair_rows = range(start, start + n)
                reference_tokens = torch.cat([cached_tokens[2 * i] for i in pair_rows]
                                             + [cached_tokens[2 * i + 1] for i in pair_rows]).to(token_logps.device)
                reference = torch.cat([self.precomputed["validation"][start:start + n, 0],
                                       self.precomputed["validation"][start:start + n, 1]]).to(sums.device)
            else:
                reference, _, reference_tokens = self._reference_logps(batch, self.reference, per_token=True)
            loss, _, metrics = preference_objective(self.job, sums, counts,
                                                    reference if self.needs_reference else None)
            for key, value in {"loss": float(loss), **metrics}.items():
                totals[key] = totals.get(key, 0.0) + value * len(chunk)
            kl_sum += float(kl_k3(token_logps.float(), reference_tokens.float()).sum())
            kl_tokens += token_logps.numel()
            pairs += len(chunk)
        totals = distributed.sum_across({**totals, "__kl": kl_sum, "__kl_tokens": kl_tokens, "__pairs": pairs})
        pairs, kl_sum, kl_tokens = totals.pop("__pairs"), totals.pop("__kl"), totals.pop("__kl_tokens")
        result = {key: value / max(1.0, pairs) for key, value in totals.items()}
        result["kl"] = kl_sum / max(1.0, kl_tokens)
        result["pairs"] = pairs
        return result

    def _validation_token_counts(self) -> list[int]:
        counts = []
        for pair in self.validation_pairs:
            counts += [len(pair.chosen_ids) - max(pair.chosen_start, 1),
                       len(pair.rejected_ids) - max(pair.rejected_start, 1)]
        return counts

    def save_final(self, directory) -> None:
        if self.reference is not None:
            self.reference.release()
            self.reference = None
        save_model(self.model, self.tokenizer, directory)
        if self.job.lora is not None and self.job.lora.merge_on_save:
            save_model(self.model, self.tokenizer, f"{directory}-merged", merge=True)


# ----------------------------------------------------------------------------- helpers

def _split_tokens(flat: torch.Tensor, counts) -> list[torch.Tensor]:
    """Split flat per-token values into rows, given per-row token counts (a tensor or a list)."""
    return list(torch.split(flat, [int(c) for c in counts]))


def _load_reference(job: DPOJob, tokenizer, device):
    reference, reference_tokenizer = load_model_and_tokenizer(
        job.reference_model, device=device, dtype=None if job.model.dtype == "auto" else job.model.dtype,
        trust_remote_code=job.model.trust_remote_code)
    if len(reference_tokenizer) != len(tokenizer) or reference_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise UsageError(f"reference_model {job.reference_model!r} has a different tokenizer than the policy; "
                         "DPO needs both to read the same token ids")
    return freeze(reference)
