"""Experiment trackers: ``training.report_to`` as TRL and the HF Trainer name it.

    training:
      report_to: [tensorboard, mlflow]      # or "wandb", "all", "none"; default [tensorboard]

``metrics.jsonl`` in the run folder is always written (by the engine); trackers receive the same
``(step, metrics)`` records. Each tracker has three methods, ``start(run_dir, config)``,
``log(step, metrics)`` and ``close()``:

* ``tensorboard``: ``torch.utils.tensorboard`` into ``RUN/tensorboard``;
* ``wandb``: ``wandb.init(project=$WANDB_PROJECT or "alignkit", name=run folder, dir=RUN,
  config=the resolved job)``, offline unless ``WANDB_MODE`` says otherwise (nothing leaves the machine
  until ``wandb sync``);
* ``trackio``: ``trackio.init(project=$TRACKIO_PROJECT or "alignkit", name=run folder, config=...)``,
  local (a SQLite file under ``$TRACKIO_DIR``) unless ``TRACKIO_SPACE_ID`` names a Space;
* ``mlflow``: a run in the experiment ``$MLFLOW_EXPERIMENT_NAME`` (or "alignkit") of
  ``$MLFLOW_TRACKING_URI`` (MLflow's own default when unset), with the flattened job as parameters.

A tracker whose package is missing, or that fails to start, is skipped with one line saying why;
one that fails while logging is closed and dropped with one line; training never stops for a
tracker. Only the main process (``RANK`` 0 or unset) reports. Non-finite values are not sent
(``metrics.jsonl`` keeps them as strings).
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path
from typing import Any, Protocol

import yaml

from alignkit.errors import UsageError

TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}
INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb", "trackio": "pip install trackio",
           "mlflow": "pip install mlflow (or mlflow-skinny)"}


class Tracker(Protocol):
    name: str

    def start(self, run_dir: Path, config: dict) -> None: ...

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def normalize_report_to(value: Any) -> list[str]:
    """``"wandb"``, ``"wandb,mlflow"``, ``["wandb"]``, ``"all"``, ``"none"`` -> a list of tracker names.

    Raises `UsageError` (a ValueError) naming an unknown tracker and the known ones.
    """
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(item).strip().lower() for item in items if str(item).strip()]
    if "none" in names:
        if len(names) > 1:
            raise UsageError(f"report_to {names}: 'none' cannot be combined with trackers")
        return []
    if "all" in names:
        return list(TRACKERS)
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise UsageError(f"report_to: unknown tracker {unknown[0]!r} (known: {', '.join(TRACKERS)}, all, none)")
    return list(dict.fromkeys(names))


def finite_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics a tracker can plot: real numbers, finite, not booleans."""
    out = {}
    for key, value in metrics.items():
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(float(value)):
            out[key] = float(value)
    return out


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"training": {"learning_rate": 1e-4}}`` -> ``{"training.learning_rate": 1e-4}``."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


# ------------------------------------------------------------------------------------------------ trackers

class TensorBoardTracker:
    name = "tensorboard"
    purge_step: int | None = None  # on resume: events from this step on are hidden (logged again)

    def start(self, run_dir: Path, config: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=self.purge_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    name = "wandb"

    def start(self, run_dir: Path, config: dict) -> None:
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "alignkit"), name=run_dir.name,
                              dir=str(run_dir), config=config, mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class TrackioTracker:
    name = "trackio"

    def start(self, run_dir: Path, config: dict) -> None:
        import trackio

        self.module = trackio
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", "alignkit"), name=run_dir.name,
                                config=config, space_id=os.environ.get("TRACKIO_SPACE_ID") or None,
                                embed=False, auto_log_cpu=False, auto_log_gpu=False)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.module.finish()  # finishes the run and clears trackio's current run (else its atexit hook ends it again)


class MlflowTracker:
    name = "mlflow"

    def start(self, run_dir: Path, config: dict) -> None:
        import mlflow

        self.mlflow = mlflow
        if os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "alignkit"))
        self.run = mlflow.start_run(run_name=run_dir.name)
        params = {key: str(value)[:500] for key, value in flatten(config).items()}
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
            mlflow.log_params(dict(list(params.items())[start:start + 100]))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


TRACKER_CLASSES = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "trackio": TrackioTracker,
                   "mlflow": MlflowTracker}


def _say(message: str) -> None:
    print(f"[alignkit] {message}", file=sys.stderr)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def _run_config(run_dir: Path) -> dict:
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


class Trackers:
    """The trackers of one run: ``log`` sends a record to each, ``close`` ends each. Failures are reported once."""

    def __init__(self, names: list[str], run_dir: str | Path, config: dict | None = None,
                 purge_step: int | None = None):
        run_dir = Path(run_dir)
        self.active: list = []
        if not names or not _is_main_process():
            return
        config = _run_config(run_dir) if config is None else config
        for name in normalize_report_to(names):
            if importlib.util.find_spec(PACKAGES[name]) is None:
                _say(f"report_to: {name} is not installed ({INSTALL[name]}); not reporting to it")
                continue
            tracker = TRACKER_CLASSES[name]()
            if purge_step is not None and hasattr(tracker, "purge_step"):
                tracker.purge_step = purge_step
            try:
                tracker.start(run_dir, config)
            except Exception as error:  # a tracker is optional: say why and go on
                _say(f"report_to: {name} did not start ({type(error).__name__}: {_first_line(error)}); "
                     "not reporting to it")
                continue
            self.active.append(tracker)

    @property
    def names(self) -> list[str]:
        return [tracker.name for tracker in self.active]

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        values = finite_scalars(metrics)
        if not values:
            return
        for tracker in list(self.active):
            try:
                tracker.log(step, values)
            except Exception as error:
                _say(f"report_to: {tracker.name} failed at step {step} ({type(error).__name__}: "
                     f"{_first_line(error)}); stopped reporting to it")
                self.active.remove(tracker)
                self._close(tracker)

    def close(self) -> None:
        for tracker in self.active:
            self._close(tracker)
        self.active = []

    @staticmethod
    def _close(tracker) -> None:
        try:
            tracker.close()
        except Exception as error:
            _say(f"report_to: {tracker.name} did not close cleanly ({type(error).__name__}: {_first_line(error)})")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""
