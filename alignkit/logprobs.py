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

This module is the kernel only: tensors in, tensors out. Which hidden states and which head of
which model is `alignkit.model.forward`'s business.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["chunked_token_logprobs", "token_logprobs", "token_logprobs_and_entropy", "token_logprobs_and_hits"]


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


def chunked_token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int = 1024,
                           temperature: float = 1.0, bias: Tensor | None = None, softcap: float | None = None,
                           with_entropy: bool = False) -> tuple[Tensor, Tensor | None, Tensor]:
    """`token_logprobs`, its entropy (when asked, no grad) and whether each target is the arg-max:
    ``(logps, entropy or None, hits)``, all from one chunked pass."""
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
    return chunked_token_logprobs(hidden, weight, targets, chunk_size, temperature, bias, softcap, False)[0]


def token_logprobs_and_hits(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int = 1024,
                            temperature: float = 1.0, bias: Tensor | None = None,
                            softcap: float | None = None) -> tuple[Tensor, Tensor]:
    """`token_logprobs` plus, without gradient, whether each target is the arg-max token
    (`z_{t,y_t} >= max_v z_{t,v}`): token accuracy for free from the same chunked pass."""
    logps, _, hits = chunked_token_logprobs(hidden, weight, targets, chunk_size, temperature, bias, softcap, False)
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
    return chunked_token_logprobs(hidden, weight, targets, chunk_size, temperature, bias, softcap, True)[:2]
