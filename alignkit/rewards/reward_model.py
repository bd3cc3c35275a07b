"""A trained reward model (``alignkit rm``) as a reward function: ``reward_model(path=...)``.

Each (prompt, completion) is rendered with the reward model's own chat template as the
conversation ``prompt messages + [assistant: completion]`` and scored by the scalar head at its
last token (`alignkit.model.heads.ScalarHeadModel.sequence_scores`). The prompt messages are the
``prompt_messages`` field when the caller passes it (GRPO and PPO do: system prompt included),
else a single user turn holding ``prompts[i]``. Too-long conversations lose prompt tokens from
the left first (``max_length``), so the completion is always scored.

    rewards:
      - {name: reward_model, kwargs: {path: runs/rm/final, batch_size: 16}}
"""
from __future__ import annotations

from typing import Any

import torch

from alignkit.data import tokenize_prompt_response
from alignkit.model.heads import load_scalar_model
from alignkit.rewards.registry import register_factory


@register_factory("reward_model")
def reward_model(path: str, batch_size: int = 16, max_length: int = 1024, device: str | None = None,
                 dtype: str | None = None, normalize: bool = False):
    """Load the reward model at ``path`` once; return a reward function scoring with it.

    ``normalize=True`` standardises each batch's scores (mean 0, std 1), useful when the model's
    scale is arbitrary and it is combined with other rewards.
    """


    model, tokenizer = load_scalar_model(path, device=device, dtype=dtype)
    model.eval()
    model_device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @torch.no_grad()
    def score(prompts: list[str], completions: list[str], prompt_messages: list | None = None,
              **fields: Any) -> list[float]:
        rows = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            messages = prompt_messages[i] if prompt_messages is not None else [{"role": "user", "content": str(prompt)}]
            prompt_ids, response_ids, _ = tokenize_prompt_response(
                tokenizer, messages, str(completion) if completion else " ", max_length,
                max_prompt_length=max(1, max_length // 2))
            rows.append(prompt_ids + response_ids)
        scores: list[float] = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, row in enumerate(chunk):  # right padding: the head reads the last real token
                ids[j, :len(row)] = torch.tensor(row)
                attention[j, :len(row)] = 1
            values = model.sequence_scores(ids.to(model_device), attention.to(model_device))
            scores.extend(float(v) for v in values.float().cpu())
        if normalize and len(scores) > 1:
            mean = sum(scores) / len(scores)
            std = (sum((s - mean) ** 2 for s in scores) / (len(scores) - 1)) ** 0.5
            scores = [(s - mean) / (std + 1e-6) for s in scores]
        return scores

    score.__name__ = "reward_model"
    score.path = str(path)  # type: ignore[attr-defined]
    return score
