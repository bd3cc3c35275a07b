"""``alignkit serve --backend vllm``: start vLLM's own OpenAI-compatible server on the same base and
adapters (GPU; ``pip install vllm``).

alignkit only builds the command line and hands over to it: the base model's folder (the embedded
model's converted safetensors cache, a local folder or a hub id), ``--enable-lora`` with every
``--adapter`` as ``--lora-modules NAME=PATH``, ``--max-lora-rank`` large enough for the largest
adapter, ``--max-loras`` for the number of adapters, the host, port, served name and API key.
``--lora-root`` turns on vLLM's run-time loading (``VLLM_ALLOW_RUNTIME_LORA_UPDATING``); note that
vLLM itself does not confine run-time paths to that folder, so only use it on a trusted network.
Reward models (``/v1/score``) are served by the built-in backend only.

UNTESTED in this project's CI (no GPU, no vLLM): the command line is checked by the tests
(``--print-command``), the launch itself is not.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from alignkit.errors import UsageError
from alignkit.model import ensure_embedded_model, resolve_model

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)   # the values vLLM's --max-lora-rank accepts


def model_location(model: str) -> str:
    """What vLLM should load for ``model``: a folder or a hub id (GGUF files are passed as they are)."""
    source = resolve_model(model)
    if source.kind == "embedded":
        return str(ensure_embedded_model())
    if source.kind == "adapter":
        raise UsageError(f"--model {model} is an adapter folder; pass its base as --model and the adapter as "
                         f"--adapter NAME={model}")
    return source.location


def adapter_rank(path: str) -> int:
    config = Path(path).expanduser() / "adapter_config.json"
    try:
        return int(json.loads(config.read_text()).get("r") or 8)
    except (OSError, ValueError) as error:
        raise UsageError(f"--adapter {path}: cannot read {config}: {error}") from None


def vllm_command(model: str, adapters: list[tuple[str, str]], host: str, port: int,
                 served_model_name: str | None = None, api_key: str | None = None, lora_root: str | None = None,
                 max_model_len: int | None = None, dtype: str | None = None,
                 extra: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """``(argv, extra environment)`` that start vLLM's OpenAI server for this base and these adapters."""
    executable = shutil.which("vllm")
    argv = [executable, "serve"] if executable else [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                                                     "--model"]
    argv += [model_location(model), "--served-model-name", served_model_name or model,
             "--host", host, "--port", str(port)]
    environment: dict[str, str] = {}
    if adapters or lora_root:
        ranks = [adapter_rank(path) for _, path in adapters] or [16]
        rank = next((value for value in LORA_RANKS if value >= max(ranks)), max(ranks))
        argv += ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(max(1, len(adapters)))]
        if adapters:
            argv += ["--lora-modules", *[f"{name}={Path(path).expanduser().resolve()}" for name, path in adapters]]
    if lora_root:
        environment["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if api_key:
        argv += ["--api-key", api_key]
    if max_model_len:
        argv += ["--max-model-len", str(max_model_len)]
    if dtype:
        argv += ["--dtype", dtype]
    return argv + list(extra or []), environment


def launch(argv: list[str], environment: dict[str, str]) -> int:
    """Run vLLM's server in the foreground until it exits; returns its exit code."""
    if importlib.util.find_spec("vllm") is None:
        raise UsageError("--backend vllm needs the vllm package (pip install 'alignkit[vllm]'; a CUDA GPU is "
                         "required); or serve with the built-in backend (--backend alignkit)")
    process = subprocess.Popen(argv, env={**os.environ, **environment})
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        return process.wait()
