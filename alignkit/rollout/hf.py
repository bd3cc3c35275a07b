"""Rollouts with `transformers` `generate`: the default backend, and the one the tests exercise.

What one call does, for P prompts and G = ``num_generations``:

1. repeat every prompt G times (group after group), left-pad the N = P*G rows to one width and
   sample them in batched `generate` calls with the KV cache (``max_batch_size`` rows per call);
   temperature 0 means greedy;
2. per row, keep the tokens up to and including the first EOS / end-of-turn token; if a stop
   string appears first, keep the tokens up to the one that completes it (post-hoc cut: the stop
   strings are also handed to `generate` so finished rows stop early, but the cut and the mask
   are ours). A row that ends neither way was cut off by ``max_new_tokens``: ``truncated``;
3. recompute the sampling log-probs in one no-grad forward pass over prompt + completion with
   the chunked head (`alignkit.logprobs`) at the sampling temperature, laid out exactly as the
   training forward lays them out (`rollout_tensors`), so a ratio computed later compares like
   with like.

Simplifications, on purpose: the log-probs are those of the tempered distribution *before*
top-p / top-k truncation (what PPO/GRPO implementations use; truncation only changes which
tokens can be drawn); the decoded text of a completion stopped by a stop string ends before the
stop string (its tokens stay in the mask, so the model is trained on them).
"""
from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from alignkit.rollout.base import RolloutBatch, SamplingParams
from alignkit.rollout.stops import cut_at_stop, stop_token_ids


def _pad_id(tokenizer, eos_ids: list[int]) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if eos_ids:
        return eos_ids[0]
    raise ValueError("the tokenizer has no pad token and no EOS token to pad with")


def left_pad(rows: list[list[int]], pad_id: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [N, W], attention [N, W])`` with every row right-aligned (left padding)."""
    width = max(len(r) for r in rows) if width is None else width
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            attention[i, width - len(row):] = 1
    return ids, attention


def rollout_tensors(prompt_ids: list[list[int]], completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                    pad_id: int) -> dict[str, torch.Tensor | int]:
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


def completion_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                        prompt_width: int, completion_length: int, temperature: float = 1.0,
                        chunk_size: int = 1024, with_entropy: bool = False):
    """Log-prob of each completion token, ``[N, completion_length]`` (and its entropy, no grad).

    Only the completion positions go through the (chunked) output head: the prompt's hidden states
    are never turned into vocabulary logits.
    """
    from alignkit.logprobs import decoder_hidden_states

    hidden = decoder_hidden_states(model, input_ids, attention_mask, position_ids)
    start = prompt_width - 1
    hidden = hidden[:, start:start + completion_length]
    targets = input_ids[:, prompt_width:prompt_width + completion_length]
    logps, entropy = head_logprobs(model, hidden, targets, temperature, chunk_size, with_entropy)
    return (logps, entropy) if with_entropy else logps


def grouped_completion_logprobs(model, prompt_ids: torch.Tensor, prompt_attention: torch.Tensor,
                                completion_ids: torch.Tensor, completion_mask: torch.Tensor, group: int,
                                temperature: float = 1.0, chunk_size: int = 1024, with_entropy: bool = False):
    """`completion_logprobs` for rows that come in groups sharing one prompt, running each prompt once.

    ``prompt_ids``/``prompt_attention`` are ``[P, W]`` (left-padded, one row per group) and the
    completions ``[P * group, L]`` (group after group). The prompts go through the decoder once,
    with a KV cache; the cache is repeated ``group`` times and the completions attend to it. The
    result (values and gradients) equals the per-row forward over ``[prompt | completion]``, at
    about ``1/group`` of the prompt's cost, forward and backward.
    """
    from transformers import DynamicCache

    from alignkit.models import decoder_of

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
    logps, entropy = head_logprobs(model, hidden, completion_ids, temperature, chunk_size, with_entropy)
    return (logps, entropy) if with_entropy else logps


def head_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                  chunk_size: int = 1024, with_entropy: bool = False):
    """``(logps, entropy or None)`` of ``targets`` from decoder ``hidden`` states through the model's
    output layer, chunked (no ``[N, V]`` logits kept), with the architecture's logit scaling or
    softcapping applied as `alignkit.logprobs.model_token_logprobs` does."""
    from alignkit.logprobs import _logit_transform, _output_layer, token_logprobs, token_logprobs_and_entropy

    head = _output_layer(model)
    scale, softcap = _logit_transform(model)
    options = dict(chunk_size=chunk_size, temperature=max(temperature, 1e-6) / scale,
                   bias=getattr(head, "bias", None), softcap=softcap)
    if with_entropy:
        return token_logprobs_and_entropy(hidden, head.weight, targets, **options)
    return token_logprobs(hidden, head.weight, targets, **options), None


@torch.no_grad()
def sampling_logprobs(model, prompt_ids: list[list[int]], completion_ids: torch.Tensor,
                      completion_mask: torch.Tensor, pad_id: int, temperature: float,
                      batch_size: int = 64, chunk_size: int = 1024) -> torch.Tensor:
    """``[N, L]`` float32 log-probs of the sampled tokens (0 outside the mask), in one pass per batch."""
    device = next(model.parameters()).device
    out = torch.zeros(completion_ids.shape, dtype=torch.float32)
    if completion_ids.shape[1] == 0:
        return out
    for start in range(0, len(prompt_ids), batch_size):
        end = min(start + batch_size, len(prompt_ids))
        layout = rollout_tensors(prompt_ids[start:end], completion_ids[start:end], completion_mask[start:end], pad_id)
        logps = completion_logprobs(
            model, layout["input_ids"].to(device), layout["attention_mask"].to(device),
            layout["position_ids"].to(device), layout["prompt_width"], completion_ids.shape[1],
            temperature=temperature if temperature > 0 else 1.0, chunk_size=chunk_size)
        out[start:end] = logps.float().cpu() * completion_mask[start:end].float()
    return out


def build_rollout_batch(model, tokenizer, prompt_ids: list[list[int]], sampled: list[list[int]],
                        num_generations: int, params: SamplingParams, eos_ids: list[int], pad_id: int,
                        with_logprobs: bool = True, logprob_batch_size: int = 64,
                        chunk_size: int = 1024) -> RolloutBatch:
    """Cut each sampled row at EOS / stop string, pad, mask, flag truncation, add log-probs.

    ``prompt_ids`` and ``sampled`` have one entry per sample (prompts already repeated). Shared by
    every backend that samples token lists (transformers, vLLM).
    """
    eos_set = set(eos_ids)
    kept, ended, texts = [], [], []
    for tokens in sampled:
        row, done, text = cut_at_stop(tokenizer, tokens, eos_set, list(params.stop_strings))
        kept.append(row)
        ended.append(done)
        texts.append(text)
    width = max((len(r) for r in kept), default=0)
    completion_ids = torch.full((len(kept), width), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((len(kept), width), dtype=torch.float32)
    for i, row in enumerate(kept):
        if row:
            completion_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            completion_mask[i, :len(row)] = 1.0
    if with_logprobs:
        logps = sampling_logprobs(model, prompt_ids, completion_ids, completion_mask, pad_id, params.temperature,
                                  batch_size=logprob_batch_size, chunk_size=chunk_size)
    else:  # the caller promised not to read them: NaN makes any use loud
        logps = torch.full(completion_ids.shape, float("nan"))
    return RolloutBatch(prompt_ids=[list(p) for p in prompt_ids], completion_ids=completion_ids,
                        completion_mask=completion_mask, sampling_logprobs=logps,
                        truncated=torch.tensor([not e for e in ended], dtype=torch.bool), texts=texts,
                        group_size=num_generations)


class HFGenerateBackend:
    """Batched `model.generate` with the KV cache; see the module docstring.

    ``max_batch_size``: rows (samples, not prompts) per `generate` call, None = all at once.
    ``share_prefix`` (default): each prompt is prefilled once and its KV cache repeated for its
    ``num_generations`` samples, instead of prefilling the same prompt G times.
    ``logprob_batch_size``: rows per log-prob forward pass. ``compute_logprobs=False`` skips the
    log-prob pass (``sampling_logprobs`` is then NaN); GRPO with one iteration per batch does not
    need them, since its ratio is 1 by construction.
    """

    name = "hf"

    def __init__(self, max_batch_size: int | None = None, logprob_batch_size: int = 64, chunk_size: int = 1024,
                 compute_logprobs: bool = True, share_prefix: bool = True):
        self.max_batch_size = max_batch_size
        self.share_prefix = share_prefix
        self.logprob_batch_size = logprob_batch_size
        self.chunk_size = chunk_size
        self.compute_logprobs = compute_logprobs
        self.last_timings: dict[str, float] = {}

    @staticmethod
    def supports(model) -> bool:
        return hasattr(model, "generate")

    def generate(self, model, tokenizer, prompt_ids: list[list[int]], num_generations: int,
                 params: SamplingParams, with_logprobs: bool | None = None) -> RolloutBatch:
        if num_generations < 1:
            raise ValueError(f"num_generations must be >= 1, got {num_generations}")
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("every prompt needs at least one token")
        with_logprobs = self.compute_logprobs if with_logprobs is None else with_logprobs
        started = time.perf_counter()
        device = next(model.parameters()).device
        eos_ids = list(params.eos_token_ids) or stop_token_ids(tokenizer, model)
        pad_id = _pad_id(tokenizer, eos_ids)
        expanded = [list(p) for p in prompt_ids for _ in range(num_generations)]
        was_training = model.training
        model.eval()
        rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else []) \
            if params.seed is not None else nullcontext()
        try:
            with rng, torch.no_grad():
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                sampled = self._sample(model, tokenizer, expanded, params, eos_ids, pad_id, device, num_generations)
            generated = time.perf_counter()
            batch = build_rollout_batch(model, tokenizer, expanded, sampled, num_generations, params, eos_ids,
                                        pad_id, with_logprobs=with_logprobs,
                                        logprob_batch_size=self.logprob_batch_size, chunk_size=self.chunk_size)
        finally:
            if was_training:
                model.train()
        finished = time.perf_counter()
        batch.seconds = finished - started
        self.last_timings = {"sampling": generated - started, "logprobs": finished - generated}
        return batch

    def _sample(self, model, tokenizer, rows: list[list[int]], params: SamplingParams, eos_ids: list[int],
                pad_id: int, device, group: int = 1) -> list[list[int]]:
        sampling = params.temperature > 0
        settings = dict(
            max_new_tokens=params.max_new_tokens, do_sample=sampling, eos_token_id=eos_ids, pad_token_id=pad_id,
            num_beams=1, repetition_penalty=1.0, use_cache=True,
        )
        if sampling:
            settings.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        else:
            settings.update(temperature=None, top_p=None, top_k=None)
        if params.stop_strings:
            settings.update(stop_strings=list(params.stop_strings), tokenizer=tokenizer)
        if self.share_prefix and group > 1:
            unique = rows[::group]
            per_call = max(1, (self.max_batch_size or len(rows)) // group)
            sampled: list[list[int]] = []
            for start in range(0, len(unique), per_call):
                chunk = unique[start:start + per_call]
                input_ids, attention = left_pad(chunk, pad_id)
                input_ids, attention = input_ids.to(device), attention.to(device)
                cache = None
                if input_ids.shape[1] > 1:  # prefill each prompt once, then share its cache
                    from transformers import DynamicCache

                    cache = DynamicCache()
                    positions = (attention.cumsum(-1) - 1).clamp(min=0)
                    model(input_ids=input_ids[:, :-1], attention_mask=attention[:, :-1],
                          position_ids=positions[:, :-1], past_key_values=cache, use_cache=True)
                    cache.batch_repeat_interleave(group)
                output = model.generate(input_ids=input_ids.repeat_interleave(group, dim=0),
                                        attention_mask=attention.repeat_interleave(group, dim=0),
                                        past_key_values=cache, **settings)
                sampled.extend(output[:, input_ids.shape[1]:].tolist())
            return sampled
        size = self.max_batch_size or len(rows)
        sampled = []
        for start in range(0, len(rows), size):
            chunk = rows[start:start + size]
            input_ids, attention = left_pad(chunk, pad_id)
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **settings)
            sampled.extend(output[:, input_ids.shape[1]:].tolist())
        return sampled
