"""Memory levers for training on a CPU (and the estimate that switches them on).

Where a training step's memory goes, for a decoder of ``L`` trainable-through layers on ``N`` tokens
of one micro-batch (measured on SmolLM2-135M, float32, LoRA on every linear layer):

* **Activations kept for the backward pass**: about 76 KB per token per layer (hidden 576,
  MLP 1536: the norms, q/k/v, the attention output, the MLP's gate/up/product, LoRA's inputs). For the reward-model
  example (8 pairs of up to 512 tokens, 30 layers) that is several GB, against 0.5 GB of weights.
  *Gradient checkpointing* keeps only each layer's input (2.3 KB per token per layer) and recomputes
  one layer at a time in the backward pass (about a third more compute).
* **Memory the allocator keeps**: glibc's malloc serves large blocks by ``mmap`` only up to a
  threshold that it raises every time such a block is freed; after a few steps, activations come from
  the heap, whose freed middle is rarely returned, so the resident size (what the OS counts, and what
  runs a 24 GB machine out of memory) keeps the high-water mark of every step's mix of sizes.
  `release_freed_memory` fixes the threshold, so large tensors are mapped and unmapped and freed
  activations go back to the system at once (a few more page faults per step).
* Attention maps: PyTorch's SDPA uses its flash kernel on CPU (float32 included, with the 4-D masks
  of packed pairs), which never stores the ``[heads, T, T]`` probabilities; the math kernel would.
  Nothing to switch: `bench/rm_memory.py --variants math-attention` shows what it saves.

``training.gradient_checkpointing: auto`` (the default) turns checkpointing on when the estimated
activations of the recipe's largest micro-batch exceed `AUTO_CHECKPOINTING_BYTES`.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

from alignkit.model.forward import decoder_of

AUTO_CHECKPOINTING_BYTES = 1 << 30
# Bytes kept per token per decoder layer, in units of the element size: 16 x hidden + 4 x MLP width
# (61 KB for SmolLM2-135M in float32; autograd saves about 76 KB there with LoRA: the estimate is on
# the low side, so auto errs towards leaving checkpointing off).
HIDDEN_FACTOR, MLP_FACTOR = 16, 4
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 * 1024


def layers_needing_activations(model: torch.nn.Module) -> int:
    """Decoder layers whose activations backward needs: from the first layer with a trainable
    parameter to the last (with LoRA on the last N layers only, N)."""
    try:
        layers = list(decoder_of(getattr(model, "backbone", model)).layers)  # a scalar-head model's backbone
    except (AttributeError, ValueError, TypeError):
        return 0
    for index, layer in enumerate(layers):
        if any(p.requires_grad for p in layer.parameters()):
            return len(layers) - index
    return 0


def activation_bytes(model: torch.nn.Module, tokens: int) -> int:
    """Estimated bytes of activations one forward pass keeps for backward, for ``tokens`` tokens."""
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", 0) or 0
    width = getattr(config, "intermediate_size", 4 * hidden) or 4 * hidden
    element = next(model.parameters()).element_size()
    return tokens * layers_needing_activations(model) * element * (HIDDEN_FACTOR * hidden + MLP_FACTOR * width)


def decide_gradient_checkpointing(setting: bool | str, model: torch.nn.Module,
                                  tokens: int | None) -> tuple[bool, str]:
    """``(on, why)`` for ``training.gradient_checkpointing`` (true, false or "auto")."""
    if setting is True or setting is False:
        return setting, f"gradient_checkpointing: {str(setting).lower()}"
    if tokens is None:
        return False, "auto: this method does not report its micro-batch size; off"
    estimate = activation_bytes(model, tokens)
    verdict = "on" if estimate > AUTO_CHECKPOINTING_BYTES else "off"
    return verdict == "on", (f"auto: {verdict}, the largest micro-batch ({tokens} tokens) would keep about "
                             f"{estimate / 2**30:.1f} GiB of activations (threshold "
                             f"{AUTO_CHECKPOINTING_BYTES / 2**30:.0f} GiB)")


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer in the backward pass instead of keeping its activations."""
    target = model
    if not hasattr(target, "gradient_checkpointing_enable"):  # a wrapper such as ScalarHeadModel
        target = getattr(model, "backbone", model)
    enable = getattr(target, "activation_checkpointing_enable", None)  # transformers >= 5; the old name warns
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(target, "enable_input_require_grads"):
        target.enable_input_require_grads()
    config = getattr(target, "config", None)
    if config is not None:
        config.use_cache = False


def uses_gradient_checkpointing(model: torch.nn.Module) -> bool:
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


def release_freed_memory() -> bool:
    """Make glibc return freed large blocks to the system at once (fixed mmap threshold).

    Linux with glibc only; returns whether it was applied. Affects the whole process, which is what
    a training run is.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
