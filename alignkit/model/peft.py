"""LoRA and the PEFT wrapper: the one place that knows what a `peft.PeftModel` is.

`is_peft_model` and `unwrap` answer "does this model carry adapters?" and "which transformers model
is inside?" for every caller (recipes, the reference policy, rollout backends, serving). `add_lora`
wraps a model (optionally on its last N decoder layers only), `merge_adapter` folds the adapter in,
and `save_model` writes an adapter (or the merged model) and the tokenizer atomically.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model

from alignkit.model.load import (
    EMBEDDED_ALIASES,
    EMBEDDED_MODEL,
    EMBEDDED_WEIGHTS_NOTE,
    SAVE_RECORD,
    public_model_id,
)


def is_peft_model(model) -> bool:
    """True for a `peft.PeftModel` (LoRA adapters on a transformers model)."""
    return isinstance(model, PeftModel)


def unwrap(model):
    """The transformers model inside a `peft.PeftModel`, or ``model`` itself.

    LoRA layers are injected in place, so the unwrapped model still applies the adapters, and
    ``PeftModel.disable_adapter()`` still switches them off.
    """
    return model.get_base_model() if is_peft_model(model) else model


def freeze(model):
    """Every parameter of ``model`` without gradient, and the model in eval mode; returns it."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def add_lora(model, rank: int = 16, alpha: float = 32, dropout: float = 0.05,
             target_modules: str | list[str] = "all-linear", is_trainable: bool = True,
             layers: int | list[int] | None = None):
    """Wrap ``model`` in a PEFT LoRA adapter (``task_type`` CAUSAL_LM) and return the PeftModel.

    ``target_modules="all-linear"`` adapts every linear layer except the output head. The base
    weights are frozen; the adapter's weights are trainable unless ``is_trainable`` is False.
    LoRA's B matrices start at zero, so the wrapped model computes exactly what the base did.

    ``layers`` limits the adapters to some decoder layers: a list of indices, or an int N for the
    last N layers. Backward then stops at the lowest adapted layer, which makes a step much cheaper
    (on a 30-layer model, adapting the last 10 skips two thirds of the backward pass).
    """

    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    layers_to_transform = None
    if layers is not None:
        total = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        if isinstance(layers, int):
            if total is None or not 0 < layers <= total:
                raise ValueError(f"lora layers={layers}: the model has {total} decoder layers")
            layers_to_transform = list(range(total - layers, total))
        else:
            layers_to_transform = sorted(int(i) for i in layers)
            if total is not None and any(not 0 <= i < total for i in layers_to_transform):
                raise ValueError(f"lora layers {layers_to_transform}: indices must be in 0..{total - 1}")
        if target_modules == "all-linear":  # peft wants explicit names together with layer indices
            output = model.get_output_embeddings()
            target_modules = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                                     if isinstance(module, torch.nn.Linear) and module is not output})
    config = LoraConfig(
        r=int(rank), lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
        task_type=TaskType.CAUSAL_LM, inference_mode=not is_trainable,
        layers_to_transform=layers_to_transform,
    )
    return get_peft_model(model, config)


def merge_adapter(model):
    """Fold a PEFT model's adapter into its base weights and return the plain model.

    This changes the base model in place (``merge_and_unload``): do not use the PeftModel afterwards.
    A model that is not a PeftModel is returned unchanged.
    """
    if not is_peft_model(model):
        return model
    return model.merge_and_unload()


def _is_replaceable(folder: Path) -> bool:
    if not folder.exists():
        return True
    if not folder.is_dir():
        return False
    entries = list(folder.iterdir())
    return not entries or (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()


def _adapter_save_options(model) -> dict:
    """PEFT's save checks, by default, whether the base vocabulary changed by fetching the base's
    config (a hub request for a hub id or our embedded name). alignkit never resizes embeddings, so
    unless the adapter itself targets an embedding layer, skip that check."""
    if not is_peft_model(model):
        return {}
    targets = getattr(model.peft_config.get(model.active_adapter), "target_modules", None)
    names = [targets] if isinstance(targets, str) else list(targets or [])
    if any("embed" in name or "lm_head" in name or "wte" in name for name in names):
        return {}
    return {"save_embedding_layers": False}


def base_model_name(model) -> str | None:
    """The name the base weights were loaded under (alignkit's embedded name, a folder or a hub id)."""
    inner = unwrap(model)
    return getattr(inner, "name_or_path", None) or getattr(getattr(inner, "config", None), "name_or_path", None)


def record_base_model(folder: str | os.PathLike, model, adapter: bool) -> dict:
    """Make a saved adapter or model portable: outside tools read the *public* base id (the embedded
    model as ``HuggingFaceTB/SmolLM2-135M-Instruct``) from ``adapter_config.json`` and the model card's
    ``base_model``; ``alignkit.json`` keeps the name alignkit loads the same weights under, and how they
    were made. Returns the record."""
    folder = Path(folder)
    base = base_model_name(model)
    public = public_model_id(base)
    embedded = bool(base) and base.strip().lower() in EMBEDDED_ALIASES
    record = {"format": 1, "kind": "adapter" if adapter else "model",
              "base_model": EMBEDDED_MODEL if embedded else base, "base_model_id": public,
              "base_weights": EMBEDDED_WEIGHTS_NOTE if embedded else None}
    (folder / SAVE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    config_path = folder / "adapter_config.json"
    if adapter and config_path.is_file() and public:
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = public
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    front = ["---"] + ([f"base_model: {public}"] if public else []) + \
        (["library_name: peft", "tags:", "- lora", "- alignkit"] if adapter
         else ["base_model_relation: finetune", "library_name: transformers", "tags:", "- alignkit"]) + ["---", ""]
    what = "A LoRA adapter" if adapter else "A fine-tuned model"
    body = [f"{what} trained with alignkit" + (f" on `{public}`." if public else f" on `{base}`.")]
    if embedded:
        body.append(f"\nalignkit trained it on its embedded copy of that model, {EMBEDDED_WEIGHTS_NOTE}. "
                    f"Outside alignkit, load the base from `{public}` (or the same de-quantised copy, "
                    "`alignkit prepare-model` prints its folder)" + (" and apply this adapter with PEFT." if adapter
                                                                      else "."))
    (folder / "README.md").write_text("\n".join(front + body) + "\n")
    return record


def save_model(model, tokenizer, directory: str | os.PathLike, merge: bool = False) -> Path:
    """Save ``model`` (and ``tokenizer`` when given) to ``directory``, atomically; return the folder.

    A PeftModel is saved as its adapter only (``adapter_config.json`` + ``adapter_model.safetensors``),
    unless ``merge`` is True: then the adapter is merged into a copy of the model (the argument is not
    changed) and the full model is saved. Plain models are saved as safetensors. Everything is written
    to a temporary folder beside ``directory`` and renamed into place; an existing ``directory`` is
    replaced only when it is empty or holds a saved model or adapter (else `FileExistsError`).
    """
    target = Path(directory).expanduser().resolve()
    if not _is_replaceable(target):
        raise FileExistsError(
            f"{target} exists and does not hold a saved model or adapter; refusing to replace it"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    to_save = model
    if merge and is_peft_model(model):
        to_save = copy.deepcopy(model).merge_and_unload()
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        os.chmod(staging, 0o755)
        to_save.save_pretrained(staging, **_adapter_save_options(to_save))
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        record_base_model(staging, model, adapter=is_peft_model(to_save))
        if target.exists():
            old = target.parent / f".old-{target.name}-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            os.rename(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target




def count_parameters(model) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; tied weights are counted once."""
    trainable = total = 0
    for parameter in model.parameters():
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return trainable, total
