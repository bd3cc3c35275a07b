"""A static-cache sampling engine for Llama, Qwen2 and Mistral models (rollout backend ``"static"``).

Why: ``transformers.generate`` spends most of each decoding step in Python and kernel launches
(dynamic cache growth, mask rebuilding, logits processors), so a small policy decodes at nearly the
same milliseconds per step whatever the batch. This engine removes that overhead:

1. **Weights.** A compact forward written here (RMSNorm, rotary embeddings, grouped-query attention
   through `scaled_dot_product_attention`, SwiGLU MLP, optional q/k/v biases, tied or untied head)
   reads the weight tensors straight out of the Hugging Face module; nothing is copied for a plain
   model. For a PEFT LoRA model each adapted linear layer gets a merged *copy*
   ``W + sum_a scale_a * B_a @ A_a`` (computed in float32, stored in the layer's dtype) for the
   rollout only: the model's own weights are never touched, so there is no merge/unmerge rounding
   drift in bf16 base weights, and the samples come from exactly the weights being trained.
2. **Cache.** One pre-allocated key/value cache per layer, ``[rows, kv_heads, P + max_new - 1,
   head_dim]``, where ``P`` is the longest prompt. Prompts are left-padded to ``P``; row ``b`` holds
   ``pad_b`` padding slots, and its token in slot ``s`` has position ``s - pad_b`` (as transformers
   numbers left-padded prompts). Decoding step ``i`` writes slot ``P + i - 1`` for every row, so a
   step is the same shape every time, and attention masks keys by slot: ``pad_b <= slot <= current``
   (and, for sliding-window layers, ``current - slot < window``).
3. **Prefill.** All distinct prompts in one forward (each prompt once, not once per generation: its
   keys/values are copied into the cache rows of all its ``num_generations`` samples).
4. **Decode.** One step = embed the last tokens, run the layers against the cache, sample, write
   the outputs into static buffers, advance the slot counter -- all on device, reading and writing
   only pre-allocated tensors. On CUDA that step is captured once as a `torch.cuda.CUDAGraph` and
   each decoding step is a single ``graph.replay()`` (plus one kernel that draws the sampling noise
   with the rollout's own generator, outside the graph so seeding stays simple). On CPU the same
   step function runs eagerly; no CUDA API is touched unless the model lives on a CUDA device.
   The host looks at the device only every ``sync_every`` steps (16 on CUDA), to stop early when
   every row has finished and to check stop strings.

**Sampling.** Logits are scaled by ``1 / temperature``; then top-k keeps the ``k`` largest, then
top-p keeps the smallest set of the remaining tokens whose (renormalised) probability reaches
``top_p`` (always at least one token). The token is drawn with the Gumbel-max trick,
``argmax(filtered_logits - log E)``, ``E ~ Exponential(1)`` i.i.d. per row and vocabulary entry,
which samples exactly from ``softmax(filtered_logits)``. ``temperature == 0`` is greedy (argmax).

**Returned log-probs** (`RolloutBatch.sampling_logprobs`): ``log_softmax(logits / temperature)`` of
the chosen token, i.e. of the temperature-scaled distribution *before* top-k/top-p filtering (the
usual choice for RL: it is what a trainer's forward pass with the same temperature recomputes, see
`alignkit.logprobs.model_token_logprobs(..., temperature=T)`). For greedy decoding (temperature 0)
they are plain ``log_softmax(logits)`` (temperature 1). They are 0 on padding.

**Stopping** (the same rules as the ``"hf"`` backend: `alignkit.rollout.stops`). A row finishes at its first EOS token
(``params.eos_token_ids``; by default the tokenizer's eos token, the generation config's eos ids
and the end-of-turn markers ``<|im_end|>``, ``<|eot_id|>``, ``<|end|>``, ``<end_of_turn>`` when the
vocabulary has them) or at the first token whose decoded completion before any EOS (special tokens
kept as text) contains one of ``params.stop_strings``. The EOS / stop-completing token is included
in ``completion_mask``; everything after it is ``pad_token_id`` with mask 0 and log-prob 0.
``texts`` are the decoded completions without special tokens (and without the EOS token), cut
just *before* the stop string (the stop string itself is not in the text). EOS is
detected on device; stop strings on the host (each row's output does not depend on when its stop
was noticed, so the post-processing simply cuts at the exact token). ``truncated`` is true exactly
for rows that produced ``max_new_tokens`` tokens without EOS or stop string.

**Memory.** Cache, sampling buffers, merged LoRA copies and the CUDA graph (with its private memory
pool) live only for one `generate` call and are released before it returns (followed by
``torch.cuda.empty_cache()`` on CUDA), so the training phase gets its memory back. Re-capturing a
graph per rollout phase costs a few warm-up steps; we chose that over keeping buffers alive between
phases because prompt lengths change from batch to batch and training memory matters more.

**Fallback.** Anything this forward does not reproduce exactly -- another architecture, a rope type
other than default/linear/llama3/yarn, a non-SiLU MLP, model parallel placement, LoRA variants
such as DoRA -- is sent to a ``transformers.generate`` backend with a one-line warning (the
``"hf"`` backend of `alignkit.rollout.hf` when it is importable, else a small built-in one).
`supports(model)` says in advance which path a model takes.

Tensors in the returned `RolloutBatch` are on the CPU.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.model.peft import unwrap
from alignkit.rollout.base import RolloutBatch, SamplingParams, padding_id
from alignkit.rollout.hf import HFGenerateBackend
from alignkit.rollout.stops import cut_at_stop, stop_token_ids

logger = logging.getLogger(__name__)

__all__ = ["StaticCacheBackend", "supports", "unsupported_reason"]

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
# Rope types whose inverse frequencies do not depend on the sequence length: "default" is computed
# here from rope_theta; the others are read from the model's own rotary module.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class UnsupportedModel(Exception):
    """The static engine cannot reproduce this model exactly; the message says why."""


# --------------------------------------------------------------------------------------------------
# What the engine supports


def _rope_settings(config) -> dict:
    """The rope dict of a config: transformers 5 ``rope_parameters``; 4.x ``rope_scaling`` + ``rope_theta``."""
    parameters = getattr(config, "rope_parameters", None)
    if isinstance(parameters, dict) and parameters:
        if "rope_type" not in parameters and "type" not in parameters:
            raise UnsupportedModel("per-layer-type rope parameters")
        settings = dict(parameters)
    else:
        settings = dict(getattr(config, "rope_scaling", None) or {})
        settings.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    settings["rope_type"] = settings.get("rope_type", settings.get("type", "default")) or "default"
    return settings


def unsupported_reason(model) -> str | None:
    """Why the static engine would fall back for ``model`` (None when it runs it itself).

    A structural check only: nothing is computed or copied.
    """
    try:
        _check_structure(model)
    except UnsupportedModel as error:
        return str(error)
    return None


def supports(model) -> bool:
    """True when `StaticCacheBackend` samples from ``model`` with its own forward (no fallback)."""
    return unsupported_reason(model) is None


def _check_structure(model) -> None:
    base = unwrap(model)
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModel(f"model type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"hidden_act {config.hidden_act!r} (only silu)")
    rope = _rope_settings(config)
    if rope["rope_type"] not in STATIC_ROPE_TYPES:
        raise UnsupportedModel(f"rope type {rope['rope_type']!r} (supported: {', '.join(STATIC_ROPE_TYPES)})")
    if rope["rope_type"] == "default" and rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModel("partial rotary embeddings")
    if getattr(base, "hf_quantizer", None) is not None or getattr(base, "is_quantized", False):
        raise UnsupportedModel("quantized weights")
    devices = {parameter.device for parameter in base.parameters()}
    if len(devices) != 1:
        raise UnsupportedModel("parameters spread over several devices")
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and any(kind not in ("full_attention", "sliding_attention")
                                       for kind in layer_types):
        raise UnsupportedModel(f"layer types {sorted(set(layer_types))}")
    decoder = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    if decoder is None or not hasattr(decoder, "layers") or not hasattr(decoder, "embed_tokens"):
        raise UnsupportedModel(f"cannot find the decoder layers of {type(base).__name__}")
    for module in model.modules():  # PEFT layers we cannot turn into plain weights
        if hasattr(module, "lora_A") or hasattr(module, "lora_embedding_A"):
            if getattr(module, "lora_variant", None) and any(
                    name in module.lora_variant for name in _active(module)):
                raise UnsupportedModel("a LoRA variant (e.g. DoRA) is active")
            if getattr(module, "merged", False) and getattr(module, "disable_adapters", False):
                raise UnsupportedModel("adapters both merged and disabled")
        elif (type(module).__module__.startswith("peft.") and not hasattr(module, "modules_to_save")
              and (hasattr(module, "base_layer") or hasattr(module, "original_module"))):
            raise UnsupportedModel(f"PEFT layer {type(module).__name__} (only LoRA and modules_to_save)")


def _active(module) -> list[str]:
    active = getattr(module, "active_adapters", None)
    if active is None:
        active = getattr(module, "active_adapter", [])
    return [active] if isinstance(active, str) else list(active)


# --------------------------------------------------------------------------------------------------
# Weights, read out of the Hugging Face module


def _module_weights(module, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """(weight, bias) that ``module`` applies now: plain, LoRA (merged copy) or modules_to_save."""
    if hasattr(module, "modules_to_save") and hasattr(module, "original_module"):
        active = _active(module)
        chosen = (module.modules_to_save[active[0]]
                  if active and not getattr(module, "disable_adapters", False)
                  and active[0] in module.modules_to_save else module.original_module)
        return _module_weights(chosen, dtype)
    lora_a = getattr(module, "lora_A", None)
    if lora_a is None:
        lora_a = getattr(module, "lora_embedding_A", None)
    if lora_a is not None and hasattr(module, "base_layer"):
        base_weight, bias = _module_weights(module.base_layer, dtype)
        if getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
            return base_weight, bias
        adapters = [name for name in _active(module) if name in lora_a]
        if not adapters:
            return base_weight, bias
        weight = base_weight.float()
        bias32 = None if bias is None else bias.float()
        for name in adapters:
            weight = weight + module.get_delta_weight(name).float()
            lora_bias = getattr(module, "lora_bias", {}).get(name, False)
            if lora_bias:
                extra = module.lora_B[name].bias.float() * module.scaling[name]
                bias32 = extra if bias32 is None else bias32 + extra
        return weight.to(dtype), (None if bias32 is None else bias32.to(dtype))
    weight = getattr(module, "weight", None)
    if weight is None or type(module).__module__.startswith("peft."):
        raise UnsupportedModel(f"cannot read the weights of {type(module).__name__}")
    return weight.detach(), (None if getattr(module, "bias", None) is None else module.bias.detach())


def _base_parameter(module) -> Tensor:
    """The underlying weight tensor of a plain, LoRA-wrapped or modules_to_save-wrapped module."""
    while True:
        if hasattr(module, "original_module") and hasattr(module, "modules_to_save"):
            module = module.original_module
        elif hasattr(module, "base_layer"):
            module = module.base_layer
        else:
            return module.weight


@dataclass
class _LayerWeights:
    input_norm: Tensor
    post_norm: Tensor
    q: tuple[Tensor, Tensor | None]
    k: tuple[Tensor, Tensor | None]
    v: tuple[Tensor, Tensor | None]
    o: tuple[Tensor, Tensor | None]
    gate: tuple[Tensor, Tensor | None]
    up: tuple[Tensor, Tensor | None]
    down: tuple[Tensor, Tensor | None]
    window: int | None


@dataclass
class DecoderWeights:
    embed: Tensor
    layers: list[_LayerWeights]
    norm: Tensor
    head: tuple[Tensor, Tensor | None]
    eps: float
    heads: int
    kv_heads: int
    head_dim: int
    inv_freq: Tensor          # [head_dim / 2] float32
    rope_scale: float         # cos/sin multiplier (yarn's attention factor; 1 otherwise)
    dtype: torch.dtype
    device: torch.device

    @property
    def vocab(self) -> int:
        return self.head[0].shape[0]


def _norm_weight(module) -> Tensor:
    if type(module).__module__.startswith("peft."):
        raise UnsupportedModel(f"adapted norm layer {type(module).__name__}")
    return module.weight.detach()


@torch.no_grad()
def extract_weights(model) -> DecoderWeights:
    _check_structure(model)
    base = unwrap(model)
    config = base.config
    decoder = getattr(base, base.base_model_prefix)
    embed_module = decoder.embed_tokens
    reference = _base_parameter(embed_module)
    dtype, device = reference.dtype, reference.device
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    model_type = config.model_type
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    layers = []
    for index, layer in enumerate(decoder.layers):
        attention, mlp = layer.self_attn, layer.mlp
        # as the transformers models do: Mistral applies its window (if any) to every layer; Qwen2
        # to the layers its layer_types mark "sliding_attention" (only with use_sliding_window);
        # Llama has no sliding window
        if model_type == "mistral":
            layer_window = window
        elif model_type == "qwen2" and getattr(config, "use_sliding_window", False) and layer_types:
            layer_window = window if layer_types[index] == "sliding_attention" else None
        else:
            layer_window = None
        layers.append(_LayerWeights(
            input_norm=_norm_weight(layer.input_layernorm),
            post_norm=_norm_weight(layer.post_attention_layernorm),
            q=_module_weights(attention.q_proj, dtype), k=_module_weights(attention.k_proj, dtype),
            v=_module_weights(attention.v_proj, dtype), o=_module_weights(attention.o_proj, dtype),
            gate=_module_weights(mlp.gate_proj, dtype), up=_module_weights(mlp.up_proj, dtype),
            down=_module_weights(mlp.down_proj, dtype),
            window=None if layer_window is None else int(layer_window),
        ))
    if layers and layers[0].q[0].shape[0] != heads * head_dim:
        raise UnsupportedModel("q_proj shape does not match num_attention_heads * head_dim")
    rope = _rope_settings(config)
    if rope["rope_type"] == "default":
        theta = float(rope.get("rope_theta", 10000.0))
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        rope_scale = 1.0
    else:  # a static scaled rope: trust the model's own (unmodified) inverse frequencies
        rotary = getattr(decoder, "rotary_emb", None)
        frequencies = getattr(rotary, "original_inv_freq", None)
        if frequencies is None:
            frequencies = getattr(rotary, "inv_freq", None)
        if frequencies is None:
            raise UnsupportedModel("cannot read the rotary embedding's inverse frequencies")
        inv_freq = frequencies.detach().float().clone()
        rope_scale = float(getattr(rotary, "attention_scaling", 1.0))
    if inv_freq.numel() * 2 != head_dim:
        raise UnsupportedModel("partial rotary embeddings")
    head_module = base.get_output_embeddings()
    if head_module is None:
        raise UnsupportedModel("no output embedding")
    return DecoderWeights(
        embed=_module_weights(embed_module, dtype)[0], layers=layers,
        norm=_norm_weight(decoder.norm), head=_module_weights(head_module, dtype),
        eps=float(getattr(config, "rms_norm_eps", 1e-6)), heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, inv_freq=inv_freq.to(device), rope_scale=rope_scale, dtype=dtype,
        device=device,
    )


# --------------------------------------------------------------------------------------------------
# The forward pieces


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _linear(x: Tensor, weight_bias: tuple[Tensor, Tensor | None]) -> Tensor:
    return F.linear(x, weight_bias[0], weight_bias[1])


def apply_rotary(positions: Tensor, weights: DecoderWeights) -> tuple[Tensor, Tensor]:
    """cos, sin ``[rows, T, head_dim]`` for integer ``positions`` ``[rows, T]``."""
    angles = positions.float()[..., None] * weights.inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    if weights.rope_scale != 1.0:
        cos, sin = cos * weights.rope_scale, sin * weights.rope_scale
    return cos.to(weights.dtype), sin.to(weights.dtype)


def _apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x ``[rows, heads, T, D]``; the second half of each head is rotated against the first."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean keep-mask -> additive mask (0 / -inf), built once per step instead of once per layer.
    Every query row keeps at least one key, so no softmax row is all -inf."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, kv_heads: int) -> Tensor:
    """Grouped-query attention without repeating keys/values.

    q ``[rows, heads, T, D]``, k/v ``[rows, kv_heads, S, D]``. The ``G = heads / kv_heads`` query
    heads that share a key/value head are laid out as extra query rows of that head
    (``[rows, kv_heads, G*T, D]``, row ``g*T + t``), so one plain attention call serves them all.
    ``mask`` is additive, ``[rows, 1, G*T, S]`` (see `tile_for_groups`) or, for ``T == 1``,
    ``[rows, 1, 1, S]``. Returns ``[rows, T, heads * D]``.
    """
    rows, heads, length, dim = q.shape
    q = q.reshape(rows, kv_heads, (heads // kv_heads) * length, dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.reshape(rows, heads, length, dim).transpose(1, 2).reshape(rows, length, heads * dim)


def tile_for_groups(mask: Tensor, group: int) -> Tensor:
    """``[rows, 1, T, S]`` -> ``[rows, 1, G*T, S]`` to match `grouped_attention`'s query layout."""
    return mask.repeat(1, 1, group, 1) if group > 1 and mask.shape[2] > 1 else mask


def gated_mlp(x: Tensor, layer: _LayerWeights, linear=_linear) -> Tensor:
    """``linear(x, weight_bias)`` applies one projection (the serving engine passes one that adds
    each row's own LoRA, `alignkit.serve.static_engine`)."""
    return linear(F.silu(linear(x, layer.gate)) * linear(x, layer.up), layer.down)


def project_qkv(x: Tensor, layer: _LayerWeights, weights: DecoderWeights, cos: Tensor, sin: Tensor, linear=_linear):
    rows, length, _ = x.shape
    q = linear(x, layer.q).view(rows, length, weights.heads, weights.head_dim).transpose(1, 2)
    k = linear(x, layer.k).view(rows, length, weights.kv_heads, weights.head_dim).transpose(1, 2)
    v = linear(x, layer.v).view(rows, length, weights.kv_heads, weights.head_dim).transpose(1, 2)
    return _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin), v


# --------------------------------------------------------------------------------------------------
# Sampling


@dataclass(frozen=True)
class _Sampler:
    temperature: float
    top_k: int
    top_p: float

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def __call__(self, logits: Tensor, noise: Tensor | None) -> tuple[Tensor, Tensor]:
        """(token [rows], log-prob [rows] float32) from float32 logits ``[rows, V]``.

        ``noise`` holds Exponential(1) draws ``[rows, V]`` (unused when greedy).
        """
        scaled = logits if self.greedy or self.temperature == 1.0 else logits / self.temperature
        if self.greedy:
            token = scaled.argmax(-1)
        else:
            gumbel = -noise.clamp_min(1e-30).log()
            if self.top_k or self.top_p < 1.0:
                if self.top_k:
                    candidates, index = torch.topk(scaled, self.top_k, dim=-1)   # sorted, largest first
                else:
                    candidates, index = torch.sort(scaled, dim=-1, descending=True)
                if self.top_p < 1.0:
                    probs = torch.softmax(candidates, dim=-1)
                    mass_before = torch.cumsum(probs, dim=-1) - probs
                    candidates = candidates.masked_fill(mass_before >= self.top_p, float("-inf"))
                pick = (candidates + gumbel.gather(-1, index)).argmax(-1, keepdim=True)
                token = index.gather(-1, pick).squeeze(-1)
            else:
                token = (scaled + gumbel).argmax(-1)
        chosen = scaled.gather(-1, token[:, None]).squeeze(-1)
        return token, chosen - torch.logsumexp(scaled, dim=-1)


# --------------------------------------------------------------------------------------------------
# One rollout's device state


class _EagerReplay:
    """Stands in for a CUDA graph in `_Rollout.capture(emulate=True)`: replay runs the step eagerly."""

    def __init__(self, step):
        self._step = step

    def replay(self) -> None:
        self._step()


class _Rollout:
    """Static buffers, prefill and the decode step of one `generate` call."""

    def __init__(self, weights: DecoderWeights, prompts: list[list[int]], group: int, max_new_tokens: int,
                 sampler: _Sampler, pad_id: int, eos_ids: list[int], generator: torch.Generator | None):
        self.w = weights
        self.sampler = sampler
        self.group = group
        self.max_new = max_new_tokens
        self.pad_id = pad_id
        self.generator = generator
        device = weights.device
        self.prompt_width = width = max(len(ids) for ids in prompts)
        self.rows = rows = len(prompts) * group
        self.slots = width + max_new_tokens - 1
        prompt_pad = torch.tensor([width - len(ids) for ids in prompts], dtype=torch.long)
        self.prompt_pad = prompt_pad.to(device)
        self.prompt_tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        for row, ids in enumerate(prompts):
            self.prompt_tokens[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        self.prompt_tokens = self.prompt_tokens.to(device)
        # --- static state read and written by the decode step
        self.pad = self.prompt_pad.repeat_interleave(group)                      # [rows]
        self.slot_range = torch.arange(self.slots, device=device)               # [S]
        shape = (rows, weights.kv_heads, self.slots, weights.head_dim)
        # zeros, not empty: masked slots must hold finite numbers (0 * NaN would poison attention)
        self.keys = [torch.zeros(shape, dtype=weights.dtype, device=device) for _ in weights.layers]
        self.values = [torch.zeros(shape, dtype=weights.dtype, device=device) for _ in weights.layers]
        self.tokens = torch.full((rows,), pad_id, dtype=torch.long, device=device)
        self.finished = torch.zeros(rows, dtype=torch.bool, device=device)
        self.slot = torch.full((1,), width, dtype=torch.long, device=device)    # cache slot to write
        self.step = torch.ones(1, dtype=torch.long, device=device)              # output column
        self.eos = torch.tensor(sorted(set(eos_ids)) or [-1], dtype=torch.long, device=device)
        self.out_tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
        self.out_logps = torch.zeros((rows, max_new_tokens), dtype=torch.float32, device=device)
        self.noise = None if sampler.greedy else torch.empty((rows, weights.vocab), dtype=torch.float32,
                                                             device=device)
        self.graph = None

    # ---- sampling bookkeeping shared by prefill and decode
    def draw_noise(self) -> None:
        if self.noise is not None:
            self.noise.exponential_(generator=self.generator)

    def _emit(self, logits: Tensor, column: Tensor) -> None:
        token, logp = self.sampler(logits, self.noise)
        alive = ~self.finished
        token = torch.where(alive, token, torch.full_like(token, self.pad_id))
        logp = torch.where(alive, logp, torch.zeros_like(logp))
        self.out_tokens.index_copy_(1, column, token[:, None])
        self.out_logps.index_copy_(1, column, logp[:, None])
        self.finished |= (token[:, None] == self.eos).any(-1)
        self.tokens.copy_(token)

    def _logits(self, hidden: Tensor) -> Tensor:
        return _linear(rms_norm(hidden, self.w.norm, self.w.eps), self.w.head).float()

    # ---- prefill: every distinct prompt once, keys/values copied to its `group` rows
    @torch.no_grad()
    def prefill(self) -> None:
        w, width, group = self.w, self.prompt_width, self.group
        tokens, pad = self.prompt_tokens, self.prompt_pad
        prompts = tokens.shape[0]
        index = torch.arange(width, device=tokens.device)
        positions = (index[None, :] - pad[:, None]).clamp_min(0)
        cos, sin = apply_rotary(positions, w)
        query, key = index[:, None], index[None, :]
        base_mask = (key <= query)[None] & (key >= pad[:, None, None])           # [prompts, T, T]
        # padding queries attend to themselves only, so no row is empty (their outputs are unused)
        base_mask |= torch.eye(width, dtype=torch.bool, device=tokens.device)[None]
        masks = {}
        x = F.embedding(tokens, w.embed)
        for number, layer in enumerate(w.layers):
            if layer.window not in masks:
                mask = base_mask if layer.window is None else base_mask & (
                    (query - key < layer.window)[None] | torch.eye(width, dtype=torch.bool,
                                                                 device=tokens.device)[None])
                masks[layer.window] = tile_for_groups(additive_mask(mask[:, None], w.dtype),
                                                       w.heads // w.kv_heads)
            h = rms_norm(x, layer.input_norm, w.eps)
            q, k, v = project_qkv(h, layer, w, cos, sin)
            for cache, new in ((self.keys[number], k), (self.values[number], v)):
                cache.view(prompts, group, w.kv_heads, self.slots, w.head_dim)[..., :width, :].copy_(
                    new[:, None])
            x = x + _linear(grouped_attention(q, k, v, masks[layer.window], w.kv_heads), layer.o)
            x = x + gated_mlp(rms_norm(x, layer.post_norm, w.eps), layer)
        logits = self._logits(x[:, -1]).repeat_interleave(group, dim=0)
        self.draw_noise()
        self._emit(logits, torch.zeros(1, dtype=torch.long, device=tokens.device))

    # ---- one decoding step: static shapes, no host synchronisation (captured as a CUDA graph)
    def decode_step(self) -> None:
        w = self.w
        slot = self.slot
        positions = (slot - self.pad)[:, None]                                   # [rows, 1]
        cos, sin = apply_rotary(positions, w)
        valid = (self.slot_range[None, :] >= self.pad[:, None]) & (self.slot_range[None, :] <= slot)
        masks = {}
        x = F.embedding(self.tokens, w.embed)[:, None]                          # [rows, 1, H]
        for number, layer in enumerate(w.layers):
            if layer.window not in masks:
                mask = valid if layer.window is None else valid & (self.slot_range > slot - layer.window)[None]
                masks[layer.window] = additive_mask(mask[:, None, None], w.dtype)     # [rows, 1, 1, S]
            h = rms_norm(x, layer.input_norm, w.eps)
            q, k, v = project_qkv(h, layer, w, cos, sin)
            self.keys[number].index_copy_(2, slot, k)
            self.values[number].index_copy_(2, slot, v)
            attended = grouped_attention(q, self.keys[number], self.values[number],
                                          masks[layer.window], w.kv_heads)
            x = x + _linear(attended, layer.o)
            x = x + gated_mlp(rms_norm(x, layer.post_norm, w.eps), layer)
        self._emit(self._logits(x[:, 0]), self.step)
        self.slot.add_(1)
        self.step.add_(1)

    # ---- CUDA graph
    def capture(self, emulate: bool = False) -> None:
        """Record `decode_step` into a CUDA graph; called before prefill.

        Capture needs warm-up runs first (lazy initialisation, kernel selection, allocator pools) on
        a side stream. They scribble on the state: every warm-up step runs from the same saved
        slot/step (so no write goes past the cache end), and afterwards the state is restored and the
        output buffers are cleared; the cache slot they wrote is overwritten by the first real step
        before anything reads it. ``emulate=True`` runs exactly this sequence without CUDA (the
        "graph" then replays `decode_step` eagerly): the tests use it to check the reset on CPU.
        """
        state = (self.tokens, self.finished, self.slot, self.step)
        saved = [tensor.clone() for tensor in state]

        def restore():
            for tensor, value in zip(state, saved):
                tensor.copy_(value)

        if self.noise is not None:
            self.noise.fill_(1.0)    # warm-up must not consume the rollout's random numbers
        try:
            with torch.no_grad():
                if emulate:
                    for _ in range(2):
                        self.decode_step()
                        restore()
                    graph = _EagerReplay(self.decode_step)
                else:
                    stream = torch.cuda.Stream()
                    stream.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(stream):
                        for _ in range(2):
                            self.decode_step()
                            restore()
                    torch.cuda.current_stream().wait_stream(stream)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        self.decode_step()
        finally:
            restore()
            self.out_tokens.fill_(self.pad_id)
            self.out_logps.zero_()
        self.graph = graph

    @torch.no_grad()
    def step_once(self) -> None:
        self.draw_noise()
        if self.graph is not None:
            self.graph.replay()
        else:
            self.decode_step()

    def release(self) -> None:
        self.graph = None        # a CUDAGraph frees its private memory pool when it is deleted
        self.keys = self.values = []
        self.noise = self.out_tokens = self.out_logps = None


# --------------------------------------------------------------------------------------------------
# Host-side finishing: EOS, stop strings, masks, texts


def finish_batch(tokenizer, tokens: Tensor, logps: Tensor, prompt_ids: list[list[int]], group: int,
                 params: SamplingParams, eos_ids: list[int], pad_id: int, started: float) -> RolloutBatch:
    """Turn raw sampled tokens ``[N, steps]`` (pad after EOS) into a `RolloutBatch`.

    Row ``i`` ends at its first EOS, else at the token completing its first stop string, else it is
    truncated (it then has exactly ``params.max_new_tokens`` tokens).
    """
    tokens, logps = tokens.cpu(), logps.cpu().float()
    ends, stopped, texts = [], [], []
    for row in tokens.tolist():
        kept, ended, text = cut_at_stop(tokenizer, row, eos_ids, params.stop_strings)
        ends.append(len(kept))
        stopped.append(ended)
        texts.append(text)
    width = max(ends) if ends else 0
    position = torch.arange(width)
    mask = position[None, :] < torch.tensor(ends)[:, None]
    completion_ids = torch.where(mask, tokens[:, :width], torch.full_like(tokens[:, :width], pad_id))
    sampling_logprobs = torch.where(mask, logps[:, :width], torch.zeros_like(logps[:, :width]))
    truncated = torch.tensor([not ended and end >= params.max_new_tokens
                              for ended, end in zip(stopped, ends)], dtype=torch.bool)
    return RolloutBatch(
        prompt_ids=[list(ids) for ids in prompt_ids for _ in range(group)],
        completion_ids=completion_ids, completion_mask=mask.float(),
        sampling_logprobs=sampling_logprobs, truncated=truncated, texts=texts, group_size=group,
        seconds=time.perf_counter() - started,
    )


# --------------------------------------------------------------------------------------------------
# The backend


class StaticCacheBackend:
    """Rollout backend ``"static"``: static KV cache, batched prefill, CUDA-graph decode loop.

    Args:
        use_cuda_graph: capture the decode step as a CUDA graph when the model is on a CUDA device.
        sync_every: decoding steps between host checks (all finished? stop strings?); default 16
            on CUDA, 1 on CPU.
        fallback: backend for models `supports` rejects; default: ``transformers.generate``.
    """

    name = "static"
    supports = staticmethod(supports)

    def __init__(self, use_cuda_graph: bool = True, sync_every: int | None = None, fallback=None):
        self.use_cuda_graph = use_cuda_graph
        self.sync_every = sync_every
        self.fallback = fallback
        self._noticed: set[str] = set()
        self.last_stats: dict = {}
        self._emulate_graph = False   # tests: run the capture/reset sequence on CPU without CUDA

    def _fall_back(self, reason: str, model, tokenizer, prompt_ids, num_generations, params, with_logprobs):
        if reason not in self._noticed:
            self._noticed.add(reason)
            logger.warning("static rollout engine: %s; falling back to transformers.generate", reason)
        backend = self.fallback if self.fallback is not None else HFGenerateBackend()
        return backend.generate(model, tokenizer, prompt_ids, num_generations, params, with_logprobs=with_logprobs)

    def generate(self, model, tokenizer, prompt_ids: list[list[int]], num_generations: int,
                 params: SamplingParams, with_logprobs: bool = True) -> RolloutBatch:
        """Sample; the log-probs come from the decode loop itself, so ``with_logprobs`` costs nothing
        here (it is passed on to the fallback backend)."""
        _validate(prompt_ids, num_generations, params)
        try:
            weights = extract_weights(model)
        except UnsupportedModel as error:
            return self._fall_back(str(error), model, tokenizer, prompt_ids, num_generations, params, with_logprobs)
        try:
            return self._generate(weights, model, tokenizer, prompt_ids, num_generations, params)
        finally:
            on_cuda = weights.device.type == "cuda"
            del weights   # merged LoRA copies; cache, buffers and graph went with the rollout object
            if on_cuda:
                torch.cuda.empty_cache()

    @torch.no_grad()
    def _generate(self, weights: DecoderWeights, model, tokenizer, prompt_ids, group, params) -> RolloutBatch:
        started = time.perf_counter()
        device = weights.device
        on_cuda = device.type == "cuda"
        pad_id = padding_id(tokenizer)
        eos_ids = [int(token) for token in params.eos_token_ids] or stop_token_ids(tokenizer, unwrap(model))
        vocab = weights.vocab
        top_k = params.top_k if 0 < params.top_k < vocab else 0
        sampler = _Sampler(float(params.temperature), int(top_k), float(params.top_p))
        generator = None
        if not sampler.greedy:
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            generator = torch.Generator(device=device)
            generator.manual_seed(int(seed))
        rollout = _Rollout(weights, [list(ids) for ids in prompt_ids], group, params.max_new_tokens,
                           sampler, pad_id, eos_ids, generator)
        sync_every = self.sync_every or (16 if on_cuda else 1)
        stats = {"rows": rollout.rows, "prompt_width": rollout.prompt_width, "cuda_graph": False}
        try:
            emulate = self._emulate_graph and not on_cuda
            if (on_cuda and self.use_cuda_graph or emulate) and params.max_new_tokens > 1:
                captured = time.perf_counter()
                try:
                    rollout.capture(emulate=emulate)
                except RuntimeError as error:  # decode eagerly rather than fail the rollout
                    logger.warning("static rollout engine: CUDA graph capture failed (%s); decoding "
                                   "without a graph", str(error).splitlines()[0] if str(error) else error)
                else:
                    stats["cuda_graph"] = not emulate
                    stats["graph_emulated"] = emulate
                    stats["capture_seconds"] = time.perf_counter() - captured
            prefill_started = time.perf_counter()
            rollout.prefill()
            steps = 1
            if on_cuda:
                torch.cuda.synchronize(device)
            stats["prefill_seconds"] = time.perf_counter() - prefill_started
            decode_started = time.perf_counter()
            while steps < params.max_new_tokens:
                if steps % sync_every == 0 or steps == 1:
                    if self._all_done(rollout, tokenizer, params.stop_strings, steps):
                        break
                rollout.step_once()
                steps += 1
            tokens = rollout.out_tokens[:, :steps].cpu()           # synchronises
            logps = rollout.out_logps[:, :steps].cpu()
            stats["decode_seconds"] = time.perf_counter() - decode_started
            stats["decode_steps"] = steps - 1
        finally:
            rollout.release()
        self.last_stats = stats
        return finish_batch(tokenizer, tokens, logps, prompt_ids, group, params, eos_ids, pad_id, started)

    @staticmethod
    def _all_done(rollout: _Rollout, tokenizer, stops: list[str], steps: int) -> bool:
        """Host check: mark rows whose text contains a stop string finished; True when all are."""
        if stops:
            alive = (~rollout.finished).nonzero().flatten().tolist()
            if alive:
                rows = rollout.out_tokens[alive, :steps].tolist()
                texts = tokenizer.batch_decode(rows, skip_special_tokens=False)
                done = [row for row, text in zip(alive, texts) if any(stop in text for stop in stops)]
                if done:
                    rollout.finished[torch.tensor(done, device=rollout.finished.device)] = True
        return bool(rollout.finished.all().item())


def _validate(prompt_ids, num_generations: int, params: SamplingParams) -> None:
    if not prompt_ids or any(len(ids) == 0 for ids in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}")
    if params.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
    if params.temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {params.top_k}")
