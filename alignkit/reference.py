"""The reference policy pi_ref: the model a trained policy is compared against (DPO's log-ratio,
the KL penalty of GRPO and PPO, the implicit reward that `alignkit eval` scores).

One object, four ways of computing it, chosen by `ReferencePolicy.for_training` from what the policy is:

    adapters_off       a LoRA policy whose adapter is still the identity (a fresh one): pi_ref is the
                       same model with the adapters switched off; no second copy of any weight
    reference_adapter  a LoRA policy that continues a saved adapter: a frozen copy of that adapter is
                       loaded beside it under the name "reference" (same base weights)
    frozen_copy        full fine-tuning: a frozen deep copy of the starting weights
    separate_model     another model given by the user (``reference_model: PATH``), frozen

and ``starting_policy``: the policy itself as it is now, for a pass made before the first update
(DPO's cached reference log-probs), which needs no copy at all. Cached log-probs are the method's
business (DPO keys them by `weights_fingerprint`); this object only says which weights compute them.

``with reference.model() as m:`` yields the module to run, in eval mode, under ``torch.no_grad``,
with the adapters switched as the mode says, and restores the policy afterwards.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from alignkit import distributed
from alignkit.model.peft import freeze, is_peft_model

MODES = ("adapters_off", "reference_adapter", "frozen_copy", "separate_model", "starting_policy")
REFERENCE_ADAPTER = "reference"


def adapter_is_identity(model) -> bool:
    """True when every LoRA ``B`` matrix is zero: the adapter adds nothing (a fresh adapter)."""
    found = False
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            found = True
            if parameter.detach().abs().max() != 0:
                return False
    return found


def weights_fingerprint(model, skip_lora: bool = False) -> str:
    """A cheap, exact-enough identity of a model's weights: per tensor its name, shape, sum and first values."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if skip_lora and "lora_" in name:
                continue
            head = parameter.detach().flatten()[:4].float().tolist()
            digest.update(f"{name}:{tuple(parameter.shape)}:{float(parameter.detach().float().sum()):.6e}:"
                          f"{head}".encode())
    return digest.hexdigest()


def _agreed(question, model) -> bool:
    """``question(model)`` as the main process answers it, when the other processes' copy of ``model`` is
    still empty (`alignkit.distributed.low_memory_loading`); every process's own answer otherwise."""
    if not distributed.low_memory_loading():
        return question(model)
    return distributed.broadcast_object(question(model) if distributed.is_main_process() else None)


@contextlib.contextmanager
def eval_mode(model):
    """``model`` in eval mode inside the block, its previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class ReferencePolicy:
    """pi_ref for ``policy``; see the module docstring for the modes."""

    def __init__(self, policy, mode: str, module=None):
        if mode not in MODES:
            raise ValueError(f"unknown reference mode {mode!r}; one of {', '.join(MODES)}")
        if mode in ("adapters_off", "reference_adapter") and not is_peft_model(policy):
            raise ValueError(f"reference mode {mode!r} needs a LoRA (PEFT) policy")
        if mode == "separate_model" and module is None:
            raise ValueError("reference mode 'separate_model' needs the reference module")
        self.policy, self.mode = policy, mode
        self.module = module
        if mode == "frozen_copy" and module is None:
            # stays whole on every process: with low-memory loading the others receive the main one's values
            self.module = distributed.fill_from_main(freeze(copy.deepcopy(policy)))
        elif mode == "separate_model":
            freeze(module)
        elif mode == "reference_adapter":
            _add_reference_adapter(policy)

    @classmethod
    def for_training(cls, policy, reference_model=None, live: bool = True) -> "ReferencePolicy":
        """The reference of a run that starts from ``policy``: ``reference_model`` (a module) when given;
        else adapters off for a fresh adapter; else, when ``live`` (used during training), a frozen copy
        of the continued adapter or of the full weights; else (``live=False``: only before the first
        update) the policy as it is now."""
        if reference_model is not None:
            return cls(policy, "separate_model", reference_model)
        if is_peft_model(policy) and _agreed(adapter_is_identity, policy):
            return cls(policy, "adapters_off")
        if not live:
            return cls(policy, "starting_policy")
        if is_peft_model(policy):
            return cls(policy, "reference_adapter")
        return cls(policy, "frozen_copy")

    @property
    def description(self) -> str:
        return {
            "adapters_off": "the policy with its LoRA adapters disabled (same weights, no copy)",
            "reference_adapter": "a frozen copy of the starting adapter ('reference'), same base weights",
            "frozen_copy": "a frozen copy of the starting weights",
            "separate_model": "a separate frozen model",
            "starting_policy": "the starting policy itself (before any update)",
        }[self.mode]

    @contextlib.contextmanager
    def model(self):
        """The module that computes reference log-probs, in eval mode and without grad."""
        with torch.no_grad():
            if self.mode in ("frozen_copy", "separate_model"):
                yield self.module
            elif self.mode == "adapters_off":
                with eval_mode(self.policy), self.policy.disable_adapter():
                    yield self.policy
            elif self.mode == "starting_policy":
                with eval_mode(self.policy):
                    yield self.policy
            else:  # reference_adapter
                active = self.policy.active_adapter
                with eval_mode(self.policy):
                    self.policy.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
                    try:
                        yield self.policy
                    finally:
                        self.policy.set_adapter(active)
                        self.policy.set_requires_grad(REFERENCE_ADAPTER, False)

    def fingerprint(self) -> str:
        """Identity of the reference weights (for caches of reference log-probs)."""
        if self.module is not None:
            return weights_fingerprint(self.module)
        return weights_fingerprint(self.policy, skip_lora=self.mode == "adapters_off")

    def release(self) -> None:
        """Drop what the reference added to the policy (the 'reference' adapter), e.g. before saving."""
        if self.mode == "reference_adapter" and REFERENCE_ADAPTER in self.policy.peft_config:
            self.policy.delete_adapter(REFERENCE_ADAPTER)
        self.module = None


def _add_reference_adapter(model) -> None:
    """Load a frozen copy of the active adapter under the name 'reference' (same base weights)."""
    active = model.active_adapter
    config = copy.deepcopy(model.peft_config[active])
    config.inference_mode = True
    model.add_adapter(REFERENCE_ADAPTER, config)
    set_peft_model_state_dict(model, get_peft_model_state_dict(model, adapter_name=active),
                              adapter_name=REFERENCE_ADAPTER)
    model.set_adapter(active)
    model.set_requires_grad(REFERENCE_ADAPTER, False)
