"""The rollout-backend interface: prompts in, sampled completions (ids, masks, log-probs) out.

Online methods (GRPO, PPO) only talk to this interface, so the sampling side can be swapped
(``transformers.generate``, alignkit's static-cache engine, vLLM) without touching a trainer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 = off
    stop_strings: list[str] = field(default_factory=list)
    eos_token_ids: list[int] = field(default_factory=list)   # empty: the tokenizer's eos / end-of-turn
    seed: int | None = None


@dataclass
class RolloutBatch:
    """`num_prompts * num_generations` samples, laid out prompt after prompt (group after group).

    Tensors are right-padded; ``completion_mask`` is 1 on generated tokens up to and including the
    EOS token (or the token that completed a stop string) and 0 after it.
    """

    prompt_ids: list[list[int]]            # one per sample (a prompt repeated num_generations times)
    completion_ids: torch.Tensor           # [N, L] long, padded with pad_token_id
    completion_mask: torch.Tensor          # [N, L] float
    sampling_logprobs: torch.Tensor        # [N, L] float32 log-prob of each sampled token (0 on padding)
    truncated: torch.Tensor                # [N] bool: hit max_new_tokens without EOS/stop string
    texts: list[str]                       # decoded completions (special tokens removed, stop string cut)
    group_size: int = 1
    seconds: float = 0.0

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)


class RolloutBackend(Protocol):
    """What every sampler offers. ``with_logprobs=False`` lets a backend skip the sampling log-prob
    pass (``sampling_logprobs`` is then NaN, so any use is loud)."""

    name: str

    def generate(self, model, tokenizer, prompt_ids: list[list[int]], num_generations: int,
                 params: SamplingParams, with_logprobs: bool = True) -> RolloutBatch: ...


def padding_id(tokenizer, eos_ids: list[int] | tuple[int, ...] = ()) -> int:
    """The id completions are padded with: the tokenizer's pad token, else its (or the first) EOS, else 0."""
    for candidate in (tokenizer.pad_token_id, *eos_ids, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0
