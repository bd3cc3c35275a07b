"""The batching scheduler: one worker thread owns the model and decodes every request in one batch.

What one worker step does (iteration-level, "continuous" batching):

1. **Admit.** Rows (one row = one choice of one request) wait in a FIFO queue. When nothing is
   running, the worker takes the first waiting row and then waits at most ``max_wait_ms`` for more
   to arrive (or until ``max_batch`` rows are there) before it starts: that is how long a request
   may wait to be batched. While a batch is running, waiting rows join it at the next step, up to
   ``max_batch`` rows in all; nobody waits for the running batch to finish.
2. **Prefill** the admitted rows in one forward pass (left-padded; a prompt shared by several rows,
   e.g. ``n > 1``, is computed once and its keys/values repeated), sample each row's first token,
   and append their key/value cache to the running batch's cache (the shorter of the two is padded
   on the left and masked, as left-padded generation does).
3. **Decode** one token for every running row in one forward pass.
4. After each forward, rows that produced an end-of-sequence token, completed a stop string or
   reached ``max_tokens`` finish; rows whose client went away or whose deadline passed are dropped;
   their cache rows are removed and all-padding columns on the left are trimmed.

**Adapters.** Every row names an adapter (or the base model). Rows of different adapters share
every forward pass: the base weights run once over the whole batch and each LoRA layer adds
``B_a A_a x`` for the rows of adapter ``a`` only (PEFT's mixed-adapter batches, the
``adapter_names=`` argument of a `peft.PeftModel` forward; ``"__base__"`` rows get no adapter).

**Sampling** is per row: temperature 0 is greedy (argmax, as `alignkit.generation.generate_ids`
does, so a served greedy reply equals the offline one); otherwise the logits are divided by the
temperature, top-p keeps the smallest set of tokens whose probability reaches ``top_p``, and the
token is drawn with the row's own `torch.Generator` (seeded from ``seed + choice index`` when the
request gives a seed, so the same request draws the same tokens whatever else is in the batch).
Log-probs returned to clients are those of the model's plain distribution (``log_softmax`` of the
logits, before temperature and top-p), as vLLM and OpenAI report them.

**Stopping** uses `alignkit.rollout.stops`: the stop tokens are `stop_token_ids` (EOS and chat
end-of-turn markers), the reply's text ends before the first stop string (`cut_text_at_stop`).

Two comparison points for benchmarks replace the mixing:

* ``mode="swap"``: the worker merges one adapter into the base weights (``merge_adapter``), runs
  only that adapter's rows (every waiting row of that adapter is taken, and new ones still join),
  and unmerges it before the next adapter's turn. It batches requests of one adapter, so it is the
  stronger of the two baselines.
* ``mode="swap-per-request"``: the literal "swap one adapter in per request": take the oldest
  waiting request (all its rows: its ``n`` choices and prompts), merge its adapter, run that request
  alone to its end (nothing joins), unmerge, and only then look at the next request.

The worker is the only thread that touches the model; run-time adapter loads and unloads are
handed to it (`run_exclusive`) and run between two steps.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from alignkit.errors import UsageError
from alignkit.model.forward import left_pad
from alignkit.model.peft import is_peft_model, unwrap
from alignkit.rollout.stops import cut_text_at_stop, stop_token_ids
from alignkit.serve.mixed_lora import mixed_batch
from alignkit.serve.static_engine import StaticSlotCache, unsupported_reason

logger = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch
ADAPTER_MODES = ("mixed", "swap", "swap-per-request")


class QueueFull(Exception):
    """More rows are waiting than the scheduler accepts (``max_queue``)."""


@dataclass
class SamplingOptions:
    """One row's decoding settings (already validated by the HTTP layer)."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None      # None: no log-probs; k >= 0: the chosen token's and the k most likely
    ignore_eos: bool = False
    min_tokens: int = 0


@dataclass
class TokenEvent:
    choice: int
    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class FinishEvent:
    choice: int
    reason: str          # "stop", "length", "timeout", "cancelled", "error"
    tokens: list[int]    # every sampled token, the final EOS token included
    text: str            # the reply: special tokens removed, cut before the first stop string
    message: str = ""
    events: list[TokenEvent] | None = None   # the row's token events, for rows that do not stream


class Row:
    """One sequence being generated: a prompt, an adapter, options, and where its events go."""

    __slots__ = ("adapter", "arrived", "cancelled", "choice", "deadline", "events", "finished", "generator",
                 "options", "prompt", "sink", "started", "stream", "tokens")

    def __init__(self, choice: int, adapter: str | None, prompt: list[int], options: SamplingOptions,
                 sink: Callable[[object], None], deadline: float | None = None, stream: bool = True):
        """``stream=False``: token events are kept on the row and handed over with its `FinishEvent`
        (one wake-up of the HTTP side per row instead of one per token)."""
        self.choice, self.adapter, self.prompt, self.options = choice, adapter, list(prompt), options
        self.sink, self.deadline, self.stream = sink, deadline, stream
        self.events: list[TokenEvent] = []
        self.cancelled = False
        self.tokens: list[int] = []
        self.generator: torch.Generator | None = None
        self.arrived = time.monotonic()
        self.started: float | None = None
        self.finished = False

    @property
    def adapter_name(self) -> str:
        return self.adapter or BASE_ADAPTER


class SchedulerStats:
    """Counters read by ``GET /stats``, the tests and the benchmark."""

    def __init__(self):
        self.lock = threading.Lock()
        self.values = collections.Counter()
        self.seconds = collections.Counter()
        self.max_rows_in_forward = 0
        self.max_adapters_in_forward = 0

    def forward(self, kind: str, adapters: list[str]) -> None:
        with self.lock:
            self.values[f"{kind}_forwards"] += 1
            self.values["rows_forwarded"] += len(adapters)
            distinct = len(set(adapters))
            if distinct > 1:
                self.values["mixed_adapter_forwards"] += 1
            self.max_rows_in_forward = max(self.max_rows_in_forward, len(adapters))
            self.max_adapters_in_forward = max(self.max_adapters_in_forward, distinct)

    def add(self, name: str, amount: int = 1) -> None:
        with self.lock:
            self.values[name] += amount

    def add_seconds(self, name: str, seconds: float) -> None:
        with self.lock:
            self.seconds[name] += seconds

    def snapshot(self) -> dict:
        with self.lock:
            return {**self.values, **{f"{k}_seconds": round(v, 3) for k, v in self.seconds.items()},
                    "max_rows_in_forward": self.max_rows_in_forward,
                    "max_adapters_in_forward": self.max_adapters_in_forward}


class _Running:
    """The running batch: its rows, their key/value cache and attention mask (left-padded)."""

    def __init__(self):
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None      # [B, T] 1 = real token

    def __len__(self) -> int:
        return len(self.rows)


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _mergeable(cache: DynamicCache) -> bool:
    """True when every layer is a plain full-attention `DynamicLayer` (keys/values ``[B, H, T, D]``)."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def join_caches(first: _Running, rows: list[Row], cache: DynamicCache, mask: torch.Tensor) -> None:
    """Append rows with their own cache to ``first``, left-padding the shorter cache to one width."""
    if first.cache is None:
        first.rows, first.cache, first.mask = list(rows), cache, mask
        return
    width = max(first.mask.shape[1], mask.shape[1])
    for old, new in zip(first.cache.layers, cache.layers):
        old.keys = torch.cat([_pad_left(old.keys, width, -2), _pad_left(new.keys, width, -2)], dim=0)
        old.values = torch.cat([_pad_left(old.values, width, -2), _pad_left(new.values, width, -2)], dim=0)
    first.mask = torch.cat([_pad_left(first.mask, width, 1), _pad_left(mask, width, 1)], dim=0)
    first.rows.extend(rows)


def keep_rows(running: _Running, keep: list[int]) -> None:
    """Keep only the rows at ``keep`` and trim columns that are padding in every kept row."""
    if not keep:
        running.rows, running.cache, running.mask = [], None, None
        return
    if len(keep) < len(running.rows):
        index = torch.tensor(keep, device=running.mask.device)
        running.cache.batch_select_indices(index)
        running.mask = running.mask[index]
        running.rows = [running.rows[i] for i in keep]
    real_columns = running.mask.any(dim=0).nonzero()
    start = int(real_columns[0]) if len(real_columns) else 0
    if start > 0:
        for layer in running.cache.layers:
            layer.keys = layer.keys[..., start:, :]
            layer.values = layer.values[..., start:, :]
        running.mask = running.mask[:, start:]


def sample_tokens(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """One token per row from ``logits`` ``[B, V]`` (float32) following each row's options."""
    chosen = logits.argmax(dim=-1)
    for i, row in enumerate(rows):
        options = row.options
        if options.temperature <= 0:
            continue
        scaled = logits[i] / options.temperature
        probabilities = torch.softmax(scaled, dim=-1)
        if options.top_p < 1.0:
            sorted_probabilities, order = probabilities.sort(descending=True)
            before = sorted_probabilities.cumsum(0) - sorted_probabilities  # mass of the more likely tokens
            sorted_probabilities[before >= options.top_p] = 0.0
            probabilities = torch.zeros_like(probabilities).scatter_(0, order, sorted_probabilities)
        chosen[i] = torch.multinomial(probabilities, 1, generator=row.generator)[0]
    return chosen


def choose_engine(requested: str, registry, mode: str, device: torch.device) -> str:
    """The decoding engine to run: ``"dynamic"`` (transformers' forward, growing cache) or ``"static"``."""
    if requested not in ("auto", "dynamic", "static"):
        raise UsageError(f"--engine must be auto, dynamic or static, got {requested!r}")
    if requested == "dynamic":
        return "dynamic"
    reason = (unsupported_reason(registry.model) if mode == "mixed"
              else f"--adapter-mode {mode} merges adapters into the weights, which the static engine does not read")
    if requested == "static":
        if reason is not None:
            raise UsageError(f"--engine static cannot serve this model: {reason}; use --engine dynamic")
        return "static"
    if device.type == "cuda" and reason is None:
        return "static"
    if device.type == "cuda":
        logger.warning("serving with the dynamic engine: the static-cache engine does not apply (%s)", reason)
    return "dynamic"


class BatchScheduler:
    """Owns the model in one worker thread; see the module docstring for the policy.

    ``registry`` is an `alignkit.serve.adapters.AdapterRegistry` (the model, the tokenizer and the
    adapters). ``max_batch``: rows decoded together; ``max_wait_ms``: how long the first request of
    an idle server waits for company; ``max_queue``: waiting rows beyond which `submit` raises
    `QueueFull`; ``mode``: ``"mixed"`` (default), ``"swap"`` (merge one adapter at a time, batching
    its requests) or ``"swap-per-request"`` (merge, run one request, unmerge).
    """

    def __init__(self, registry, max_batch: int = 32, max_wait_ms: float = 10.0, max_queue: int = 256,
                 mode: str = "mixed", engine: str = "auto"):
        if max_batch < 1:
            raise UsageError(f"--max-batch must be at least 1, got {max_batch}")
        if max_wait_ms < 0:
            raise UsageError(f"--max-wait-ms must be >= 0, got {max_wait_ms}")
        if max_queue < 1:
            raise UsageError(f"--max-queue must be at least 1, got {max_queue}")
        if mode not in ADAPTER_MODES:
            raise UsageError(f"--adapter-mode must be one of {', '.join(ADAPTER_MODES)}, got {mode!r}")
        self.registry = registry
        self.tokenizer = registry.tokenizer
        self.max_batch, self.max_wait_s, self.max_queue, self.mode = max_batch, max_wait_ms / 1000.0, max_queue, mode
        self.stats = SchedulerStats()
        self.eos_ids = set(stop_token_ids(self.tokenizer, registry.model))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
        self._waiting: collections.deque[Row] = collections.deque()
        self._commands: collections.deque = collections.deque()
        self._condition = threading.Condition()
        self._running = _Running()
        self._merged: str | None = None     # swap mode: the adapter merged into the base weights now
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._device = next(registry.model.parameters()).device
        self.engine = choose_engine(engine, registry, mode, self._device)
        self._static = StaticSlotCache(registry, max_batch, self._device) if self.engine == "static" else None
        registry.static_engine = self._static is not None   # run-time loads refuse what it cannot serve

    # ------------------------------------------------------------------ public, any thread

    def start(self) -> BatchScheduler:
        self._thread = threading.Thread(target=self._loop, name="alignkit-serve-worker", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, rows: list[Row]) -> None:
        """Queue ``rows`` (all or none); raises `QueueFull` when the queue cannot take them."""
        with self._condition:
            if len(self._waiting) + len(rows) > self.max_queue:
                self.stats.add("rejected_queue_full")
                raise QueueFull(f"the server's queue is full ({len(self._waiting)} rows waiting, "
                                f"--max-queue {self.max_queue}); retry later")
            self._waiting.extend(rows)
            self.stats.add("rows_submitted", len(rows))
            self._condition.notify_all()

    def run_exclusive(self, function: Callable[[], object]) -> concurrent.futures.Future:
        """Run ``function()`` on the worker between two steps; the future holds its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._condition:
            self._commands.append((function, future))
            self._condition.notify_all()
        return future

    def uses_adapter(self, name: str) -> bool:
        with self._condition:
            return any(row.adapter == name for row in list(self._waiting) + self._running.rows)

    def engine_counters(self) -> dict:
        """The static engine's graph captures, cache allocations and cache length (empty for dynamic)."""
        if self._static is None:
            return {}
        return {f"static_{key}": value for key, value in
                {**self._static.counters, "cache_length": self._static.length}.items()}

    def load(self) -> dict:
        """Rows running and waiting now."""
        with self._condition:
            return {"running": len(self._running), "waiting": len(self._waiting)}

    # ------------------------------------------------------------------ worker

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._condition:
                while not (self._stopping or self._commands or self._waiting or self._running.rows):
                    self._condition.wait()
                if self._stopping:
                    break
            self._run_commands()
            try:
                self._admit()
                if self._running.rows:
                    self._decode()
                self._after_step()
            except Exception as error:  # a failed forward fails its rows, never the server
                logger.exception("generation step failed")
                self._fail_running(f"{type(error).__name__}: {error}")
        self._fail_running("the server is shutting down")
        with self._condition:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for row in waiting:
            self._finish(row, "error", "the server is shutting down")

    def _run_commands(self) -> None:
        while True:
            with self._condition:
                if not self._commands:
                    return
                function, future = self._commands.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(function())
                except BaseException as error:  # noqa: BLE001 - handed to the caller
                    future.set_exception(error)

    def _take_waiting(self, limit: int, accept: Callable[[Row], bool] | None = None) -> list[Row]:
        """Pop up to ``limit`` live waiting rows (only those ``accept`` takes, when given)."""
        taken, kept = [], collections.deque()
        now = time.monotonic()
        with self._condition:
            while self._waiting:
                row = self._waiting.popleft()
                if row.cancelled or (row.deadline is not None and now > row.deadline):
                    self._finish(row, "cancelled" if row.cancelled else "timeout")
                elif len(taken) < limit and (accept is None or accept(row)):
                    taken.append(row)
                else:
                    kept.append(row)
            self._waiting = kept
        return taken

    def _admit(self) -> None:
        room = self.max_batch - len(self._running)
        if room <= 0:
            return
        if self.mode == "swap-per-request":
            self._admit_one_request()
            return
        if not self._running.rows:
            with self._condition:
                if not self._waiting:
                    return
                first = self._waiting[0].arrived
                while (not self._stopping and len(self._waiting) < self.max_batch
                       and time.monotonic() < first + self.max_wait_s):
                    self._condition.wait(max(0.0, first + self.max_wait_s - time.monotonic()))
            if self.mode == "swap":
                with self._condition:
                    adapter = self._waiting[0].adapter if self._waiting else None
                self._swap_to(adapter)
        if self.mode == "swap":
            merged = self._merged
            rows = self._take_waiting(room, lambda row: row.adapter == merged)
        else:
            rows = self._take_waiting(room)
        if rows:
            self._prefill(rows)

    def _admit_one_request(self) -> None:
        """swap-per-request: when the previous request is done, merge the next one's adapter and run it
        alone (all its rows, at most ``max_batch``); `_after_step` unmerges when it is finished."""
        if self._running.rows:
            return
        with self._condition:
            first = next((row for row in self._waiting if not row.cancelled), None)
        if first is None:
            self._take_waiting(0)          # drops cancelled / timed-out rows
            return
        self._swap_to(first.adapter)
        rows = self._take_waiting(self.max_batch, lambda row: row.sink is first.sink)
        if rows:
            self._prefill(rows)

    def _after_step(self) -> None:
        if self.mode == "swap-per-request" and not self._running.rows and self._merged is not None:
            self._swap_to(None)

    def _swap_to(self, adapter: str | None) -> None:
        model = self.registry.model
        if self._merged == adapter:
            return
        if self._merged is not None:
            model.unmerge_adapter()
            self._merged = None
            self.stats.add("adapter_unmerges")
        if adapter is not None:
            model.merge_adapter(adapter_names=[adapter])
            self._merged = adapter
            self.stats.add("adapter_merges")

    def _forward(self, kind: str, rows: list[Row], **inputs) -> torch.Tensor:
        """One forward of the dynamic engine (transformers' model, ``DynamicCache``)."""
        names = [row.adapter_name for row in rows]
        return self._timed(kind, rows, self._model_forward, self.registry.model, rows, names, **inputs)

    def _timed(self, kind: str, rows: list[Row], function: Callable, *args, **kwargs) -> torch.Tensor:
        self.stats.forward(kind, [row.adapter_name for row in rows])
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            self.stats.add_seconds(kind, time.perf_counter() - started)

    def _model_forward(self, model, rows: list[Row], names: list[str], **inputs) -> torch.Tensor:
        if is_peft_model(model):
            if self.mode != "mixed":   # swap modes: the adapter (if any) is merged into the weights
                if self._merged is None:
                    with model.disable_adapter():
                        output = model(**inputs, use_cache=True, logits_to_keep=1)
                else:
                    output = model(**inputs, use_cache=True, logits_to_keep=1)
            elif self.registry.mixed_kernel == "alignkit":
                with mixed_batch([row.adapter for row in rows], self.registry.slots, self._device):
                    output = unwrap(model)(**inputs, use_cache=True, logits_to_keep=1)
            else:
                output = model(**inputs, use_cache=True, logits_to_keep=1, adapter_names=names)
        else:
            output = model(**inputs, use_cache=True, logits_to_keep=1)
        return output.logits[:, -1, :].float()

    def _prefill(self, rows: list[Row]) -> None:
        started = time.monotonic()
        for row in rows:
            row.started = started
            seed = row.options.seed
            if row.options.temperature > 0:
                row.generator = torch.Generator(device=self._device)
                row.generator.manual_seed(seed if seed is not None else secrets.randbits(62))
        # one prefill per distinct (adapter, prompt): n > 1 choices share it
        unique: dict[tuple, int] = {}
        owner = []
        for row in rows:
            key = (row.adapter, tuple(row.prompt))
            owner.append(unique.setdefault(key, len(unique)))
        firsts = {index: row for row, index in zip(reversed(rows), reversed(owner))}
        distinct = [firsts[i] for i in range(len(unique))]
        if self._static is not None:
            self._prefill_static(rows, distinct, owner)
            return
        input_ids, attention = left_pad([row.prompt for row in distinct], self.pad_id)
        input_ids, attention = input_ids.to(self._device), attention.to(self._device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward("prefill", distinct, input_ids=input_ids, attention_mask=attention,
                               position_ids=positions, past_key_values=cache)
        if len(distinct) < len(rows):
            index = torch.tensor(owner, device=self._device)
            cache.batch_select_indices(index)
            attention, logits = attention[index], logits[index]
        if self._running.rows:
            if not (_mergeable(cache) and _mergeable(self._running.cache)):
                raise RuntimeError("this model's cache layers cannot be joined (sliding-window or other layer "
                                   "types); serve it with --max-batch 1")
            self.stats.add("rows_joined_running_batch", len(rows))
        join_caches(self._running, rows, cache, attention)
        offset = len(self._running) - len(rows)
        self._emit(logits, list(range(offset, len(self._running))))

    def _prefill_static(self, rows: list[Row], distinct: list[Row], owner: list[int]) -> None:
        slots = [self.registry.slots.get(row.adapter, 0) if row.adapter is not None else 0 for row in distinct]
        needed = max(len(row.prompt) + row.options.max_tokens for row in rows)
        logits = self._timed("prefill", distinct, self._static.prefill, [row.prompt for row in distinct], slots,
                             owner, self.pad_id, needed)
        if self._running.rows:
            self.stats.add("rows_joined_running_batch", len(rows))
        offset = len(self._running)
        self._running.rows.extend(rows)
        self._emit(logits, list(range(offset, len(self._running))))

    def _decode(self) -> None:
        running = self._running
        if self._static is not None:
            logits = self._timed("decode", running.rows, self._static.decode, [row.tokens[-1] for row in running.rows])
            self._emit(logits, list(range(len(running))))
            return
        last = torch.tensor([[row.tokens[-1]] for row in running.rows], device=self._device)
        positions = running.mask.sum(dim=1, keepdim=True)
        running.mask = torch.cat([running.mask, running.mask.new_ones((len(running), 1))], dim=1)
        logits = self._forward("decode", running.rows, input_ids=last, attention_mask=running.mask,
                               position_ids=positions, past_key_values=running.cache)
        self._emit(logits, list(range(len(running))))

    def _emit(self, logits: torch.Tensor, indices: list[int]) -> None:
        """Sample for the running rows at ``indices`` (``logits`` aligned with them), send the tokens,
        finish and drop the rows that are done."""
        started = time.perf_counter()
        rows = [self._running.rows[i] for i in indices]
        for i, row in enumerate(rows):
            if not row.options.ignore_eos and len(row.tokens) < row.options.min_tokens:
                logits[i, list(self.eos_ids)] = float("-inf")
        tokens = sample_tokens(logits, rows).tolist()
        wants_logprobs = [i for i, row in enumerate(rows) if row.options.logprobs is not None]
        logprobs = torch.log_softmax(logits[wants_logprobs], dim=-1) if wants_logprobs else None
        now = time.monotonic()
        done = set()
        for i, (row, token) in enumerate(zip(rows, tokens)):
            event = TokenEvent(row.choice, token)
            if logprobs is not None and row.options.logprobs is not None:
                table = logprobs[wants_logprobs.index(i)]
                event.logprob = float(table[token])
                if row.options.logprobs > 0:
                    values, ids = table.topk(row.options.logprobs)
                    event.top_logprobs = list(zip(ids.tolist(), values.tolist()))
            row.tokens.append(token)
            if row.cancelled:
                self._finish(row, "cancelled")
            elif row.deadline is not None and now > row.deadline:
                self._finish(row, "timeout")
            else:
                if row.stream:
                    row.sink(event)
                else:
                    row.events.append(event)
                reason = self._stop_reason(row, token)
                if reason:
                    self._finish(row, reason)
            if row.finished:
                done.add(indices[i])
        if done:
            self._keep([i for i in range(len(self._running)) if i not in done])
        self.stats.add("tokens_generated", len(tokens))
        self.stats.add_seconds("sample", time.perf_counter() - started)

    def _stop_reason(self, row: Row, token: int) -> str | None:
        if token in self.eos_ids and not row.options.ignore_eos:
            return "stop"
        if row.options.stop and any(stop in self._text(row) for stop in row.options.stop):
            return "stop"
        if len(row.tokens) >= row.options.max_tokens:
            return "length"
        return None

    def _text(self, row: Row) -> str:
        body = row.tokens[:-1] if row.tokens and row.tokens[-1] in self.eos_ids and not row.options.ignore_eos \
            else row.tokens
        return self.tokenizer.decode(body, skip_special_tokens=True)

    def _finish(self, row: Row, reason: str, message: str = "") -> None:
        if row.finished:
            return
        row.finished = True
        text = cut_text_at_stop(self._text(row), row.options.stop) if reason in ("stop", "length") else ""
        self.stats.add(f"finished_{reason}")
        row.sink(FinishEvent(row.choice, reason, list(row.tokens), text, message,
                             None if row.stream else row.events))

    def _keep(self, keep: list[int]) -> None:
        """Keep only the running rows at ``keep`` (and their cache rows)."""
        if self._static is not None:
            self._static.keep(keep)
            self._running.rows = [self._running.rows[i] for i in keep]
        else:
            keep_rows(self._running, keep)

    def _fail_running(self, message: str) -> None:
        for row in self._running.rows:
            self._finish(row, "error", message)
        self._running = _Running()
        if self._static is not None:
            self._static.reset()
        if self._merged is not None:
            try:
                self.registry.model.unmerge_adapter()
            finally:
                self._merged = None

    def drop_adapter(self, name: str) -> None:
        """Unload adapter ``name`` (on the worker, between steps). Rows still using it (a request that
        slipped in while it was being unloaded) end with an error instead of breaking the batch."""
        with self._condition:
            stranded = [row for row in self._waiting if row.adapter == name]
            self._waiting = collections.deque(row for row in self._waiting if row.adapter != name)
        for row in stranded:
            self._finish(row, "error", f"adapter {name!r} was unloaded")
        using = [i for i, row in enumerate(self._running.rows) if row.adapter == name]
        if using:
            for i in using:
                self._finish(self._running.rows[i], "error", f"adapter {name!r} was unloaded")
            self._keep([i for i in range(len(self._running)) if i not in set(using)])
        if self._merged == name:
            self.registry.model.unmerge_adapter()
            self._merged = None
        self.registry.unload(name)

    def cancel_rows(self, rows: list[Row]) -> None:
        """Mark rows cancelled (a client went away); the worker frees their slots at its next step."""
        for row in rows:
            row.cancelled = True
        with self._condition:
            self._condition.notify_all()
