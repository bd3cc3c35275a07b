"""The rules of a run folder: one job per folder, one live process per folder, no debris.

`run_job` uses it in three lines::

    folder = RunFolder.open(run_dir, job_config, resume=..., overwrite=..., force_resume=...)
    ...                                  # build the recipe: nothing is written before it succeeds
    folder.start(config_yaml)            # clears an overwritten folder, writes config.yaml
    ...                                  # train
    folder.release()                     # (in a finally:) the lock goes

The rules:

* **A folder that already holds a run is refused** unless the job says ``resume`` (continue that
  same job from its newest checkpoint) or ``overwrite`` (start afresh: the previous run's files are
  deleted; files alignkit did not write are never deleted, the folder is refused instead).
* **Resume checks that it is the same job.** The checkpoint's ``config.yaml`` is compared with the
  new job, key by key; any difference that changes the training path (learning rate, data,
  model, LoRA, seed, batch size, ...) refuses the resume and names the keys, unless
  ``force_resume``. Keys that only change what is logged or saved (``eval_steps``,
  ``save_steps``, ``logging_steps``, ``output_dir``, ...) may differ. ``max_steps`` / ``epochs`` may
  change only when the learning rate does not depend on the total (a constant schedule with
  warm-up given in steps).
* **One live process per folder.** ``.alignkit.lock`` holds the owner's PID, host and process start
  time; a second run on the folder is refused while the owner lives. A lock left by a process that
  is gone (kill -9, a crash, a preempted node) is detected as stale and taken over.
* **Debris of dead writers is cleaned** at start: half-written ``checkpoints/.tmp-step-*-PID``
  folders whose process is gone.

Checkpoints are found and pruned by the step number in their name (``step-0000040``), parsed as an
integer. On resume, ``metrics.jsonl`` is cut back to the checkpoint's step, and checkpoints of later
steps (left by the run being resumed from an earlier point) are removed, so the folder tells one
story.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from alignkit.errors import UsageError

LOCK_NAME = ".alignkit.lock"
CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"
CHECKPOINTS_NAME = "checkpoints"
# What alignkit writes into a run folder: what --overwrite may delete.
RUN_ENTRIES = frozenset({CONFIG_NAME, METRICS_NAME, "tensorboard", "wandb", CHECKPOINTS_NAME, "final",
                         "final-merged", "summary.json", "report.md", "command.txt"})
# Keys that change what is logged, evaluated or saved, never the weights a step produces.
PATH_NEUTRAL_KEYS = frozenset({
    "training.output_dir", "training.resume", "training.overwrite", "training.force_resume",
    "training.eval_steps", "training.eval_at_start", "training.save_steps", "training.save_total_limit",
    "training.logging_steps", "training.tensorboard", "training.progress", "training.early_stopping_metric",
    "training.early_stopping_patience", "training.greater_is_better", "lora.merge_on_save",
    "eval_max_prompts", "eval_temperature", "training.gradient_checkpointing", "training.release_memory",
})
LENGTH_KEYS = ("training.max_steps", "training.epochs")
_STEP_NAME = re.compile(r"^step-(\d+)$")
_TEMPORARY_NAME = re.compile(r"^\.tmp-step-\d+-(\d+)$")


class RunFolderError(UsageError):
    """A run folder that cannot be used as asked; the message says why and what to do."""


# ----------------------------------------------------------------------------- checkpoints

def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step of a checkpoint folder named ``step-NNNNNNN``; None for any other name."""
    match = _STEP_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete_checkpoint(path: Path) -> bool:
    """A checkpoint folder with its weights and state (``step-*`` folders are renamed into place whole)."""
    return path.is_dir() and (path / "trainable.safetensors").exists() and (
        (path / "state.json").exists() or (path / "state.pt").exists())


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints as ``(step, path)``, by step number (not by name)."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in folder.iterdir() if checkpoint_step(p) is not None]
    return sorted((step, path) for step, path in found if is_complete_checkpoint(path))


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(checkpoint_dir)
    return found[-1][1] if found else None


def prune_checkpoints(checkpoint_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the ``keep`` checkpoints of highest step; returns what was deleted."""
    found = list_checkpoints(checkpoint_dir)
    removed = [path for _, path in found[:max(0, len(found) - keep)]]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def remove_checkpoints_after(checkpoint_dir: str | os.PathLike, step: int) -> list[Path]:
    """Delete checkpoints of steps after ``step`` (a branch abandoned by resuming from earlier)."""
    removed = [path for number, path in list_checkpoints(checkpoint_dir) if number > step]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def clean_debris(run_dir: str | os.PathLike) -> list[Path]:
    """Delete ``checkpoints/.tmp-step-*-PID`` folders whose writer is not this process and is gone."""
    folder = Path(run_dir) / CHECKPOINTS_NAME
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        match = _TEMPORARY_NAME.match(path.name)
        if not match:
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and not process_alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def cut_metrics(path: str | os.PathLike, last_step: int | None) -> int:
    """Keep only the lines of ``metrics.jsonl`` up to ``last_step`` (None: none); returns lines removed.

    A line that is not valid JSON (half-written when the process was killed) is removed too.
    """
    path = Path(path)
    if not path.exists():
        return 0
    kept, removed = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            step = None
        if last_step is not None and isinstance(step, int) and step <= last_step:
            kept.append(line)
        else:
            removed += 1
    if removed:
        temporary = path.with_name(path.name + f".tmp-{os.getpid()}")
        temporary.write_text("".join(line + "\n" for line in kept))
        os.replace(temporary, path)
    return removed


# ----------------------------------------------------------------------------- processes and the lock

def process_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of a process (Linux ``/proc/PID/stat`` field 22), to tell a reused PID
    from the original owner; None where unavailable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


@dataclass
class LockOwner:
    pid: int
    host: str
    started: str = ""
    process_start: str | None = None

    def alive(self) -> bool | None:
        """True / False on this host; None when the owner runs on another host (cannot be checked)."""
        if self.host != socket.gethostname():
            return None
        if not process_alive(self.pid):
            return False
        if self.process_start is not None:
            return process_start_time(self.pid) in (None, self.process_start)
        return True

    def describe(self) -> str:
        return f"process {self.pid} on {self.host}" + (f" (started {self.started})" if self.started else "")


class RunLock:
    """``.alignkit.lock`` in a run folder: created exclusively, holding the owner's identity."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False

    def read_owner(self) -> LockOwner | None:
        try:
            data = json.loads(self.path.read_text())
            return LockOwner(int(data["pid"]), str(data["host"]), str(data.get("started", "")),
                             data.get("process_start"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):  # unreadable or half-written: nobody we can check
            return LockOwner(-1, socket.gethostname())

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a stale lock was taken over. Raises `RunFolderError`
        when a live process holds it."""
        note = None
        for _ in range(20):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.read_owner()
                if owner is None:
                    continue  # released in between: try again
                alive = owner.alive()
                if alive is None:
                    raise RunFolderError(
                        f"{self.path.parent} is locked by {owner.describe()}, another machine; if that run is "
                        f"over, delete {self.path}")
                if alive:
                    raise RunFolderError(
                        f"{self.path.parent} is in use by {owner.describe()}; wait for it to finish, stop it, "
                        "or choose another training.output_dir")
                if self._remove_stale(owner):
                    note = f"removed a stale lock of {owner.describe()}, which is no longer running"
                continue
            with os.fdopen(handle, "w") as file:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                           "process_start": process_start_time(os.getpid())}, file)
            self.held = True
            return note
        raise RunFolderError(f"could not take the lock {self.path} (it keeps changing); is another run starting?")

    def _remove_stale(self, owner: LockOwner) -> bool:
        """Delete the stale lock, guarded so that two processes taking over at once cannot delete the
        fresh lock of the one that won."""
        guard = self.path.with_name(LOCK_NAME + ".takeover")
        try:
            handle = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - guard.stat().st_mtime > 60:  # left by a process killed mid-takeover
                    guard.unlink()
            except OSError:
                pass
            time.sleep(0.05)
            return False
        try:
            os.close(handle)
            if self.read_owner() == owner:
                self.path.unlink(missing_ok=True)
                return True
            return False
        finally:
            guard.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            owner = self.read_owner()
            if owner is not None and owner.pid == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False


# ----------------------------------------------------------------------------- comparing jobs

def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"training": {"seed": 1}}`` -> ``{"training.seed": 1}`` (lists are compared whole)."""
    if not isinstance(config, dict):
        return {prefix: config}
    out: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted))
        else:
            out[dotted] = value
    return out


def _schedule_ignores_total(config: dict) -> bool:
    training = config.get("training") or {}
    return training.get("lr_scheduler") == "constant" and not training.get("warmup_ratio")


def training_path_differences(previous: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ between two job configs in a way that changes training.

    Keys only one side has (written by another alignkit version) are not compared.
    """
    old, new = flatten(previous), flatten(current)
    length_free = _schedule_ignores_total(previous) and _schedule_ignores_total(current)
    differences = []
    for key in sorted(set(old) & set(new)):
        if key in PATH_NEUTRAL_KEYS or old[key] == new[key]:
            continue
        if key in LENGTH_KEYS and length_free:
            continue
        differences.append(key)
    return differences


def describe_differences(previous: dict, current: dict, keys: list[str]) -> str:
    old, new = flatten(previous), flatten(current)
    return ", ".join(f"{key} ({old.get(key)!r} -> {new.get(key)!r})" for key in keys)


# ----------------------------------------------------------------------------- the folder

class RunFolder:
    """One training run's folder, opened under its rules (see the module docstring)."""

    def __init__(self, path: Path, lock: RunLock, clear: list[Path], resume_from: Path | None,
                 notes: list[str], created: bool = False):
        self.path, self.lock, self.clear, self.resume_from, self.notes = path, lock, clear, resume_from, notes
        self.created, self.started = created, False

    @classmethod
    def open(cls, run_dir: str | os.PathLike, job_config: dict, *, resume: bool | str = False,
             overwrite: bool = False, force_resume: bool = False) -> "RunFolder":
        """Check the folder against the rules and take its lock. Writes nothing but the lock."""
        path = Path(run_dir)
        if resume not in (False, None) and overwrite:
            raise RunFolderError("resume and overwrite both given: resume continues the run in "
                                 f"{path}, overwrite deletes it; choose one")
        if path.exists() and not path.is_dir():
            raise RunFolderError(f"training.output_dir {path} is a file, not a folder; choose another output_dir")
        created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise RunFolderError(f"training.output_dir {path}: a part of the path is a file, not a folder") from None
        lock = RunLock(path)
        try:
            note = lock.acquire()
        except RunFolderError:
            if created:
                shutil.rmtree(path, ignore_errors=True)
            raise
        notes = [note] if note else []
        try:
            clear, resume_from = cls._check(path, job_config, resume, overwrite, force_resume, notes)
        except BaseException:
            lock.release()
            if created:
                shutil.rmtree(path, ignore_errors=True)
            raise
        for line in notes:
            print(f"[alignkit] {line}")
        return cls(path, lock, clear, resume_from, notes, created)

    @staticmethod
    def _check(path: Path, job_config: dict, resume, overwrite: bool, force_resume: bool,
               notes: list[str]) -> tuple[list[Path], Path | None]:
        contents = sorted(p for p in path.iterdir() if p.name != LOCK_NAME)
        if resume not in (False, None):
            resume_from = None
            if resume is True or str(resume).lower() == "true":
                resume_from = latest_checkpoint(path / CHECKPOINTS_NAME)
                if resume_from is None:
                    notes.append(f"resume: no checkpoint in {path / CHECKPOINTS_NAME}; starting from step 0")
            else:
                resume_from = Path(str(resume))
                if not is_complete_checkpoint(resume_from):
                    raise RunFolderError(f"resume: {resume_from} is not a complete checkpoint folder "
                                         "(it needs trainable.safetensors and state.json)")
            check_same_job(path, resume_from, job_config, force_resume, notes)
            return [], resume_from
        if not contents:
            return [], None
        unknown = [p.name for p in contents if p.name not in RUN_ENTRIES]
        if overwrite:
            if unknown:
                raise RunFolderError(
                    f"overwrite: {path} holds files alignkit did not write ({', '.join(unknown[:5])}); they are not "
                    "deleted: move them away or choose another training.output_dir")
            notes.append(f"overwrite: deleting the previous run in {path} ({', '.join(p.name for p in contents)})")
            return contents, None
        what = "a previous run" if not unknown else "files"
        raise RunFolderError(
            f"training.output_dir {path} already holds {what} ({', '.join(p.name for p in contents[:6])}); "
            "add --resume to continue that job, --overwrite to delete it and start afresh, "
            "or choose another output_dir")

    def start(self, config_text: str) -> None:
        """Delete what ``overwrite`` replaces, then write the resolved job as ``config.yaml``."""
        for path in self.clear:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        self.clear = []
        temporary = self.path / f".{CONFIG_NAME}.tmp-{os.getpid()}"
        temporary.write_text(config_text)
        os.replace(temporary, self.path / CONFIG_NAME)
        self.started = True

    def release(self, discard: bool = False) -> None:
        """Drop the lock. ``discard`` (the job failed before its first step): a folder this run created
        is removed again, so a failed start leaves nothing behind; a folder that existed is kept. A
        folder this run created and never started is removed either way once empty."""
        self.lock.release()
        if self.created and discard:
            shutil.rmtree(self.path, ignore_errors=True)
        elif self.created and not self.started and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def read_config(path: Path) -> dict | None:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def check_same_job(run_dir: Path, checkpoint: Path | None, job_config: dict, force: bool,
                   notes: list[str]) -> None:
    """Refuse to resume a checkpoint written by a job that trains differently (unless ``force``)."""
    candidates = ([checkpoint / CONFIG_NAME] if checkpoint is not None else []) + [run_dir / CONFIG_NAME]
    source = next((p for p in candidates if p.exists()), None)
    if source is None:
        if checkpoint is not None:
            notes.append(f"resume: {checkpoint} has no config.yaml to compare this job with; resuming unchecked")
        return
    previous = read_config(source)
    if previous is None:
        raise RunFolderError(f"resume: {source} is not a readable job config; cannot check that this is the same job")
    keys = training_path_differences(previous, job_config)
    if not keys:
        return
    detail = describe_differences(previous, job_config, keys)
    if force:
        notes.append(f"force_resume: resuming although the job differs from {source}: {detail}")
        return
    lengths = [k for k in keys if k in LENGTH_KEYS]
    hint = (" (the learning rate schedule depends on the total number of steps; only a constant schedule "
            "may be extended)") if lengths else ""
    raise RunFolderError(
        f"resume: this job differs from the one that wrote {source.parent if checkpoint else run_dir} in "
        f"{detail}{hint}; resuming would continue another job's weights under new settings. Undo the "
        "change, use --overwrite to start afresh, another output_dir, or --force-resume to continue anyway")
