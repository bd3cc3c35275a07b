"""What is being exported: a run folder, a run's ``final/`` folder, or any model alignkit loads.

``alignkit export RUN_OR_MODEL`` accepts

* a run folder (it holds ``config.yaml`` and ``final/``): the run's final model is exported and the
  run's config, summary and metrics go into the model card;
* a run's ``final/`` folder (or ``final-merged/``): the same, the run being its parent folder;
* anything `alignkit.model.load_model_and_tokenizer` loads (the embedded model's name, a local
  model or adapter folder, a ``.gguf`` file, a hub id): exported as it is, with a shorter card.

A folder holding ``head.json`` is a reward model (or a critic) written by `ScalarHeadModel.save`;
it exports as a sequence-classification model, never as a causal LM.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from alignkit.errors import UsageError
from alignkit.model.heads import HEAD_CONFIG
from alignkit.model.load import EMBEDDED_ALIASES, EMBEDDED_MODEL, resolve_model

RUN_CONFIG = "config.yaml"
FINAL_FOLDERS = ("final", "final-merged")


class ExportError(UsageError):
    """The source cannot be exported as asked; the message names the source and what to do."""


@dataclass(frozen=True)
class ExportSource:
    """``model_path`` is what the loaders take; ``run_dir`` is set when the model is a run's output.

    ``kind`` is ``"causal"`` (a language model or adapter) or ``"reward"`` / ``"critic"`` (a folder
    with ``head.json``). ``name`` is a short name for files and cards (the run folder's name, or the
    model folder's).
    """

    model_path: str
    kind: str
    name: str
    run_dir: Path | None = None
    given: str = ""

    @property
    def is_scalar(self) -> bool:
        return self.kind in ("reward", "critic")


def set_default_permissions(path: str | os.PathLike) -> None:
    """Give a written file (or every file of a folder) the permissions the user's umask gives new files.

    Temporary files (``mkstemp``, and transformers' own shard writer) are private (0600); an export is
    meant to be read by servers and other users.
    """
    mask = os.umask(0)
    os.umask(mask)
    path = Path(path)
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if item.is_file():
            os.chmod(item, 0o666 & ~mask)


def _is_run_dir(path: Path) -> bool:
    return (path / RUN_CONFIG).is_file()


def _safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return name or "model"


def _head_kind(folder: Path) -> str | None:
    head = folder / HEAD_CONFIG
    if not head.is_file():
        return None
    try:
        return str(json.loads(head.read_text()).get("kind", "reward"))
    except (OSError, ValueError) as error:
        raise ExportError(f"{head}: cannot read the head description: {error}") from error


def resolve_source(name_or_path: str | os.PathLike) -> ExportSource:
    """Decide what ``name_or_path`` exports, without loading weights."""
    given = os.fspath(name_or_path)
    text = given.strip()
    if text.lower() in EMBEDDED_ALIASES:
        return ExportSource(EMBEDDED_MODEL, "causal", EMBEDDED_MODEL, None, given)
    path = Path(text).expanduser()
    if path.is_dir() and _is_run_dir(path):
        final = path / "final"
        if not final.is_dir():
            raise ExportError(
                f"run folder {path} has no final/ folder: the run did not finish. Finish or resume it "
                f"(alignkit train {path / RUN_CONFIG} --resume), then export")
        return ExportSource(str(final.resolve()), _head_kind(final) or "causal", _safe_name(path.resolve().name),
                            path.resolve(), given)
    if path.is_dir():
        run_dir = path.resolve().parent if path.resolve().name in FINAL_FOLDERS and _is_run_dir(
            path.resolve().parent) else None
        kind = _head_kind(path)
        resolve_model(str(path))  # raises ModelLoadError for a folder that holds no model
        name = run_dir.name if run_dir is not None else path.resolve().name
        return ExportSource(str(path.resolve()), kind or "causal", _safe_name(name), run_dir, given)
    source = resolve_model(text)  # a .gguf file or a hub id; raises for a missing path
    stem = Path(source.location).stem if source.kind == "gguf" else source.location.rsplit("/", 1)[-1]
    return ExportSource(source.location if source.kind == "gguf" else text, "causal", _safe_name(stem), None, given)
