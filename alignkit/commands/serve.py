"""`alignkit serve`: many LoRA adapters on one base model behind an OpenAI-compatible HTTP API.

    alignkit serve --model smollm2-135m-instruct --adapter support=runs/sft/final --adapter legal=runs/dpo/final
    alignkit serve --model runs/sft/final                          (its base, with the adapter as "sft")
    alignkit serve --reward-model rm=runs/rm/final ...              (POST /v1/score)
    alignkit serve --backend vllm --model ... --adapter ...         (vLLM's own server, GPU)

Clients talk to it as to OpenAI or vLLM: base_url http://127.0.0.1:8000/v1, ``model`` = the base's
served name or an adapter's name. Requests for different adapters share one forward pass; the
batching policy is --max-batch (rows decoded together) and --max-wait-ms (how long the first
request of an idle server waits for others). See docs/serving.md.
"""
from __future__ import annotations

import argparse
import os
import sys

from alignkit.errors import UsageError

API_KEY_ENV = "ALIGNKIT_API_KEY"


def register(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="serve a model and its LoRA adapters over an OpenAI-compatible API",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "-m", default="smollm2-135m-instruct",
                        help="the base model: embedded name, local folder, .gguf, hub id, or a run's adapter folder")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="a LoRA adapter of the base, served as model NAME (repeatable)")
    parser.add_argument("--reward-model", action="append", default=[], metavar="NAME=PATH",
                        help="a reward model run (`alignkit rm`) served at /v1/score as NAME (repeatable)")
    parser.add_argument("--served-model-name", help="the base model's name in requests (default: --model as given)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} if set)")
    parser.add_argument("--lora-root", help="allow /v1/load_lora_adapter, reading adapters only from under this folder "
                                            "(default: run-time loading off)")
    parser.add_argument("--allow-other-base", action="store_true",
                        help="load adapters whose adapter_config names another base (same weights, other name)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when present)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    policy = parser.add_argument_group("batching policy")
    policy.add_argument("--max-batch", type=int, default=32, help="rows (choices) decoded together (default 32)")
    policy.add_argument("--max-wait-ms", type=float, default=10.0,
                        help="how long the first request of an idle server waits for others to batch with (default 10)")
    policy.add_argument("--max-queue", type=int, default=256,
                        help="rows waiting beyond the running batch; more are refused with 429 (default 256)")
    policy.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds a request may take, queue included; then 408 and its slot is freed (default 600)")
    policy.add_argument("--max-model-len", type=int, help="context length limit (default: the model's)")
    policy.add_argument("--default-max-tokens", type=int, default=512,
                        help="max_tokens of a chat request that gives none (default 512, within the context)")
    policy.add_argument("--adapter-mode", choices=["mixed", "swap", "swap-per-request"], default="mixed",
                        help="mixed: adapters share every forward (default); swap: merge one adapter at a time and "
                             "batch its requests; swap-per-request: merge, run one request, unmerge (the "
                             "benchmark's comparison points)")
    policy.add_argument("--engine", choices=["auto", "dynamic", "static"], default="auto",
                        help="decoding engine: static (pre-allocated key/value cache, CUDA-graph decode steps), "
                             "dynamic (transformers' forward with a growing cache); auto: static on CUDA when the "
                             "model supports it, else dynamic")
    parser.add_argument("--backend", choices=["alignkit", "vllm"], default="alignkit",
                        help="alignkit: this server (CPU or GPU); vllm: start vLLM's OpenAI server instead (GPU)")
    parser.add_argument("--print-command", action="store_true", help="with --backend vllm: print the command and exit")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.set_defaults(handler=run)


def run(args) -> int:
    import importlib.util

    if args.backend == "alignkit" and not all(importlib.util.find_spec(name) for name in ("fastapi", "uvicorn")):
        raise UsageError("alignkit serve needs fastapi and uvicorn: pip install 'alignkit[serve]'")
    from alignkit.serve.server import build_state, parse_named_paths, run_server

    adapters = parse_named_paths(args.adapter, "--adapter")
    rewards = parse_named_paths(args.reward_model, "--reward-model")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"[alignkit] warning: serving on {args.host} without --api-key: anyone who can reach this address "
              "can use the model", file=sys.stderr)
    if args.backend == "vllm":
        from alignkit.serve.vllm import launch, vllm_command

        if rewards:
            raise UsageError("--reward-model is served by the built-in backend only (vLLM has no /v1/score for "
                             "alignkit reward models); drop --backend vllm or start a second server for it")
        argv, environment = vllm_command(args.model, adapters, args.host, args.port, args.served_model_name, api_key,
                                         args.lora_root, args.max_model_len, args.dtype)
        shown = " ".join(argv).replace(api_key, "***") if api_key else " ".join(argv)
        prefix = " ".join(f"{k}={v}" for k, v in environment.items())
        print(f"{prefix} {shown}".strip())
        return 0 if args.print_command else launch(argv, environment)
    state = build_state(args.model, adapters, rewards, args.served_model_name, args.device, args.dtype,
                        args.max_batch, args.max_wait_ms, args.max_queue, args.max_model_len, args.default_max_tokens,
                        args.request_timeout, api_key, args.lora_root, args.allow_other_base, args.adapter_mode,
                        engine=args.engine)
    names = ", ".join(state.registry.model_names() + list(state.reward_models))
    print(f"[alignkit] serving {names} at http://{args.host}:{args.port}/v1 (max batch {args.max_batch}, "
          f"max wait {args.max_wait_ms:g} ms, {state.scheduler.engine} engine{', API key required' if api_key else ''}"
          f"{', run-time adapters from ' + state.lora_root if state.lora_root else ''})", file=sys.stderr)
    run_server(state, args.host, args.port, args.log_level)
    return 0
