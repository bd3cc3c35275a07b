"""Per-token log-probabilities from hidden states, without full-vocabulary logits in memory.

For a decoder's last hidden state `h_t` and the output embedding (lm_head) weight `W` (`[V, H]`)
the logits are `z_t = W h_t / temperature` and the log-probability of the token `y_t` is

    log p(y_t) = z_{t,y_t} - logsumexp_v z_{t,v}

Every alignment loss (SFT, DPO, GRPO, PPO) only needs that one number per token, yet the usual
`log_softmax(model(x).logits).gather(...)` materialises `[batch, seq, vocab]` float32 logits, and
autograd keeps them (and the log-softmax output) alive until backward. With vocabularies of
50k-150k tokens that is most of the memory of a DPO or GRPO step: 8 x 2048 tokens x 150k x 4 bytes
is ~10 GB per copy.

`token_logprobs` instead runs a custom autograd function over the flattened `N = B*T` rows,
`chunk_size` rows at a time. Forward keeps only `[N]` results (the log-prob and the logsumexp);
backward recomputes each chunk's logits and uses

    d log p(y_t) / d z_t = onehot(y_t) - softmax(z_t)

so at any moment at most a few `[chunk_size, V]` float32 buffers exist. The price is one extra
`[chunk, H] x [H, V]` matmul per chunk in backward. Logits are always computed in float32 (with
autocast disabled) whatever the dtype of `hidden` / `weight`; gradients are returned in the
inputs' dtypes, and the weight gradient is accumulated in float32 across chunks.

Model glue (`decoder_hidden_states`, `output_weight`, `model_token_logprobs`) runs only the
decoder stack of a Hugging Face causal LM (optionally wrapped in a `peft.PeftModel`) and applies
the chunked head itself. Output-logit transforms that some architectures apply after the lm_head
are reproduced: Gemma-2/3 `final_logit_softcapping` (`z = c * tanh(z / c)`, applied before the
temperature), Granite `logits_scaling` (divide) and Cohere `logit_scale` (multiply). When a config
has no such attribute (or it is `None`), nothing is applied: plain Llama/Qwen/Mistral heads.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "token_logprobs",
    "token_logprobs_and_entropy",
    "token_logprobs_and_hits",
    "hidden_token_logprobs",
    "decoder_hidden_states",
    "output_weight",
    "model_token_logprobs",
    "sequence_logprob_sums",
]


def _chunk_logits(hidden_chunk: Tensor, weight32: Tensor, bias32: Tensor | None,
                  temperature: float, softcap: float | None) -> tuple[Tensor, Tensor | None]:
    """Float32 logits of a chunk, and (only with softcapping) the tanh needed by backward."""
    raw = hidden_chunk.float() @ weight32.T
    if bias32 is not None:
        raw += bias32
    tanh = None
    if softcap is not None:
        tanh = torch.tanh(raw.div_(softcap))
        raw = tanh * softcap
    if temperature != 1.0:
        raw.div_(temperature)
    return raw, tanh


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """Autograd function: (hidden[N,H], weight[V,H], bias[V]|None, targets[N]) -> (logp[N], entropy)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, temperature, softcap, with_entropy):
        n = hidden.shape[0]
        logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse_all = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(n if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        hits = torch.empty(n, dtype=torch.bool, device=hidden.device)  # target is the argmax
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            weight32 = weight.float()
            bias32 = None if bias is None else bias.float()
            for start in range(0, n, chunk_size):
                end = min(start + chunk_size, n)
                z, _ = _chunk_logits(hidden[start:end], weight32, bias32, temperature, softcap)
                lse = torch.logsumexp(z, dim=-1)
                lse_all[start:end] = lse
                target_logit = z.gather(1, targets[start:end, None]).squeeze(1)
                logps[start:end] = target_logit - lse
                hits[start:end] = target_logit >= z.amax(dim=-1)
                if with_entropy:
                    # H = logsumexp(z) - sum_v softmax(z)_v z_v
                    probs = torch.exp(z - lse[:, None])
                    entropy[start:end] = lse - (probs * z).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse_all)
        ctx.chunk_size, ctx.temperature, ctx.softcap = chunk_size, temperature, softcap
        ctx.mark_non_differentiable(entropy, hits)
        return logps, entropy, hits

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps, grad_entropy, grad_hits):
        hidden, weight, bias, targets, lse_all = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = grad_weight = grad_bias = None
        if grad_logps is None or not (need_hidden or need_weight or need_bias):
            return None, None, None, None, None, None, None, None
        chunk_size, temperature, softcap = ctx.chunk_size, ctx.temperature, ctx.softcap
        n = hidden.shape[0]
        grad_logps = grad_logps.float()
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            weight32 = weight.float()
            bias32 = None if bias is None else bias.float()
            if need_hidden:
                grad_hidden = torch.empty_like(hidden)
            if need_weight:
                grad_weight = torch.zeros_like(weight32)
            if need_bias:
                grad_bias = torch.zeros_like(bias32)
            for start in range(0, n, chunk_size):
                end = min(start + chunk_size, n)
                h = hidden[start:end]
                z, tanh = _chunk_logits(h, weight32, bias32, temperature, softcap)
                g = grad_logps[start:end, None]
                # grad_z = g * (onehot(y) - softmax(z)), built in place in z's buffer.
                grad_z = z.sub_(lse_all[start:end, None]).exp_().mul_(-g)
                grad_z.scatter_add_(1, targets[start:end, None], g)
                # Chain rule back to the raw logits W h + b.
                grad_z.div_(temperature)
                if tanh is not None:
                    grad_z.mul_(1.0 - tanh.square_())
                if need_hidden:
                    grad_hidden[start:end] = (grad_z @ weight32).to(hidden.dtype)
                if need_weight:
                    grad_weight.addmm_(grad_z.T, h.float())
                if need_bias:
                    grad_bias += grad_z.sum(0)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def _chunked(hidden, weight, targets, chunk_size, temperature, bias, softcap, with_entropy):
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree: "
                         "expected hidden [..., H] and targets [...]")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H] with H={hidden.shape[-1]}, got {tuple(weight.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    lead = targets.shape
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    # Ignored positions (e.g. -100) are clamped to a valid id; callers mask them afterwards.
    targets1d = targets.reshape(-1).to(device=hidden.device, dtype=torch.long).clamp(min=0)
    logps, entropy, hits = _ChunkedTokenLogprobs.apply(
        hidden2d, weight, bias, targets1d, int(chunk_size), float(temperature),
        None if softcap is None else float(softcap), with_entropy,
    )
    return logps.reshape(lead), (entropy.reshape(lead) if with_entropy else None), hits.reshape(lead)


def token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int = 1024,
                   temperature: float = 1.0, bias: Tensor | None = None,
                   softcap: float | None = None) -> Tensor:
    """Exact `log p(y_t) = z_{t,y_t} - logsumexp_v z_{t,v}` with `z_t = W h_t / temperature`.

    Args:
        hidden: `[B, T, H]` (any leading shape) decoder output, any float dtype.
        weight: `[V, H]` output embedding / lm_head weight (may be frozen).
        targets: `[B, T]` token ids; negative ids (e.g. -100 padding) are clamped to 0 and give a
            meaningless value the caller must mask out.
        chunk_size: rows of the flattened `B*T` processed at once; peak extra memory is a few
            `[chunk_size, V]` float32 buffers instead of `[B*T, V]`.
        temperature: logits are divided by it (sampling temperature, for on-policy RL).
        bias: optional `[V]` lm_head bias.
        softcap: optional final-logit softcapping `c`: `z = c * tanh((W h + b) / c) / temperature`.

    Returns:
        `[B, T]` float32 log-probabilities; differentiable w.r.t. `hidden`, `weight` and `bias`
        (gradients computed chunk by chunk in a custom backward that recomputes the logits).
    """
    return _chunked(hidden, weight, targets, chunk_size, temperature, bias, softcap, False)[0]


def token_logprobs_and_hits(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int = 1024,
                            temperature: float = 1.0, bias: Tensor | None = None,
                            softcap: float | None = None) -> tuple[Tensor, Tensor]:
    """`token_logprobs` plus, without gradient, whether each target is the arg-max token
    (`z_{t,y_t} >= max_v z_{t,v}`): token accuracy for free from the same chunked pass."""
    logps, _, hits = _chunked(hidden, weight, targets, chunk_size, temperature, bias, softcap, False)
    return logps, hits


def token_logprobs_and_entropy(hidden: Tensor, weight: Tensor, targets: Tensor,
                               chunk_size: int = 1024, temperature: float = 1.0,
                               bias: Tensor | None = None,
                               softcap: float | None = None) -> tuple[Tensor, Tensor]:
    """`token_logprobs` plus the per-token entropy of the (tempered) next-token distribution.

    `H_t = logsumexp_v z_{t,v} - sum_v softmax(z_t)_v z_{t,v}` (nats), computed in the same chunked
    pass as the log-probs and without gradient (a monitoring quantity).

    Returns:
        `(logps [B, T] float32 with grad, entropy [B, T] float32 without grad)`.
    """
    return _chunked(hidden, weight, targets, chunk_size, temperature, bias, softcap, True)[:2]


# --------------------------------------------------------------------------------------------
# Model glue
# --------------------------------------------------------------------------------------------

def _unwrap_peft(model):
    """The transformers model inside a `peft.PeftModel` (LoRA layers are injected in place, so it
    still applies the adapters, and `PeftModel.disable_adapter()` still switches them off)."""
    get_base_model = getattr(model, "get_base_model", None)
    if callable(get_base_model) and hasattr(model, "peft_config"):
        return get_base_model()
    return model


def _decoder_of(model):
    base = _unwrap_peft(model)
    prefix = getattr(base, "base_model_prefix", "")
    decoder = getattr(base, prefix, None) if prefix else None
    if decoder is None and hasattr(base, "get_decoder"):
        decoder = base.get_decoder()
    # `get_decoder()` falls back to the model itself; calling a *ForCausalLM would return logits.
    if decoder is None or (decoder is base and hasattr(base, "lm_head")):
        raise ValueError(f"cannot find the decoder stack of {type(base).__name__}")
    return decoder


def decoder_hidden_states(model, input_ids: Tensor, attention_mask: Tensor | None = None,
                          position_ids: Tensor | None = None) -> Tensor:
    """Last hidden state `[B, T, H]` of a causal LM's decoder stack (final norm included, lm_head not).

    Works for a plain Hugging Face causal LM (`getattr(model, model.base_model_prefix)` is the
    decoder, e.g. `LlamaForCausalLM.model`) and for a `peft.PeftModel` around one. Arguments are
    passed through unchanged, so results match `model(input_ids, attention_mask, position_ids)`:
    with left padding and no `position_ids`, positions are `0..T-1` as in that call.
    """
    decoder = _decoder_of(model)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _output_layer(model):
    base = _unwrap_peft(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output embeddings (lm_head)")
    # A LoRA layer on the lm_head: its `.weight` is the *base* weight, so the chunked head would
    # silently drop the adapter. Refuse unless the adapter is merged or disabled.
    if hasattr(head, "base_layer") and hasattr(head, "merged"):
        if head.active_adapters and not head.disable_adapters and not head.merged:
            raise NotImplementedError(
                "a LoRA adapter on the lm_head is not supported by chunked log-probs; leave the "
                "output layer out of target_modules (\"all-linear\" already does)")
    return head


def output_weight(model) -> Tensor:
    """The lm_head (output embedding) weight `[V, H]` of a causal LM or a `peft.PeftModel` around one.

    A `modules_to_save` copy of the lm_head resolves to the active adapter's copy (or the original
    under `disable_adapter()`), as in the model's own forward.
    """
    return _output_layer(model).weight


def _logit_transform(model) -> tuple[float, float | None]:
    """(multiplier on raw logits, softcap) reproducing architecture-specific lm_head post-processing.

    Missing or `None` config attributes mean no transform (ignored, not an error).
    """
    config = getattr(_unwrap_peft(model), "config", None)
    scale = 1.0
    logits_scaling = getattr(config, "logits_scaling", None)  # Granite: logits / logits_scaling
    if logits_scaling is not None:
        scale /= float(logits_scaling)
    logit_scale = getattr(config, "logit_scale", None)  # Cohere: logits * logit_scale
    if isinstance(logit_scale, (int, float)):
        scale *= float(logit_scale)
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    if softcap is not None and scale != 1.0:
        raise NotImplementedError("logit scaling combined with final_logit_softcapping")
    return scale, (None if softcap is None else float(softcap))


def model_token_logprobs(model, input_ids: Tensor, attention_mask: Tensor | None = None,
                         position_ids: Tensor | None = None, chunk_size: int = 1024,
                         temperature: float = 1.0, with_entropy: bool = False):
    """Log-probability of each next token under `model`, shape `[B, T-1]`.

    Entry `[b, t]` is `log p(input_ids[b, t+1] | input_ids[b, :t+1])`, i.e. aligned with
    `input_ids[:, 1:]` (hidden state `t` predicts token `t+1`); mask it with
    `attention_mask[:, 1:]` (or a loss mask shifted the same way). With `with_entropy=True`
    returns `(logps, entropy)`, entropy `[B, T-1]` without grad.
    """
    hidden = decoder_hidden_states(model, input_ids, attention_mask, position_ids)[:, :-1]
    targets = input_ids[:, 1:]
    result = hidden_token_logprobs(model, hidden, targets, chunk_size, temperature, with_entropy=with_entropy)
    return (result[0], result[1]) if with_entropy else result[0]


def hidden_token_logprobs(model, hidden: Tensor, targets: Tensor, chunk_size: int = 1024,
                          temperature: float = 1.0, with_entropy: bool = False) -> tuple[Tensor, Tensor | None, Tensor]:
    """Log-probs of `targets` from already computed decoder `hidden` states through `model`'s output
    layer (its bias, logit scale and softcapping included). Callers that select a subset of positions
    first (e.g. only loss tokens) pay the vocabulary matmul only for those.

    Returns `(logps, entropy or None, hits)`; `hits` says whether each target is the arg-max token.
    """
    head = _output_layer(model)
    scale, softcap = _logit_transform(model)
    effective_temperature = temperature / scale
    if not math.isfinite(effective_temperature):
        raise ValueError(f"invalid logit scale {scale} for temperature {temperature}")
    bias = getattr(head, "bias", None)
    return _chunked(hidden, head.weight, targets, chunk_size, effective_temperature, bias, softcap, with_entropy)


def sequence_logprob_sums(token_logps: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row `(sum_t mask_t * logp_t, sum_t mask_t)`, both `[B]` float32.

    Masked positions contribute exactly zero even if their log-prob is `-inf`/NaN garbage.
    Divide the first by the second (clamped to >= 1) for average log-probs (IPO, SimPO, ORPO).
    """
    mask = mask.to(token_logps.device).bool()
    sums = torch.where(mask, token_logps, torch.zeros_like(token_logps)).sum(-1).float()
    return sums, mask.sum(-1).float()
