"""Job configuration: one validated pydantic model per method, read from YAML, overridable.

A job file looks like::

    method: sft
    model: {name_or_path: smollm2-135m-instruct}
    lora: {rank: 16}
    data: {train: examples/data/support_train.jsonl, max_length: 512}
    training: {learning_rate: 2.0e-4, max_steps: 60, output_dir: runs/sft}

Unknown keys fail with the key's dotted path and the closest valid key; ``--set a.b=value``
overrides any key (the value is parsed as YAML, so ``--set training.max_steps=10`` is an int).
Each method's job class (registered with `alignkit.methods.register_method`) adds its own keys;
managed fine-tuning names (``samplesPerPrompt`` ...) are mapped to ours through each job's ``ALIASES``
before validation. Loading a job by method name is `alignkit.methods.load_job`.
A key written twice in one mapping is an error naming both lines (YAML alone keeps the last);
NaN and infinite numbers are refused in every float field. Values of keys named like secrets
(``api_key``, ``token``, ``secret``, ``password``) are never written out: `job_to_yaml` shows them as
``<redacted>``.
"""
from __future__ import annotations

import difflib
import re
import string
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from alignkit.errors import UserError


class ConfigError(UserError, ValueError):
    """A job configuration that cannot be used; the message names the key and the file."""


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(),
                              allow_inf_nan=False)


class ModelConfig(Section):
    name_or_path: str = Field("smollm2-135m-instruct", description="embedded name, local folder or hub id")
    adapter: str | None = Field(None, description="a saved LoRA adapter to start from")
    dtype: str = Field("auto", description="auto | float32 | bfloat16 | float16")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    trust_remote_code: bool = False
    chat_template: str | None = Field(None, description="chatml | llama3 | gemma | zephyr, or a .jinja file; "
                                                        "saved with every output (docs/data.md)")


class LoraConfig(Section):
    enabled: bool = True
    rank: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    layers: int | list[int] | None = Field(None, description="adapt only these decoder layers; an int N = the last N")
    merge_on_save: bool = Field(False, description="also write the adapter merged into a full model")


class TrainFile(Section):
    """One file of a training mix: ``data.train: [{path: a.jsonl, weight: 2}, b.jsonl]``."""

    path: str = Field(description="file (jsonl/json/csv/parquet) or hf://name")
    weight: float = Field(1.0, gt=0, description="share of the mix, relative to the other files' weights")
    columns: dict[str, str] | None = Field(None, description="this file's column names (default: data.columns)")
    format: str | None = Field(None, description="this file's row shape (default: data.format)")
    system_prompt: str | None = None
    limit: int | None = Field(None, gt=0, description="read at most this many rows of this file")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value


class DataConfig(Section):
    train: str | list[TrainFile] | None = Field(
        None, description="file (jsonl/json/csv/parquet) or hf://name, or a list of files with weights (a mix)")
    validation: str | None = Field(None, description="file for validation; else a split of train")
    validation_fraction: float = Field(0.1, ge=0, lt=1)
    format: str = Field("auto", description="row shape; auto-detected from the keys by default")
    columns: dict[str, str] = Field(default_factory=dict, description="our field name -> file column")
    system_prompt: str | None = None
    on_error: Literal["fail", "skip"] = "fail"
    desirable_only: bool = Field(False, description="SFT on feedback rows (prompt/completion/label): keep the "
                                                    "label-true rows, drop (and count) the label-false ones")
    max_length: int = Field(1024, gt=8)
    max_prompt_length: int | None = None
    deduplicate: Literal["none", "exact", "normalized"] = "none"
    limit: int | None = Field(None, gt=0, description="read at most this many rows")
    seed: int = 0


OUTPUT_DIR_PLACEHOLDERS = ("method", "time")


class TrainingConfig(Section):
    output_dir: str = "runs/{method}"
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="overrides epochs when set")
    batch_size: int = Field(8, gt=0, description="rows per micro-batch")
    gradient_accumulation_steps: int = Field(1, gt=0)
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    max_grad_norm: float | None = 1.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="recompute layers in backward; auto: on when a micro-batch's activations would "
        "exceed 1 GiB (alignkit/memory.py)")
    release_memory: bool = Field(True, description="CPU on Linux: return freed activations to the system "
                                                   "at once (lower peak resident memory)")
    eval_steps: int | None = Field(None, gt=0, description="evaluate every N steps (and at the end)")
    eval_at_start: bool = True
    save_steps: int | None = Field(None, gt=0, description="checkpoint every N steps")
    save_total_limit: int = Field(2, gt=0)
    logging_steps: int = Field(1, gt=0)
    early_stopping_metric: str | None = Field(None, description="e.g. eval/loss")
    early_stopping_patience: int = Field(3, gt=0)
    greater_is_better: bool | None = None
    seed: int = 42
    resume: bool | str = Field(False, description="true: last checkpoint in output_dir; or a checkpoint path")
    overwrite: bool = Field(False, description="delete a previous run in output_dir and start afresh")
    force_resume: bool = Field(False, description="resume even when the job differs from the checkpoint's")
    tensorboard: bool = True
    report_to: list[str] = Field(default_factory=lambda: ["tensorboard"],
                                 description="tensorboard, wandb, trackio, mlflow; all; none (alignkit.trackers)")
    progress: bool = True

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to(cls, value: Any) -> list[str]:
        from alignkit.trackers import normalize_report_to

        return normalize_report_to(value)

    @field_validator("output_dir")
    @classmethod
    def _output_dir_placeholders(cls, value: str) -> str:
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        except ValueError as error:
            raise ValueError(f"{error} (write a literal brace as {{{{ or }}}})") from None
        unknown = sorted(names - set(OUTPUT_DIR_PLACEHOLDERS))
        if unknown:
            raise ValueError(f"unknown placeholder {{{unknown[0]}}}; known: "
                             + ", ".join(f"{{{name}}}" for name in OUTPUT_DIR_PLACEHOLDERS))
        return value


class Job(Section):
    """Fields every method shares. Subclasses add the method's own keys at the top level."""

    METHOD: ClassVar[str] = ""
    ALIASES: ClassVar[dict[str, str]] = {}
    # what the method reads: chat (SFT), preference (pairs), unpaired (KTO), prompt (online methods)
    DATA_KIND: ClassVar[str] = "chat"

    method: str = ""
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    # how the job file was read (other tools' names translated, managed-job settings not supported):
    # printed and written into the run report, not part of the resolved config
    _notes: list[str] = PrivateAttr(default_factory=list)

    @property
    def notes(self) -> list[str]:
        return self._notes

    @model_validator(mode="after")
    def _fill_method(self):
        if not self.method:
            object.__setattr__(self, "method", self.METHOD)
        elif self.METHOD and self.method != self.METHOD:
            raise ValueError(f"method is '{self.method}' but this is a '{self.METHOD}' job")
        return self

    def output_dir(self) -> Path:
        return Path(self.training.output_dir.format(method=self.method, time=time.strftime("%Y%m%d-%H%M%S")))


# ----------------------------------------------------------------------------- parsing helpers

def duplicate_keys(text: str) -> list[tuple[str, int, int]]:
    """``(dotted key, first line, second line)`` for every key written twice in one YAML mapping."""
    found: list[tuple[str, int, int]] = []

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                dotted = f"{prefix}.{key}" if prefix else str(key)
                if key is not None and key != "<<":
                    line = key_node.start_mark.line + 1
                    if key in seen:
                        found.append((dotted, seen[key], line))
                    else:
                        seen[key] = line
                walk(value_node, dotted)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, f"{prefix}.{index}" if prefix else str(index))

    walk(yaml.compose(text, Loader=yaml.SafeLoader), "")
    return found


def load_yaml(path: str | Path) -> Any:
    """A YAML file's content; `ConfigError` naming the file for invalid YAML or a key written twice."""
    path = Path(path)
    text = path.read_text()
    try:
        duplicates = duplicate_keys(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if duplicates:
        key, first, second = duplicates[0]
        raise ConfigError(f"{path}: key '{key}' is written twice (lines {first} and {second}); YAML would silently "
                          "keep the second: merge them into one")
    return data


SECRET_KEY = re.compile(r"(^|[_-])(api[_-]?key|apikey|secret|secret[_-]key|password|passwd|token|"
                        r"access[_-]?token|auth[_-]?token|bearer)$", re.IGNORECASE)
SPECIAL_TOKEN_KEY = re.compile(r"(^|_)(pad|eos|bos|unk|sep|cls|mask)_token$", re.IGNORECASE)
REDACTED = "<redacted>"


def is_secret_key(key: str) -> bool:
    """Keys whose values are credentials (``api_key``, ``hf_token``, ``client_secret``...); not
    ``max_tokens`` or ``api_key_env`` (the *name* of a variable), nor ``pad_token``."""
    return bool(SECRET_KEY.search(str(key))) and not SPECIAL_TOKEN_KEY.search(str(key))


_KEY_VALUE_IN_TEXT = re.compile(r"([A-Za-z0-9_.-]+)(\s*[:=]\s*)((?![\[{])['\"]?[^\s,}\]'\"]+['\"]?)")


def redact_secret_text(text: str) -> str:
    """A command line or other text with the values of secret-named ``key: value`` / ``key=value``
    pairs (as in ``--set "rewards=[{kwargs: {api_key: sk-...}}]"``) replaced by ``<redacted>``."""
    def replace(match: re.Match) -> str:
        key = match.group(1).rsplit(".", 1)[-1]
        return match.group(1) + match.group(2) + REDACTED if is_secret_key(key) else match.group(0)

    return _KEY_VALUE_IN_TEXT.sub(replace, text)


def redact_secrets(value: Any) -> Any:
    """A copy with the value of every secret-named key replaced by ``<redacted>``."""
    if isinstance(value, dict):
        return {k: (REDACTED if is_secret_key(k) and v not in (None, "") else redact_secrets(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact_secrets(v) for v in value]
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], parsed value). The value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.subkey=value")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides or []:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return raw


def apply_aliases(raw: dict, aliases: dict[str, str]) -> dict:
    """Move alias keys (anywhere at top level) to their dotted canonical place.

    An alias and its canonical key given with different values is an error, not a silent choice.
    """
    for alias, target in aliases.items():
        if alias not in raw:
            continue
        value = raw.pop(alias)
        path = target.split(".")
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"'{alias}' maps to '{target}' but '{part}' is not a section")
        if path[-1] in node and not _same_value(node[path[-1]], value):
            raise ConfigError(f"'{alias}' ({value!r}) and '{target}' ({node[path[-1]]!r}) disagree; give one")
        node.setdefault(path[-1], value)
    return raw


def _same_value(a: Any, b: Any) -> bool:
    """Equal, with text compared without case or surrounding spaces (names like thinking levels)."""
    if isinstance(a, str) and isinstance(b, str):
        return a.strip().casefold() == b.strip().casefold()
    return a == b


def _fields_at(model_cls: type[BaseModel], loc: tuple) -> list[str]:
    """Valid field names of the section that `loc` (a pydantic error location) points into."""
    cls: Any = model_cls
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        cls = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if cls is None:
            return []
    return list(getattr(cls, "model_fields", {}))


def format_validation_error(error: ValidationError, model_cls: type[BaseModel], source: str,
                            hint_for: Callable[[tuple], str | None] | None = None) -> str:
    """One line per problem; an unknown key gets ``hint_for(location)`` (other tools' names, a key in
    another section: `alignkit.aliases.hint_for`) or else the closest valid key."""
    lines = [f"{source}: invalid configuration"]
    for item in error.errors():
        loc = tuple(item.get("loc", ()))
        dotted = ".".join(str(p) for p in loc)
        if item.get("type") == "extra_forbidden":
            valid = _fields_at(model_cls, loc)
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f"; did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?" if close else ""
            special = hint_for(loc) if hint_for is not None else None
            if special:
                hint = f"; {special}"
            lines.append(f"  unknown key '{dotted}'{hint} (valid here: {', '.join(valid)})")
        else:
            message = str(item.get("msg", "")).removeprefix("Value error, ")
            if not loc:  # a check of the whole job (e.g. two keys that disagree): its input is everything
                lines.append(f"  {message}")
                continue
            shown = repr(redact_secrets(item.get("input")))
            shown = shown if len(shown) <= 120 else shown[:117] + "..."
            lines.append(f"  {dotted}: {message} (got {shown})")
    return "\n".join(lines)


def read_job_file(path: str | Path | None) -> tuple[dict, str]:
    """``(raw mapping, source name)`` of a YAML job file; no file: an empty mapping."""
    if path is None:
        return {}, "<command line>"
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    raw = load_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    return raw, str(path)


def job_config(job: Job) -> dict:
    """The resolved job as plain data, secrets redacted: what a run folder's ``config.yaml`` holds."""
    return redact_secrets(job.model_dump(mode="json"))


def job_to_yaml(job: Job) -> str:
    return yaml.safe_dump(job_config(job), sort_keys=False)
