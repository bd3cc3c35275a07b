"""Preparation helpers: de-duplication, length filtering, a deterministic train/validation split.

Each returns what it removed (a count) next to what it kept, so that callers can report it.
"""
from __future__ import annotations

import json
import random
import re
import unicodedata
from typing import Any, Callable, Sequence

_SPACE = re.compile(r"\s+")


def example_key(example: Any) -> tuple[str, ...]:
    """The text that identifies an example: role/content of each message, plus the responses of a
    preference example and the ``fields`` of a prompt example; strings are themselves; other objects
    their JSON."""
    if isinstance(example, str):
        return (example,)
    parts: list[str] = []
    for name in ("messages", "prompt"):
        messages = getattr(example, name, None)
        if isinstance(messages, list):
            for message in messages:
                parts += [message["role"], message["content"]]
    for name in ("chosen", "rejected"):
        value = getattr(example, name, None)
        if isinstance(value, str):
            parts += [name, value]
    if parts:
        return tuple(parts)
    if hasattr(example, "input_ids"):
        return tuple(str(i) for i in example.input_ids)
    return (json.dumps(example, sort_keys=True, ensure_ascii=False, default=str),)


def normalize_text(text: str) -> str:
    """Lower-case, punctuation removed (Unicode categories P*), whitespace collapsed and stripped."""
    text = "".join(ch for ch in text.lower() if not unicodedata.category(ch).startswith("P"))
    return _SPACE.sub(" ", text).strip()


def deduplicate(examples: Sequence[Any], key: Callable[[Any], Any] | None = None,
                mode: str = "exact") -> tuple[list, int]:
    """Keep the first occurrence of each example, in order; return ``(kept, n_removed)``.

    ``key`` maps an example to a string (or a tuple of strings); default `example_key`.
    ``mode="normalized"`` compares keys after `normalize_text` (case, punctuation and spacing ignored).
    """
    if mode not in ("exact", "normalized"):
        raise ValueError(f"mode must be 'exact' or 'normalized', got {mode!r}")
    key = key or example_key
    seen: set = set()
    kept = []
    for example in examples:
        value = key(example)
        parts = (value,) if isinstance(value, str) else tuple(value)
        if mode == "normalized":
            parts = tuple(normalize_text(str(part)) for part in parts)
        if parts in seen:
            continue
        seen.add(parts)
        kept.append(example)
    return kept, len(examples) - len(kept)


def _length(row: Any) -> int:
    if isinstance(row, dict):
        return len(row["input_ids"])
    if hasattr(row, "input_ids"):
        return len(row.input_ids)
    return len(row)


def filter_by_length(rows: Sequence[Any], min_tokens: int | None = None,
                     max_tokens: int | None = None) -> tuple[list, int]:
    """Keep rows (`TokenizedRow`s, dicts with ``input_ids``, or token lists) with
    ``min_tokens <= len <= max_tokens`` (either bound optional); return ``(kept, n_removed)``."""
    kept = [row for row in rows
            if (min_tokens is None or _length(row) >= min_tokens)
            and (max_tokens is None or _length(row) <= max_tokens)]
    return kept, len(rows) - len(kept)


def train_validation_split(items: Sequence[Any], validation_fraction: float | None = None,
                           seed: int = 0, validation_size: int | None = None) -> tuple[list, list]:
    """Split into ``(train, validation)``, deterministic given ``seed``; both keep the input order.

    ``validation_size`` (a count) wins over ``validation_fraction``. With a fraction > 0 and at least 2
    items the validation set is never empty (at least 1), and the training set never empty either.
    """
    n = len(items)
    if validation_size is not None:
        if validation_size < 0:
            raise ValueError(f"validation_size must be >= 0, got {validation_size}")
        count = min(validation_size, max(0, n - 1))
    elif validation_fraction:
        if not 0 < validation_fraction < 1:
            raise ValueError(f"validation_fraction must be between 0 and 1, got {validation_fraction}")
        count = int(round(n * validation_fraction)) if n >= 2 else 0
        if n >= 2:
            count = min(max(count, 1), n - 1)
    else:
        count = 0
    chosen = set(random.Random(seed).sample(range(n), count)) if count else set()
    train = [item for i, item in enumerate(items) if i not in chosen]
    validation = [item for i, item in enumerate(items) if i in chosen]
    return train, validation
