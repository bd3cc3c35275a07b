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
   the chunked head (`alignkit.model.forward`) at the sampling temperature, laid out exactly as the
   training forward lays them out (`completion_layout`), so a ratio computed later compares like
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
from transformers import DynamicCache

from alignkit.model.forward import batched_completion_logprobs, left_pad
from alignkit.rollout.base import RolloutBatch, SamplingParams, padding_id
from alignkit.rollout.stops import cut_at_stop, stop_token_ids


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
        logps = batched_completion_logprobs(model, prompt_ids, completion_ids, completion_mask, pad_id,
                                            params.temperature, batch_size=logprob_batch_size,
                                            chunk_size=chunk_size)
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
        pad_id = padding_id(tokenizer, eos_ids)
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
