"""What every recipe needs and none should write twice: the policy, the data split, the run folder.

``run_job(job)`` is the whole life of a training run: build the recipe for the job's method,
write the resolved config, hand the recipe to the one engine, save the final model and a report.
"""
from __future__ import annotations

import json
import math
import time
from typing import Any, Callable, Iterator, Literal

import torch

from alignkit.config import Job, job_to_yaml
from alignkit.data import (
    deduplicate,
    length_bucketed_batches,
    load_examples,
    train_validation_split,
)
from alignkit.engine import Engine
from alignkit.errors import UsageError
from alignkit.methods.registry import get_method
from alignkit.model import (
    add_lora,
    is_peft_model,
    load_model_and_tokenizer,
    merge_adapter,
)

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
    model, tokenizer = load_model_and_tokenizer(
        job.model.name_or_path,
        device=None if job.model.device == "auto" else job.model.device,
        dtype=None if job.model.dtype == "auto" else job.model.dtype,
        trust_remote_code=job.model.trust_remote_code,
        adapter=job.model.adapter,
        is_trainable=saved_adapter == "continue",
    )
    if is_peft_model(model) and saved_adapter == "merge":
        model = merge_adapter(model)
    if job.lora is not None and job.lora.enabled and not is_peft_model(model):
        model = add_lora(model, rank=job.lora.rank, alpha=job.lora.alpha, dropout=job.lora.dropout,
                         target_modules=job.lora.target_modules, layers=job.lora.layers)
    if job.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        model.config.use_cache = False
    return model, tokenizer


# ----------------------------------------------------------------------------- data

def load_train_validation(job: Job, kind: str, **reader_options):
    """Read the training file (and validation file or a seeded split) as typed examples.

    ``kind`` is ``chat``, ``prompt`` or ``preference`` (``reader_options`` go to `load_examples`, e.g.
    ``ranking_pairs``). The split is by file *row*, so the pairs expanded from one ranking never end up
    on both sides. Returns (train, validation, notes): notes are human-readable lines about what was
    read, skipped, de-duplicated, so the run report says where every row went.
    """
    data = job.data
    if not data.train:
        raise UsageError("data.train is not set: give a file (jsonl/json/csv/parquet) or hf://name")
    common = dict(kind=kind, columns=data.columns or None, on_error=data.on_error,
                  system_prompt=data.system_prompt, format=None if data.format == "auto" else data.format,
                  **reader_options)
    train, report = load_examples(data.train, limit=data.limit, **common)
    notes = [f"train {data.train}: {report.summary()}"]
    if data.deduplicate != "none":
        train, removed = deduplicate(train, mode=data.deduplicate)
        notes.append(f"de-duplication ({data.deduplicate}): removed {removed} rows")
    validation = []
    if data.validation:
        validation, vreport = load_examples(data.validation, **common)
        notes.append(f"validation {data.validation}: {vreport.summary()}")
    elif data.validation_fraction > 0:
        sources = list(dict.fromkeys(example.source for example in train))
        if len(sources) >= 2:
            _, held_out = train_validation_split(sources, validation_fraction=data.validation_fraction,
                                                 seed=data.seed)
            held_out = set(held_out)
            validation = [example for example in train if example.source in held_out]
            train = [example for example in train if example.source not in held_out]
            notes.append(f"validation: {len(held_out)} rows ({len(validation)} examples) split from train "
                         f"(seed {data.seed})")
    if not train:
        raise UsageError(f"{data.train}: no training rows left after validation and filtering")
    return train, validation, notes


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
    """

    def __init__(self, lengths: list[int], batch_size: int, accumulation: int, seed: int,
                 group_by_length: bool = True):
        if not lengths:
            raise ValueError("no training rows to schedule")
        self.lengths, self.batch_size, self.accumulation = lengths, batch_size, accumulation
        self.seed, self.group_by_length = seed, group_by_length
        self._cache: dict[int, list] = {}

    def steps_per_epoch(self) -> int:
        return math.ceil(math.ceil(len(self.lengths) / self.batch_size) / self.accumulation)

    def epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._cache:
            self._cache = {epoch: epoch_batches(self.lengths, self.batch_size, self.seed, epoch,
                                                self.group_by_length)}
        return self._cache[epoch]

    def updates(self, start_step: int) -> Iterator[list[list[int]]]:
        """From `start_step` on, forever: one list of micro-batch index lists per optimizer step."""
        return scheduled_updates(len(self.lengths), self.steps_per_epoch(), start_step, self.epoch,
                                 self.accumulation)


# ----------------------------------------------------------------------------- run

def run_job(job: Job) -> dict[str, Any]:
    """Train `job` end to end; returns a summary with the run folder and the metric history."""
    method = get_method(job.method)
    run_dir = job.output_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(job_to_yaml(job))
    started = time.time()
    recipe = method.recipe(job)
    for line in getattr(recipe, "notes", []):
        print(f"[alignkit] {line}")
    engine = Engine(job.training, recipe, run_dir)
    result = engine.train()
    final_dir = run_dir / "final"
    recipe.save_final(final_dir)
    summary = {
        "method": job.method,
        "run_dir": str(run_dir),
        "final": str(final_dir),
        "steps": result["steps"],
        "seconds": round(time.time() - started, 1),
        "stopped_early": result["stopped_early"],
        "last_train": result["history"][-1] if result["history"] else {},
        "first_eval": result["eval_history"][0] if result["eval_history"] else {},
        "last_eval": result["eval_history"][-1] if result["eval_history"] else {},
        "notes": getattr(recipe, "notes", []),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (run_dir / "report.md").write_text(render_report(summary))
    return summary


def render_report(summary: dict[str, Any]) -> str:
    lines = [f"# alignkit {summary['method']} run", "",
             f"- folder: `{summary['run_dir']}`", f"- final model: `{summary['final']}`",
             f"- optimizer steps: {summary['steps']} in {summary['seconds']} s"
             + (" (stopped early)" if summary["stopped_early"] else ""), ""]
    if summary["notes"]:
        lines += ["## Data", "", *[f"- {note}" for note in summary["notes"]], ""]
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
