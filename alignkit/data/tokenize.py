"""Chat template + tokenization + loss masks.

How the loss mask is found (no per-template rules):

1. Render the whole conversation with the tokenizer's chat template (``apply_chat_template(...,
   tokenize=False)``), or with the fallback template below when ``tokenizer.chat_template`` is None.
2. Locate each assistant turn's content in that text: the prefix ``messages[:i]`` rendered with the
   generation prompt tells where the i-th turn's content starts (checked; if the template renders
   history differently, the content is searched for after the previous turn instead).
3. Tokenize the full text once with ``return_offsets_mapping=True`` and mark every token whose
   character span overlaps an assistant content span.
4. Extend each turn by its end-of-turn marker: the first special token right after the content
   (``<|im_end|>``, ``<|eot_id|>``, ``</s>``, ``<end_of_turn>``; whitespace in between is included).
   The model thus learns to stop. Template text (role headers, the newline after ``<|im_end|>``),
   system and user turns stay out of the loss.

``add_special_tokens`` is False when the rendered text already starts with the BOS token (templates
that write BOS themselves), so BOS is never doubled.

Fallback template (tokenizers without a chat template), ChatML-like, rendered in Python::

    <|im_start|>{role}\\n{content}{END}\\n        (one block per message)
    <|im_start|>assistant\\n                      (the generation prompt)

``END`` is ``<|im_end|>`` when the tokenizer has that token, else its EOS token (else the literal
text ``<|im_end|>``).

Truncation keeps the start and cuts the end (``truncated=True``); a row left without any loss token
is flagged ``completion_lost=True`` and `tokenize_dataset` drops and reports it.

Per-turn weights (OpenAI's ``"weight": 0`` on an assistant message): such a turn is rendered as usual
(the model sees it as context) but none of its tokens, nor its end-of-turn marker, are in the loss.

Tool calls: an assistant turn with ``tool_calls`` has no content to search for, so its span is the
text the template renders for that turn (from the end of the prefix with the generation prompt to
the end of the conversation up to that turn), minus the trailing end-of-turn marker, which is then
added back by step 4. Conversations with tool calls, tool results or tool definitions are only
tokenized when the template renders them (`template_tool_support` probes it once per template);
otherwise a `FatalDataError` says so, instead of silently training on a conversation whose calls
the template dropped.

Plain text (`TextExample`, TRL's ``{"text": ...}``): no template, the tokenizer's own special tokens
(BOS when it adds one), the EOS token appended, every token in the loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

from alignkit.data.errors import FatalDataError
from alignkit.data.types import TextExample, template_message, uses_tools

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
TRAIN_ON = ("assistant", "last_assistant", "all")


def list_sources(sources: list[str], shown: int = 5) -> str:
    """``": a.jsonl:3, a.jsonl:9 and 4 more"`` (empty when there are none): where dropped rows were."""
    if not sources:
        return ""
    more = f" and {len(sources) - shown} more" if len(sources) > shown else ""
    return ": " + ", ".join(sources[:shown]) + more


@dataclass
class TokenizedRow:
    """Token ids and the per-token loss mask (True where the token is a training target)."""

    input_ids: list[int]
    loss_mask: list[bool]
    truncated: bool = False
    source: str = ""
    completion_lost: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        return sum(self.loss_mask)


@dataclass
class TokenizeReport:
    """Counts from `tokenize_dataset`: rows seen, rows truncated, rows dropped because truncation left
    no loss token (with their sources, so they can be found in the file)."""

    total: int = 0
    truncated: int = 0
    dropped_no_loss_tokens: int = 0
    dropped_sources: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (f"tokenized {self.total} rows: {self.truncated} truncated, "
                f"{self.dropped_no_loss_tokens} dropped (no loss token left after truncation)")
        return text + list_sources(self.dropped_sources)


# ------------------------------------------------------------------------------------ rendering
def fallback_end_marker(tokenizer) -> str:
    """``<|im_end|>`` if the tokenizer knows it as a token, else its EOS token, else ``<|im_end|>``."""
    if tokenizer is not None:
        if IM_END in (getattr(tokenizer, "get_added_vocab", dict)() or {}):
            return IM_END
        token_id = tokenizer.convert_tokens_to_ids(IM_END)
        if token_id is not None and token_id != getattr(tokenizer, "unk_token_id", None):
            return IM_END
        if getattr(tokenizer, "eos_token", None):
            return tokenizer.eos_token
    return IM_END


def render_fallback_template(messages: Sequence[dict], add_generation_prompt: bool = False,
                             end_marker: str = IM_END) -> str:
    """The documented ChatML-like template: ``<|im_start|>role\\ncontent{end_marker}\\n`` per message."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{end_marker}\n" for m in messages)
    if add_generation_prompt:
        text += f"{IM_START}assistant\n"
    return text


def has_chat_template(tokenizer) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def render_chat(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False,
                tools: list | None = None) -> str:
    """The conversation as text, through the tokenizer's chat template or the fallback template.
    ``tools`` (tool definitions) go to the template; ``weight`` keys never do."""
    messages = [template_message(m) for m in messages]
    if not has_chat_template(tokenizer):
        return render_fallback_template(messages, add_generation_prompt, fallback_end_marker(tokenizer))
    extra = {"tools": tools} if tools else {}
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **extra)
    if not isinstance(text, str):  # some versions wrap a single rendering in a list
        text = text[0]
    return text


# ------------------------------------------------------------------------------------ tool formats
PROBE_FUNCTION, PROBE_ARGUMENT, PROBE_RESULT = "alignkit_probe_function", "alignkit_probe_argument", "alignkit_probe_result"


@dataclass(frozen=True)
class ToolSupport:
    """Which tool pieces a chat template renders: ``calls`` (assistant ``tool_calls``), ``results``
    (``tool`` messages) and ``definitions`` (the ``tools=`` list)."""

    calls: bool
    results: bool
    definitions: bool


def _renders(tokenizer, messages, needles, tools=None) -> bool:
    try:
        text = render_chat(tokenizer, messages, tools=tools)
    except Exception:  # a template that fails on tool messages has no tool format
        return False
    return all(needle in text for needle in needles)


def template_tool_support(tokenizer) -> ToolSupport:
    """Probe the tokenizer's chat template once (cached per template text) with a conversation holding
    a tool call, a tool result and a tool definition, each carrying a unique marker: a piece is
    supported when its marker appears in the rendered text."""
    template = getattr(tokenizer, "chat_template", None)
    cached = getattr(tokenizer, "_alignkit_tool_support", None)
    if cached is not None and cached[0] == template:
        return cached[1]
    if template is None:
        support = ToolSupport(False, False, False)
    else:
        call = {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "id": "call_0",
             "function": {"name": PROBE_FUNCTION, "arguments": {PROBE_ARGUMENT: 1}}}]}
        user = {"role": "user", "content": "hello"}
        result = {"role": "tool", "content": PROBE_RESULT, "name": PROBE_FUNCTION, "tool_call_id": "call_0"}
        definition = [{"type": "function", "function": {
            "name": PROBE_FUNCTION, "description": "probe",
            "parameters": {"type": "object", "properties": {PROBE_ARGUMENT: {"type": "integer"}}}}}]
        support = ToolSupport(
            calls=_renders(tokenizer, [user, call], [PROBE_FUNCTION, PROBE_ARGUMENT]),
            results=_renders(tokenizer, [user, call, result], [PROBE_RESULT]),
            definitions=_renders(tokenizer, [user], [PROBE_FUNCTION], tools=definition))
    try:
        tokenizer._alignkit_tool_support = (template, support)
    except AttributeError:  # pragma: no cover - tokenizers that refuse new attributes
        pass
    return support


def check_tool_support(tokenizer, messages: Sequence[dict], tools: list | None = None, source: str = "") -> None:
    """Raise `FatalDataError` when the conversation has tool pieces the chat template does not render
    (training on it would silently drop the calls)."""
    if not uses_tools(list(messages), tools):
        return
    support = template_tool_support(tokenizer)
    missing = []
    if any(m.get("tool_calls") for m in messages) and not support.calls:
        missing.append("tool calls ('tool_calls')")
    if any(m["role"] == "tool" for m in messages) and not support.results:
        missing.append("tool results ('tool' messages)")
    if tools and not support.definitions:
        missing.append("tool definitions ('tools')")
    if missing:
        what = "the fallback template" if not has_chat_template(tokenizer) else "the tokenizer's chat template"
        raise FatalDataError(
            f"the conversation has {' and '.join(missing)} but {what} has no format for them, so they would "
            "be dropped from training; use a model whose chat template renders tools, or set "
            "model.chat_template: chatml (alignkit's ChatML with tool calls)", source=source or None,
            field="messages")


def _special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return ids


def _encode(tokenizer, text: str, cuts: Iterable[int] = ()) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of ``text``. Slow (Python) tokenizers have no offsets: the text is
    then tokenized piece by piece between ``cuts`` and each token gets its piece's character range."""
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and text.startswith(bos))
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        return list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    bounds = sorted({0, len(text), *[c for c in cuts if 0 < c < len(text)]})
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    if add_special:
        with_special = tokenizer("", add_special_tokens=True)["input_ids"]
        ids += list(with_special)
        offsets += [(0, 0)] * len(with_special)
    for start, end in zip(bounds, bounds[1:]):
        piece = tokenizer(text[start:end], add_special_tokens=False)["input_ids"]
        ids += list(piece)
        offsets += [(start, end)] * len(piece)
    return ids, offsets


def _special_texts(tokenizer) -> list[str]:
    texts = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
        if getattr(token, "special", False):
            texts.add(str(token))
    return sorted((t for t in texts if t), key=len, reverse=True)


def _tool_call_span(tokenizer, messages: Sequence[dict], index: int, text: str,
                    tools: list | None) -> tuple[int, int]:
    """The rendered text of assistant turn ``index`` (a tool call), without its end-of-turn marker."""
    prefix = render_chat(tokenizer, messages[:index], add_generation_prompt=True, tools=tools)
    upto = render_chat(tokenizer, messages[:index + 1], tools=tools).rstrip()
    if not (text.startswith(prefix) and upto.startswith(prefix) and text.startswith(upto)):
        raise ValueError(f"cannot place the loss mask on message {index} (an assistant tool call): the chat "
                         "template renders it differently inside the conversation than at its end")
    end = len(upto)
    specials = _special_texts(tokenizer)
    trimmed = True
    while trimmed:
        trimmed = False
        for marker in specials:
            if upto.endswith(marker, len(prefix), end):
                end = len(upto[:end - len(marker)].rstrip())
                trimmed = True
                break
    if end <= len(prefix):
        raise ValueError(f"the chat template renders nothing for message {index} (an assistant tool call)")
    return len(prefix), end


def _assistant_spans(tokenizer, messages: Sequence[dict], text: str,
                     tools: list | None = None) -> list[tuple[int, int]]:
    """Character span of each assistant message's content (a tool call: its rendered turn) in ``text``."""
    spans: list[tuple[int, int]] = []
    cursor = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if message.get("tool_calls"):
            start, end = _tool_call_span(tokenizer, messages, index, text, tools)
            spans.append((start, end))
            cursor = end
            continue
        content = message["content"]
        start = -1
        try:
            prefix = render_chat(tokenizer, messages[:index], add_generation_prompt=True, tools=tools)
        except Exception:  # templates that cannot render this prefix (e.g. an empty list)
            prefix = None
        base = cursor
        if prefix is not None and len(prefix) >= cursor and text.startswith(prefix):
            base = len(prefix)
            if text.startswith(content, base):
                start, length = base, len(content)
        if start < 0:
            for candidate in (content, content.strip()):
                position = text.find(candidate, base) if candidate else -1
                if position >= 0:
                    start, length = position, len(candidate)
                    break
        if start < 0:
            raise ValueError(
                f"cannot find the content of message {index} (assistant) in the chat template's output; "
                "the template rewrites assistant content, so the loss mask cannot be placed")
        spans.append((start, start + length))
        cursor = start + length
    return spans


def _mask_spans(text: str, ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]],
                special: set[int], end_marker: str | None) -> list[bool]:
    """True for tokens overlapping a span, plus the end-of-turn marker right after each span."""
    mask = [False] * len(ids)
    if not spans:
        return mask
    last_in_span = [-1] * len(spans)
    span_index = 0
    for token, (start, end) in enumerate(offsets):
        if end <= start:
            continue
        while span_index < len(spans) and spans[span_index][1] <= start:
            span_index += 1
        if span_index == len(spans):
            break
        span_start, span_end = spans[span_index]
        if start < span_end and end > span_start:
            mask[token] = True
            last_in_span[span_index] = token
    for (span_start, span_end), last in zip(spans, last_in_span):
        if last < 0:  # empty content: begin at the first token after the span start
            last = next((t for t, (s, e) in enumerate(offsets) if e > s and s >= span_end), len(ids)) - 1
        if end_marker is not None and text.startswith(end_marker, span_end):
            # fallback template: the marker's characters are known exactly
            marker_end = span_end + len(end_marker)
            token = last + 1
            while token < len(ids) and offsets[token][0] < marker_end:
                mask[token] = True
                token += 1
            continue
        token = last + 1
        while token < len(ids) and ids[token] not in special and not text[slice(*offsets[token])].strip():
            token += 1  # whitespace between the content and the marker
        if token < len(ids) and ids[token] in special:
            for t in range(last + 1, token + 1):
                mask[t] = True
    return mask


def _encode_chat(tokenizer, messages: Sequence[dict], train_on: str,
                 special: set[int] | None = None, tools: list | None = None) -> tuple[list[int], list[bool]]:
    text = render_chat(tokenizer, messages, tools=tools)
    if train_on == "all":
        ids, _ = _encode(tokenizer, text)
        return ids, [True] * len(ids)
    spans = _assistant_spans(tokenizer, messages, text, tools)
    trained = [m.get("weight", 1) != 0 for m in messages if m["role"] == "assistant"]
    spans = [span for span, keep in zip(spans, trained) if keep]  # weight 0: context, not a target
    if train_on == "last_assistant":
        spans = spans[-1:]
    cuts = [c for span in spans for c in span]
    ids, offsets = _encode(tokenizer, text, cuts)
    end_marker = None if has_chat_template(tokenizer) else fallback_end_marker(tokenizer)
    if special is None:
        special = _special_ids(tokenizer)
    return ids, _mask_spans(text, ids, offsets, spans, special, end_marker)


# ------------------------------------------------------------------------------------ public API
def tokenize_chat(tokenizer, messages, max_length: int | None = None, train_on: str = "assistant",
                  source: str = "", *, tools: list | None = None,
                  _special: set[int] | None = None) -> TokenizedRow:
    """A conversation -> `TokenizedRow`.

    ``messages`` is a list of message dicts or a `ChatExample` (its source and tools are kept).
    ``train_on``: ``"assistant"`` (every assistant turn whose weight is not 0 + its end-of-turn
    marker), ``"last_assistant"`` (only the final trained one) or ``"all"`` (every token).
    ``max_length`` keeps the first tokens. Tool calls the template cannot render raise `FatalDataError`.
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
    if isinstance(messages, TextExample):
        return tokenize_text(tokenizer, messages.text, max_length, messages.source)
    if hasattr(messages, "messages"):
        source = source or getattr(messages, "source", "")
        tools = tools or getattr(messages, "tools", None)
        messages = messages.messages
    check_tool_support(tokenizer, messages, tools, source)
    ids, mask = _encode_chat(tokenizer, messages, train_on, _special, tools)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, mask = ids[:max_length], mask[:max_length]
    return TokenizedRow(input_ids=ids, loss_mask=mask, truncated=truncated, source=source,
                        completion_lost=not any(mask))


def tokenize_text(tokenizer, text: str, max_length: int | None = None, source: str = "") -> TokenizedRow:
    """Plain text for language modelling: the tokenizer's own special tokens, EOS appended (so the
    model learns where a document ends), every token a target."""
    ids = _encode_plain(tokenizer, text)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids = ids[:max_length]
    return TokenizedRow(input_ids=ids, loss_mask=[True] * len(ids), truncated=truncated, source=source,
                        completion_lost=len(ids) < 2)


def tokenize_dataset(tokenizer, examples: Iterable, max_length: int | None,
                     train_on: str = "assistant") -> tuple[list[TokenizedRow], TokenizeReport]:
    """Tokenize `ChatExample`s (and `TextExample`s); rows with no loss token left (after truncation)
    are dropped and reported with their sources, never silently."""
    special = _special_ids(tokenizer)
    report = TokenizeReport()
    rows: list[TokenizedRow] = []
    for example in examples:
        row = tokenize_chat(tokenizer, example, max_length, train_on, _special=special)
        report.total += 1
        report.truncated += row.truncated
        if row.completion_lost:
            report.dropped_no_loss_tokens += 1
            report.dropped_sources.append(row.source)
            continue
        rows.append(row)
    return rows, report


def _encode_plain(tokenizer, text: str) -> list[int]:
    bos = getattr(tokenizer, "bos_token", None)
    return list(tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"])


def tokenize_prompt(tokenizer, prompt_messages: Sequence[dict], tools: list | None = None) -> list[int]:
    """Token ids of a prompt ending with the generation prompt (``<|im_start|>assistant\\n``), ready
    for sampling."""
    check_tool_support(tokenizer, prompt_messages, tools)
    return _encode_plain(tokenizer, render_chat(tokenizer, prompt_messages, add_generation_prompt=True, tools=tools))


def tokenize_prompt_response(tokenizer, prompt_messages: Sequence[dict], response: str, max_length: int | None,
                             max_prompt_length: int | None = None,
                             tools: list | None = None) -> tuple[list[int], list[int], bool]:
    """``(prompt_ids, response_ids, truncated)`` for preference training.

    The conversation ``prompt + [assistant response]`` is tokenized once; ``response_ids`` are the
    response's tokens plus the end-of-turn marker, ``prompt_ids`` everything before (the generation
    prompt included). When the two exceed ``max_length``: the prompt is cut from the left down to
    ``max_prompt_length`` first, then the response from the right. With ``max_prompt_length=None`` the
    prompt is only cut (to ``max_length // 2``) when it alone would leave no room for the response.
    """
    messages = [*(template_message(m) for m in prompt_messages), {"role": "assistant", "content": response}]
    check_tool_support(tokenizer, messages, tools)
    ids, mask = _encode_chat(tokenizer, messages, "last_assistant", tools=tools)
    positions = [i for i, m in enumerate(mask) if m]
    if not positions:
        raise ValueError("the response produced no tokens")
    prompt_ids, response_ids = ids[:positions[0]], ids[positions[0]:positions[-1] + 1]
    truncated = False
    if max_length is not None and len(prompt_ids) + len(response_ids) > max_length:
        truncated = True
        limit = max_prompt_length
        if limit is None and len(prompt_ids) >= max_length:
            limit = max_length // 2
        if limit is not None and len(prompt_ids) > limit:
            prompt_ids = prompt_ids[len(prompt_ids) - limit:] if limit > 0 else []
        response_ids = response_ids[:max(0, max_length - len(prompt_ids))]
    return prompt_ids, response_ids, truncated
