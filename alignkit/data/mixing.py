"""A job's training data: one file or a weighted mix of files, a validation split, and notes saying
where every row went.

    data:
      train:
        - {path: support.jsonl, weight: 3}
        - {path: chitchat.jsonl, weight: 1, columns: {prompt: question, completion: reply}}
      validation_fraction: 0.1

Weights are **sampling proportions**: with total T training examples over all files (after the
validation split), file i contributes ``round(T * w_i / sum(w))`` examples to one epoch. A file
asked for more examples than it has is repeated (each row ``floor(k)`` times, the remainder drawn
without replacement); one asked for fewer is sub-sampled without replacement. The draw is a pure
function of ``data.seed``, so a resumed run sees the same mix. The validation split is taken per
file *before* mixing, from the file's own rows (held-out rows are never repeated into training),
and the notes (printed and written into the run report) state every file's share.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

from alignkit.data.errors import DataError
from alignkit.data.formats import load_examples
from alignkit.data.prepare import deduplicate, example_key, train_validation_split


@dataclass
class SourceFile:
    """One training file and how to read it (a string in ``data.train`` is a file of weight 1)."""

    path: str
    weight: float = 1.0
    columns: dict[str, str] | None = None
    format: str | None = None
    system_prompt: str | None = None
    limit: int | None = None


def training_files(train: Any) -> list[SourceFile]:
    """``data.train`` (a string, a list of strings, or a list of ``{path, weight, ...}`` sections or
    dicts) as `SourceFile`s."""
    if train is None or train == "" or train == []:
        raise DataError("data.train is not set: give a file (jsonl/json/csv/parquet) or hf://name, "
                         "or a list of files with weights")
    items = train if isinstance(train, list) else [train]
    files = []
    for item in items:
        if isinstance(item, str):
            files.append(SourceFile(path=item))
        elif isinstance(item, dict):
            files.append(SourceFile(**item))
        else:  # a config section (pydantic model) with the same fields
            files.append(SourceFile(**{name: getattr(item, name) for name in SourceFile.__dataclass_fields__}))
    for file in files:
        if not file.weight > 0:
            raise DataError(f"data.train: {file.path}: weight must be > 0, got {file.weight}")
    return files


def largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """Integer counts summing to ``total``, proportional to ``weights`` (Hamilton's method)."""
    scale = sum(weights)
    exact = [total * w / scale for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    return counts


def mix_by_weight(groups: Sequence[Sequence], weights: Sequence[float], seed: int,
                  total: int | None = None) -> tuple[list, list[int]]:
    """Draw ``total`` (default: all items) items from the groups in proportion to ``weights``;
    returns ``(items, per-group counts)``. Deterministic for a seed."""
    if len(groups) != len(weights):
        raise ValueError("one weight per group")
    total = sum(len(g) for g in groups) if total is None else total
    counts = largest_remainder(total, weights)
    generator = random.Random(seed)
    mixed: list = []
    for group, count in zip(groups, counts):
        if count and not group:
            raise ValueError("cannot draw from an empty group")
        repeats, extra = divmod(count, len(group)) if group else (0, 0)
        mixed += list(group) * repeats
        mixed += [group[i] for i in sorted(generator.sample(range(len(group)), extra))]
    return mixed, counts


def _split_by_row(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """Validation by *row* (``source``), so the pairs made from one ranking stay on one side."""
    sources = list(dict.fromkeys(example.source for example in examples))
    if fraction <= 0 or len(sources) < 2:
        return examples, []
    _, held_out = train_validation_split(sources, validation_fraction=fraction, seed=seed)
    held_out = set(held_out)
    return ([e for e in examples if e.source not in held_out], [e for e in examples if e.source in held_out])


def load_training_data(data: Any, kind: str, ranking_pairs: str = "all",
                       reports: list | None = None) -> tuple[list, list, list[str]]:
    """Training and validation examples of ``kind`` for a job's ``data`` section, and the notes.

    Reads every file of ``data.train`` (with its own columns/format when given), removes duplicates
    across files when ``data.deduplicate`` asks, splits validation per file (or reads
    ``data.validation``), then mixes the files by weight. ``reports`` (a list) receives every file's
    `LoadReport`.
    """
    files = training_files(data.train)
    default_format = None if data.format in (None, "auto") else data.format
    notes: list[str] = []
    per_file: list[list] = []

    def options(file: SourceFile | None) -> dict:
        common: dict[str, Any] = dict(
            kind=kind, on_error=data.on_error,
            columns=(file.columns if file and file.columns else data.columns) or None,
            system_prompt=(file.system_prompt if file and file.system_prompt else data.system_prompt),
            format=(file.format if file and file.format else default_format))
        if kind == "preference":
            common["ranking_pairs"] = ranking_pairs
        if kind == "chat":
            common["desirable_only"] = getattr(data, "desirable_only", False)
        return common

    for file in files:
        examples, report = load_examples(file.path, limit=file.limit or data.limit, **options(file))
        notes.append(f"train {report.summary()}")
        per_file.append(examples)
        if reports is not None:
            reports.append(report)
    if data.deduplicate != "none":
        tagged = [(index, example) for index, examples in enumerate(per_file) for example in examples]
        kept, removed = deduplicate(tagged, key=lambda pair: example_key(pair[1]), mode=data.deduplicate)
        per_file = [[example for index, example in kept if index == i] for i in range(len(files))]
        notes.append(f"de-duplication ({data.deduplicate}): removed {removed} examples")
    validation: list = []
    if data.validation:
        validation, vreport = load_examples(data.validation, **options(None))
        notes.append(f"validation {vreport.summary()}")
        if reports is not None:
            reports.append(vreport)
    elif data.validation_fraction > 0:
        split = [_split_by_row(examples, data.validation_fraction, data.seed) for examples in per_file]
        per_file = [train for train, _ in split]
        validation = [example for _, held in split for example in held]
        if validation:
            rows = len({example.source for example in validation})
            notes.append(f"validation: {rows} rows ({len(validation)} examples) split from train (seed {data.seed})")
    if len(files) == 1:
        train = per_file[0]
    else:
        empty = [file.path for file, examples in zip(files, per_file) if not examples]
        if empty:
            raise DataError(f"data.train: no training rows left in {', '.join(empty)} after validation and "
                             "filtering; a file in a mix needs at least one")
        weights = [file.weight for file in files]
        train, counts = mix_by_weight(per_file, weights, data.seed)
        notes.append(mix_note(files, per_file, counts))
    if not train:
        raise DataError(f"{files[0].path}: no training rows left after validation and filtering")
    return train, validation, notes


def mix_note(files: Sequence[SourceFile], per_file: Sequence[Sequence], counts: Sequence[int]) -> str:
    """The mix in one line: each file's weight, its share of an epoch and how often its rows appear."""
    total = sum(counts)
    weight_sum = sum(file.weight for file in files)
    parts = []
    for file, examples, count in zip(files, per_file, counts):
        times = count / len(examples)
        how = f"each row {times:.2f}x" if times >= 1 else f"{count} of its {len(examples)} examples"
        parts.append(f"{file.path} weight {file.weight:g} -> {100 * file.weight / weight_sum:.1f}% "
                     f"= {count} examples from {len(examples)} ({how})")
    return f"mix by sampling proportion ({total} examples per epoch, seed fixed): " + "; ".join(parts)
