"""Merged exports: a standard `transformers` folder that needs no alignkit to load.

* A language model (a full model, or a LoRA adapter on its base): the adapter is merged into the
  base weights in float32, the result is cast to the asked dtype (float32 by default) and saved
  with ``save_pretrained`` (safetensors, ``config.json``, ``generation_config.json``, the tokenizer
  and its chat template).
  ``AutoModelForCausalLM.from_pretrained(folder)`` loads it; so do vLLM, TRL and llama.cpp's
  converter.
* A reward model (a folder with ``head.json``): the backbone (adapter merged) becomes the decoder
  of ``AutoModelForSequenceClassification`` with ``num_labels=1`` and alignkit's head weight as its
  ``score`` weight, so ``AutoModelForSequenceClassification.from_pretrained(folder)`` returns the
  same reward, for TRL, OpenRLHF and vLLM.

The head's bias. alignkit's head is ``r = w^T h + b``; transformers' ``score`` layer has no bias, so
the export computes ``r - b``. A Bradley-Terry reward is only defined up to a constant (the loss
sees differences, so ``b`` gets no gradient and stays at its initial 0 unless
``center_rewards_coefficient`` is set), which means rankings, margins and accuracies are unchanged;
``b`` is written to ``config.json`` as ``alignkit_score_bias`` and to the model card, and the
export says so when it is not 0. Nothing else is approximated.

Where a sequence-classification model reads its score. transformers reads the last token that is
not ``config.pad_token_id``; alignkit reads the end-of-turn marker that closes the assistant's
reply. Many chat tokenizers pad with that very marker (SmolLM2 pads with ``<|im_end|>``), which
would move the score one token back. The export therefore picks a padding token that can never be
the last real token (the tokenizer's pad, unk, or another special token, never its end-of-turn or
eos token), sets it in ``config.json`` and the saved tokenizer, and refuses when there is none.

Compatibility keys. transformers 5 writes ``rope_parameters`` and ``dtype``; 4.x reads
``rope_theta``/``rope_scaling`` and ``torch_dtype`` and would silently fall back to its default
RoPE base without them (many vLLM and TRL installs still run 4.x). The export writes both spellings.
The tokenizer class is written as ``PreTrainedTokenizerFast``, the fast tokenizer both lines load.
"""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkit.data import tokenize_prompt_response
from alignkit.export.source import ExportError, ExportSource, set_default_permissions
from alignkit.model.heads import load_scalar_model
from alignkit.model.load import load_model_and_tokenizer
from alignkit.model.peft import merge_adapter, save_model, unwrap

logger = logging.getLogger(__name__)

EXPORT_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
SCORE_BIAS_KEY = "alignkit_score_bias"


@dataclass
class ExportResult:
    """What an export wrote: ``path`` (the folder, or the ``.gguf`` file), the card, notes to print."""

    path: Path
    format: str
    card: Path | None = None
    notes: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)


def export_dtype(name: str | None) -> torch.dtype:
    """``f32`` / ``f16`` / ``bf16``; None is float32 (the weights are merged in float32)."""
    if name is None:
        return torch.float32
    key = name.strip().lower()
    if key not in EXPORT_DTYPES:
        raise ExportError(f"--dtype {name!r}: use one of {', '.join(EXPORT_DTYPES)}")
    return EXPORT_DTYPES[key]


def load_merged_causal_lm(source: ExportSource):
    """The source's causal LM on the CPU in float32 with any LoRA adapter merged in: (model, tokenizer)."""
    if source.is_scalar:
        raise ExportError(f"{source.given}: this is a {source.kind} model (head.json); it exports as a "
                          "sequence-classification model with --format merged")
    model, tokenizer = load_model_and_tokenizer(source.model_path, device="cpu", dtype=torch.float32)
    model = unwrap(merge_adapter(model))
    model.eval()
    return model, tokenizer


def export_merged(source: ExportSource, out: str | Path, dtype: str | None = None) -> ExportResult:
    """Write ``source`` as a standard transformers folder at ``out`` (see the module docstring)."""
    if source.is_scalar:
        return export_reward_model(source, out, dtype)
    model, tokenizer = load_merged_causal_lm(source)
    target_dtype = export_dtype(dtype)
    model.to(target_dtype)
    folder = _save(model, tokenizer, out)
    return ExportResult(folder, "merged", details={"dtype": _dtype_name(target_dtype),
                                                   "architecture": type(model).__name__})


# ----------------------------------------------------------------------------------------- reward models

def reward_padding_token(tokenizer) -> int:
    """A token id a reward model can pad with: never the end-of-turn marker alignkit scores at, nor eos."""
    _, response_ids, _ = tokenize_prompt_response(tokenizer, [{"role": "user", "content": "hi"}], "ok", None)
    forbidden = {response_ids[-1], tokenizer.eos_token_id}
    candidates = [tokenizer.pad_token_id, tokenizer.unk_token_id, *tokenizer.all_special_ids]
    for candidate in candidates:
        if candidate is not None and candidate not in forbidden:
            return int(candidate)
    marker = tokenizer.convert_ids_to_tokens(response_ids[-1])
    raise ExportError(
        f"the tokenizer has no special token other than its end-of-turn marker {marker!r} to pad with, and "
        "transformers' sequence classifiers read the score at the last non-padding token; add a pad token "
        "to the tokenizer (tokenizer.add_special_tokens) before training the reward model")


def build_sequence_classifier(scalar_model, tokenizer, dtype: torch.dtype | None = None):
    """``(AutoModelForSequenceClassification model, score bias, pad token id)`` from a `ScalarHeadModel`.

    The backbone's adapter (if any) is merged into a copy; ``score.weight`` is the head's weight.
    """
    from transformers import AutoModelForSequenceClassification

    backbone = unwrap(merge_adapter(copy.deepcopy(scalar_model.backbone)))
    config = copy.deepcopy(backbone.config)
    pad_id = reward_padding_token(tokenizer)
    config.num_labels = 1
    config.id2label, config.label2id = {0: "reward"}, {"reward": 0}
    config.pad_token_id = pad_id
    if hasattr(config, "use_cache"):
        config.use_cache = True
    try:
        classifier = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    except ValueError as error:
        raise ExportError(f"transformers has no sequence-classification class for model type "
                          f"'{config.model_type}', so this reward model cannot be exported as one") from error
    config.architectures = [type(classifier).__name__]
    classifier.config.architectures = config.architectures
    missing, unexpected = classifier.base_model.load_state_dict(backbone.base_model.state_dict(), strict=False)
    if missing or unexpected:
        raise ExportError(f"the reward model's backbone does not fit {type(classifier).__name__}: "
                          f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    head = scalar_model.head
    with torch.no_grad():
        classifier.score.weight.copy_(head.weight.detach().float().reshape(classifier.score.weight.shape))
    bias = float(head.bias.detach().float().reshape(-1)[0]) if head.bias is not None else 0.0
    classifier.eval()
    if dtype is not None:
        classifier.to(dtype)
    return classifier, bias, pad_id


def export_reward_model(source: ExportSource, out: str | Path, dtype: str | None = None) -> ExportResult:
    """Write a reward model (``head.json`` folder) as ``AutoModelForSequenceClassification``."""
    scalar, tokenizer = load_scalar_model(source.model_path, device="cpu", dtype=torch.float32)
    target_dtype = export_dtype(dtype)
    classifier, bias, pad_id = build_sequence_classifier(scalar, tokenizer, target_dtype)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    classifier.config.update({SCORE_BIAS_KEY: bias})
    folder = _save(classifier, tokenizer, out)
    notes = [f"padding token for the classifier: {tokenizer.pad_token!r} (id {pad_id})"]
    if bias != 0.0:
        notes.append(f"the reward head's bias {bias:+.6g} is not part of transformers' score layer (it has no "
                     f"bias): transformers' score = alignkit's reward - ({bias:.6g}); rankings and margins are "
                     f"unchanged, and the bias is in config.json as {SCORE_BIAS_KEY}")
    return ExportResult(folder, "merged", notes=notes,
                        details={"dtype": _dtype_name(target_dtype), "architecture": type(classifier).__name__,
                                 "score_bias": bias, "pad_token_id": pad_id, "kind": source.kind})


# ----------------------------------------------------------------------------------------- writing

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _save(model, tokenizer, out: str | Path) -> Path:
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; give a folder for --format merged")
    try:
        folder = save_model(model, tokenizer, out)
    except FileExistsError as error:
        raise ExportError(f"--out {out}: {error}") from error
    add_compatibility_keys(folder)
    set_default_permissions(folder)
    return folder


def add_compatibility_keys(folder: str | Path) -> None:
    """Give ``config.json`` and ``tokenizer_config.json`` the spellings transformers 4.x reads too."""
    folder = Path(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            config.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    if "dtype" in config:
        config.setdefault("torch_dtype", config["dtype"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer_config_path = folder / "tokenizer_config.json"
    if tokenizer_config_path.is_file():
        tokenizer_config = json.loads(tokenizer_config_path.read_text())
        if tokenizer_config.get("tokenizer_class") in (None, "TokenizersBackend"):
            tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
        for key in ("is_local", "local_files_only"):  # where alignkit loaded it from: meaningless elsewhere
            tokenizer_config.pop(key, None)
        tokenizer_config_path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
