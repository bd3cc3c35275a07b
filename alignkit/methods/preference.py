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
from alignkit.data import deduplicate, load_examples, train_validation_split
from alignkit.errors import UsageError


class PreferenceJob(Job):
    """Keys shared by the preference methods (``rm``, ``dpo``); not a method itself."""

    ALIASES = {"max_prompt_length": "data.max_prompt_length", "max_length": "data.max_length"}

    ranking_pairs: Literal["all", "adjacent"] = Field(
        "all", description="ranked rows (prompt + responses best first): every (better, worse) pair or adjacent ones")
    group_by_length: bool = Field(True, description="batch pairs of similar length together (less padding)")


# ----------------------------------------------------------------------------- data

def load_preference_data(job: Job, ranking_pairs: str = "all"):
    """Training and validation `PreferenceExample`s and notes saying where every row went.

    Validation comes from ``data.validation`` or a seeded split of the training rows. The split is by
    *row*, so the pairs expanded from one ranking never end up on both sides.
    """

    data = job.data
    if not data.train:
        raise UsageError("data.train is not set: give a file (jsonl/json/csv/parquet) or hf://name")
    common = dict(kind="preference", columns=data.columns or None, on_error=data.on_error,
                  system_prompt=data.system_prompt, format=None if data.format == "auto" else data.format,
                  ranking_pairs=ranking_pairs)
    train, report = load_examples(data.train, limit=data.limit, **common)
    notes = [f"train {report.summary()}"]
    if data.deduplicate != "none":
        train, removed = deduplicate(train, mode=data.deduplicate)
        notes.append(f"de-duplication ({data.deduplicate}): removed {removed} pairs")
    if data.validation:
        validation, vreport = load_examples(data.validation, **common)
        notes.append(f"validation {vreport.summary()}")
    elif data.validation_fraction > 0:
        sources = list(dict.fromkeys(example.source for example in train))
        if len(sources) >= 2:
            _, held_out = train_validation_split(sources, validation_fraction=data.validation_fraction,
                                                 seed=data.seed)
            held_out = set(held_out)
            validation = [example for example in train if example.source in held_out]
            train = [example for example in train if example.source not in held_out]
            notes.append(f"validation: {len(held_out)} rows ({len(validation)} pairs) split from train "
                         f"(seed {data.seed})")
        else:
            validation = []
    else:
        validation = []
    if not train:
        raise UsageError(f"{data.train}: no training pairs left after validation and filtering")
    return train, validation, notes
