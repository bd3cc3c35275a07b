"""A trained reward model (``alignkit rm``) as a reward function: ``reward_model(path=...)``.

Each (prompt, completion) is rendered with the reward model's own chat template as the
conversation ``prompt messages + [assistant: completion]`` and scored by the scalar head at its
last token (`alignkit.model.heads.ScalarHeadModel.sequence_scores`). The prompt messages are the
``prompt_messages`` field when the caller passes it (GRPO and PPO do: system prompt included),
else a single user turn holding ``prompts[i]``. Too-long conversations lose prompt tokens from
the left first (to the cut the model was trained with), so the completion is always scored.

    rewards:
      - {name: reward_model, kwargs: {path: runs/rm/final, batch_size: 16}}
"""
from __future__ import annotations

from typing import Any

from alignkit.model.heads import load_scalar_model, score_responses
from alignkit.rewards.registry import register_factory


@register_factory("reward_model")
def reward_model(path: str, batch_size: int = 16, max_length: int | None = None,
                 max_prompt_length: int | None = None, device: str | None = None,
                 dtype: str | None = None, normalize: bool = False):
    """Load the reward model at ``path`` once; return a reward function scoring with it.

    ``normalize=True`` standardises each batch's scores (mean 0, std 1), useful when the model's
    scale is arbitrary and it is combined with other rewards. ``max_length`` / ``max_prompt_length``
    default to the cut the model was trained with (kept in its ``head.json``), else 1024 / 512.
    """

    model, tokenizer = load_scalar_model(path, device=device, dtype=dtype)
    model.eval()

    def score(prompts: list[str], completions: list[str], prompt_messages: list | None = None,
              **fields: Any) -> list[float]:
        conversations = prompt_messages if prompt_messages is not None else \
            [[{"role": "user", "content": str(prompt)}] for prompt in prompts]
        scores = score_responses(model, tokenizer, list(zip(conversations, completions)), batch_size, max_length,
                                 max_prompt_length)
        if normalize and len(scores) > 1:
            mean = sum(scores) / len(scores)
            std = (sum((s - mean) ** 2 for s in scores) / (len(scores) - 1)) ** 0.5
            scores = [(s - mean) / (std + 1e-6) for s in scores]
        return scores

    score.__name__ = "reward_model"
    score.path = str(path)  # type: ignore[attr-defined]
    return score
