"""`alignkit serve`: many LoRA adapters on one base model behind an OpenAI-compatible HTTP API.

    alignkit serve --model smollm2-135m-instruct --adapter support=runs/sft/final --adapter legal=runs/dpo/final

* `app` — the routes (FastAPI): ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``,
  ``/v1/score``, ``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``, ``/health``, ``/stats``;
* `engine` — the batching scheduler: one worker thread decodes every request in one batch, rows of
  different adapters in the same forward pass (PEFT mixed-adapter batches);
* `adapters` — the adapter registry (names, base checks, allowed paths, loading and unloading);
* `protocol` — request bodies and the reply-text helpers; `server` — building and running it;
* `vllm` — ``--backend vllm``: the command line that starts vLLM's own OpenAI server instead;
* `client` — `remote_reward_model`, a reward function that scores through ``/v1/score``.

See docs/serving.md.

The names below are imported when first used, so the scheduler and the engines
(`alignkit.serve.engine`, `alignkit.serve.static_engine`) import without FastAPI (the GPU suite
drives them directly on machines that have no web stack).
"""
import importlib

__all__ = ["BackgroundServer", "build_state", "run_server"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("alignkit.serve.server"), name)
    raise AttributeError(f"module 'alignkit.serve' has no attribute {name!r}")
