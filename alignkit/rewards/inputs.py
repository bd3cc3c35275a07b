"""The one builder of what a reward function sees, for every caller (GRPO, PPO, `alignkit eval`,
best-of-N), so a reward scores the same row the same way wherever it runs.

For ``P`` prompt rows and ``k`` completions per row (laid out row after row)::

    prompts[i]      the text of the row's last user turn (the question being answered)
    completions[i]  the completion text
    fields[name][i] every extra column of the row (``answer``, ``answer_value``, ...), repeated k times,
                    plus ``prompt_messages``: the whole conversation (system turn included)

A reward that needs the system prompt or earlier turns reads ``prompt_messages``.
"""
from __future__ import annotations

from typing import Any, Sequence


def prompt_text(messages: Sequence[dict]) -> str:
    """The last user turn's content (the last message's, when no turn is the user's)."""
    if not messages:
        return ""
    return next((m["content"] for m in reversed(messages) if m.get("role") == "user"), messages[-1]["content"])


def reward_inputs(examples: Sequence[Any], completions: Sequence[str],
                  per_example: int = 1) -> tuple[list[str], list[str], dict[str, list]]:
    """``(prompts, completions, fields)`` for ``examples`` (objects with ``prompt`` messages and a
    ``fields`` mapping, e.g. `alignkit.data.PromptExample`), each with ``per_example`` completions."""
    if len(completions) != len(examples) * per_example:
        raise ValueError(f"{len(completions)} completions for {len(examples)} prompts x {per_example}")
    names = sorted({name for example in examples for name in example.fields})
    prompts: list[str] = []
    fields: dict[str, list] = {name: [] for name in names}
    fields["prompt_messages"] = []
    for example in examples:
        text = prompt_text(example.prompt)
        for _ in range(per_example):
            prompts.append(text)
            fields["prompt_messages"].append(example.prompt)
            for name in names:
                fields[name].append(example.fields.get(name))
    return prompts, list(completions), fields
