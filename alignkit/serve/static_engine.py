"""The static-cache decoding engine of `alignkit serve` (``--engine static``; the default on CUDA).

It runs the compact Llama/Qwen2/Mistral forward of the rollout engine (`alignkit.rollout.static`:
the same weights read out of the Hugging Face modules, RMSNorm, rotary embeddings, grouped-query
attention, SwiGLU) against a key/value cache allocated once, and on CUDA replays each decoding step
as a captured CUDA graph. What is different from the rollout engine is what serving needs:

* **One cache slot per running row, rows joining at any step** (continuous batching is kept). The
  cache is ``[max_batch, kv_heads, length, head_dim]`` per layer. Row ``i`` of the running batch
  lives in slot ``i``; its prompt fills cache positions ``0 .. L-1`` (no left padding) and each
  decoding step writes the next position of *that row* (``lengths[i]``), so rows of any age and any
  prompt length decode in the same step. Joining rows are prefilled (eagerly, one forward over
  their distinct prompts, right-padded) straight into the free slots after the running rows. When
  rows finish, the rows after them move down (their cache prefixes are copied), so the running
  rows always occupy slots ``0 .. n-1``.
* **Fixed shapes for CUDA graphs.** A decoding step over ``n`` rows runs the graph captured for
  the smallest bucket ``B >= n`` (1, 2, 4, 8, ... up to ``max_batch``) over the whole cache
  length; the ``B - n`` spare slots hold length 0 and the base model and their outputs are ignored.
  A graph per bucket is captured the first time it is needed and replayed after that. Capturing
  needs two warm-up steps on the live state: they write the same keys/values the real step
  writes next, so they leave no trace. A capture that fails (logged once) switches the engine to
  eager steps instead of failing requests. On CPU the step runs eagerly over exactly the ``n`` rows
  and the cache positions in use.
* **Cache length.** ``length`` is the longest ``prompt + max_tokens`` of the rows admitted so far,
  rounded up to a power of two (at least 256 positions). A row that needs more grows the cache
  (a new allocation, the old prefixes copied, graphs captured again); it never shrinks while
  serving, so the cost of attention per step is bounded by twice the longest request seen.
* **Mixed adapters.** The base weights are read with the adapters switched off (views, no copy);
  every LoRA projection adds each row's own ``s_a B_a A_a x`` from the stacked adapter weights that
  `alignkit.serve.mixed_lora` keeps (``A`` ``[slots, r, in]``, ``s B`` ``[slots, out, r]``, slot 0
  all zeros for base rows), gathered by a per-row slot index: the same arithmetic as the dynamic
  engine's mixed batches, so the replies are the same. In a CUDA graph the gathered path always
  runs (the slot tensor is an input of the graph); eagerly, a step whose rows all use one adapter
  (or none) uses two plain matrix products (or none).
* **Sampling stays with the scheduler** (per-row temperature, top-p, seeds, log-probs, stop rules:
  `alignkit.serve.engine`): the engine returns each step's float32 logits, the scheduler samples.
  That costs one device-to-host synchronisation per step, which streaming needs anyway.

Adapters loaded or unloaded at run time change the stacked weights: the engine notices
(`AdapterRegistry.version`), reads the weights again and drops its graphs; the cache stays valid
(the base weights do not change, and rows of an unloaded adapter are dropped first).

What the engine cannot run exactly -- another architecture, LoRA on layers other than the seven
attention/MLP projections (e.g. ``lm_head`` or embeddings), ``modules_to_save``, LoRA bias, DoRA --
is named by `unsupported_reason`; ``--engine auto`` then uses the dynamic engine, and an explicit
``--engine static`` refuses to start (or refuses the run-time adapter load) saying why.
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.model.peft import is_peft_model
from alignkit.rollout.static import (
    DecoderWeights,
    UnsupportedModel,
    additive_mask,
    apply_rotary,
    extract_weights,
    gated_mlp,
    grouped_attention,
    project_qkv,
    rms_norm,
    tile_for_groups,
)
from alignkit.rollout.static import (
    unsupported_reason as model_unsupported_reason,
)
from alignkit.serve import mixed_lora

logger = logging.getLogger(__name__)

PROJECTIONS = (("self_attn", "q_proj", "q"), ("self_attn", "k_proj", "k"), ("self_attn", "v_proj", "v"),
               ("self_attn", "o_proj", "o"), ("mlp", "gate_proj", "gate"), ("mlp", "up_proj", "up"),
               ("mlp", "down_proj", "down"))
MIN_CACHE_LENGTH = 256


class Projection(NamedTuple):
    """A projection's base ``weight`` and ``bias`` (read by the rollout engine's ``_linear`` as a pair)
    and, when it has LoRA adapters, their stacked weights ``(A [slots, r, in], s B [slots, out, r])``."""

    weight: Tensor
    bias: Tensor | None
    lora: tuple[Tensor, Tensor] | None = None


def unsupported_reason(model) -> str | None:
    """Why the static serving engine cannot run ``model`` exactly (None when it can)."""
    reason = model_unsupported_reason(model)
    if reason is not None:
        return reason
    if not is_peft_model(model):
        return None
    from peft.tuners.lora.layer import LoraLayer

    if not mixed_lora.supports(model):
        return "LoRA layers other than plain Linear (embedding or convolution LoRA, DoRA)"
    covered = set()
    decoder = getattr(model.get_base_model(), model.get_base_model().base_model_prefix)
    for layer in decoder.layers:
        for block, name, _ in PROJECTIONS:
            module = getattr(getattr(layer, block), name)
            if isinstance(module, LoraLayer):
                covered.add(id(module))
    for module in model.modules():
        if isinstance(module, LoraLayer):
            if not (module.lora_A or module.lora_embedding_A):
                continue            # a wrapper left behind by an unloaded adapter: it adds nothing
            if id(module) not in covered:
                return "LoRA on a layer other than the attention and MLP projections (e.g. lm_head)"
            if any(getattr(module, "lora_bias", {}).values()):
                return "LoRA with a bias (lora_bias)"
        elif hasattr(module, "modules_to_save") and hasattr(module, "original_module"):
            return "an adapter with modules_to_save (fully trained layers of its own)"
    return None


def _buckets(max_batch: int) -> list[int]:
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return sizes + [max_batch]


class StaticSlotCache:
    """The engine's state: weights, the slot cache, per-row buffers, graphs. Used by
    `alignkit.serve.engine.BatchScheduler` from its worker thread only.

    ``use_cuda_graph``: capture decoding steps on CUDA; ``emulate_graph``: on CPU, run the step the
    way a graph would (bucketed rows, the whole cache length): the tests check that path on CPU.
    """

    def __init__(self, registry, max_batch: int, device: torch.device, use_cuda_graph: bool = True,
                 emulate_graph: bool = False):
        self.registry = registry
        self.max_batch = max_batch
        self.device = torch.device(device)
        self.use_graph = (self.device.type == "cuda" and use_cuda_graph) or emulate_graph
        self.emulate_graph = emulate_graph and self.device.type != "cuda"
        self.buckets = _buckets(max_batch)
        self.weights: DecoderWeights | None = None
        self.version = None
        self.length = 0
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self.lengths = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.tokens = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.slots = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.host_lengths: list[int] = []          # of the running rows, in slot order
        self.host_slots: list[int] = []
        self.graphs: dict[int, object] = {}
        self.graph_logits: dict[int, Tensor] = {}
        self.pool = None
        self.counters = {"graph_captures": 0, "cache_allocations": 0}
        self._lora: tuple[str, object] = ("none", None)   # how projections add LoRA in the current forward

    # ------------------------------------------------------------------ weights

    @torch.no_grad()
    def refresh(self) -> None:
        """Read the weights again when the adapters changed (or the first time)."""
        version = getattr(self.registry, "version", 0)
        if self.weights is not None and version == self.version:
            return
        model = self.registry.model
        reason = unsupported_reason(model)
        if reason is not None:
            raise UnsupportedModel(reason)
        if is_peft_model(model):
            with model.disable_adapter():           # the base weights, as views
                weights = extract_weights(model)
            decoder = getattr(model.get_base_model(), model.get_base_model().base_model_prefix)
            for layer_weights, layer in zip(weights.layers, decoder.layers):
                for block, name, field in PROJECTIONS:
                    module = getattr(getattr(layer, block), name)
                    weight, bias = getattr(layer_weights, field)
                    stack = getattr(module, "_alignkit_stack", None)
                    setattr(layer_weights, field, Projection(weight, bias, stack))
        else:
            weights = extract_weights(model)
        if self.weights is not None and (weights.kv_heads, weights.head_dim, len(weights.layers), weights.dtype) != (
                self.weights.kv_heads, self.weights.head_dim, len(self.weights.layers), self.weights.dtype):
            self.length, self.keys, self.values = 0, [], []
        self.weights, self.version = weights, version
        self._drop_graphs()

    def _drop_graphs(self) -> None:
        self.graphs.clear()
        self.graph_logits.clear()
        self.pool = None

    # ------------------------------------------------------------------ the projection with per-row LoRA

    def _linear(self, x: Tensor, projection) -> Tensor:
        out = F.linear(x, projection[0], projection[1])
        lora = projection[2] if len(projection) > 2 else None
        kind, which = self._lora
        if lora is None or kind == "none":
            return out
        down, up = lora
        if kind == "single":                        # every row uses adapter slot `which`
            delta = F.linear(F.linear(x.to(down.dtype), down[which]), up[which])
        else:                                       # `which`: each row's slot, [rows]
            a = down.index_select(0, which)         # [rows, r, in]
            b = up.index_select(0, which)           # [rows, out, r]
            delta = torch.bmm(torch.bmm(x.to(down.dtype), a.transpose(1, 2)), b.transpose(1, 2))
        return out + delta.to(out.dtype)

    def _set_lora(self, slots: list[int], slot_tensor: Tensor, gather: bool = False) -> None:
        distinct = set(slots)
        if gather:
            self._lora = ("gather", slot_tensor)
        elif distinct == {0}:
            self._lora = ("none", None)
        elif len(distinct) == 1:
            self._lora = ("single", slots[0])
        else:
            self._lora = ("gather", slot_tensor)

    # ------------------------------------------------------------------ cache

    def ensure_length(self, needed: int, running: int) -> None:
        """Make the cache hold ``needed`` positions per row, keeping the first ``running`` rows."""
        if needed <= self.length:
            return
        length = MIN_CACHE_LENGTH
        while length < needed:
            length *= 2
        w = self.weights
        shape = (self.max_batch, w.kv_heads, length, w.head_dim)
        keys = [torch.zeros(shape, dtype=w.dtype, device=self.device) for _ in w.layers]
        values = [torch.zeros(shape, dtype=w.dtype, device=self.device) for _ in w.layers]
        if running and self.keys:
            for new, old in zip(keys + values, self.keys + self.values):
                new[:running, :, :self.length].copy_(old[:running])
        self.keys, self.values, self.length = keys, values, length
        self.slot_range = torch.arange(length, device=self.device)
        self.counters["cache_allocations"] += 1
        self._drop_graphs()

    def reset(self) -> None:
        """Forget every running row (their slots become free)."""
        self.lengths.zero_()
        self.slots.zero_()
        self.host_lengths, self.host_slots = [], []

    def keep(self, keep: list[int]) -> None:
        """Keep the running rows at ``keep`` (increasing), moved down to slots ``0 .. len(keep)-1``."""
        moves = [(target, source) for target, source in enumerate(keep) if target != source]
        if moves:
            longest = max(self.host_lengths[source] for _, source in moves)
            target = torch.tensor([t for t, _ in moves], device=self.device)
            source = torch.tensor([s for _, s in moves], device=self.device)
            for cache in self.keys + self.values:
                prefix = cache[:, :, :longest]
                prefix[target] = prefix[source]
            for buffer in (self.lengths, self.slots, self.tokens):
                buffer[target] = buffer[source]
        self.host_lengths = [self.host_lengths[i] for i in keep]
        self.host_slots = [self.host_slots[i] for i in keep]
        self.lengths[len(keep):] = 0
        self.slots[len(keep):] = 0

    # ------------------------------------------------------------------ prefill

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], prompt_slots: list[int], owner: list[int], pad_id: int,
                needed: int = 0) -> Tensor:
        """Prefill the distinct ``prompts`` (adapter slot ``prompt_slots[p]``) into the slots after the
        running rows: new row ``j`` gets prompt ``owner[j]``. ``needed``: cache positions the new rows
        will use (prompt + max_tokens), reserved now so the cache does not grow mid-decode. Returns the
        new rows' logits ``[k, V]``."""
        self.refresh()
        running, joining = len(self.host_lengths), len(owner)
        if running + joining > self.max_batch:
            raise RuntimeError(f"{running + joining} rows for a cache of {self.max_batch}")
        w = self.weights
        device = self.device
        width = max(len(ids) for ids in prompts)
        self.ensure_length(max(width, needed), running)
        tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        for index, ids in enumerate(prompts):
            tokens[index, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        tokens = tokens.to(device)
        sizes = torch.tensor([len(ids) for ids in prompts], device=device)
        index = torch.arange(width, device=device)
        positions = index[None, :].expand(len(prompts), width)
        cos, sin = apply_rotary(positions, w)
        query, key = index[:, None], index[None, :]
        base_mask = (key <= query)[None] & (key < sizes[:, None, None])         # [prompts, T, T]
        rows = torch.tensor(owner, device=device)
        new = slice(running, running + joining)
        self._set_lora(prompt_slots, torch.tensor(prompt_slots, device=device))
        masks = {}
        x = F.embedding(tokens, w.embed)
        for number, layer in enumerate(w.layers):
            if layer.window not in masks:
                mask = base_mask if layer.window is None else base_mask & (query - key < layer.window)[None]
                masks[layer.window] = tile_for_groups(additive_mask(mask[:, None], w.dtype), w.heads // w.kv_heads)
            h = rms_norm(x, layer.input_norm, w.eps)
            q, k, v = project_qkv(h, layer, w, cos, sin, linear=self._linear)
            self.keys[number][new, :, :width].copy_(k.index_select(0, rows))
            self.values[number][new, :, :width].copy_(v.index_select(0, rows))
            x = x + self._linear(grouped_attention(q, k, v, masks[layer.window], w.kv_heads), layer.o)
            x = x + gated_mlp(rms_norm(x, layer.post_norm, w.eps), layer, linear=self._linear)
        last = x[torch.arange(len(prompts), device=device), sizes - 1]
        logits = self._logits(last).index_select(0, rows)
        self._lora = ("none", None)
        lengths = [len(prompts[p]) for p in owner]
        slots = [prompt_slots[p] for p in owner]
        self.lengths[new] = torch.tensor(lengths, device=device)
        self.slots[new] = torch.tensor(slots, device=device)
        self.host_lengths += lengths
        self.host_slots += slots
        return logits

    def _logits(self, hidden: Tensor) -> Tensor:
        w = self.weights
        return F.linear(rms_norm(hidden, w.norm, w.eps), w.head[0], w.head[1]).float()

    # ------------------------------------------------------------------ decode

    def _step(self, rows: int, length: int) -> Tensor:
        """One decoding step for slots ``0 .. rows-1`` over cache positions ``0 .. length-1``: writes each
        row's new key/value at its own position ``lengths[i]`` and returns float32 logits ``[rows, V]``."""
        w = self.weights
        lengths = self.lengths[:rows]
        cos, sin = apply_rotary(lengths[:, None], w)
        slot_range = self.slot_range[:length]
        valid = slot_range[None, :] <= lengths[:, None]                          # [rows, length]
        row_index = torch.arange(rows, device=self.device)
        masks = {}
        x = F.embedding(self.tokens[:rows], w.embed)[:, None]
        for number, layer in enumerate(w.layers):
            if layer.window not in masks:
                mask = valid if layer.window is None else valid & (
                    slot_range[None, :] > lengths[:, None] - layer.window)
                masks[layer.window] = additive_mask(mask[:, None, None], w.dtype)   # [rows, 1, 1, length]
            h = rms_norm(x, layer.input_norm, w.eps)
            q, k, v = project_qkv(h, layer, w, cos, sin, linear=self._linear)
            keys, values = self.keys[number][:rows], self.values[number][:rows]
            keys[row_index, :, lengths] = k[:, :, 0]
            values[row_index, :, lengths] = v[:, :, 0]
            attended = grouped_attention(q, keys[:, :, :length], values[:, :, :length], masks[layer.window],
                                          w.kv_heads)
            x = x + self._linear(attended, layer.o)
            x = x + gated_mlp(rms_norm(x, layer.post_norm, w.eps), layer, linear=self._linear)
        return self._logits(x[:, 0])

    @torch.no_grad()
    def decode(self, last_tokens: list[int]) -> Tensor:
        """One token for every running row (``last_tokens`` in slot order); returns logits ``[n, V]``."""
        self.refresh()
        rows = len(last_tokens)
        if rows != len(self.host_lengths):
            raise RuntimeError(f"{rows} tokens for {len(self.host_lengths)} running rows")
        self.ensure_length(max(self.host_lengths) + 1, rows)
        self.tokens[:rows] = torch.tensor(last_tokens, device=self.device)
        if self.use_graph:
            bucket = next(size for size in self.buckets if size >= rows)
            logits = self._replay(bucket)[:rows]
        else:
            self._set_lora(self.host_slots, self.slots[:rows])
            try:
                logits = self._step(rows, max(self.host_lengths) + 1)
            finally:
                self._lora = ("none", None)
        self.lengths[:rows] += 1
        self.host_lengths = [length + 1 for length in self.host_lengths]
        return logits

    def _replay(self, bucket: int) -> Tensor:
        graph = self.graphs.get(bucket)
        if graph is None:
            try:
                graph = self._capture(bucket)
            except RuntimeError as error:   # decode eagerly rather than fail the requests
                first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
                logger.warning("static serving engine: CUDA graph capture failed (%s); decoding without graphs",
                               first_line)
                self.use_graph = False
                self.counters["graph_capture_failures"] = self.counters.get("graph_capture_failures", 0) + 1
                rows = len(self.host_lengths)
                self._set_lora(self.host_slots, self.slots[:rows])
                try:
                    return self._step(rows, max(self.host_lengths) + 1)
                finally:
                    self._lora = ("none", None)
        graph.replay()
        return self.graph_logits[bucket]

    def _capture(self, bucket: int):
        """Record `_step` over ``bucket`` slots and the whole cache. The warm-up steps run on the live
        state and write exactly the keys/values the next real step writes (lengths are advanced outside
        the graph), so they leave nothing behind."""
        slot_tensor = self.slots[:bucket]
        self._lora = ("gather", slot_tensor)
        try:
            if self.emulate_graph:
                graph = _EagerStep(self, bucket)
            else:
                stream = torch.cuda.Stream(device=self.device)
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        self._step(bucket, self.length)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                if self.pool is None:
                    self.pool = torch.cuda.graph_pool_handle()
                graph = torch.cuda.CUDAGraph()
                # thread_local: the HTTP threads (e.g. /v1/score on a reward model) may use the GPU meanwhile
                with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                    self.graph_logits[bucket] = self._step(bucket, self.length)
        finally:
            self._lora = ("none", None)   # a captured graph keeps the gathered path it was recorded with
        self.graphs[bucket] = graph
        self.counters["graph_captures"] += 1
        return graph


class _EagerStep:
    """Stands in for a CUDA graph on CPU (``emulate_graph``): each replay runs the bucketed step."""

    def __init__(self, cache: StaticSlotCache, bucket: int):
        self.cache, self.bucket = cache, bucket

    def replay(self) -> None:
        cache = self.cache
        cache._lora = ("gather", cache.slots[:self.bucket])
        try:
            cache.graph_logits[self.bucket] = cache._step(self.bucket, cache.length)
        finally:
            cache._lora = ("none", None)
