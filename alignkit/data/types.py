"""Typed examples: what the data layer hands to tokenization and to the method recipes.

Messages are plain dicts ``{"role": "system" | "user" | "assistant", "content": str}`` so they can
be passed straight to ``tokenizer.apply_chat_template``. ``source`` is where the example came from
(``"train.jsonl:12"``), kept for error messages and truncation reports.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")


@dataclass
class ChatExample:
    """A conversation to imitate (SFT): the loss covers every assistant turn."""

    messages: list[dict]
    source: str = ""


@dataclass
class PreferenceExample:
    """A prompt with a preferred (``chosen``) and a dispreferred (``rejected``) response."""

    prompt: list[dict]
    chosen: str
    rejected: str
    source: str = ""
    margin: float | None = None


@dataclass
class PromptExample:
    """A prompt to sample from (GRPO/PPO). ``fields`` holds the row's other columns (for reward
    functions), e.g. ``answer`` and ``answer_value`` for GSM8K."""

    prompt: list[dict]
    fields: dict[str, Any] = field(default_factory=dict)
    source: str = ""
