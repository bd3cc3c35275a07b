"""One seed for every random number generator a run touches, and their state for checkpoints.

``seed_everything(seed)`` seeds Python's ``random``, NumPy's global generator and torch (CPU and every
CUDA device). `run_job` calls it before the model is built, so LoRA's initial weights and a reward
model's head are the same in two runs with the same seed; the engine calls it again when the loop
starts, so what training draws does not depend on how many numbers model loading used.

``rng_state()`` / ``restore_rng_state(state)`` capture and restore all of them (checkpoints).
"""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)  # seeds every CUDA device too


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state[0], np.asarray(numpy_state[1], dtype=np.uint32), *numpy_state[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
