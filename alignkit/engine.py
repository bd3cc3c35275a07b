"""The one training loop every method shares.

A *recipe* (see ``alignkit/methods``) knows its data and its loss; the engine knows everything
else and nothing about any method:

    for step in range(start, total):
        micro_batches = next(updates)              # recipe: one list per optimizer step
        W = sum of recipe.loss_weight(mb) over every micro-batch of every process
        for mb in micro_batches:                   # gradient accumulation
            loss, metrics = recipe.loss(mb)        # the mean over mb's units, under bf16 autocast on GPU
            (loss * loss_weight(mb) / W).backward()   # all-reduced across processes on the last one
        clip gradients; optimizer.step(); scheduler.step()
        log; every eval_steps: recipe.evaluate(); every save_steps: checkpoint

``recipe.loss_weight(mb)`` (optional; 1 when a recipe has none) is how many units -- tokens,
pairs, completions -- the micro-batch's mean loss is over, so the step's loss is the mean over the
whole global batch however it is cut into micro-batches and processes.

Processes (``accelerate launch`` / ``torchrun``; see `alignkit.distributed` and docs/scaling.md):
the recipe gives each process its share of the step's rows; the model and optimizer are prepared
by accelerate (DDP, FSDP2 or DeepSpeed, as the launch configuration says); every micro-batch's loss
runs as the wrapped model's forward; processes with fewer micro-batches than the others run a
repeat with weight 0, so collectives always pair up. Metrics, the NaN check and Ctrl-C are agreed
on by every process after each step, so all of them stop at the same step. Only the main process
writes logs, checkpoints and reports; checkpoints hold whole (gathered) weights and optimizer
state, so a run resumes under any number of processes.

Checkpoints hold the trainable weights (adapter or full model: every parameter with
``requires_grad``), the optimizer, the scheduler, every RNG state, the step, the early-stopping
state and the recipe's own state. They are written to a temporary folder and renamed, so a crash
never leaves a half-written checkpoint. Nothing in a checkpoint is pickled: tensors go to
``trainable.safetensors`` / ``state.safetensors`` and everything else to ``state.json``, so loading
one can never run code (an older ``state.pt`` is read with ``torch.load(weights_only=True)``, tensors
and plain values only). ``resume`` reloads the newest one (by step number), and because recipes
produce their updates deterministically from ``start_step``, a resumed run reproduces the
uninterrupted one step for step. Ctrl-C (SIGINT) and SIGTERM (what SLURM and Kubernetes send)
finish the current step, write a checkpoint and leave (`TrainingInterrupted`; the CLI exits 130 or
143); a NaN or infinite loss stops the run, keeps the last good checkpoint and says which step
diverged. The run folder's rules (locks, debris, metrics cut back on resume) are in
`alignkit.run_folder`.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from alignkit import distributed, run_folder
from alignkit.config import TrainingConfig
from alignkit.distributed import ParallelModel
from alignkit.errors import UserError
from alignkit.memory import (
    decide_gradient_checkpointing,
    enable_gradient_checkpointing,
    release_freed_memory,
    uses_gradient_checkpointing,
)
from alignkit.seeding import restore_rng_state, rng_state, seed_everything
from alignkit.trackers import Trackers

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class TrainingDiverged(UserError, RuntimeError):
    """Raised when a loss or gradient norm is NaN/inf; the last good checkpoint is kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped training after a checkpoint; ``signal_number`` says which (the CLI exits
    with 128 + it: 130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, message: str, signal_number: int = signal.SIGINT):
        super().__init__(message)
        self.signal_number = signal_number


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be loaded safely or does not fit this run."""


class Recipe(Protocol):
    model: torch.nn.Module

    def steps_per_epoch(self) -> int: ...

    def updates(self, start_step: int) -> Iterator[list[Any]]: ...

    def loss(self, micro_batch: Any) -> tuple[torch.Tensor, dict[str, float]]: ...

    def evaluate(self) -> dict[str, float]: ...

    # optional: loss_weight(micro_batch) -> float (units the loss averages over; default 1) and
    # loss_unit (their name, logged with the step's total), padding_batch(micro_batch) (the weight-0
    # repeat a process runs while others finish, marked), on_step_end(step) -> metrics,
    # state_dict() / load_state_dict(state)


# ----------------------------------------------------------------------------- small pieces

def learning_rate_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at `step` (0-based).

    Linear warm-up from 1/warmup to 1 over ``warmup_steps``, then
    constant: 1;  linear: (T - s) / (T - w);  cosine: 0.5 (1 + cos(pi (s - w) / (T - w))).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_scheduler '{schedule}' (constant, linear, cosine)")


def make_optimizer(model: torch.nn.Module, config: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (1-D parameters)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.learning_rate,
                             betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


class CheckpointMismatch(UserError, ValueError):
    """A checkpoint whose trainable weights are not this job's (another model, LoRA setting or method)."""


def check_trainable_names(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Any = "checkpoint") -> None:
    """Raise `CheckpointMismatch` (one line) unless ``state`` holds exactly the trainable weights of ``model``."""
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in state]
    unknown = [name for name in state if name not in params]
    wrong = [name for name, tensor in state.items()
             if name in params and tuple(tensor.shape) != tuple(params[name].shape)]
    if missing or unknown or wrong:
        details = [f"{len(missing)} trainable weights missing (e.g. {missing[0]})" if missing else "",
                   f"{len(unknown)} it has that this model lacks (e.g. {unknown[0]})" if unknown else "",
                   f"{len(wrong)} of another shape (e.g. {wrong[0]})" if wrong else ""]
        raise CheckpointMismatch(f"{source} does not fit this job's model: " + "; ".join(d for d in details if d)
                                 + " (another model, LoRA setting or method wrote it; start afresh or point "
                                 "training.resume at a checkpoint of this job)")


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    check_trainable_names(model, state)
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))


# ----------------------------------------------------------------------------- resume state without pickle

def encode_state(value: Any, tensors: dict[str, torch.Tensor], where: str = "state") -> Any:
    """A JSON-able copy of ``value`` with every tensor / NumPy array moved into ``tensors``.

    Tensors become ``{"__tensor__": key}``, arrays ``{"__ndarray__": key, "dtype": ...}``, tuples
    ``{"__tuple__": [...]}`` and dicts with non-string keys ``{"__dict__": [[key, value], ...]}``.
    Anything else (an arbitrary object) is refused: it could only be stored by pickling it.
    """
    if isinstance(value, torch.Tensor):
        key = f"tensor_{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        key = f"tensor_{len(tensors)}"
        kind = value.dtype.kind
        wide = value.astype(np.int64 if kind in "iu" else np.float64 if kind == "f" else value.dtype)
        tensors[key] = torch.from_numpy(np.ascontiguousarray(wide)).clone()
        return {"__ndarray__": key, "dtype": value.dtype.str}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, torch.Size)):
        return {"__tuple__": [encode_state(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode_state(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: encode_state(v, tensors, f"{where}.{k}") for k, v in value.items()}
        return {"__dict__": [[encode_state(k, tensors, where), encode_state(v, tensors, f"{where}[{k!r}]")]
                             for k, v in value.items()]}
    raise TypeError(f"checkpoint state {where} is a {type(value).__name__}; a checkpoint stores tensors, arrays, "
                    "numbers, strings, lists, tuples and dicts only")


def decode_state(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `encode_state`."""
    if isinstance(value, list):
        return [decode_state(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return tensors[value["__ndarray__"]].numpy().astype(np.dtype(value["dtype"]))
    if "__tuple__" in value:
        return tuple(decode_state(v, tensors) for v in value["__tuple__"])
    if "__dict__" in value:
        return {_hashable(decode_state(k, tensors)): decode_state(v, tensors) for k, v in value["__dict__"]}
    return {k: decode_state(v, tensors) for k, v in value.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key


def save_state(state: dict, folder: Path) -> None:
    """``state.json`` + ``state.safetensors`` in ``folder``."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = encode_state(state, tensors)
    save_file(tensors, str(folder / "state.safetensors"))
    (folder / "state.json").write_text(json.dumps(encoded))


def load_state(folder: Path) -> dict:
    """Read what `save_state` wrote; an older ``state.pt`` is read with ``weights_only=True`` (tensors,
    plain values and NumPy arrays only), and refused when it holds anything else."""
    if (folder / "state.json").exists():
        tensors = load_file(str(folder / "state.safetensors")) if (folder / "state.safetensors").exists() else {}
        try:
            return decode_state(json.loads((folder / "state.json").read_text()), tensors)
        except (json.JSONDecodeError, KeyError) as error:
            raise CheckpointError(f"{folder}: state.json is damaged ({type(error).__name__}: {error})") from None
    legacy = folder / "state.pt"
    allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _numpy_reconstruct()]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(legacy, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = next((line.strip() for line in str(error).splitlines() if "GLOBAL" in line or "Unsupported" in line),
                     "it holds objects other than tensors and plain values")
        raise CheckpointError(
            f"{legacy}: refusing to load: {first}. Loading such a file could run arbitrary code; a checkpoint "
            "written by alignkit holds tensors and plain values only") from None


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _is_finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))


class NullLogger:
    """What processes other than the main one log to: nothing."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsLogger:
    """Writes metrics as JSON lines and to the trackers of ``report_to`` (`alignkit.trackers`)."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, report_to: Iterable[str] = ("tensorboard",),
                 purge_step: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        self.file = self.path.open("a")
        # purge_step: on resume, TensorBoard hides the events logged after the checkpoint
        self.trackers = Trackers([name for name in report_to if tensorboard or name != "tensorboard"], run_dir,
                                 purge_step=purge_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.trackers.log(step, metrics)

    def close(self) -> None:
        self.file.close()
        self.trackers.close()


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not _is_finite(value):
        return str(value)
    return value


# ----------------------------------------------------------------------------- the engine

class Engine:
    """Runs a recipe: optimizer, schedule, accumulation, clipping, eval, checkpoints, resume."""

    def __init__(self, config: TrainingConfig, recipe: Recipe, run_dir: str | Path):
        self.config = config
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.model = recipe.model
        self.device = distributed.model_device(self.model)
        self.autocast_dtype = self._autocast_dtype()
        self.total_steps = self._total_steps()
        warmup = config.warmup_steps or int(round(config.warmup_ratio * self.total_steps))
        self.warmup_steps = warmup
        self._memory_levers()  # before accelerate wraps the model
        # one process: the model as it is; under a launcher: prepared by accelerate (DDP, FSDP2, DeepSpeed)
        self.parallel = ParallelModel(self.model, make_optimizer(self.model, config), self.autocast_dtype)
        self.optimizer = self.parallel.optimizer
        self.is_main = distributed.is_main_process()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: learning_rate_factor(step, self.total_steps, warmup, config.lr_scheduler),
        )
        self.step = 0
        self.best_metric: float | None = None
        self.bad_evals = 0
        self.history: list[dict] = []
        self.eval_history: list[dict] = []
        self.stopped_early = False
        self._interrupted: int | None = None  # the signal (Ctrl-C, SIGTERM) that asked this process to stop
        self._stop_requested: int | None = None  # a stop signal seen by any process, agreed on after each step
        self._spare = None  # the last micro-batch run: what a process with an empty share repeats

    # -- setup
    def _autocast_dtype(self) -> torch.dtype | None:
        """fp32: none. bf16: bf16 autocast on any device. auto: bf16 on a CUDA GPU that has it."""
        precision = self.config.precision
        if precision == "bf16":
            return torch.bfloat16
        if precision == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None

    def _memory_levers(self) -> None:
        """Gradient checkpointing (``auto``: when the recipe's largest micro-batch would keep more
        than 1 GiB of activations) and, on a CPU, freed memory returned at once (alignkit/memory.py)."""
        largest = getattr(self.recipe, "largest_micro_batch_tokens", None)
        setting = self.config.gradient_checkpointing
        on, why = decide_gradient_checkpointing(setting, self.model, largest() if callable(largest) and
                                                setting == "auto" else None)
        if on and not uses_gradient_checkpointing(self.model):
            enable_gradient_checkpointing(self.model)
        if setting == "auto" and distributed.is_main_process():
            print(f"[alignkit] gradient checkpointing {why}")
        if self.config.release_memory and self.device.type == "cpu":
            release_freed_memory()

    def _total_steps(self) -> int:
        if self.config.max_steps:
            return self.config.max_steps
        per_epoch = self.recipe.steps_per_epoch()
        if per_epoch <= 0:
            raise ValueError("the training data gives no optimizer steps (is it empty?)")
        return max(1, math.ceil(self.config.epochs * per_epoch))

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def say(self, message: str) -> None:
        """Print on the main process only."""
        if self.is_main:
            print(message, flush=True)

    # -- checkpoints
    def save_checkpoint(self) -> Path:
        """Every process takes part (sharded weights are gathered); the main process writes."""
        final = self.checkpoint_dir / f"step-{self.step:07d}"
        weights = self.parallel.trainable_state()
        optimizer = self.parallel.optimizer_state()
        recipe = self.recipe.state_dict() if hasattr(self.recipe, "state_dict") else None
        processes = self.parallel.processes
        if processes > 1:  # each process's own RNG and recipe state (e.g. its share of the rollout)
            process_rng = distributed.gather_objects(rng_state())
            recipe = {"processes": processes, "per_process": distributed.gather_objects(recipe)}
        if self.is_main:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.checkpoint_dir / f".tmp-step-{self.step:07d}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            save_file(weights, str(tmp / "trainable.safetensors"))
            state = {
                "optimizer": optimizer,
                "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(),
                "step": self.step,
                "best_metric": self.best_metric,
                "bad_evals": self.bad_evals,
                "recipe": recipe,
            }
            if processes > 1:
                state["process_rng"] = process_rng
            save_state(state, tmp)
            config = self.run_dir / run_folder.CONFIG_NAME
            if config.exists():  # the job that wrote this checkpoint, for the resume check
                shutil.copyfile(config, tmp / run_folder.CONFIG_NAME)
            (tmp / "checkpoint.json").write_text(json.dumps({"step": self.step, "total_steps": self.total_steps,
                                                             "processes": processes}))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            run_folder.prune_checkpoints(self.checkpoint_dir, self.config.save_total_limit)
        distributed.barrier()
        return final

    def latest_checkpoint(self) -> Path | None:
        return run_folder.latest_checkpoint(self.checkpoint_dir)

    def load_checkpoint(self, path: Path) -> None:
        """The main process reads the checkpoint and hands it to the others; it may come from a run with
        any number of processes."""
        loaded = None
        if self.is_main:
            loaded = (load_file(str(path / "trainable.safetensors")), load_state(path))
        weights, state = distributed.broadcast_object(loaded)
        check_trainable_names(self.model, weights, path)
        self.parallel.load_trainable_state(weights)
        self.parallel.load_optimizer_state(state["optimizer"], path)
        self.scheduler.load_state_dict(state["scheduler"])
        processes, process = self.parallel.processes, distributed.rank()
        process_rng = state.get("process_rng")
        restore_rng_state(process_rng[process] if process_rng and len(process_rng) == processes else state["rng"])
        self.step = state["step"]
        self.best_metric = state["best_metric"]
        self.bad_evals = state["bad_evals"]
        recipe = state.get("recipe")
        if isinstance(recipe, dict) and "per_process" in recipe:
            if recipe["processes"] == processes:
                recipe = recipe["per_process"][process]
            else:  # e.g. a rollout shared out among another number of processes: made again
                self.say(f"[alignkit] resume: {path} was written by {recipe['processes']} processes, this run has "
                         f"{processes}; the recipe's in-progress state is rebuilt from step {self.step}")
                recipe = None
        elif recipe is not None and processes > 1:
            self.say(f"[alignkit] resume: {path} was written by one process, this run has {processes}; the "
                     f"recipe's in-progress state is rebuilt from step {self.step}")
            recipe = None
        if recipe is not None and hasattr(self.recipe, "load_state_dict"):
            self.recipe.load_state_dict(recipe)

    def _resume_point(self) -> Path | None:
        resume = self.config.resume
        if resume is False or resume is None:
            return None
        if resume is True or resume == "true":
            found = distributed.broadcast_object(self.latest_checkpoint() if self.is_main else None)
            if found is None:
                self.say(f"[alignkit] resume: no checkpoint in {self.checkpoint_dir}; starting from step 0")
            return found
        path = Path(str(resume))
        if not run_folder.is_complete_checkpoint(path):
            raise FileNotFoundError(f"resume: {path} is not a complete checkpoint folder "
                                    "(it needs trainable.safetensors and state.json)")
        return path

    def _resume(self) -> int | None:
        """Load the checkpoint to resume from (if any) and make the folder agree with it: metrics and
        checkpoints after its step are removed. Returns the step TensorBoard purges from, or None."""
        if self.config.resume is False or self.config.resume is None:
            return None
        resume_from = self._resume_point()
        if resume_from is not None:
            self.load_checkpoint(resume_from)
            if self.step > self.total_steps:
                raise CheckpointError(
                    f"resume: {resume_from} is at step {self.step}, past this job's last step {self.total_steps}; "
                    "raise training.max_steps or start afresh")
            self.say(f"[alignkit] resumed from {resume_from} at step {self.step}")
        if self.is_main:
            later = run_folder.remove_checkpoints_after(self.checkpoint_dir, self.step)
            if later:
                self.say(f"[alignkit] resume: removed checkpoints after step {self.step} "
                         f"({', '.join(p.name for p in later)}); those steps are trained again")
            cut = run_folder.cut_metrics(self.run_dir / run_folder.METRICS_NAME, self.step if self.step else None)
            if cut:
                self.say(f"[alignkit] resume: removed {cut} metrics.jsonl lines logged after step {self.step}")
        distributed.barrier()
        return self.step + 1 if self.step else 0

    # -- evaluation and early stopping
    def evaluate(self) -> dict[str, float]:
        """The recipe's evaluation (each process scores its share of the held-out rows and the recipe
        combines them, so every process gets the same numbers)."""
        self.model.eval()
        with torch.no_grad(), self.autocast():
            metrics = {f"eval/{k}": v for k, v in self.parallel.run(self.recipe.evaluate).items()}
        self.model.train()
        if metrics:
            self.eval_history.append({"step": self.step, **metrics})
        return metrics

    def _early_stop(self, metrics: dict[str, float]) -> bool:
        key = self.config.early_stopping_metric
        if not key or key not in metrics:
            return False
        value = metrics[key]
        greater = self.config.greater_is_better
        if greater is None:
            greater = not any(word in key for word in ("loss", "perplexity", "kl"))
        better = self.best_metric is None or (value > self.best_metric if greater else value < self.best_metric)
        if better:
            self.best_metric, self.bad_evals = value, 0
            return False
        self.bad_evals += 1
        return self.bad_evals >= self.config.early_stopping_patience

    # -- the loop
    def train(self) -> dict[str, Any]:
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            debris = run_folder.clean_debris(self.run_dir)
            if debris:
                self.say(f"[alignkit] removed {len(debris)} half-written checkpoint folder(s) of processes that "
                         "are gone: " + ", ".join(p.name for p in debris))
        seed_everything(self.config.seed)
        if self.parallel.processes > 1:
            self.say(f"[alignkit] {self.parallel.processes} processes ({self.parallel.kind}): each step's rows are "
                     "shared out, the loss is the mean over the whole global batch")
        purge_step = self._resume()
        logger = MetricsLogger(self.run_dir, tensorboard=self.config.tensorboard, report_to=self.config.report_to,
                               purge_step=purge_step) if self.is_main else NullLogger()
        self.model.train()
        if self.step == 0 and self.config.eval_at_start and self.config.eval_steps is not None:
            count = validation_count(self.recipe)
            if count != 0:
                what = f"{count} validation examples" if count else "the validation set"
                self.say(f"[alignkit] step 0: evaluating the starting model on {what}, so that the report shows "
                         "before and after (training.eval_at_start: false skips this)")
            metrics = self.evaluate()
            if metrics:
                logger.log(0, metrics)
        previous_handler = self._install_interrupt_handler()
        progress = self._progress_bar()
        updates = self.recipe.updates(self.step)
        saved_on_stop = False
        try:
            while self.step < self.total_steps:
                started = time.perf_counter()
                micro_batches = self.parallel.run(next, updates, None)
                if micro_batches is None:
                    break
                metrics = self._optimizer_step(micro_batches)
                self.step += 1
                metrics["lr"] = self.scheduler.get_last_lr()[0]
                metrics["step_seconds"] = time.perf_counter() - started
                if hasattr(self.recipe, "on_step_end"):
                    metrics.update(self._across_processes(self.recipe.on_step_end(self.step) or {}))
                self.history.append({"step": self.step, **metrics})
                if self.step % self.config.logging_steps == 0 or self.step == self.total_steps:
                    logger.log(self.step, metrics)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}", lr=f"{metrics['lr']:.2e}")
                stop = False
                if self.config.eval_steps and (self.step % self.config.eval_steps == 0 or self.step == self.total_steps):
                    eval_metrics = self.evaluate()
                    logger.log(self.step, eval_metrics)
                    if progress is not None and eval_metrics:
                        progress.write(f"step {self.step}: " + ", ".join(f"{k}={v:.4g}" for k, v in eval_metrics.items()))
                    stop = self._early_stop(eval_metrics)
                if self.config.save_steps and self.step % self.config.save_steps == 0:
                    self.save_checkpoint()
                if self._stop_requested or (self._interrupted and self.parallel.processes == 1):
                    path = self.save_checkpoint()
                    saved_on_stop = True
                    number = self._stop_requested or self._interrupted
                    name = SIGNAL_NAMES.get(number, f"signal {number}")
                    raise TrainingInterrupted(f"{name} at step {self.step}; checkpoint saved to {path}", number)
                if stop:
                    self.stopped_early = True
                    self.say(f"[alignkit] early stopping at step {self.step}: "
                             f"{self.config.early_stopping_metric} did not improve for "
                             f"{self.config.early_stopping_patience} evaluations")
                    break
        except KeyboardInterrupt:
            # a Ctrl-C raised inside a step (a second one, or outside our handler): one process can save
            # on its own; among several, the others are not at the same point, so none is written
            if not saved_on_stop and not self._interrupted and self.parallel.processes == 1:
                path = self.save_checkpoint()
                self.say(f"\n[alignkit] interrupted at step {self.step}; checkpoint saved to {path}")
            raise
        finally:
            if progress is not None:
                progress.close()
            logger.close()
            self._restore_handlers(previous_handler)
        if self.config.save_steps:
            self.save_checkpoint()
        return {"steps": self.step, "history": self.history, "eval_history": self.eval_history,
                "stopped_early": self.stopped_early}

    def _optimizer_step(self, micro_batches: list[Any]) -> dict[str, float]:
        """One optimizer step over this process's micro-batches; the loss is the mean over the global batch.

        Every process learns the others' micro-batch counts and loss weights first (one small gather),
        so it can divide by the global weight and run as many micro-batches as the busiest process
        (repeats with weight 0); after backward, one more gather agrees on the metrics, on a
        non-finite loss anywhere and on a stop request, so every process acts the same way.
        """
        if micro_batches:
            weights = [float(self.recipe.loss_weight(mb)) if hasattr(self.recipe, "loss_weight") else 1.0
                       for mb in micro_batches]
        elif self.parallel.processes > 1 and self._spare is not None:
            # this process's share of a short step is empty: it still takes part, with nothing to add
            micro_batches, weights = [self._padding(self._spare)], [0.0]
        else:
            raise ValueError(f"step {self.step + 1}: the recipe produced an empty update")
        self._spare = micro_batches[-1]
        plans = distributed.gather_objects((len(micro_batches), sum(weights)))
        count = max(n for n, _ in plans)
        total = sum(w for _, w in plans)
        micro_batches = list(micro_batches) + [self._padding(micro_batches[-1])] * (count - len(micro_batches))
        weights += [0.0] * (count - len(weights))
        scale = self.parallel.processes / total if total > 0 else 0.0  # DDP/FSDP/DeepSpeed average over processes
        sums: dict[str, float] = {}
        problem = None
        for index, (micro_batch, weight) in enumerate(zip(micro_batches, weights)):
            with self.parallel.micro_batch(last=index == count - 1):
                with self.autocast():
                    loss, metrics = self.parallel.forward(self.recipe.loss, micro_batch)
                value = float(loss.detach())
                if weight > 0 and not _is_finite(value) and problem is None:
                    problem = f"loss is {value}"
                self.parallel.backward(loss * (weight * scale))
            for key, item in {"loss": value, **metrics}.items():
                sums[key] = sums.get(key, 0.0) + weight * float(item)
        reports = distributed.gather_objects((sums, problem, self._interrupted))
        problem = next((p for _, p, _ in reports if p is not None), None)
        if problem is not None:
            self._diverged(problem)
        self._stop_requested = next((stop for _, _, stop in reports if stop), None)
        combined: dict[str, float] = {}
        for report, _, _ in reports:
            for key, value in report.items():
                combined[key] = combined.get(key, 0.0) + value
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm else float("inf")
        grad_norm = self.parallel.clip_grad_norm(max_norm)
        if not _is_finite(grad_norm):
            self._diverged(f"gradient norm is {grad_norm}")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        averaged = {key: value / total if total > 0 else 0.0 for key, value in combined.items()}
        unit = getattr(self.recipe, "loss_unit", None)
        if unit:  # how many units (tokens, pairs, completions) the step's loss is the mean over
            averaged[unit] = total
        averaged["grad_norm"] = grad_norm
        return averaged

    def _padding(self, micro_batch: Any) -> Any:
        """The repeat a process runs (with weight 0) while others still have micro-batches: marked by the
        recipe's ``padding_batch`` when it has one (for losses with statistics shared across processes)."""
        return self.recipe.padding_batch(micro_batch) if hasattr(self.recipe, "padding_batch") else micro_batch

    def _across_processes(self, metrics: dict[str, float]) -> dict[str, float]:
        """Per-process metrics (e.g. a rollout's reward mean) averaged over the processes; maxima stay maxima."""
        if self.parallel.processes == 1:
            return metrics
        reports = distributed.gather_objects({k: float(v) for k, v in metrics.items()})
        out = {}
        for key in reports[0]:
            values = [r[key] for r in reports if key in r]
            out[key] = max(values) if key.endswith("_max") else sum(values) / len(values)
        return out

    def _diverged(self, what: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        last = self.latest_checkpoint()
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
        raise TrainingDiverged(
            f"step {self.step + 1}: {what}. Training stopped; {kept}. "
            "Try a lower learning_rate, max_grad_norm, or fp32 precision."
        )

    def _install_interrupt_handler(self) -> dict:
        """SIGINT (Ctrl-C) and SIGTERM (schedulers): finish the step, save, leave. A second signal
        leaves at once, without a checkpoint."""

        def handler(signum, frame):
            name = SIGNAL_NAMES.get(signum, f"signal {signum}")
            if self._interrupted:  # the second signal: leave now
                raise TrainingInterrupted(f"{name} again at step {self.step}: stopped without a checkpoint", signum)
            self._interrupted = signum
            self.say(f"\n[alignkit] {name}: finishing this step and saving a checkpoint ({name} again to abort)")

        previous = {}
        for number in HANDLED_SIGNALS:
            try:
                previous[number] = signal.signal(number, handler)
            except ValueError:  # not in the main thread: signals stay with whoever handles them
                pass
        return previous

    @staticmethod
    def _restore_handlers(previous: dict) -> None:
        for number, handler in previous.items():
            signal.signal(number, handler)

    def _progress_bar(self):
        if not self.config.progress or not self.is_main:
            return None

        return tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True)


def validation_count(recipe) -> int | None:
    """How many validation examples a recipe evaluates (None when it does not say)."""
    for name in ("validation_rows", "validation_pairs", "validation_examples"):
        items = getattr(recipe, name, None)
        if items is not None:
            return len(items)
    return None


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
