"""The training forward pass: decoder hidden states, then per-token log-probs through the head.

Every method (SFT, reward models, DPO, GRPO, PPO), the reference policy, evaluation and the rollout
backends' log-prob pass go through these functions, so there is one answer to "where is the
decoder?", "which head, with which scale or softcap?" and "which hidden state predicts which
token?":

    hidden = decoder(input_ids)                       [B, T, H]  (final norm, no lm_head)
    log p(y_t) = log_softmax(s * W h_t / T)[y_t]      only at the positions asked for

The head is applied by `alignkit.logprobs` (the chunked kernel), never as full ``[B, T, V]`` logits.
Architecture-specific head transforms are reproduced: Gemma-2/3 ``final_logit_softcapping``
(``z = c * tanh(z / c)``), Granite ``logits_scaling`` (divide) and Cohere ``logit_scale`` (multiply).

Layout of a rollout (`completion_layout`): ``[left-padded prompt | right-padded completion]`` with
positions ``cumsum(attention) - 1`` as `generate` numbers them; hidden state ``prompt_width - 1 + j``
predicts completion token ``j``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from transformers import DynamicCache

from alignkit.logprobs import chunked_token_logprobs
from alignkit.model.peft import unwrap

# ----------------------------------------------------------------------------- lookup

def decoder_of(model):
    """The backbone that maps input ids to final hidden states (LoRA layers included, if any).

    For a ``LlamaForCausalLM`` this is its ``.model``; calling it returns an output whose
    ``last_hidden_state`` is ``[batch, tokens, hidden]``, already through the final norm.
    """
    base = unwrap(model)
    prefix = getattr(base, "base_model_prefix", "")
    decoder = getattr(base, prefix, None) if prefix else None
    if decoder is None and hasattr(base, "get_decoder"):
        decoder = base.get_decoder()
    # get_decoder() falls back to the model itself; calling a *ForCausalLM would return logits.
    if decoder is None or (decoder is base and base.get_output_embeddings() is not None):
        raise ValueError(f"cannot find the decoder stack of {type(base).__name__}")
    return decoder


def output_layer(model):
    """The output head module (``lm_head``, weight ``[vocab, hidden]``) of a causal LM or PeftModel.

    A LoRA layer on the head would be silently dropped by the chunked kernel (its ``.weight`` is the
    base weight), so an active one is refused ("all-linear" never targets the head). A
    ``modules_to_save`` copy resolves to the active adapter's copy, as in the model's own forward.
    """
    base = unwrap(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output embeddings (lm_head)")
    if hasattr(head, "base_layer") and hasattr(head, "merged"):
        if head.active_adapters and not head.disable_adapters and not head.merged:
            raise NotImplementedError(
                "a LoRA adapter on the lm_head is not supported by chunked log-probs; leave the "
                "output layer out of target_modules (\"all-linear\" already does)")
    return head


def output_weight(model) -> Tensor:
    """The lm_head weight ``[V, H]`` (see `output_layer`)."""
    return output_layer(model).weight


def logit_transform(model) -> tuple[float, float | None]:
    """``(multiplier on raw logits, softcap)``: the architecture's lm_head post-processing.

    Missing or ``None`` config attributes mean no transform (plain Llama/Qwen/Mistral heads).
    """
    config = getattr(unwrap(model), "config", None)
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


# ----------------------------------------------------------------------------- hidden states and head

def decoder_hidden_states(model, input_ids: Tensor, attention_mask: Tensor | None = None,
                          position_ids: Tensor | None = None) -> Tensor:
    """Last hidden state ``[B, T, H]`` of the decoder stack (final norm included, lm_head not).

    Arguments pass through unchanged, so results match ``model(input_ids, attention_mask,
    position_ids)``: with left padding and no ``position_ids``, positions are ``0..T-1`` as there.
    A 4-D additive attention mask is cast to the model's dtype, as attention expects.
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask.to(next(model.parameters()).dtype)
    out = decoder_of(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def head_logprobs(model, hidden: Tensor, targets: Tensor, temperature: float = 1.0, chunk_size: int = 1024,
                  with_entropy: bool = False) -> tuple[Tensor, Tensor | None, Tensor]:
    """Log-probs of ``targets`` from decoder ``hidden`` states through ``model``'s output layer.

    The one place the head is applied: its bias, logit scale and softcap included, chunk by chunk.
    Callers that select a subset of positions first (loss tokens, completion tokens) pay the
    vocabulary matmul only for those. ``temperature`` must be > 0 (greedy sampling scores at 1).

    Returns ``(logps [..] float32, entropy [..] or None (no grad), hits [..] bool)``; ``hits`` says
    whether each target is the arg-max token.
    """
    head = output_layer(model)
    scale, softcap = logit_transform(model)
    effective = temperature / scale
    if not (temperature > 0 and math.isfinite(effective)):
        raise ValueError(f"invalid temperature {temperature} for logit scale {scale}")
    return chunked_token_logprobs(hidden, head.weight, targets, chunk_size=chunk_size, temperature=effective,
                                  bias=getattr(head, "bias", None), softcap=softcap, with_entropy=with_entropy)


def model_token_logprobs(model, input_ids: Tensor, attention_mask: Tensor | None = None,
                         position_ids: Tensor | None = None, chunk_size: int = 1024,
                         temperature: float = 1.0, with_entropy: bool = False):
    """Log-probability of each next token, ``[B, T-1]``, aligned with ``input_ids[:, 1:]``.

    Entry ``[b, t]`` is ``log p(input_ids[b, t+1] | input_ids[b, :t+1])``; mask it with
    ``attention_mask[:, 1:]`` (or a loss mask shifted the same way). With ``with_entropy=True``
    returns ``(logps, entropy)``, entropy without grad.
    """
    hidden = decoder_hidden_states(model, input_ids, attention_mask, position_ids)[:, :-1]
    logps, entropy, _ = head_logprobs(model, hidden, input_ids[:, 1:], temperature, chunk_size, with_entropy)
    return (logps, entropy) if with_entropy else logps


def sequence_logprob_sums(token_logps: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row ``(sum_t mask_t * logp_t, sum_t mask_t)``, both ``[B]`` float32.

    Masked positions contribute exactly zero even if their log-prob is ``-inf``/NaN garbage.
    Divide the first by the second (clamped to >= 1) for average log-probs (IPO, SimPO, ORPO).
    """
    mask = mask.to(token_logps.device).bool()
    sums = torch.where(mask, token_logps, torch.zeros_like(token_logps)).sum(-1).float()
    return sums, mask.sum(-1).float()


def response_logprob_sums(model, batch: dict[str, torch.Tensor], chunk_size: int = 1024,
                          per_token: bool = False):
    """Sum of the response tokens' log-probabilities per sequence, and their count: ``([2B], [2B])``
    for an `alignkit.data.pairs.collate_pairs` batch (any layout).

    The decoder runs once over all rows; the output layer is applied only at the hidden states that
    predict a response token (``source_index``), chunk by chunk (``token_logprobs``), so prompt and
    padding positions cost no vocabulary projection at all. With ``per_token=True`` also returns the
    flat ``[N]`` log-probs, sequence by sequence (for drift metrics).
    """
    input_ids = batch["input_ids"]
    hidden = decoder_hidden_states(model, input_ids, batch["attention_mask"], batch.get("position_ids"))
    selected = hidden.reshape(-1, hidden.shape[-1])[batch["source_index"]]   # [N, H]
    targets = input_ids.reshape(-1)[batch["target_index"]]                   # [N]
    owner = batch["target_sequence"]
    logps, _, _ = head_logprobs(model, selected, targets, chunk_size=chunk_size)
    sequences = 2 * batch["margin"].shape[0]
    sums = torch.zeros(sequences, dtype=torch.float32, device=logps.device).index_add(0, owner, logps)
    counts = torch.zeros(sequences, dtype=torch.float32, device=logps.device).index_add(
        0, owner, torch.ones_like(logps))
    if per_token:
        return sums, counts, logps
    return sums, counts


# ----------------------------------------------------------------------------- prompt + completion

def left_pad(rows: list[list[int]], pad_id: int, width: int | None = None) -> tuple[Tensor, Tensor]:
    """``(ids [N, W], attention [N, W])`` with every row right-aligned (left padding)."""
    width = max(len(r) for r in rows) if width is None else width
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            attention[i, width - len(row):] = 1
    return ids, attention


def completion_layout(prompt_ids: list[list[int]], completion_ids: Tensor, completion_mask: Tensor,
                      pad_id: int) -> dict[str, Tensor | int]:
    """The training layout of a rollout: ``[left-padded prompt | right-padded completion]``.

    Returns ``input_ids``, ``attention_mask`` (prompt tokens and completion tokens inside the mask),
    ``position_ids`` (``cumsum(attention) - 1``, as `generate` numbers left-padded rows) and
    ``prompt_width``: hidden state ``prompt_width - 1 + j`` predicts completion token ``j``.
    """
    prompts, prompt_attention = left_pad(prompt_ids, pad_id)
    completion_mask = completion_mask.to(torch.long).cpu()
    input_ids = torch.cat([prompts, completion_ids.cpu()], dim=1)
    attention = torch.cat([prompt_attention, completion_mask], dim=1)
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention, "position_ids": position_ids,
            "prompt_width": prompts.shape[1]}


def completion_hidden_states(model, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                             prompt_width: int, completion_length: int) -> Tensor:
    """Hidden states that predict the completion tokens, ``[N, completion_length, H]``."""
    hidden = decoder_hidden_states(model, input_ids, attention_mask, position_ids)
    start = prompt_width - 1
    return hidden[:, start:start + completion_length]


def completion_logprobs(model, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                        prompt_width: int, completion_length: int, temperature: float = 1.0,
                        chunk_size: int = 1024, with_entropy: bool = False):
    """Log-prob of each completion token, ``[N, completion_length]`` (and its entropy, no grad).

    Only the completion positions go through the output head: the prompt's hidden states are
    never turned into vocabulary logits.
    """
    hidden = completion_hidden_states(model, input_ids, attention_mask, position_ids, prompt_width,
                                      completion_length)
    targets = input_ids[:, prompt_width:prompt_width + completion_length]
    logps, entropy, _ = head_logprobs(model, hidden, targets, temperature, chunk_size, with_entropy)
    return (logps, entropy) if with_entropy else logps


def grouped_completion_logprobs(model, prompt_ids: Tensor, prompt_attention: Tensor, completion_ids: Tensor,
                                completion_mask: Tensor, group: int, temperature: float = 1.0,
                                chunk_size: int = 1024, with_entropy: bool = False):
    """`completion_logprobs` for rows that come in groups sharing one prompt, running each prompt once.

    ``prompt_ids``/``prompt_attention`` are ``[P, W]`` (left-padded, one row per group) and the
    completions ``[P * group, L]`` (group after group). The prompts go through the decoder once,
    with a KV cache; the cache is repeated ``group`` times and the completions attend to it. The
    result (values and gradients) equals the per-row forward over ``[prompt | completion]``, at
    about ``1/group`` of the prompt's cost, forward and backward.
    """
    decoder = decoder_of(model)
    cache = DynamicCache()
    prompt_positions = (prompt_attention.cumsum(-1) - 1).clamp(min=0)
    out = decoder(input_ids=prompt_ids, attention_mask=prompt_attention, position_ids=prompt_positions,
                  past_key_values=cache, use_cache=True)
    hidden = [out.last_hidden_state[:, -1:].repeat_interleave(group, dim=0)]  # predicts completion token 0
    length = completion_ids.shape[1]
    if length > 1:
        cache.batch_repeat_interleave(group)
        attention = torch.cat([prompt_attention.repeat_interleave(group, dim=0),
                               completion_mask[:, :-1].to(prompt_attention.dtype)], dim=1)
        starts = prompt_attention.sum(-1).repeat_interleave(group)[:, None]
        positions = starts + torch.arange(length - 1, device=completion_ids.device)[None]
        out = decoder(input_ids=completion_ids[:, :-1], attention_mask=attention, position_ids=positions,
                      past_key_values=cache, use_cache=True)
        hidden.append(out.last_hidden_state)
    hidden = torch.cat(hidden, dim=1)
    logps, entropy, _ = head_logprobs(model, hidden, completion_ids, temperature, chunk_size, with_entropy)
    return (logps, entropy) if with_entropy else logps


@torch.no_grad()
def batched_completion_logprobs(model, prompt_ids: list[list[int]], completion_ids: Tensor,
                                completion_mask: Tensor, pad_id: int, temperature: float = 1.0,
                                batch_size: int = 64, chunk_size: int = 1024) -> Tensor:
    """``[N, L]`` float32 log-probs of given completions (0 outside the mask), no grad, in batches.

    What a rollout backend records as the sampling log-probs and what a reference policy scores;
    ``temperature`` <= 0 (greedy) scores at 1.
    """
    device = next(model.parameters()).device
    out = torch.zeros(completion_ids.shape, dtype=torch.float32)
    if completion_ids.shape[1] == 0:
        return out
    for start in range(0, len(prompt_ids), batch_size):
        end = min(start + batch_size, len(prompt_ids))
        layout = completion_layout(prompt_ids[start:end], completion_ids[start:end], completion_mask[start:end],
                                   pad_id)
        logps = completion_logprobs(
            model, layout["input_ids"].to(device), layout["attention_mask"].to(device),
            layout["position_ids"].to(device), layout["prompt_width"], completion_ids.shape[1],
            temperature=temperature if temperature > 0 else 1.0, chunk_size=chunk_size)
        out[start:end] = logps.float().cpu() * completion_mask[start:end].float()
    return out
