"""The HTTP routes (FastAPI): OpenAI's and vLLM's endpoint names and shapes.

    GET  /health                      200 {"status": "ok", ...} (no key needed)
    GET  /v1/models                   the base, every adapter (parent = the base), reward models
    POST /v1/chat/completions         messages -> reply (stream: server-sent events)
    POST /v1/completions              prompt text or token ids -> continuation
    POST /v1/score                    reward-model scores for (prompt, response) pairs
    POST /v1/load_lora_adapter        {"lora_name", "lora_path"}: add an adapter (when enabled)
    POST /v1/unload_lora_adapter      {"lora_name"}: drop it (waits for its running requests)
    GET  /stats                       the scheduler's counters (forwards, mixed batches, rows)

Errors are OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``: 400 bad parameters,
401 missing or wrong key, 403 run-time loading off or a path outside the allowed root, 404 unknown
model, 408 a request that ran past ``--request-timeout``, 429 queue full, 500 a failed forward.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from alignkit.data import tokenize_prompt
from alignkit.model.heads import score_responses
from alignkit.serve.adapters import AdapterError, AdapterRegistry
from alignkit.serve.engine import (
    BatchScheduler,
    FinishEvent,
    QueueFull,
    Row,
    SamplingOptions,
    TokenEvent,
)
from alignkit.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadAdapterRequest,
    ScoreRequest,
    TextStream,
    UnloadAdapterRequest,
    chat_logprob_entry,
    completion_logprobs,
)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 408: "timeout_error", 409: "conflict_error", 429: "rate_limit_error",
               500: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {
        "message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param, "code": status}})


@dataclass
class RewardModel:
    name: str
    path: str
    model: Any
    tokenizer: Any
    lock: Any = field(default_factory=lambda: __import__("threading").Lock())


@dataclass
class ServerState:
    """Everything the routes need. ``api_key`` None: no key required. ``lora_root`` None: run-time
    adapter loading is off."""

    registry: AdapterRegistry
    scheduler: BatchScheduler
    max_model_len: int
    default_max_tokens: int = 512
    request_timeout: float = 600.0
    api_key: str | None = None
    lora_root: str | None = None
    reward_models: dict[str, RewardModel] = field(default_factory=dict)
    score_batch_size: int = 8
    score_max_length: int | None = None  # None: the cut each reward model was trained with (head.json)
    created: int = field(default_factory=lambda: int(time.time()))


def _parse(model: type[BaseModel], body: Any) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or None
        raise APIError(400, f"{where}: {first.get('msg')}" if where else str(first.get("msg")), where) from None


async def _json_body(request: Request) -> Any:
    try:
        return await request.json()
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="alignkit serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError):
        return error_response(error.status, error.message, error.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        return error_response(error.status_code, str(error.detail))

    @app.middleware("http")
    async def _authorize(request: Request, call_next):
        if state.api_key is not None and request.url.path != "/health":
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
                return error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", **state.scheduler.load()}

    @app.get("/stats")
    async def stats():
        return {**state.scheduler.stats.snapshot(), **state.scheduler.load(), "mode": state.scheduler.mode,
                "engine": state.scheduler.engine, **state.scheduler.engine_counters(),
                "max_batch": state.scheduler.max_batch, "max_wait_ms": state.scheduler.max_wait_s * 1000,
                "max_queue": state.scheduler.max_queue}

    @app.get("/v1/models")
    async def models():
        registry = state.registry
        data = [{"id": registry.base_name, "object": "model", "created": state.created, "owned_by": "alignkit",
                 "root": registry.base_source.location, "parent": None, "max_model_len": state.max_model_len}]
        with registry.lock:
            adapters = [info for name, info in registry.adapters.items() if name not in registry.draining]
        data += [{"id": info.name, "object": "model", "created": info.created or state.created, "owned_by": "alignkit",
                  "root": info.path, "parent": registry.base_name, "max_model_len": state.max_model_len}
                 for info in adapters]
        data += [{"id": reward.name, "object": "model", "created": state.created, "owned_by": "alignkit",
                  "root": reward.path, "parent": None, "kind": "reward_model"}
                 for reward in state.reward_models.values()]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = _parse(ChatCompletionRequest, await _json_body(request))
        adapter = _resolve_generation_model(state, body.model)
        _refuse_unsupported(body)
        try:
            prompt = tokenize_prompt(state.registry.tokenizer, body.conversation())
        except ValueError as error:
            raise APIError(400, str(error), "messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        options = _options(state, body, [prompt], max_tokens, body.logprob_count())
        return await _serve(state, request, body, "chat", adapter, [prompt], options)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = _parse(CompletionRequest, await _json_body(request))
        adapter = _resolve_generation_model(state, body.model)
        _refuse_unsupported(body)
        try:
            raw = body.prompts()
        except ValueError as error:
            raise APIError(400, str(error), "prompt") from None
        tokenizer = state.registry.tokenizer
        prompts = []
        for item in raw:
            if isinstance(item, str):
                prompts.append(tokenizer.encode(item))
            else:
                ids = list(item)
                if any(not 0 <= token < len(tokenizer) for token in ids):
                    raise APIError(400, f"prompt: token ids must be in 0..{len(tokenizer) - 1}", "prompt")
                prompts.append(ids)
        if any(not prompt for prompt in prompts):
            raise APIError(400, "prompt: a prompt has no tokens", "prompt")
        options = _options(state, body, prompts, body.max_tokens or 16, body.logprob_count())
        return await _serve(state, request, body, "text", adapter, prompts, options)

    @app.post("/v1/score")
    async def score(request: Request):
        body = _parse(ScoreRequest, await _json_body(request))
        reward = state.reward_models.get(body.model)
        if reward is None:
            served = ", ".join(state.reward_models) or "none (start the server with --reward-model NAME=PATH)"
            status = 400 if body.model in state.registry.model_names() else 404
            raise APIError(status, f"the model {body.model!r} is not a served reward model; reward models: {served}",
                           "model")
        try:
            items = body.items()
        except ValueError as error:
            raise APIError(400, str(error), "input") from None
        if not items:
            raise APIError(400, "nothing to score", "input")
        def run():
            with reward.lock:
                return score_responses(reward.model, reward.tokenizer, items, state.score_batch_size,
                                  state.score_max_length, None)

        values = await asyncio.to_thread(run)
        return {"object": "list", "model": reward.name,
                "data": [{"object": "score", "index": i, "score": value} for i, value in enumerate(values)]}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        body = _parse(LoadAdapterRequest, await _json_body(request))
        if state.lora_root is None:
            raise APIError(403, "run-time adapter loading is off; start the server with --lora-root DIR "
                                "(adapters are then read from under DIR only)")
        path = _allowed_path(state.lora_root, body.lora_path)
        registry = state.registry
        try:
            registry.check_adapter(body.lora_name, path)
            future = state.scheduler.run_exclusive(lambda: registry.load(body.lora_name, path, int(time.time())))
            info = await asyncio.wrap_future(future)
        except AdapterError as error:
            raise APIError(error.status, str(error), "lora_path") from None
        return {"status": "loaded", "lora_name": info.name, "lora_path": info.path, "parent": registry.base_name}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        body = _parse(UnloadAdapterRequest, await _json_body(request))
        if state.lora_root is None:
            raise APIError(403, "run-time adapter unloading is off; start the server with --lora-root DIR")
        registry, scheduler = state.registry, state.scheduler
        with registry.lock:
            if body.lora_name not in registry.adapters or body.lora_name in registry.draining:
                raise APIError(404, f"no adapter named {body.lora_name!r} is loaded", "lora_name")
            registry.draining.add(body.lora_name)
        deadline = time.monotonic() + state.request_timeout
        while scheduler.uses_adapter(body.lora_name):     # let its running requests finish
            if time.monotonic() > deadline:
                with registry.lock:
                    registry.draining.discard(body.lora_name)
                raise APIError(408, f"adapter {body.lora_name!r} is still in use after {state.request_timeout:g} s")
            await asyncio.sleep(0.02)
        try:
            await asyncio.wrap_future(scheduler.run_exclusive(lambda: scheduler.drop_adapter(body.lora_name)))
        except AdapterError as error:
            raise APIError(error.status, str(error), "lora_name") from None
        return {"status": "unloaded", "lora_name": body.lora_name}

    return app


# ----------------------------------------------------------------------------------------- helpers


def _resolve_generation_model(state: ServerState, name: str) -> str | None:
    if name in state.reward_models:
        raise APIError(400, f"{name!r} is a reward model: use POST /v1/score", "model")
    try:
        return state.registry.resolve(name)
    except AdapterError as error:
        raise APIError(error.status, str(error), "model") from None


def _refuse_unsupported(body) -> None:
    problem = body.unsupported()
    if problem:
        raise APIError(400, problem, problem.split(":", 1)[0])


def _options(state: ServerState, body, prompts: list[list[int]], max_tokens: int | None,
             logprobs: int | None) -> SamplingOptions:
    longest = max(len(prompt) for prompt in prompts)
    room = state.max_model_len - longest
    if room < 1:
        raise APIError(400, f"the prompt has {longest} tokens; this model's context is {state.max_model_len} tokens",
                       "messages" if isinstance(body, ChatCompletionRequest) else "prompt")
    if max_tokens is None:
        max_tokens = min(room, state.default_max_tokens)
    if max_tokens > room:
        raise APIError(400, f"max_tokens {max_tokens} + the prompt's {longest} tokens exceed this model's context "
                            f"of {state.max_model_len} tokens (at most {room} new tokens)", "max_tokens")
    if body.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens {body.min_tokens} is larger than max_tokens {max_tokens}", "min_tokens")
    temperature = 1.0 if body.temperature is None else body.temperature
    return SamplingOptions(max_tokens=max_tokens, temperature=temperature,
                           top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, stop=list(body.stop or []),
                           logprobs=logprobs, ignore_eos=body.ignore_eos, min_tokens=body.min_tokens)


def _allowed_path(root: str, path: str) -> str:
    """``path`` (relative paths are taken under ``root``) resolved; 403 unless it lies under ``root``."""
    root_path = Path(root).resolve()
    candidate = Path(path).expanduser()
    if not candidate.is_absolute():
        candidate = root_path / candidate
    resolved = candidate.resolve()
    if not resolved.is_relative_to(root_path):
        raise APIError(403, f"lora_path {path!r} is outside the allowed adapter root {root_path}", "lora_path")
    return str(resolved)


def _row_options(options: SamplingOptions, choice: int) -> SamplingOptions:
    if options.seed is None or choice == 0:
        return options
    return SamplingOptions(**{**options.__dict__, "seed": options.seed + choice})


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _serve(state: ServerState, request: Request, body, kind: str, adapter: str | None,
                 prompts: list[list[int]], options: SamplingOptions):
    """Queue one row per (prompt, choice) and answer, streamed or whole."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def sink(event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass

    deadline = time.monotonic() + state.request_timeout
    rows = [Row(index * body.n + choice, adapter, prompt, _row_options(options, choice), sink, deadline, body.stream)
            for index, prompt in enumerate(prompts) for choice in range(body.n)]
    try:
        state.scheduler.submit(rows)
    except QueueFull as error:
        raise APIError(429, str(error)) from None
    identifier = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
    created = int(time.time())
    if body.stream:
        return StreamingResponse(_stream(state, body, kind, rows, events, identifier, created, prompts),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await _whole(state, request, body, kind, rows, events, identifier, created, prompts)


async def _next_event(events: asyncio.Queue, timeout: float):
    return await asyncio.wait_for(events.get(), timeout=max(0.001, timeout))


async def _whole(state, request, body, kind, rows, events, identifier, created, prompts):
    scheduler, tokenizer = state.scheduler, state.registry.tokenizer
    eos = scheduler.eos_ids
    tokens: dict[int, list[TokenEvent]] = {row.choice: [] for row in rows}
    finished: dict[int, FinishEvent] = {}
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    grace = state.request_timeout + 30.0
    try:
        while len(finished) < len(rows):
            getter = asyncio.ensure_future(_next_event(events, grace))
            done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if watcher in done:
                getter.cancel()
                scheduler.cancel_rows(rows)
                return error_response(499, "client closed the request")
            try:
                event = getter.result()
            except asyncio.TimeoutError:
                scheduler.cancel_rows(rows)
                raise APIError(408, f"no answer within --request-timeout {state.request_timeout:g} s") from None
            if isinstance(event, TokenEvent):
                tokens[event.choice].append(event)
            else:
                finished[event.choice] = event
                tokens[event.choice].extend(event.events or [])
                if event.reason == "timeout":
                    scheduler.cancel_rows(rows)
                    raise APIError(408, f"the request ran past --request-timeout {state.request_timeout:g} s")
                if event.reason in ("error", "cancelled"):
                    scheduler.cancel_rows(rows)
                    raise APIError(500, f"generation failed: {event.message or event.reason}")
    finally:
        watcher.cancel()
    choices, completion_tokens = [], 0
    for row in rows:
        end = finished[row.choice]
        completion_tokens += len(end.tokens)
        kept = [e for e in tokens[row.choice] if e.token not in eos or row.options.ignore_eos]
        logprobs = None
        if row.options.logprobs is not None:
            if kind == "chat":
                logprobs = {"content": [chat_logprob_entry(tokenizer, e, body.return_tokens_as_token_ids) for e in kept]}
            else:
                logprobs = completion_logprobs(tokenizer, kept, body.return_tokens_as_token_ids)
        if kind == "chat":
            choices.append({"index": row.choice, "message": {"role": "assistant", "content": end.text},
                            "logprobs": logprobs, "finish_reason": end.reason})
        else:
            choices.append({"index": row.choice, "text": end.text, "logprobs": logprobs,
                            "finish_reason": end.reason})
    prompt_tokens = sum(len(prompt) for prompt in prompts)
    return {"id": identifier, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": created, "model": body.model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


async def _stream(state, body, kind, rows, events, identifier, created, prompts):
    scheduler, tokenizer = state.scheduler, state.registry.tokenizer
    eos = scheduler.eos_ids
    streams = {row.choice: TextStream(tokenizer, row.options.stop) for row in rows}
    by_choice = {row.choice: row for row in rows}
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    as_ids = body.return_tokens_as_token_ids

    def chunk(choice: int, text: str | None = None, finish: str | None = None, event=None, first=False) -> dict:
        if kind == "chat":
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            item = {"index": choice, "delta": delta, "logprobs": None, "finish_reason": finish}
            if event is not None and by_choice[choice].options.logprobs is not None:
                item["logprobs"] = {"content": [chat_logprob_entry(tokenizer, event, as_ids)]}
        else:
            item = {"index": choice, "text": text or "", "logprobs": None, "finish_reason": finish}
            if event is not None and by_choice[choice].options.logprobs is not None:
                item["logprobs"] = completion_logprobs(tokenizer, [event], as_ids)
        return {"id": identifier, "object": obj, "created": created, "model": body.model, "choices": [item]}

    finished = 0
    completion_tokens = 0
    grace = state.request_timeout + 30.0
    try:
        if kind == "chat":
            for row in rows:
                yield _sse(chunk(row.choice, first=True))
        while finished < len(rows):
            try:
                event = await _next_event(events, grace)
            except asyncio.TimeoutError:
                yield _sse({"error": {"message": "no answer within --request-timeout", "type": "timeout_error",
                                      "param": None, "code": 408}})
                return
            if isinstance(event, TokenEvent):
                row = by_choice[event.choice]
                if event.token in eos and not row.options.ignore_eos:
                    continue
                text = streams[event.choice].push(event.token, set() if row.options.ignore_eos else eos)
                with_logprobs = row.options.logprobs is not None
                if text or with_logprobs:
                    yield _sse(chunk(event.choice, text, event=event if with_logprobs else None))
                continue
            finished += 1
            completion_tokens += len(event.tokens)
            if event.reason not in ("stop", "length"):
                code = 408 if event.reason == "timeout" else 500
                yield _sse({"error": {"message": f"generation ended: {event.message or event.reason}",
                                      "type": "timeout_error" if code == 408 else "server_error",
                                      "param": None, "code": code}})
                scheduler.cancel_rows(rows)
                return
            rest = streams[event.choice].finish(event.text)
            if rest:
                yield _sse(chunk(event.choice, rest))
            yield _sse(chunk(event.choice, finish=event.reason))
        if body.include_usage:
            prompt_tokens = sum(len(prompt) for prompt in prompts)
            yield _sse({"id": identifier, "object": obj, "created": created, "model": body.model, "choices": [],
                        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                  "total_tokens": prompt_tokens + completion_tokens}})
        yield _sse("[DONE]")
    finally:  # the client went away, or we are done: either way free the slots
        scheduler.cancel_rows(rows)
