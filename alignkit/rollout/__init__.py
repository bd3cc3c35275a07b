"""Sampling backends for online methods. See `base.py` for the interface.

``get_backend(name)`` picks one: ``"hf"`` (`transformers` generate, the default and the tested one),
``"static"`` (alignkit's static-KV-cache engine), ``"vllm"`` (optional extra, GPU only), or
``"auto"``: the static engine when it imports, supports the model and CUDA is present, else ``"hf"``.
"""
from __future__ import annotations

from alignkit.rollout.base import RolloutBackend, RolloutBatch, SamplingParams

__all__ = ["BACKENDS", "RolloutBackend", "RolloutBatch", "SamplingParams", "get_backend"]

BACKENDS = ("auto", "hf", "static", "vllm")


def _static_backend_class():
    try:
        from alignkit.rollout.static import StaticCacheBackend
    except ImportError:
        return None
    return StaticCacheBackend


def _static_supports(cls, model) -> bool:
    """`StaticCacheBackend.supports(model)`, or the module's `supports` where the class has none."""
    import sys

    check = getattr(cls, "supports", None) or getattr(sys.modules.get(cls.__module__), "supports", None)
    if check is None:
        return False
    try:
        return bool(check(model))
    except Exception:  # a backend that cannot tell is not used
        return False


def get_backend(name: str = "auto", model=None, **options) -> RolloutBackend:
    """A rollout backend by name; ``options`` go to its constructor (unknown ones are dropped for
    backends that do not take them, so one config serves every backend)."""
    import inspect

    import torch

    if name not in BACKENDS:
        raise ValueError(f"unknown rollout backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        static = _static_backend_class()
        supported = (static is not None and model is not None and torch.cuda.is_available()
                     and _static_supports(static, model))
        name = "static" if supported else "hf"
    if name == "hf":
        from alignkit.rollout.hf import HFGenerateBackend as cls
    elif name == "static":
        cls = _static_backend_class()
        if cls is None:
            raise ImportError("rollout backend 'static' is not available (alignkit.rollout.static does not import)")
    else:
        from alignkit.rollout.vllm import VLLMBackend as cls
    try:
        accepted = inspect.signature(cls).parameters
        takes_any = any(p.kind == p.VAR_KEYWORD for p in accepted.values())
        options = options if takes_any else {k: v for k, v in options.items() if k in accepted}
    except (TypeError, ValueError):
        pass
    return cls(**options)
