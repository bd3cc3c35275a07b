"""Names users bring from other tools: accepted where they mean one thing here, hinted where they do not.

Before a job is validated (`alignkit.methods.build_job`), `translate_keys` rewrites the raw mapping:

* **Aliases** (`ALIASES`): a name from TRL, PEFT or the managed fine-tuning APIs (Vertex AI,
  managed RFT) whose meaning is one alignkit key, written at the top level or inside the section
  the tool puts it in, is moved to alignkit's key (its value converted where the two spell it
  differently: ``bf16: true`` -> ``training.precision: bf16``; ``adapterSize: ADAPTER_SIZE_FOUR`` ->
  ``lora.rank: 4``). Giving an alias and its alignkit key with different values is an error; every
  alias used is stated in the run notes.
* **Hints** (`HINTS`): names that have no one-to-one meaning here (LLaMA-Factory's ``stage``,
  ``finetuning_type``, ``template``, Axolotl's ``datasets``...), or alignkit's own names written in
  the wrong section (a top-level ``learning_rate``), stay errors, but the error says what to write.

docs/training.md has the tables; tests/test_aliases.py checks each row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from alignkit.config import ConfigError

# Base learning rates that the managed APIs' ``learningRateMultiplier`` multiplies (no public base
# rate exists for their own models; these are alignkit's defaults for LoRA and for full weights).
BASE_LEARNING_RATE = {"lora": 1e-4, "full": 1e-5}

ONLINE = ("grpo", "ppo")
OFFLINE = ("sft", "rm", "dpo", "kto")
_ADAPTER_SIZES = {"ONE": 1, "TWO": 2, "FOUR": 4, "EIGHT": 8, "SIXTEEN": 16, "THIRTY_TWO": 32}


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConfigError(f"'{name}' must be true or false, got {value!r}")


def _precision(value: Any) -> dict[str, Any]:
    return {"training.precision": "bf16" if _as_bool("bf16", value) else "fp32"}


def _fp16(value: Any) -> dict[str, Any]:
    if _as_bool("fp16", value):
        raise ConfigError("'fp16: true': alignkit trains in bf16 or fp32 (fp16 needs loss scaling); "
                          "use 'bf16: true' (training.precision: bf16)")
    return {}


_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}


def _scheduler(value: Any) -> dict[str, Any]:
    name = str(value).strip().lower()
    if name not in _SCHEDULERS:
        raise ConfigError(f"lr_scheduler_type '{value}' has no alignkit equivalent; training.lr_scheduler is "
                          "linear, cosine or constant (warm-up: training.warmup_steps / warmup_ratio)")
    return {"training.lr_scheduler": _SCHEDULERS[name]}


def _adapter_size(value: Any) -> dict[str, Any]:
    """Vertex's ``ADAPTER_SIZE_FOUR`` (or 4) -> ``lora.rank: 4``, LoRA switched on."""
    if isinstance(value, str) and not value.strip().isdigit():
        key = value.strip().upper().removeprefix("ADAPTER_SIZE_")
        if key not in _ADAPTER_SIZES:
            raise ConfigError(f"adapterSize '{value}': expected ADAPTER_SIZE_ONE, _TWO, _FOUR, _EIGHT, _SIXTEEN, "
                              "_THIRTY_TWO or a number")
        value = _ADAPTER_SIZES[key]
    return {"lora.rank": int(value)}


def _use_vllm(value: Any) -> dict[str, Any]:
    return {"rollout_backend": "vllm" if _as_bool("use_vllm", value) else "hf"}


def _use_peft(value: Any) -> dict[str, Any]:
    return {"lora.enabled": True} if _as_bool("use_peft", value) else {}


def _reward_funcs(value: Any, raw: dict) -> dict[str, Any]:
    """TRL's ``reward_funcs`` (names or import paths) and ``reward_weights`` -> ``rewards``."""
    names = [value] if isinstance(value, str) else list(value or [])
    weights = raw.pop("reward_weights", None)
    if weights is not None and len(weights) != len(names):
        raise ConfigError(f"reward_weights has {len(weights)} values for {len(names)} reward_funcs")
    terms = [{"name": str(name), "weight": float(weights[i]) if weights is not None else 1.0}
             for i, name in enumerate(names)]
    return {"rewards": terms}


# TRL's GRPO loss_type -> alignkit's aggregation and reward scaling
GRPO_LOSS_TYPES = {
    "grpo": {"loss_aggregation": "sequence", "scale_rewards": True},
    "dapo": {"loss_aggregation": "token", "scale_rewards": True},
    "dr_grpo": {"loss_aggregation": "token", "scale_rewards": False},
}


def _grpo_loss_type(value: Any) -> dict[str, Any]:
    name = str(value).strip().lower()
    if name not in GRPO_LOSS_TYPES:
        raise ConfigError(f"grpo: loss_type '{value}' (TRL) has no alignkit equivalent; known: "
                          f"{', '.join(GRPO_LOSS_TYPES)} (or set loss_aggregation and scale_rewards)")
    return dict(GRPO_LOSS_TYPES[name])


def _scale_rewards(value: Any) -> dict[str, Any]:
    """TRL's ``scale_rewards: group | batch | none`` (or a bool) -> alignkit's bool."""
    if isinstance(value, bool):
        return {"scale_rewards": value}
    name = str(value).strip().lower()
    if name in ("group", "true"):
        return {"scale_rewards": True}
    if name in ("none", "false"):
        return {"scale_rewards": False}
    raise ConfigError(f"scale_rewards '{value}': alignkit scales by the group's std (true / group) or not at all "
                      "(false / none); batch-level scaling is not supported")


def _columns_text(value: Any) -> dict[str, Any]:
    return {"data.columns.text": str(value)}


@dataclass(frozen=True)
class Alias:
    """``name`` (as the tool ``origin`` writes it, at the top level or inside ``sections``) means
    ``target`` in ``methods`` (None: every method); ``convert`` maps the value to ``{dotted key: value}``."""

    name: str
    target: str
    origin: str
    methods: tuple[str, ...] | None = None
    convert: Callable[..., dict[str, Any]] | None = None
    sections: tuple[str, ...] = ()
    note: str = ""


ALIASES: tuple[Alias, ...] = (
    # TRL TrainingArguments / configs
    Alias("num_train_epochs", "training.epochs", "TRL", sections=("training",)),
    Alias("per_device_train_batch_size", "training.batch_size", "TRL", sections=("training",)),
    Alias("lr_scheduler_type", "training.lr_scheduler", "TRL", convert=_scheduler, sections=("training",)),
    Alias("bf16", "training.precision", "TRL", convert=_precision, sections=("training",)),
    Alias("fp16", "training.precision", "TRL", convert=_fp16, sections=("training",)),
    Alias("max_seq_length", "data.max_length", "TRL (before 0.20)", sections=("data",)),
    Alias("max_length", "data.max_length", "TRL"),
    Alias("max_prompt_length", "data.max_prompt_length", "TRL"),
    Alias("dataset_text_field", "data.columns.text", "TRL", methods=("sft",), convert=_columns_text,
          sections=("data",)),
    Alias("assistant_only_loss", "completion_only_loss", "TRL", methods=("sft",)),
    Alias("model_name_or_path", "model.name_or_path", "TRL / LLaMA-Factory", sections=("model",)),
    Alias("torch_dtype", "model.dtype", "transformers", sections=("model",)),
    Alias("chat_template", "model.chat_template", "alignkit (top level)"),
    Alias("chat_template_path", "model.chat_template", "TRL", sections=("model",)),
    Alias("use_peft", "lora.enabled", "TRL", convert=_use_peft, sections=("model",)),
    Alias("lora_r", "lora.rank", "TRL / PEFT", sections=("model", "lora")),
    Alias("r", "lora.rank", "PEFT", sections=("lora",)),
    Alias("lora_alpha", "lora.alpha", "TRL / PEFT", sections=("model", "lora")),
    Alias("lora_dropout", "lora.dropout", "TRL / PEFT", sections=("model", "lora")),
    Alias("lora_target_modules", "lora.target_modules", "TRL", sections=("model", "lora")),
    Alias("reward_funcs", "rewards", "TRL", methods=ONLINE, convert=_reward_funcs),
    Alias("use_vllm", "rollout_backend", "TRL", methods=ONLINE, convert=_use_vllm),
    Alias("num_ppo_epochs", "ppo_epochs", "TRL", methods=("ppo",)),
    Alias("loss_type", "loss_aggregation, scale_rewards", "TRL", methods=("grpo",), convert=_grpo_loss_type,
          note="dr_grpo divides by the step's token count, not by a constant (the same up to one factor per step)"),
    Alias("scale_rewards", "scale_rewards", "TRL", methods=("grpo",), convert=_scale_rewards),
    Alias("steps_per_generation", "num_iterations", "TRL", methods=("grpo",)),
    Alias("precompute_ref_log_probs", "precompute_reference_logprobs", "TRL", methods=("dpo", "kto")),
    Alias("ref_model", "reference_model", "TRL", methods=("dpo", "kto")),
    # managed fine-tuning APIs (Vertex AI tuning jobs, managed RFT), for every method they apply to
    Alias("epochCount", "training.epochs", "Vertex AI"),
    Alias("adapterSize", "lora.rank", "Vertex AI", convert=_adapter_size),
    Alias("batchSize", "training.batch_size", "Vertex AI", methods=OFFLINE),
    Alias("batchSize", "prompts_per_step", "managed RFT", methods=ONLINE),
    Alias("learningRate", "training.learning_rate", "Vertex AI"),
)

# Names with no one-to-one meaning here: the error says what to write instead.
HINTS: dict[str, str] = {
    # LLaMA-Factory
    "stage": "LLaMA-Factory's 'stage' is alignkit's method: write 'method: sft' (or rm, dpo, kto, ppo; "
             "stage pt: SFT on {\"text\": ...} rows)",
    "finetuning_type": "LLaMA-Factory's 'finetuning_type': for lora add a 'lora:' section (lora: {rank: 16}); "
                       "for full leave 'lora:' out; freeze: use lora with lora.layers",
    "cutoff_len": "LLaMA-Factory's 'cutoff_len' is data.max_length",
    "template": "LLaMA-Factory's 'template' is model.chat_template (chatml, llama3, gemma, zephyr, or a .jinja "
                "file); models with their own template need none",
    "dataset": "name the file itself: data.train: path/to/train.jsonl (alignkit reads it directly; no "
               "dataset_info.json)",
    "dataset_dir": "name the file itself: data.train: path/to/train.jsonl",
    "lora_rank": "LLaMA-Factory's 'lora_rank' is lora.rank (in a 'lora:' section)",
    "lora_target": "LLaMA-Factory's 'lora_target' is lora.target_modules ('all' is 'all-linear')",
    "pref_beta": "LLaMA-Factory's 'pref_beta' is beta",
    "pref_loss": "LLaMA-Factory's 'pref_loss' is loss_type (sigmoid, ipo, hinge, robust, simpo, orpo)",
    "val_size": "LLaMA-Factory's 'val_size' is data.validation_fraction",
    # Axolotl
    "base_model": "Axolotl's 'base_model' is model.name_or_path",
    "datasets": "Axolotl's 'datasets': data.train takes a file or a list of {path, weight}",
    "sequence_len": "Axolotl's 'sequence_len' is data.max_length",
    "micro_batch_size": "Axolotl's 'micro_batch_size' is training.batch_size",
    "num_epochs": "Axolotl's 'num_epochs' is training.epochs",
    "adapter": "Axolotl's 'adapter: lora' is a 'lora:' section (lora: {rank: 16}); model.adapter is a saved "
               "adapter folder to start from",
    "sample_packing": "Axolotl's 'sample_packing' is packing (SFT)",
    # TRL / transformers names that have no alignkit key
    "eval_strategy": "alignkit evaluates every training.eval_steps steps (and at the end)",
    "evaluation_strategy": "alignkit evaluates every training.eval_steps steps (and at the end)",
    "save_strategy": "alignkit checkpoints every training.save_steps steps",
    "report_to": "it is training.report_to (tensorboard, wandb, trackio, mlflow, none); metrics.jsonl is always "
                 "written",
    "dataset_name": "data.train: hf://owner/name (with the 'data' extra) or a local file",
    "vllm_mode": "rollout_backend: vllm runs vLLM in the training process (no server mode)",
    "attn_implementation": "alignkit uses the model's default attention implementation",
    "reward_weights": "TRL's 'reward_weights' goes with reward_funcs; in alignkit: rewards: [{name, weight}]",
}


def _set(raw: dict, dotted: str, value: Any, alias: str) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"'{alias}' maps to '{dotted}' but '{part}' is not a section")
        node = child
    if parts[-1] in node and node[parts[-1]] != value:
        raise ConfigError(f"'{alias}' ({value!r}) and '{dotted}' ({node[parts[-1]]!r}) disagree; give one")
    node[parts[-1]] = value


def _learning_rate_multiplier(raw: dict, method: str) -> str | None:
    """``learningRateMultiplier: m`` -> ``training.learning_rate = m x base`` (base by LoRA or full)."""
    if "learningRateMultiplier" not in raw:
        return None
    multiplier = raw.pop("learningRateMultiplier")
    try:
        multiplier = float(multiplier)
    except (TypeError, ValueError):
        raise ConfigError(f"learningRateMultiplier must be a number, got {multiplier!r}") from None
    if not multiplier > 0:
        raise ConfigError(f"learningRateMultiplier must be > 0, got {multiplier}")
    lora = raw.get("lora")
    uses_lora = isinstance(lora, dict) and lora.get("enabled", True)
    base = BASE_LEARNING_RATE["lora" if uses_lora else "full"]
    rate = multiplier * base
    training = raw.setdefault("training", {}) or {}
    raw["training"] = training
    if "learning_rate" in training and not math.isclose(float(training["learning_rate"]), rate):
        raise ConfigError(f"learningRateMultiplier ({multiplier} x {base:g} = {rate:g}) and "
                          f"training.learning_rate ({training['learning_rate']}) disagree; give one")
    training["learning_rate"] = rate
    return f"learningRateMultiplier {multiplier:g} -> training.learning_rate {rate:g} ({base:g} x multiplier, " \
           f"{'LoRA' if uses_lora else 'full weights'})"


def translate_keys(raw: dict, method: str) -> tuple[dict, list[str]]:
    """``raw`` with every alias (`ALIASES`) moved to its alignkit key for ``method``; returns the new
    mapping and one note per translation. Unknown keys are left for validation to report (with
    `hint_for`)."""
    raw = {key: (dict(value) if isinstance(value, dict) else value) for key, value in raw.items()}
    notes: list[str] = []
    for alias in ALIASES:
        if alias.methods is not None and method not in alias.methods:
            continue
        for section in ("", *alias.sections):
            node = raw if not section else raw.get(section)
            if not isinstance(node, dict) or alias.name not in node:
                continue
            if section and alias.target == f"{section}.{alias.name}":
                continue  # already alignkit's own key
            value = node.pop(alias.name)
            where = f"{section}.{alias.name}" if section else alias.name
            if alias.convert is None:
                updates = {alias.target: value}
            elif alias.convert is _reward_funcs:
                updates = _reward_funcs(value, node)
            else:
                updates = alias.convert(value)
            for dotted, converted in updates.items():
                _set(raw, dotted, converted, where)  # a lora.* key creates the lora section: LoRA on
            shown = ", ".join(f"{k}: {v!r}" for k, v in updates.items()) or "(no effect)"
            notes.append(f"{alias.origin} key '{where}: {value!r}' read as {shown}"
                         + (f" ({alias.note})" if alias.note else ""))
    note = _learning_rate_multiplier(raw, method)
    if note:
        notes.append(note)
    return raw, notes


def hint_for(location: tuple, job_class) -> str | None:
    """What to write instead of the unknown key at ``location`` (a pydantic error location): a
    `HINTS` entry, or the section where alignkit has a key of that name."""
    name = str(location[-1])
    if name in HINTS:
        return HINTS[name]
    places = []
    for section, field in job_class.model_fields.items():
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and hasattr(c, "model_fields")), None)
        if model is not None and name in model.model_fields:
            places.append(f"{section}.{name}")
    if name in job_class.model_fields and len(location) > 1:
        places.append(name)
    here = ".".join(str(part) for part in location)
    places = [place for place in places if place != here]
    if places:
        return "did you mean " + " or ".join(f"'{place}'" for place in places) + "?"
    return None
