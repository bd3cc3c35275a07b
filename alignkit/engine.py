"""The one training loop every method shares.

A *recipe* (see ``alignkit/methods``) knows its data and its loss; the engine knows everything
else and nothing about any method:

    for step in range(start, total):
        micro_batches = next(updates)              # recipe: one list per optimizer step
        for mb in micro_batches:                   # gradient accumulation
            loss, metrics = recipe.loss(mb)        # under bf16 autocast on GPU
            (loss / len(micro_batches)).backward()
        clip gradients; optimizer.step(); scheduler.step()
        log; every eval_steps: recipe.evaluate(); every save_steps: checkpoint

Checkpoints hold the trainable weights (adapter or full model: every parameter with
``requires_grad``), the optimizer, the scheduler, every RNG state, the step, the early-stopping
state and the recipe's own state. They are written to a temporary folder and renamed, so a crash
never leaves a half-written checkpoint. ``resume`` reloads the newest one, and because recipes
produce their updates deterministically from ``start_step``, a resumed run reproduces the
uninterrupted one step for step. Ctrl-C writes a checkpoint before leaving; a NaN or infinite loss
stops the run, keeps the last good checkpoint and says which step diverged.
"""
from __future__ import annotations

import json
import math
import os
import random
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

from alignkit.config import TrainingConfig
from alignkit.errors import UserError
from alignkit.trackers import Trackers


class TrainingDiverged(UserError, RuntimeError):
    """Raised when a loss or gradient norm is NaN/inf; the last good checkpoint is kept."""


class Recipe(Protocol):
    model: torch.nn.Module

    def steps_per_epoch(self) -> int: ...

    def updates(self, start_step: int) -> Iterator[list[Any]]: ...

    def loss(self, micro_batch: Any) -> tuple[torch.Tensor, dict[str, float]]: ...

    def evaluate(self) -> dict[str, float]: ...


# ----------------------------------------------------------------------------- small pieces

def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in state]
    unknown = [name for name in state if name not in params]
    if missing or unknown:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unknown[:3]}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))


def _is_finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))


class MetricsLogger:
    """Writes metrics as JSON lines and to the trackers of ``report_to`` (`alignkit.trackers`)."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, report_to: Iterable[str] = ("tensorboard",)):
        self.path = run_dir / "metrics.jsonl"
        self.file = self.path.open("a")
        self.trackers = Trackers([name for name in report_to if tensorboard or name != "tensorboard"], run_dir)

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
        self.device = next(self.model.parameters()).device
        self.autocast_dtype = self._autocast_dtype()
        self.total_steps = self._total_steps()
        warmup = config.warmup_steps or int(round(config.warmup_ratio * self.total_steps))
        self.warmup_steps = warmup
        self.optimizer = make_optimizer(self.model, config)
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
        self._interrupted = False

    # -- setup
    def _autocast_dtype(self) -> torch.dtype | None:
        """fp32: none. bf16: bf16 autocast on any device. auto: bf16 on a CUDA GPU that has it."""
        precision = self.config.precision
        if precision == "bf16":
            return torch.bfloat16
        if precision == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None

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

    # -- checkpoints
    def save_checkpoint(self) -> Path:
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        final = self.checkpoint_dir / f"step-{self.step:07d}"
        tmp = self.checkpoint_dir / f".tmp-step-{self.step:07d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(trainable_state(self.model), str(tmp / "trainable.safetensors"))
        torch.save({
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "step": self.step,
            "best_metric": self.best_metric,
            "bad_evals": self.bad_evals,
            "recipe": self.recipe.state_dict() if hasattr(self.recipe, "state_dict") else None,
        }, tmp / "state.pt")
        (tmp / "checkpoint.json").write_text(json.dumps({"step": self.step, "total_steps": self.total_steps}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        self._prune_checkpoints()
        return final

    def _prune_checkpoints(self) -> None:
        kept = sorted(self.checkpoint_dir.glob("step-*"))
        for old in kept[: -self.config.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)

    def latest_checkpoint(self) -> Path | None:
        found = sorted(p for p in self.checkpoint_dir.glob("step-*") if (p / "state.pt").exists())
        return found[-1] if found else None

    def load_checkpoint(self, path: Path) -> None:
        load_trainable_state(self.model, load_file(str(path / "trainable.safetensors")))
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        restore_rng_state(state["rng"])
        self.step = state["step"]
        self.best_metric = state["best_metric"]
        self.bad_evals = state["bad_evals"]
        if state.get("recipe") is not None and hasattr(self.recipe, "load_state_dict"):
            self.recipe.load_state_dict(state["recipe"])

    def _resume_point(self) -> Path | None:
        resume = self.config.resume
        if resume is False or resume is None:
            return None
        if resume is True or resume == "true":
            found = self.latest_checkpoint()
            if found is None:
                print(f"[alignkit] resume: no checkpoint in {self.checkpoint_dir}; starting from step 0")
            return found
        path = Path(str(resume))
        if not (path / "state.pt").exists():
            raise FileNotFoundError(f"resume: {path} is not a checkpoint folder (no state.pt)")
        return path

    # -- evaluation and early stopping
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        with torch.no_grad(), self.autocast():
            metrics = {f"eval/{k}": v for k, v in self.recipe.evaluate().items()}
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
        self.run_dir.mkdir(parents=True, exist_ok=True)
        set_seed(self.config.seed)
        resume_from = self._resume_point()
        if resume_from is not None:
            self.load_checkpoint(resume_from)
            print(f"[alignkit] resumed from {resume_from} at step {self.step}")
        logger = MetricsLogger(self.run_dir, tensorboard=self.config.tensorboard, report_to=self.config.report_to)
        self.model.train()
        if self.step == 0 and self.config.eval_at_start and self.config.eval_steps is not None:
            count = validation_count(self.recipe)
            if count != 0:
                what = f"{count} validation examples" if count else "the validation set"
                print(f"[alignkit] step 0: evaluating the starting model on {what}, so that the report shows "
                      "before and after (training.eval_at_start: false skips this)", flush=True)
            metrics = self.evaluate()
            if metrics:
                logger.log(0, metrics)
        previous_handler = self._install_interrupt_handler()
        progress = self._progress_bar()
        updates = self.recipe.updates(self.step)
        try:
            while self.step < self.total_steps:
                started = time.perf_counter()
                try:
                    micro_batches = next(updates)
                except StopIteration:
                    break
                metrics = self._optimizer_step(micro_batches)
                self.step += 1
                metrics["lr"] = self.scheduler.get_last_lr()[0]
                metrics["step_seconds"] = time.perf_counter() - started
                if hasattr(self.recipe, "on_step_end"):
                    metrics.update(self.recipe.on_step_end(self.step) or {})
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
                if self._interrupted:
                    path = self.save_checkpoint()
                    raise KeyboardInterrupt(f"interrupted at step {self.step}; checkpoint saved to {path}")
                if stop:
                    self.stopped_early = True
                    print(f"[alignkit] early stopping at step {self.step}: "
                          f"{self.config.early_stopping_metric} did not improve for "
                          f"{self.config.early_stopping_patience} evaluations")
                    break
        except KeyboardInterrupt:
            if not self._interrupted:  # a second Ctrl-C, or one raised inside a step
                path = self.save_checkpoint()
                print(f"\n[alignkit] interrupted at step {self.step}; checkpoint saved to {path}")
            raise
        finally:
            if progress is not None:
                progress.close()
            logger.close()
            signal.signal(signal.SIGINT, previous_handler)
        if self.config.save_steps:
            self.save_checkpoint()
        return {"steps": self.step, "history": self.history, "eval_history": self.eval_history,
                "stopped_early": self.stopped_early}

    def _optimizer_step(self, micro_batches: list[Any]) -> dict[str, float]:
        if not micro_batches:
            raise ValueError(f"step {self.step + 1}: the recipe produced an empty update")
        sums: dict[str, float] = {}
        for micro_batch in micro_batches:
            with self.autocast():
                loss, metrics = self.recipe.loss(micro_batch)
            value = float(loss.detach())
            if not _is_finite(value):
                self._diverged(f"loss is {value}")
            (loss / len(micro_batches)).backward()
            metrics = {"loss": value, **metrics}
            for key, item in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(item)
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not _is_finite(grad_norm):
            self._diverged(f"gradient norm is {grad_norm}")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        averaged = {key: value / len(micro_batches) for key, value in sums.items()}
        averaged["grad_norm"] = grad_norm
        return averaged

    def _diverged(self, what: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        last = self.latest_checkpoint()
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
        raise TrainingDiverged(
            f"step {self.step + 1}: {what}. Training stopped; {kept}. "
            "Try a lower learning_rate, max_grad_norm, or fp32 precision."
        )

    def _install_interrupt_handler(self):
        def handler(signum, frame):
            if self._interrupted:  # second Ctrl-C: leave now
                raise KeyboardInterrupt
            self._interrupted = True
            print("\n[alignkit] Ctrl-C: finishing this step and saving a checkpoint (Ctrl-C again to abort)")

        try:
            return signal.signal(signal.SIGINT, handler)
        except ValueError:  # not in the main thread
            return signal.getsignal(signal.SIGINT)

    def _progress_bar(self):
        if not self.config.progress:
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
