"""Supervised fine-tuning: maximise the likelihood of the assistant's tokens.

    L = - (1 / |M|) * sum_{t in M} log p_theta(x_t | x_<t)

where M is the set of assistant tokens (every assistant turn and its end-of-turn marker) or every
token when ``completion_only_loss`` is off. Log-probabilities come from hidden states chunk by
chunk (``alignkit.logprobs``), so the ``[batch, seq, vocab]`` logits never exist at once. Batches
are grouped by length to cut padding, or packed into full rows (``packing: true``) with
block-diagonal attention so packed sequences never see each other.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field

from alignkit import distributed
from alignkit.config import Job
from alignkit.data import pack_rows, pad_batch, tokenize_dataset
from alignkit.errors import UsageError
from alignkit.methods.base import BatchSchedule, policy_and_data
from alignkit.methods.registry import register_method
from alignkit.model import save_model
from alignkit.model.forward import decoder_hidden_states, head_logprobs


class SFTJob(Job):
    METHOD = "sft"
    completion_only_loss: bool = Field(True, description="loss on assistant tokens only; false: all tokens")
    packing: bool = Field(False, description="pack several rows into one sequence of max_length")
    group_by_length: bool = Field(True, description="batch rows of similar length together")
    logprob_chunk_size: int = Field(1024, gt=0)


@register_method("sft", job=SFTJob, help="supervised fine-tuning on prompt/response or chat data")
class SFTRecipe:
    def __init__(self, job: SFTJob, model=None, tokenizer=None, train=None, validation=None):
        self.job = job
        model, tokenizer, train, validation, self.notes = policy_and_data(job, model, tokenizer, train, validation,
                                                                          kind="chat")
        self.model, self.tokenizer = model, tokenizer
        self.device = distributed.model_device(model)
        train_on = "assistant" if job.completion_only_loss else "all"
        self.train_rows, report = tokenize_dataset(tokenizer, train, job.data.max_length, train_on)
        self.notes.append(f"tokenized train: {report.summary()}")
        self.validation_rows, vreport = tokenize_dataset(tokenizer, validation or [], job.data.max_length, train_on)
        if validation:
            self.notes.append(f"tokenized validation: {vreport.summary()}")
        if not self.train_rows:
            raise UsageError("no training rows have any loss tokens left after truncation")
        if job.packing:

            before = len(self.train_rows)
            self.train_rows = pack_rows(self.train_rows, job.data.max_length)
            self.notes.append(f"packing: {before} rows into {len(self.train_rows)} sequences of <= {job.data.max_length}")
        lengths = [len(row["input_ids"]) if isinstance(row, dict) else len(row.input_ids) for row in self.train_rows]
        self.schedule = BatchSchedule(lengths, 1 if job.packing else job.training.batch_size,
                                      job.training.gradient_accumulation_steps, job.training.seed,
                                      job.group_by_length and not job.packing,
                                      unit="packed sequences" if job.packing else "rows")

    # -- engine interface
    def steps_per_epoch(self) -> int:
        return self.schedule.steps_per_epoch()

    def largest_micro_batch_tokens(self) -> int:
        return self.schedule.largest_batch_tokens()

    def updates(self, start_step: int):
        for chunk in self.schedule.updates(start_step):
            yield [self.collate([self.train_rows[i] for i in indices]) for indices in chunk]

    def collate(self, rows) -> dict[str, torch.Tensor]:
        batch = pad_batch(rows, self.tokenizer.pad_token_id, side="right")
        if "position_ids" in batch:
            # packed rows: no attention mask, so the model builds block-diagonal attention from the
            # restarting position ids (docs/data.md, "Packing")
            batch["attention_mask"] = None
        return {key: value.to(self.device) for key, value in batch.items() if value is not None}

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        nll_sum, correct, count = self._token_statistics(batch, with_grad=True)
        loss = nll_sum / count.clamp(min=1)
        return loss, {"token_accuracy": float(correct) / max(1, int(count))}

    loss_unit = "tokens"  # the engine logs the step's total

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> float:
        """Loss tokens in the batch: the engine divides by their count over the whole global batch."""
        return float(_loss_mask(batch).sum())

    def evaluate(self) -> dict[str, float]:
        """Mean NLL, perplexity and token accuracy over every validation token; each process scores its
        share of the rows and the sums are added up (``tokens``: how many were scored)."""
        if not self.validation_rows:
            return {}
        total_nll, total_correct, total_tokens = 0.0, 0, 0
        size = max(1, self.job.training.batch_size)
        rows = distributed.shard(self.validation_rows)
        for start in range(0, len(rows), size):
            batch = self.collate(rows[start:start + size])
            nll_sum, correct, count = self._token_statistics(batch, with_grad=False)
            total_nll += float(nll_sum)
            total_correct += int(correct)
            total_tokens += int(count)
        totals = distributed.sum_across({"nll": total_nll, "correct": total_correct, "tokens": total_tokens})
        mean_nll = totals["nll"] / max(1, totals["tokens"])
        return {"loss": mean_nll, "perplexity": math.exp(min(mean_nll, 50.0)),
                "token_accuracy": totals["correct"] / max(1, totals["tokens"]), "tokens": totals["tokens"]}

    def save_final(self, directory) -> None:
        save_model(self.model, self.tokenizer, directory)
        if self.job.lora is not None and self.job.lora.merge_on_save:
            save_model(self.model, self.tokenizer, f"{directory}-merged", merge=True)

    # -- the computation
    def _token_statistics(self, batch, with_grad: bool):
        """Sum of masked NLL (with grad when asked), number of correct argmax predictions, token count.

        Only the hidden states of loss tokens go through the output layer: prompt and padding
        positions never cost a vocabulary-sized matmul (on chat data that is often half the rows).
        """

        hidden = decoder_hidden_states(self.model, batch["input_ids"], batch.get("attention_mask"),
                                       batch.get("position_ids"))[:, :-1]
        mask = _loss_mask(batch)
        picked = hidden[mask]                                  # [M, H]
        targets = batch["input_ids"][:, 1:][mask]              # [M]
        logps, _, hits = head_logprobs(self.model, picked[None], targets[None],
                                               chunk_size=self.job.logprob_chunk_size)
        nll_sum = -logps.sum()
        correct = int(hits.sum())
        count = mask.sum()
        if not with_grad:
            nll_sum = nll_sum.detach()
        return nll_sum, correct, count


def _loss_mask(batch) -> torch.Tensor:
    """``[B, T-1]`` True where a next-token prediction counts: loss tokens that are not padding."""
    mask = batch["loss_mask"][:, 1:].bool()
    if batch.get("attention_mask") is not None:
        mask = mask & batch["attention_mask"][:, 1:].bool()
    return mask
