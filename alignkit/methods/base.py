"""What every recipe needs and none should write twice: the policy, the data split, the run folder.

``run_job(job)`` is the whole life of a training run: build the recipe for the job's method,
write the resolved config, hand the recipe to the one engine, save the final model and a report.
"""
from __future__ import annotations

import inspect
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch

from alignkit import distributed
from alignkit.config import Job, job_config, job_to_yaml
from alignkit.data import length_bucketed_batches
from alignkit.data.check import prepare_job_data
from alignkit.data.mixing import load_training_data
from alignkit.data.templates import apply_chat_template_setting
from alignkit.engine import Engine
from alignkit.errors import UsageError
from alignkit.export.card import write_run_card
from alignkit.memory import enable_gradient_checkpointing
from alignkit.methods.registry import get_method
from alignkit.model import (
    add_lora,
    is_peft_model,
    load_model_and_tokenizer,
    load_tokenizer,
    merge_adapter,
    unwrap,
)
from alignkit.run_folder import RunFolder
from alignkit.seeding import seed_everything

# ----------------------------------------------------------------------------- model

def build_policy(job: Job, saved_adapter: Literal["continue", "merge"] = "continue"):
    """The policy a job trains, and its tokenizer: the one place a recipe's model is made.

    Loads ``model.name_or_path`` (with ``model.adapter`` on top, if set). A saved adapter (that one, or a
    ``name_or_path`` that is itself an adapter folder such as an SFT run's ``final``) is either trained
    further (``saved_adapter="continue"``: offline methods) or merged into its base first
    (``"merge"``: online methods, so that "adapters off" is the starting policy); then, when the job
    has ``lora:`` and no adapter is being continued, a fresh LoRA adapter (on ``lora.layers`` only, if
    set). Gradient checkpointing is switched on when asked, and the KV cache off for training.
    """
    device = job.model.device
    if device == "auto":  # under a launcher: this process's device (cuda:<local rank>), else the default
        device = distributed.device()
    options = {"device": None if device == "auto" else device,
               "dtype": None if job.model.dtype == "auto" else job.model.dtype,
               "trust_remote_code": job.model.trust_remote_code, "adapter": job.model.adapter,
               "is_trainable": saved_adapter == "continue"}
    if distributed.low_memory_loading():  # only the main process reads the weights; the others build it empty
        main = distributed.is_main_process()
        model, tokenizer = load_model_and_tokenizer(job.model.name_or_path, **options) if main else (None, None)
        config = distributed.broadcast_object(unwrap(model).config if main else None)
        if not main:
            model, tokenizer = load_model_and_tokenizer(job.model.name_or_path, empty_from=config, **options)
    else:
        model, tokenizer = load_model_and_tokenizer(job.model.name_or_path, **options)
    if is_peft_model(model) and saved_adapter == "merge":
        model = merge_adapter(model)
    if job.lora is not None and job.lora.enabled and not is_peft_model(model):
        model = add_lora(model, rank=job.lora.rank, alpha=job.lora.alpha, dropout=job.lora.dropout,
                         target_modules=job.lora.target_modules, layers=job.lora.layers)
    if job.training.gradient_checkpointing is True:  # "auto" is decided by the engine, which sees the batches
        enable_gradient_checkpointing(model)
    apply_chat_template_setting(tokenizer, job.model.chat_template)  # saved with every output
    return model, tokenizer


# ----------------------------------------------------------------------------- data

def load_train_validation(job: Job, kind: str, ranking_pairs: str = "all"):
    """Read the training file(s) (and validation file or a seeded split) as typed examples.

    ``kind`` is ``chat``, ``prompt``, ``preference`` or ``unpaired``. The split is by file *row*, so the
    pairs expanded from one ranking never end up on both sides. Returns (train, validation, notes):
    notes are human-readable lines about what was read, skipped, de-duplicated and mixed, so the run
    report says where every row went (`alignkit.data.mixing.load_training_data`).
    """
    return load_training_data(job.data, kind, ranking_pairs)


def policy_and_data(job: Job, model, tokenizer, train, validation, kind: str,
                    saved_adapter: Literal["continue", "merge"] = "continue", **reader_options):
    """What a recipe starts from: the model and data it was handed (tests, benchmarks, the API), or
    else the job's (`build_policy`, `load_train_validation`). Returns ``(model, tokenizer, train,
    validation, notes)``."""
    if model is None:
        model, tokenizer = build_policy(job, saved_adapter)
    notes: list[str] = []
    if train is None:
        train, validation, notes = load_train_validation(job, kind, **reader_options)
    return model, tokenizer, list(train), list(validation or []), notes


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool):
    """Index lists for one epoch, a pure function of (seed, epoch): what makes resume exact."""
    generator = torch.Generator().manual_seed(seed * 1000003 + epoch)
    if group_by_length:
        return length_bucketed_batches(lengths, batch_size, generator=generator, shuffle=True)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def scheduled_updates(num_items: int, steps_per_epoch: int, start_step: int,
                      batches_for_epoch: Callable[[int], list], accumulation: int) -> Iterator[list]:
    """Yield one list of micro-batch index lists per optimizer step, from `start_step` on, forever."""
    step = start_step
    while True:
        epoch, within = divmod(step, steps_per_epoch)
        batches = batches_for_epoch(epoch)
        chunk = batches[within * accumulation:(within + 1) * accumulation]
        if not chunk:
            raise RuntimeError(f"no batches at epoch {epoch} step {within} ({num_items} rows)")
        yield chunk
        step += 1


class BatchSchedule:
    """Which rows each optimizer step trains on, for offline methods (SFT, reward models, DPO).

    Each epoch's batches are a pure function of (seed, epoch) — grouped by length or shuffled —
    and each optimizer step takes ``accumulation`` consecutive batches, so any step's data can be
    recomputed from the step number alone: that is what makes ``resume`` exact.

    Under N processes the step's rows (``batch_size * accumulation``, in batch order) are cut into
    N contiguous shares, one per process, and each share into micro-batches of at most
    ``batch_size`` rows (`process_share`): every row of the global batch is trained on exactly once,
    and the schedule does not depend on N, so a run resumes under another process count.
    """

    def __init__(self, lengths: list[int], batch_size: int, accumulation: int, seed: int,
                 group_by_length: bool = True, unit: str = "rows"):
        if not lengths:
            raise ValueError("no training rows to schedule")
        self.lengths, self.batch_size, self.accumulation = lengths, batch_size, accumulation
        self.seed, self.group_by_length = seed, group_by_length
        self._cache: dict[int, list] = {}
        distributed.check_split(min(batch_size * accumulation, len(lengths)), unit,
                                f"training.batch_size {batch_size} x gradient_accumulation_steps {accumulation}"
                                if batch_size > 1 else f"gradient_accumulation_steps {accumulation}")

    def steps_per_epoch(self) -> int:
        return math.ceil(math.ceil(len(self.lengths) / self.batch_size) / self.accumulation)

    def epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._cache:
            self._cache = {epoch: epoch_batches(self.lengths, self.batch_size, self.seed, epoch,
                                                self.group_by_length)}
        return self._cache[epoch]

    def updates(self, start_step: int) -> Iterator[list[list[int]]]:
        """From `start_step` on, forever: one list of micro-batch index lists per optimizer step
        (this process's share of it, under several processes)."""
        steps = scheduled_updates(len(self.lengths), self.steps_per_epoch(), start_step, self.epoch,
                                  self.accumulation)
        if distributed.world_size() == 1:
            return steps
        return (process_share(chunk, self.batch_size) for chunk in steps)

    def largest_batch_tokens(self) -> int:
        """Rows x longest row of the first epoch's largest micro-batch (later epochs mix rows anew, with
        batches of the same sizes): what the engine's memory estimate needs."""
        return max(len(batch) * max(self.lengths[i] for i in batch) for batch in self.epoch(0))


def process_share(chunk: list[list[int]], batch_size: int, process: int | None = None,
                  processes: int | None = None) -> list[list[int]]:
    """This process's micro-batches of one optimizer step's ``chunk`` (micro-batch index lists).

    The step's rows, in order, are cut into contiguous shares (`distributed.shard_range`), and the
    share into as few micro-batches of at most ``batch_size`` rows as it needs, of near-equal size.
    A process whose share is empty (a short last step of an epoch) gets ``[]``, and the engine runs
    a repeat of its previous micro-batch with weight 0.
    """
    rows = [index for batch in chunk for index in batch]
    start, stop = distributed.shard_range(len(rows), process, processes)
    mine = rows[start:stop]
    if not mine:
        return []
    parts = -(-len(mine) // batch_size)
    bounds = [round(i * len(mine) / parts) for i in range(parts + 1)]
    return [mine[bounds[i]:bounds[i + 1]] for i in range(parts)]


# ----------------------------------------------------------------------------- run

def check_data_first(job: Job) -> tuple[list, list, list[str]]:
    """The job's data, read and validated before any model loads (`alignkit.data.check`): a bad row, a
    format the method cannot use, a chat template that cannot render the data's tool calls stop the
    run here, in seconds. The tokenizer alone is loaded for the template checks."""
    tokenizer = load_tokenizer(job.model.name_or_path, trust_remote_code=job.model.trust_remote_code)
    template_note = apply_chat_template_setting(tokenizer, job.model.chat_template)
    train, validation, notes = prepare_job_data(job, tokenizer)
    return train, validation, list(job.notes) + ([template_note] if template_note else []) + notes


def open_run_folder(run_dir: Path, job: Job, main: bool) -> RunFolder | None:
    """The main process opens the run folder under `alignkit.run_folder`'s rules (and holds its lock);
    the others learn whether that worked, so that every process stops on the same one-line error."""
    training, folder, problem = job.training, None, None
    if main:
        try:
            folder = RunFolder.open(run_dir, job_config(job), resume=training.resume, overwrite=training.overwrite,
                                    force_resume=training.force_resume)
        except UsageError as error:
            problem = error
    message = distributed.broadcast_object(str(problem) if problem else None)
    if problem is not None:
        raise problem
    if message is not None:
        raise UsageError(message)
    return folder


def run_job(job: Job, recipe=None) -> dict[str, Any]:
    """Train `job` end to end; returns a summary with the run folder and the metric history.

    The data is read and checked first (`check_data_first`), then the recipe is built (model loaded),
    then the engine runs. The run folder follows `alignkit.run_folder`'s rules (a folder holding a run
    needs ``training.resume`` or ``training.overwrite``; one live process per folder). Every RNG is
    seeded before the model is built, so LoRA and head initialisation follow ``training.seed`` (the
    same on every process). Nothing is written to the folder before the recipe (model, data, rewards)
    is built, and a run that fails before its first step leaves no run folder behind (one it did not
    create is left as it was). ``recipe`` is the job's recipe when already built (tests, benchmarks).
    Under ``accelerate launch`` / ``torchrun`` every process runs this, and only the main one takes the
    folder's lock and writes the run folder (config, metrics, checkpoints, final model, report).
    """
    method = get_method(job.method)
    training = job.training
    if training.resume not in (False, None) and "{time}" in training.output_dir:
        raise UsageError(f"training.output_dir {training.output_dir!r} holds {{time}}, a new folder at every start: "
                         "give the run folder to resume as training.output_dir")
    data: dict[str, Any] = {}
    notes = list(job.notes)
    if job.data.train and recipe is None:  # a method without data files reads what it wants itself
        train, validation, notes = check_data_first(job)
        parameters = inspect.signature(method.recipe).parameters
        if "train" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            data = {"train": train, "validation": validation}  # (GRPO/PPO take them through **parts)
    run_dir = Path(distributed.broadcast_object(str(job.output_dir())))  # one {time} for every process
    main = distributed.is_main_process()
    folder = open_run_folder(run_dir, job, main)
    started = time.time()
    try:
        if recipe is None:
            seed_everything(training.seed)  # model surgery (LoRA, heads) starts from the same RNG on every process
            recipe = method.recipe(job, **data)
            recipe.notes = notes + list(getattr(recipe, "notes", []))
        recipe.notes = [*(folder.notes if folder else []), *getattr(recipe, "notes", [])]
        if main:
            folder.start(job_to_yaml(job))
            for line in recipe.notes:
                print(f"[alignkit] {line}")
        engine = Engine(training, recipe, run_dir)
    except BaseException:
        if folder is not None:
            folder.release(discard=True)
        raise
    try:
        result = engine.train()
        final_dir = run_dir / "final"
        with engine.parallel.saving(recipe):  # whole weights, even when FSDP2 shards them
            if main:
                recipe.save_final(final_dir)
        distributed.barrier()
    finally:
        if folder is not None:
            folder.release()
    notes = list(recipe.notes)
    failures = list(getattr(recipe, "final_notes", lambda: [])())  # e.g. reward functions that failed
    summary = {
        "method": job.method,
        "run_dir": str(run_dir),
        "final": str(final_dir),
        "steps": result["steps"],
        "seconds": round(time.time() - started, 1),
        "stopped_early": result["stopped_early"],
        "processes": engine.parallel.processes,
        "data_parallel": engine.parallel.kind,
        "last_train": result["history"][-1] if result["history"] else {},
        "first_eval": result["eval_history"][0] if result["eval_history"] else {},
        "last_eval": result["eval_history"][-1] if result["eval_history"] else {},
        "notes": notes,
        "failures": failures,
    }
    if main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        (run_dir / "report.md").write_text(render_report(summary))
        write_run_card(job, summary)  # final/README.md: the model card (alignkit.export.card)
    return summary


def render_report(summary: dict[str, Any]) -> str:
    lines = [f"# alignkit {summary['method']} run", "",
             f"- folder: `{summary['run_dir']}`", f"- final model: `{summary['final']}`",
             f"- optimizer steps: {summary['steps']} in {summary['seconds']} s"
             + (" (stopped early)" if summary["stopped_early"] else ""), ""]
    if summary["notes"]:
        lines += ["## Data", "", *[f"- {note}" for note in summary["notes"]], ""]
    if summary.get("failures"):
        lines += ["## Failures (contained)", "", *[f"- {line}" for line in summary["failures"]], ""]
    first, last = summary["first_eval"], summary["last_eval"]
    if last:
        lines += ["## Validation", "", "| metric | start | end |", "| --- | --- | --- |"]
        for key, value in last.items():
            if key == "step":
                continue
            start = first.get(key, float("nan"))
            lines.append(f"| {key} | {_fmt(start)} | {_fmt(value)} |")
        lines.append("")
    if summary["last_train"]:
        lines += ["## Last training step", ""]
        lines += [f"- {k}: {_fmt(v)}" for k, v in summary["last_train"].items()]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)
