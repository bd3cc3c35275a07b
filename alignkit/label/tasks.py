"""The tasks file: prompts with candidate responses, what `label generate` writes and `label serve` reads.

One JSON object per line::

    {"id": "p0007", "prompt": "How do I ...?",
     "candidates": [{"text": "...", "model": "smollm2-135m-instruct"}, {"text": "...", "model": "runs/dpo/final"}],
     "metadata": {"diversity": "nc"}}

* ``prompt``: a string (one user message) or a message list (``system``/``user``/``assistant`` turns
  ending with a user turn), exactly as the training data files take it.
* ``candidates``: two or more responses, each a string or an object with ``text`` and optional
  ``model`` (who produced it; the admin leaderboard ranks these) and any other keys (kept as metadata).
* ``id``: optional; a string or number, unique in the file. Without it the id is a hash of the prompt
  and the candidates, so importing the same file twice never duplicates a task.
* ``metadata``: optional object, kept as it is.

Every problem raises `alignkit.data.DataError` naming the file, the line and the field.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from alignkit.data import DataError, iter_records, to_prompt_example
from alignkit.data.write import write_jsonl

UNKNOWN_MODEL = "unknown"
_TASK_KEYS = {"id", "prompt", "candidates", "metadata"}


@dataclass
class Candidate:
    """One response to a task's prompt and the model (or adapter) that wrote it."""

    text: str
    model: str = UNKNOWN_MODEL
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Task:
    """A prompt (message list) with its candidate responses; ``source`` is ``file:line`` when read from a file."""

    id: str
    prompt: list[dict]
    candidates: list[Candidate]
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def fingerprint(self) -> str:
        """SHA-256 of the prompt and the candidates' texts and models: what a task *is*."""
        content = json.dumps({"prompt": self.prompt, "candidates": [[c.text, c.model] for c in self.candidates]},
                             sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(content.encode("utf-8")).hexdigest()


def prompt_value(messages: list[dict]) -> str | list[dict]:
    """A prompt as data files write it: a plain string for a single user message, else the message list."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return [dict(m) for m in messages]


def task_to_row(task: Task) -> dict:
    """The JSON object of a task in a tasks file."""
    candidates = [{"text": c.text, "model": c.model, **c.metadata} for c in task.candidates]
    row = {"id": task.id, "prompt": prompt_value(task.prompt), "candidates": candidates}
    if task.metadata:
        row["metadata"] = task.metadata
    return row


def write_tasks(path: str | os.PathLike, tasks: Iterable[Task]) -> Path:
    """Write tasks as JSON Lines (to a temporary file renamed into place, so a crash leaves no half file)."""
    return write_jsonl(path, [task_to_row(task) for task in tasks])


def _candidate(value: Any, source: str, index: int) -> Candidate:
    where = f"candidates[{index}]"
    text_field = where  # a plain string candidate is its own text
    if isinstance(value, str):
        value = {"text": value}
    else:
        text_field = f"{where}.text"
    if not isinstance(value, dict):
        raise DataError(f"wrong type: expected a string or an object with 'text', got {type(value).__name__}",
                        source, where)
    text = value.get("text")
    if not isinstance(text, str):
        raise DataError("missing field 'text' (a string)" if text is None else
                        f"wrong type: 'text' must be a string, got {type(text).__name__}", source, where)
    if not text.strip():
        raise DataError("empty text", source, text_field)
    model = value.get("model", UNKNOWN_MODEL)
    if not isinstance(model, str) or not model.strip():
        raise DataError("'model' must be a non-empty string", source, f"{where}.model")
    metadata = {k: v for k, v in value.items() if k not in ("text", "model")}
    return Candidate(text=text, model=model.strip(), metadata=metadata)


def task_from_row(row: dict, source: str) -> Task:
    """One tasks-file row -> `Task`, or `DataError` naming ``source`` and the field."""
    unknown = sorted(set(row) - _TASK_KEYS)
    if unknown:
        raise DataError(f"unknown field(s) {', '.join(repr(k) for k in unknown)}; a task has "
                        f"{', '.join(sorted(_TASK_KEYS))}", source)
    if "prompt" not in row:
        raise DataError("missing field (every task needs a prompt)", source, "prompt")
    prompt = to_prompt_example({"prompt": row["prompt"]}, source, format="prompt").prompt
    if prompt[-1]["role"] != "user":
        raise DataError("the prompt must end with a user turn", source, "prompt")
    candidates_value = row.get("candidates")
    if not isinstance(candidates_value, list):
        raise DataError("missing field (a list of at least 2 responses)" if candidates_value is None else
                        f"wrong type: expected a list of responses, got {type(candidates_value).__name__}",
                        source, "candidates")
    if len(candidates_value) < 2:
        raise DataError(f"a task needs at least 2 candidates to compare, got {len(candidates_value)}",
                        source, "candidates")
    candidates = [_candidate(value, source, index) for index, value in enumerate(candidates_value)]
    metadata = row.get("metadata", {})
    if not isinstance(metadata, dict):
        raise DataError(f"wrong type: expected an object, got {type(metadata).__name__}", source, "metadata")
    task = Task(id="", prompt=prompt, candidates=candidates, metadata=metadata, source=source)
    identifier = row.get("id")
    if identifier is None:
        task.id = "sha256:" + task.fingerprint()[:16]
    elif isinstance(identifier, bool) or not isinstance(identifier, (str, int)) or not str(identifier).strip():
        raise DataError("'id' must be a non-empty string or a number", source, "id")
    else:
        task.id = str(identifier).strip()
    return task


def read_tasks(path: str | os.PathLike) -> list[Task]:
    """Read and validate a whole tasks file; the first bad row raises `DataError` with its file:line."""
    tasks: list[Task] = []
    first_seen: dict[str, str] = {}
    for source, row in iter_records(path):
        if isinstance(row, DataError):
            raise row
        task = task_from_row(row, source)
        if task.id in first_seen:
            raise DataError(f"duplicate task id {task.id!r} (first at {first_seen[task.id]})", source, "id")
        first_seen[task.id] = source
        tasks.append(task)
    return tasks
