"""Request bodies of the OpenAI-compatible endpoints, validated with pydantic, and the text helpers
that turn sampled tokens into reply text, log-prob entries and streamed deltas.

Unknown request fields are ignored (clients send many); fields we do not implement but that change
what a reply means (``tools``, non-zero penalties, ``logit_bias``, ``echo``, ``suffix``, ``best_of``)
are refused with 400 and the field's name, never silently dropped.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 8


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = Field(default=None, validate_default=True)
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    # vLLM's extensions
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    return_tokens_as_token_ids: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value):
        if value is None:
            return []
        values = [value] if isinstance(value, str) else list(value)
        if len(values) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not stop for stop in values):
            raise ValueError("stop strings must not be empty")
        return values

    def unsupported(self) -> str | None:
        """The first field set to something this server does not implement, as 'field: why'."""
        if self.presence_penalty:
            return "presence_penalty: only 0 is supported"
        if self.frequency_penalty:
            return "frequency_penalty: only 0 is supported"
        if self.logit_bias:
            return "logit_bias: not supported"
        return None

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"content parts of type {part.get('type')!r} are not supported (text only)")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None

    def unsupported(self) -> str | None:
        if self.tools:
            return "tools: tool calling is not supported"
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs: needs logprobs: true"
        return super().unsupported()

    def conversation(self) -> list[dict]:
        messages = []
        for message in self.messages:
            role = "system" if message.role == "developer" else message.role
            if role == "tool":
                raise ValueError("messages: the 'tool' role is not supported")
            messages.append({"role": role, "content": message.text()})
        return messages

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo: not supported"
        if self.suffix:
            return "suffix: not supported"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of: only best_of == n is supported"
        return super().unsupported()

    def prompts(self) -> list[str | list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise ValueError("prompt: empty")
        if all(isinstance(item, int) for item in prompt):
            return [list(prompt)]
        return list(prompt)

    def logprob_count(self) -> int | None:
        return self.logprobs


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str
    lora_path: str


class UnloadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str
    lora_path: str | None = None


class ScoreItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | list[ChatMessage] | None = None
    response: str | None = None
    messages: list[ChatMessage] | None = None

    def pair(self) -> tuple[list[dict], str]:
        """(prompt messages, response) of one item."""
        if self.messages is not None:
            if self.prompt is not None or self.response is not None:
                raise ValueError("give either messages (ending with the assistant reply) or prompt + response")
            messages = [{"role": m.role, "content": m.text()} for m in self.messages]
            if not messages or messages[-1]["role"] != "assistant":
                raise ValueError("messages must end with the assistant reply to score")
            return messages[:-1], messages[-1]["content"]
        if self.prompt is None or self.response is None:
            raise ValueError("each item needs prompt and response (or messages)")
        prompt = [{"role": "user", "content": self.prompt}] if isinstance(self.prompt, str) \
            else [{"role": m.role, "content": m.text()} for m in self.prompt]
        return prompt, self.response


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: list[ScoreItem] | None = None
    prompt: str | list[ChatMessage] | None = None
    responses: list[str] | None = None

    def items(self) -> list[tuple[list[dict], str]]:
        if self.input is not None:
            if self.responses is not None:
                raise ValueError("give either input: [{prompt, response}] or prompt + responses, not both")
            return [item.pair() for item in self.input]
        if self.prompt is None or self.responses is None:
            raise ValueError("give input: [{prompt, response}, ...] or prompt + responses: [...]")
        return [ScoreItem(prompt=self.prompt, response=response).pair() for response in self.responses]


# ------------------------------------------------------------------------------------- text helpers


def held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of ``text`` could be the start of a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class TextStream:
    """Turns a growing token list into text deltas for streaming.

    A delta is only sent once it cannot change: text that could be the start of a stop string, or
    that ends in an incomplete UTF-8 character, is held back until the next token decides it.
    The concatenated deltas plus `finish` equal the non-streamed reply text.
    """

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, list(stops)
        self.tokens: list[int] = []
        self.sent = 0

    def push(self, token: int, eos_ids: set[int]) -> str:
        if token in eos_ids:
            return ""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        if any(stop in text for stop in self.stops):
            return ""
        safe = len(text) - held_back(text, self.stops)
        if safe <= self.sent:
            return ""
        delta, self.sent = text[self.sent:safe], safe
        return delta

    def finish(self, final_text: str) -> str:
        delta = final_text[self.sent:]
        self.sent = len(final_text)
        return delta


def token_text(tokenizer, token: int, as_ids: bool) -> str:
    return f"token_id:{token}" if as_ids else tokenizer.decode([token], skip_special_tokens=False)


def chat_logprob_entry(tokenizer, event, as_ids: bool) -> dict:
    text = token_text(tokenizer, event.token, as_ids)
    entry = {"token": text, "logprob": event.logprob, "bytes": list(text.encode("utf-8")), "top_logprobs": []}
    for token, logprob in event.top_logprobs or []:
        other = token_text(tokenizer, token, as_ids)
        entry["top_logprobs"].append({"token": other, "logprob": logprob, "bytes": list(other.encode("utf-8"))})
    return entry


def completion_logprobs(tokenizer, events: list, as_ids: bool, offset: int = 0) -> dict:
    tokens, values, tops, offsets = [], [], [], []
    position = offset
    for event in events:
        text = token_text(tokenizer, event.token, as_ids)
        tokens.append(text)
        values.append(event.logprob)
        tops.append({token_text(tokenizer, t, as_ids): v for t, v in (event.top_logprobs or [])}
                    if event.top_logprobs is not None else None)
        offsets.append(position)
        position += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
