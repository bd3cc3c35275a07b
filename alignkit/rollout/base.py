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
    name: str

    def generate(self, model, tokenizer, prompt_ids: list[list[int]], num_generations: int,
                 params: SamplingParams) -> RolloutBatch: ...
