"""Sampling backends for online methods and serving. See `base.py` for the interface.

``get_backend(name)`` picks one: ``"hf"`` (`transformers` generate, the default and the tested one),
``"static"`` (alignkit's static-KV-cache engine with CUDA-graph decode), ``"vllm"`` (optional extra,
GPU only), or ``"auto"``: the static engine when CUDA is present and it supports the model, else ``"hf"``.
"""
from __future__ import annotations

import torch

from alignkit.rollout.base import (
    RolloutBackend,
    RolloutBatch,
    SamplingParams,
    padding_id,
)
from alignkit.rollout.hf import HFGenerateBackend
from alignkit.rollout.static import StaticCacheBackend
from alignkit.rollout.vllm import VLLMBackend

__all__ = ["BACKENDS", "HFGenerateBackend", "RolloutBackend", "RolloutBatch", "SamplingParams",
           "StaticCacheBackend", "get_backend", "padding_id"]

BACKENDS = ("auto", "hf", "static", "vllm")


def get_backend(name: str = "auto", model=None, max_batch_size: int | None = None,
                chunk_size: int = 1024) -> RolloutBackend:
    """A rollout backend by name, with the options every online job sets: ``max_batch_size``
    (samples per generate call, hf only) and ``chunk_size`` (rows per chunk of the log-prob head)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown rollout backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        name = "static" if model is not None and torch.cuda.is_available() and StaticCacheBackend.supports(model) \
            else "hf"
    if name == "hf":
        return HFGenerateBackend(max_batch_size=max_batch_size, chunk_size=chunk_size)
    if name == "static":
        return StaticCacheBackend()

    return VLLMBackend(chunk_size=chunk_size)
