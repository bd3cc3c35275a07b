"""Mixed-adapter LoRA forward, computed the way PEFT's ``adapter_names=`` batches compute it, with
the per-step bookkeeping done once per forward instead of once per layer.

For every LoRA linear layer and a batch whose rows use adapters ``a(b)`` (or none)::

    y = W x + b                                       (the base layer, once over the whole batch)
    y[rows of a] += s_a * B_a A_a x[rows of a]        (for each adapter a present in the batch)

PEFT's ``adapter_names`` path does the same arithmetic, but walks every module of the model three
times per forward to install hooks and rebuilds the row lists of each adapter in every layer; on a
small model that Python work costs more than the matrix products (measured: `bench/serve.py`).
Here the row index tensors are built once per forward (`MixedBatch`) and each LoRA linear layer's
``forward`` reads them from a shared slot while a `MixedBatch` is active; outside one, the layer
runs PEFT's own forward unchanged. Dropout is not applied (inference), as PEFT does in eval mode.

Layers other than LoRA ``Linear`` (embeddings, convolutions) and LoRA variants (DoRA) are not
handled here: `supports(model)` is False for such models and the scheduler uses PEFT's path.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

_ACTIVE = threading.local()


def _lora_linear_class():
    from peft.tuners.lora.layer import Linear

    return Linear


def lora_layers(model):
    from peft.tuners.lora.layer import LoraLayer

    return [module for module in model.modules() if isinstance(module, LoraLayer)]


def supports(model) -> bool:
    """True when every LoRA layer of ``model`` is a plain LoRA ``Linear`` without variants."""
    linear = _lora_linear_class()
    for layer in lora_layers(model):
        if type(layer) is not linear or getattr(layer, "lora_variant", None) or layer.lora_embedding_A:
            return False
    return True


def _mixed_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    groups = getattr(_ACTIVE, "groups", None)
    if groups is None or layer.merged or layer.disable_adapters:
        return type(layer).forward(layer, x, *args, **kwargs)
    result = layer.base_layer(x, *args, **kwargs)
    for name, index in groups:
        if name not in layer.lora_A:
            continue
        lora_a, lora_b, scaling = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
        if index is None:  # every row uses this adapter
            result = result + (lora_b(lora_a(x.to(lora_a.weight.dtype))) * scaling).to(result.dtype)
        else:
            rows = x.index_select(0, index).to(lora_a.weight.dtype)
            result = result.index_add(0, index, (lora_b(lora_a(rows)) * scaling).to(result.dtype))
    return result


def install(model) -> int:
    """Route the forward of every LoRA linear layer through `_mixed_forward`; returns how many."""
    count = 0
    for layer in lora_layers(model):
        if not getattr(layer, "_alignkit_mixed", False):
            layer.forward = _mixed_forward.__get__(layer)
            layer._alignkit_mixed = True
            count += 1
    return count


@contextmanager
def mixed_batch(adapters: list[str | None], device):
    """While active, LoRA layers add each row's own adapter (None = the base model, no adapter)."""
    positions: dict[str, list[int]] = {}
    for row, name in enumerate(adapters):
        if name is not None:
            positions.setdefault(name, []).append(row)
    groups = [(name, None if len(rows) == len(adapters) else torch.tensor(rows, device=device))
              for name, rows in positions.items()]
    previous = getattr(_ACTIVE, "groups", None)
    _ACTIVE.groups = groups
    try:
        yield
    finally:
        _ACTIVE.groups = previous
