"""Job files written for managed fine-tuning APIs, accepted as they are.

    alignkit train openai_job.json        # an OpenAI fine-tuning job (supervised, dpo, reinforcement)
    alignkit train vertex_job.json        # a Vertex AI tuning job body (supervised, preference)

`translate_managed_job` turns such a body into an alignkit job mapping before validation, and returns
one note per decision: every setting that has no alignkit counterpart is named (and ignored), a hosted
base model is replaced by the default local one (say which with ``--set model.name_or_path=...``),
a file id or a ``gs://`` URI is refused with the flag that gives the local file. docs/training.md
has both mapping tables. OpenAI's graders become reward terms (`alignkit.rewards.graders`).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from alignkit.config import ConfigError

OPENAI_METHODS = {"supervised": "sft", "dpo": "dpo", "reinforcement": "grpo"}
VERTEX_SPECS = {"supervisedTuningSpec": "sft", "preferenceOptimizationSpec": "dpo"}
_HOSTED = re.compile(r"^(gpt-|o\d|ft:|davinci|babbage|chatgpt|gemini|text-bison|chat-bison|publishers/|projects/)"
                     r"|@", re.IGNORECASE)
_EFFORT = {"low": "low", "medium": "medium", "high": "high", "minimal": "minimal", "none": "none"}


def is_openai_job(raw: dict) -> bool:
    return "training_file" in raw or (isinstance(raw.get("method"), dict) and "type" in raw["method"])


def is_vertex_job(raw: dict) -> bool:
    return any(key in raw for key in (*VERTEX_SPECS, "baseModel", "tunedModelDisplayName", "distillationSpec",
                                      "reinforcementTuningSpec"))


def _model(name: Any, notes: list[str], api: str) -> dict:
    if not isinstance(name, str) or not name.strip():
        return {}
    if Path(name).expanduser().exists() or not _HOSTED.search(name):
        return {"name_or_path": name}
    notes.append(f"{api} base model '{name}' is hosted and cannot be trained locally: model.name_or_path "
                 "decides (default: the embedded model; --set model.name_or_path=... to choose)")
    return {}


def _local_file(value: Any, key: str, api: str) -> str:
    text = str(value)
    if text.startswith("gs://"):
        raise ConfigError(f"{key} '{text}' is a Cloud Storage URI; copy the file here and give its path "
                          "(--set data.train=FILE)")
    if re.fullmatch(r"file-[A-Za-z0-9]+", text) and not Path(text).exists():
        raise ConfigError(f"{key} '{text}' is an {api} file id; give the local JSONL file instead "
                          f"(--set data.{'validation' if 'validation' in key else 'train'}=FILE)")
    return text


def _unsupported(body: dict, keys: dict[str, str], notes: list[str], where: str) -> None:
    for key, why in keys.items():
        if key in body and body[key] not in (None, {}, [], ""):
            notes.append(f"{where}.{key} is not supported and was ignored: {why}")


def _auto(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() == "auto")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


# ----------------------------------------------------------------------------------------------- OpenAI
def translate_openai_job(body: dict, source: str) -> tuple[str, dict, list[str]]:
    notes: list[str] = []
    method_spec = body.get("method") or {"type": "supervised",
                                         "supervised": {"hyperparameters": body.get("hyperparameters") or {}}}
    kind = str(method_spec.get("type", "")).strip().lower()
    if kind not in OPENAI_METHODS:
        raise ConfigError(f"{source}: OpenAI method type '{kind}' is not supported; known: "
                          f"{', '.join(OPENAI_METHODS)}")
    method = OPENAI_METHODS[kind]
    settings = method_spec.get(kind) or {}
    hyper = dict(settings.get("hyperparameters") or {})
    if kind == "supervised" and body.get("hyperparameters") and "method" in body:
        hyper = {**body["hyperparameters"], **hyper}
    raw: dict[str, Any] = {"method": method}
    model = _model(body.get("model"), notes, "OpenAI")
    if model:
        raw["model"] = model
    if "training_file" not in body:
        raise ConfigError(f"{source}: an OpenAI fine-tuning job needs training_file")
    raw["data"] = {"train": _local_file(body["training_file"], "training_file", "OpenAI")}
    if body.get("validation_file"):
        raw["data"]["validation"] = _local_file(body["validation_file"], "validation_file", "OpenAI")
    training: dict[str, Any] = {}
    if body.get("suffix"):
        training["output_dir"] = f"runs/{_slug(str(body['suffix']))}"
    if body.get("seed") is not None:
        training["seed"] = int(body["seed"])
    if not _auto(hyper.get("n_epochs")):
        training["epochs"] = hyper.pop("n_epochs")
    hyper.pop("n_epochs", None)
    batch = hyper.pop("batch_size", None)
    if not _auto(batch):
        if method == "grpo":
            raw["prompts_per_step"] = batch
        else:
            training["batch_size"] = batch
    multiplier = hyper.pop("learning_rate_multiplier", None)
    if not _auto(multiplier):
        raw["learningRateMultiplier"] = multiplier
    if method == "dpo":
        beta = hyper.pop("beta", None)
        if not _auto(beta):
            raw["beta"] = beta
    if method == "grpo":
        interval = hyper.pop("eval_interval", None)
        if not _auto(interval):
            training["eval_steps"] = interval
        effort = hyper.pop("reasoning_effort", None)
        if not _auto(effort):
            if str(effort).lower() not in _EFFORT:
                raise ConfigError(f"{source}: reasoning_effort '{effort}' is not one of {', '.join(_EFFORT)}")
            raw["thinking_level"] = _EFFORT[str(effort).lower()]
        samples = hyper.pop("eval_samples", None)
        if not _auto(samples):
            notes.append(f"eval_samples {samples}: alignkit answers each held-out prompt once (greedy) at "
                         "evaluation; use 'alignkit eval --samples N' for sampled accuracy")
        if "grader" not in settings:
            raise ConfigError(f"{source}: a reinforcement job needs method.reinforcement.grader")
        raw["rewards"] = grader_terms(settings["grader"], source)
        _unsupported(settings, {"response_format": "structured outputs are not enforced while sampling; add a "
                                                   "valid_json reward to score them"}, notes,
                     "method.reinforcement")
    for key, value in hyper.items():
        if not _auto(value):
            notes.append(f"method.{kind}.hyperparameters.{key} is not supported and was ignored"
                         + (": there is no compute multiplier" if key == "compute_multiplier" else ""))
    if training:
        raw["training"] = training
    _unsupported(body, {"integrations": "use TensorBoard (training.tensorboard) or metrics.jsonl",
                        "metadata": "kept only in the job file"}, notes, "job")
    return method, raw, notes


_CALCULATION = re.compile(r"^[\w\s.+*()-]+$")


def _linear_terms(expression: str, names: set[str], source: str) -> dict[str, float]:
    """``"0.7 * a + 0.3 * b"`` -> ``{"a": 0.7, "b": 0.3}``; anything but a weighted sum is refused."""
    try:
        tree = ast.parse(expression, mode="eval").body
    except SyntaxError:
        tree = None

    def walk(node, sign: float) -> dict[str, float]:
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
            left = walk(node.left, sign)
            right = walk(node.right, -sign if isinstance(node.op, ast.Sub) else sign)
            return {k: left.get(k, 0.0) + right.get(k, 0.0) for k in {*left, *right}}
        if isinstance(node, ast.Name) and node.id in names:
            return {node.id: sign}
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            for weight, name in ((node.left, node.right), (node.right, node.left)):
                if isinstance(weight, ast.Constant) and isinstance(weight.value, (int, float)) \
                        and isinstance(name, ast.Name) and name.id in names:
                    return {name.id: sign * float(weight.value)}
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant):
            inner = walk(node.left, sign)
            return {k: v / float(node.right.value) for k, v in inner.items()}
        raise ValueError

    try:
        if tree is None or not _CALCULATION.match(expression):
            raise ValueError
        return walk(tree, 1.0)
    except ValueError:
        raise ConfigError(f"{source}: multi grader calculate_output '{expression}' is not a weighted sum of "
                          f"the graders ({', '.join(sorted(names))}); alignkit combines rewards as a weighted sum "
                          "only") from None


def grader_terms(grader: dict, source: str, weight: float = 1.0) -> list[dict]:
    """An OpenAI grader -> alignkit reward terms (``rewards:`` entries)."""
    if not isinstance(grader, dict) or "type" not in grader:
        raise ConfigError(f"{source}: a grader needs a 'type'")
    kind, name = grader["type"], grader.get("name")
    label = str(name) if name else kind
    if kind == "string_check":
        kwargs = {k: grader[k] for k in ("input", "reference", "operation") if k in grader}
        return [{"name": "openai_string_check", "weight": weight, "kwargs": kwargs, "label": label}]
    if kind == "text_similarity":
        kwargs = {k: grader[k] for k in ("input", "reference", "evaluation_metric") if k in grader}
        return [{"name": "openai_text_similarity", "weight": weight, "kwargs": kwargs, "label": label}]
    if kind == "python":
        return [{"name": "openai_python_grader", "weight": weight, "kwargs": {"source": grader["source"]},
                 "label": label}]
    if kind == "score_model":
        kwargs = {k: grader[k] for k in ("model", "input", "range") if k in grader}
        params = grader.get("sampling_params") or {}
        for key in ("temperature", "max_completions_tokens", "max_tokens"):
            if key in params:
                kwargs["temperature" if key == "temperature" else "max_tokens"] = params[key]
        return [{"name": "openai_score_model", "weight": weight, "kwargs": kwargs, "label": label}]
    if kind == "multi":
        inner = grader.get("graders") or {}
        weights = _linear_terms(str(grader.get("calculate_output", "")), set(inner), source)
        terms = []
        for key, sub in inner.items():
            if weights.get(key):
                terms += grader_terms({"name": key, **sub}, source, weight * weights[key])
        return terms
    raise ConfigError(f"{source}: grader type '{kind}' has no alignkit reward; supported: string_check, "
                      "text_similarity, python, score_model, multi (a weighted sum)")


# ----------------------------------------------------------------------------------------------- Vertex
def translate_vertex_job(body: dict, source: str) -> tuple[str, dict, list[str]]:
    notes: list[str] = []
    specs = [key for key in VERTEX_SPECS if key in body]
    if not specs:
        other = next((k for k in ("distillationSpec", "reinforcementTuningSpec") if k in body), None)
        raise ConfigError(f"{source}: a Vertex tuning job needs supervisedTuningSpec or preferenceOptimizationSpec"
                          + (f"; {other} is not supported" if other else ""))
    if len(specs) > 1:
        raise ConfigError(f"{source}: give one tuning spec, not {', '.join(specs)}")
    spec_key = specs[0]
    method = VERTEX_SPECS[spec_key]
    spec = body[spec_key] or {}
    hyper = dict(spec.get("hyperParameters") or spec.get("hyper_parameters") or {})
    raw: dict[str, Any] = {"method": method}
    model = _model(body.get("baseModel") or body.get("base_model"), notes, "Vertex AI")
    if model:
        raw["model"] = model
    train = spec.get("trainingDatasetUri") or spec.get("training_dataset_uri")
    if not train:
        raise ConfigError(f"{source}: {spec_key}.trainingDatasetUri is missing")
    raw["data"] = {"train": _local_file(train, "trainingDatasetUri", "Vertex AI")}
    validation = spec.get("validationDatasetUri") or spec.get("validation_dataset_uri")
    if validation:
        raw["data"]["validation"] = _local_file(validation, "validationDatasetUri", "Vertex AI")
    mode = str(spec.get("tuningMode", "TUNING_MODE_PEFT_ADAPTER")).upper()
    if mode.endswith("FULL"):
        if "adapterSize" in hyper:
            raise ConfigError(f"{source}: tuningMode {mode} with an adapterSize; give one")
    else:  # Vertex tunes adapters unless told otherwise
        raw["lora"] = {}
    for key in ("epochCount", "learningRateMultiplier", "adapterSize", "batchSize", "learningRate"):
        if key in hyper and not _auto(hyper[key]):
            raw[key] = hyper.pop(key)
        hyper.pop(key, None)
    if method == "dpo" and "beta" in hyper:
        raw["beta"] = hyper.pop("beta")
    for key in hyper:
        notes.append(f"{spec_key}.hyperParameters.{key} is not supported and was ignored")
    name = body.get("tunedModelDisplayName") or body.get("tuned_model_display_name")
    if name:
        raw["training"] = {"output_dir": f"runs/{_slug(str(name))}"}
    _unsupported(spec, {"exportLastCheckpointOnly": "alignkit keeps the last training.save_total_limit "
                                                    "checkpoints and the final model",
                        "evaluationConfig": "run 'alignkit eval' on the final model"}, notes, spec_key)
    _unsupported(body, {"labels": "kept only in the job file", "description": "kept only in the job file",
                        "encryptionSpec": "files are written as they are", "serviceAccount": "runs locally"},
                 notes, "job")
    return method, raw, notes


def translate_managed_job(raw: dict, source: str) -> tuple[dict, str | None, list[str]]:
    """``(alignkit mapping, its method, notes)`` for an OpenAI or Vertex job body; anything else
    passes through unchanged (method None, no notes)."""
    if is_openai_job(raw):
        method, translated, notes = translate_openai_job(raw, source)
        return translated, method, [f"read as an OpenAI fine-tuning job (method {method})"] + notes
    if is_vertex_job(raw):
        method, translated, notes = translate_vertex_job(raw, source)
        return translated, method, [f"read as a Vertex AI tuning job (method {method})"] + notes
    return raw, None, []
