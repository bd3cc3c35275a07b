"""Typed examples: what the data layer hands to tokenization and to the method recipes.

Messages are plain dicts ``{"role": "system" | "user" | "assistant" | "tool", "content": str}`` so
they can be passed straight to ``tokenizer.apply_chat_template``. An assistant message may also
carry ``tool_calls`` (``[{"type": "function", "function": {"name", "arguments": dict}}]``, content
then ``""`` when the turn is only a call) and ``weight`` (0 or 1, OpenAI's per-turn switch: 0 = no
loss on that turn); a ``tool`` message may carry ``tool_call_id`` and ``name``. ``tools`` holds the
tool definitions the conversation may call (JSON schemas, as chat templates expect them).
``source`` is where the example came from (``"train.jsonl:12"``), kept for error messages and
truncation reports.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
# keys of a message that the chat template sees (``weight`` is ours: it only shapes the loss mask)
TEMPLATE_KEYS = ("role", "content", "tool_calls", "tool_call_id", "name")


def template_message(message: dict) -> dict:
    """The message as the chat template should see it (no ``weight``; tool keys only when present)."""
    return {key: message[key] for key in TEMPLATE_KEYS if key in message}


def uses_tools(messages: list[dict], tools: list | None = None) -> bool:
    """True when a conversation has tool definitions, tool calls or tool results."""
    return bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)


@dataclass
class ChatExample:
    """A conversation to imitate (SFT): the loss covers every assistant turn whose weight is not 0."""

    messages: list[dict]
    source: str = ""
    tools: list[dict] | None = None


@dataclass
class TextExample:
    """Plain text for language modelling (TRL's ``{"text": ...}``): no chat template, every token is
    a training target, the EOS token is appended."""

    text: str
    source: str = ""


@dataclass
class PreferenceExample:
    """A prompt with a preferred (``chosen``) and a dispreferred (``rejected``) response."""

    prompt: list[dict]
    chosen: str
    rejected: str
    source: str = ""
    margin: float | None = None
    tools: list[dict] | None = None


@dataclass
class UnpairedExample:
    """A prompt, one response and a binary judgement of it (KTO's unpaired feedback):
    ``label=True`` desirable (thumbs up), ``False`` undesirable (thumbs down)."""

    prompt: list[dict]
    completion: str
    label: bool
    source: str = ""
    tools: list[dict] | None = None


@dataclass
class PromptExample:
    """A prompt to sample from (GRPO/PPO). ``fields`` holds the row's other columns (for reward
    functions), e.g. ``answer`` and ``answer_value`` for GSM8K."""

    prompt: list[dict]
    fields: dict[str, Any] = field(default_factory=dict)
    source: str = ""
