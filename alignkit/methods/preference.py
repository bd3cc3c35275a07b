"""What the reward-model and DPO recipes share: the job keys and where the pairs come from.

    rows ──load_preference_data──▶ PreferenceExample ──alignkit.data.pairs──▶ TokenizedPair ──▶ batches

Bad rows never pass silently. Rows the data layer rejects (chosen identical to rejected, an empty
response, no prompt, ...) raise their `DataError` or, with ``data.on_error: skip``, are skipped and
counted in the run notes; so are pairs that truncation spoils (`alignkit.data.pairs.tokenize_pairs`).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from alignkit.config import Job
from alignkit.data.pairs import tokenize_pairs
from alignkit.errors import UsageError
from alignkit.methods.base import BatchSchedule, load_train_validation, policy_and_data


class PreferenceJob(Job):
    """Keys shared by the preference methods (``rm``, ``dpo``); not a method itself."""

    DATA_KIND = "preference"

    ALIASES = {"max_prompt_length": "data.max_prompt_length", "max_length": "data.max_length"}

    ranking_pairs: Literal["all", "adjacent"] = Field(
        "all", description="ranked rows (prompt + responses best first): every (better, worse) pair or adjacent ones")
    group_by_length: bool = Field(True, description="batch pairs of similar length together (less padding)")


# ----------------------------------------------------------------------------- data

def preference_inputs(job: PreferenceJob, model, tokenizer, train, validation):
    """``(model, tokenizer, train pairs, validation pairs, notes)``: what a preference recipe starts from
    (given, or the job's), its pairs tokenized."""
    model, tokenizer, train, validation, notes = policy_and_data(job, model, tokenizer, train, validation,
                                                                 kind="preference", ranking_pairs=job.ranking_pairs)
    train_pairs, validation_pairs = tokenize_train_validation(job, tokenizer, train, validation, notes)
    return model, tokenizer, train_pairs, validation_pairs, notes


def load_preference_data(job: PreferenceJob):
    """Training and validation `PreferenceExample`s and the notes saying where every row went."""
    return load_train_validation(job, kind="preference", ranking_pairs=job.ranking_pairs)


def tokenize_train_validation(job: PreferenceJob, tokenizer, train, validation, notes: list[str]):
    """``(train pairs, validation pairs)`` tokenized within ``data.max_length`` / ``max_prompt_length``;
    what truncation dropped is added to ``notes``."""
    data = job.data
    train_pairs, report = tokenize_pairs(tokenizer, train, data.max_length, data.max_prompt_length)
    notes.append(f"train {report.summary()}")
    validation_pairs, validation_report = tokenize_pairs(tokenizer, validation or [], data.max_length,
                                                         data.max_prompt_length)
    if validation:
        notes.append(f"validation {validation_report.summary()}")
    if not train_pairs:
        raise UsageError("no training pairs left after tokenization and truncation")
    return train_pairs, validation_pairs


def pair_schedule(job: PreferenceJob, pairs) -> BatchSchedule:
    """The step -> pairs schedule (grouped by length unless ``group_by_length: false``)."""
    return BatchSchedule([len(pair) for pair in pairs], job.training.batch_size,
                         job.training.gradient_accumulation_steps, job.training.seed, job.group_by_length)
