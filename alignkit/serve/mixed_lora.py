"""Mixed-adapter LoRA forward, computed the way PEFT's ``adapter_names=`` batches compute it, with
the per-step bookkeeping done once per forward instead of once per layer.

For every LoRA linear layer and a batch whose rows use adapters ``a(b)`` (or none)::

    y = W x + b                                       (the base layer, once over the whole batch)
    y[rows of a] += s_a * B_a A_a x[rows of a]        (for each adapter a present in the batch)

PEFT's ``adapter_names`` path does the same arithmetic, but walks every module of the model three
times per forward to install hooks and rebuilds the row lists of each adapter in every layer; on a
small model that Python work costs more than the matrix products (measured: `bench/serve.py`).
Here each LoRA linear layer keeps its adapters stacked (``A`` as ``[slots, r_max, in]``, ``s B`` as
``[slots, out, r_max]``, zero-padded to the largest rank, slot 0 all zeros for rows without an
adapter); a forward builds one tensor of row slots (`mixed_batch`), and each layer gathers every
row's own ``A`` and ``s B`` and applies them with two batched matrix products, so the cost per layer
does not grow with the number of adapters in the batch (S-LoRA's and Punica's idea, in plain
PyTorch). Outside a `mixed_batch`, the layer runs PEFT's own forward unchanged. Dropout is not
applied (inference), as PEFT does in eval mode.

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
    batch = getattr(_ACTIVE, "batch", None)
    if batch is None or layer.merged or layer.disable_adapters:
        return type(layer).forward(layer, x, *args, **kwargs)
    result = layer.base_layer(x, *args, **kwargs)
    if batch.single is not None:  # every row uses one adapter: two plain matrix products
        name = batch.single
        if name in layer.lora_A:
            lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
            result = result + (lora_b(lora_a(x.to(lora_a.weight.dtype))) * layer.scaling[name]).to(result.dtype)
        return result
    stack = getattr(layer, "_alignkit_stack", None)
    if batch.slots is None or stack is None or x.dim() != 3:
        return result if batch.slots is None else type(layer).forward(layer, x, *args, **kwargs)
    down, up = stack                                          # [S, R, in], [S, out, R] (slot 0: zeros)
    a = down.index_select(0, batch.slots)                     # each row's own A: [B, R, in]
    b = up.index_select(0, batch.slots)                       # each row's own s * B: [B, out, R]
    delta = torch.bmm(torch.bmm(x.to(down.dtype), a.transpose(1, 2)), b.transpose(1, 2))
    return result + delta.to(result.dtype)


def install(model, slots: dict[str, int]) -> int:
    """Route every LoRA linear layer's forward through `_mixed_forward` and (re)build its stacked
    weights for the adapter slots ``slots`` (name -> index >= 1; 0 is "no adapter"). Returns the
    number of layers."""
    layers = lora_layers(model)
    rank = max((module.weight.shape[0] for layer in layers for module in layer.lora_A.values()), default=1)
    size = max(slots.values(), default=0) + 1
    with torch.no_grad():
        for layer in layers:
            if not getattr(layer, "_alignkit_mixed", False):
                layer.forward = _mixed_forward.__get__(layer)
                layer._alignkit_mixed = True
            base = layer.get_base_layer()
            # the adapters' own dtype (PEFT keeps LoRA weights in float32 on a bf16 base), as PEFT computes
            weight = next(iter(layer.lora_A.values())).weight if layer.lora_A else base.weight
            down = weight.new_zeros((size, rank, base.in_features))
            up = weight.new_zeros((size, base.out_features, rank))
            for name, module in layer.lora_A.items():
                if name not in slots:
                    continue
                r = module.weight.shape[0]
                down[slots[name], :r] = module.weight.to(weight.dtype)
                up[slots[name], :, :r] = (layer.lora_B[name].weight * layer.scaling[name]).to(weight.dtype)
            layer._alignkit_stack = (down, up)
    return len(layers)


class _Batch:
    __slots__ = ("single", "slots")

    def __init__(self, single, slots):
        self.single, self.slots = single, slots


@contextmanager
def mixed_batch(adapters: list[str | None], slots: dict[str, int], device):
    """While active, LoRA layers add each row's own adapter (None = the base model, no adapter).

    One adapter for every row: the layer's own two matrix products. Several (or some rows without
    one): each row's A and B are gathered from the stacked weights and applied with two batched
    matrix products, whatever the number of adapters.
    """
    distinct = set(adapters)
    if len(distinct) == 1:
        batch = _Batch(next(iter(distinct)), None)
        if batch.single is None:  # base rows only
            batch = _Batch(None, None)
    else:
        batch = _Batch(None, torch.tensor([slots[name] if name is not None else 0 for name in adapters],
                                          device=device))
    previous = getattr(_ACTIVE, "batch", None)
    _ACTIVE.batch = batch
    try:
        yield
    finally:
        _ACTIVE.batch = previous
