"""Row shapes -> typed examples, with one specific error message per problem.

A row's shape is detected from its keys, in this order (the first match wins):

1. ``messages`` (or ShareGPT ``conversations``): a list of ``{"role", "content"}`` (or ``{"from", "value"}``).
2. ``preference`` — ``prompt`` + ``chosen`` + ``rejected``.
3. ``ranked`` — ``prompt`` + ``responses`` (a list, best first).
4. ``hh_pair`` — ``chosen`` + ``rejected`` without ``prompt``: two HH dialogues
   (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) or two message lists sharing all turns but the last.
5. ``hh`` — ``text`` holding an HH dialogue.
6. ``prompt_completion`` — ``prompt`` + ``completion``.
7. ``question_answer`` — ``question`` + ``answer`` (GSM8K: the answer ends in ``#### value``).
8. ``alpaca`` — ``instruction`` + ``output`` (+ optional ``input``).
9. ``prompt`` — ``prompt`` alone (prompt data sets for GRPO/PPO).

``format=`` skips detection and names the shape; its fields are then required (for example
``format="preference"`` on a row without ``prompt`` fails with "missing field"). ``columns`` maps our
field names to the file's: ``{"prompt": "instruction", "completion": "output"}``; errors name the
file's column. A ``system`` column, or the ``system_prompt`` argument for rows without one, adds a
system message in front. Prompts and completions may be strings or message lists.

Which shapes serve which kind of example:

* ``chat`` (SFT): every shape with a response. Preference rows give ``prompt + chosen`` (ranked rows:
  the best response) so that a preference set can also be used for SFT.
* ``preference`` (reward models, DPO): ``preference``, ``ranked`` (expanded into pairs) and ``hh_pair``.
* ``prompt`` (GRPO, PPO): every shape; the response columns stay in ``fields`` as references, and an
  ``answer`` field also gets ``answer_value`` (the text after ``####``, stripped, commas removed).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from alignkit.data.errors import DataError
from alignkit.data.read import iter_records
from alignkit.data.types import ROLES, ChatExample, PreferenceExample, PromptExample

KINDS = ("chat", "preference", "prompt")
FORMATS = ("messages", "preference", "ranked", "hh_pair", "hh", "prompt_completion",
           "question_answer", "alpaca", "prompt")
RANKING_PAIRS = ("all", "adjacent")
ROLE_ALIASES = {"human": "user", "gpt": "assistant"}
HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_OPTIONAL_COLUMNS = {"system", "margin", "input"}


# ------------------------------------------------------------------------------------ row access
class _Row:
    """A row with the column mapping applied; errors name the file's column and the row's source."""

    def __init__(self, row: dict, source: str, columns: dict[str, str] | None):
        if not isinstance(row, dict):
            raise DataError(f"expected a JSON object, got {type(row).__name__}", source=source)
        self.source = source
        self.file_names: dict[str, str] = {}
        columns = dict(columns or {})
        renamed = set(columns.values())
        data = {key: value for key, value in row.items() if key not in renamed}
        for ours, theirs in columns.items():
            self.file_names[ours] = theirs
            if theirs in row:
                data[ours] = row[theirs]
            elif ours not in _OPTIONAL_COLUMNS:
                raise DataError(f"missing (mapped to '{ours}' by columns=)", source, theirs)
        self.data = data

    def error(self, message: str, field: str | None = None) -> DataError:
        if field is not None:
            head, dot, rest = field.partition("[")
            field = self.file_names.get(head, head) + (dot + rest if dot else "")
        return DataError(message, source=self.source, field=field)

    def has(self, name: str) -> bool:
        return name in self.data

    def get(self, name: str, required: bool = True) -> Any:
        if name not in self.data:
            if required:
                raise self.error("missing field (this row shape needs it)", name)
            return None
        return self.data[name]

    def text(self, name: str) -> str:
        return self.check_text(self.get(name), name)

    def check_text(self, value: Any, name: str) -> str:
        if not isinstance(value, str):
            raise self.error(f"wrong type: expected a string, got {_type_name(value)}", name)
        if not value.strip():
            raise self.error("empty text", name)
        return value

    def messages(self, name: str, value: Any = None) -> list[dict]:
        """A validated message list (a JSON-encoded list in a string is accepted, for CSV files)."""
        if value is None:
            value = self.get(name)
        if isinstance(value, str) and value.lstrip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise self.error(f"a message list in a string must be valid JSON ({error.msg})", name) from None
        if not isinstance(value, list):
            raise self.error(f"wrong type: expected a list of messages, got {_type_name(value)}", name)
        if not value:
            raise self.error("empty message list", name)
        messages = []
        for index, item in enumerate(value):
            where = f"{name}[{index}]"
            if not isinstance(item, dict):
                raise self.error(f"wrong type: expected a message object, got {_type_name(item)}", where)
            role_key = "role" if "role" in item else "from" if "from" in item else None
            content_key = "content" if "content" in item else "value" if "value" in item else None
            if role_key is None:
                raise self.error("missing field 'role'", where)
            if content_key is None:
                raise self.error("missing field 'content'", where)
            role = item[role_key]
            if not isinstance(role, str):
                raise self.error(f"wrong type: expected a string, got {_type_name(role)}", f"{where}.role")
            role = ROLE_ALIASES.get(role.strip().lower(), role.strip().lower())
            if role not in ROLES:
                raise self.error(
                    f"unknown role '{item[role_key]}'; valid roles: {', '.join(ROLES)} "
                    f"(ShareGPT 'human'/'gpt' are accepted too)", f"{where}.role")
            content = self.check_text(_content_text(item[content_key], self, f"{where}.content"), f"{where}.content")
            if role == "system" and index > 0:
                raise self.error("a system message must come first", f"{where}.role")
            messages.append({"role": role, "content": content})
        return messages

    def prompt(self, name: str) -> list[dict]:
        """A prompt: a string (one user message) or a message list (a conversational prompt)."""
        value = self.get(name)
        if isinstance(value, list) or (isinstance(value, str) and _is_json_message_list(value)):
            return self.messages(name, value)
        return [{"role": "user", "content": self.check_text(value, name)}]

    def response(self, name: str, value: Any = None, index: int | None = None) -> str:
        """A response: a string, an assistant message, or a list holding one assistant message."""
        if value is None and index is None:
            value = self.get(name)
        where = name if index is None else f"{name}[{index}]"
        if isinstance(value, dict):
            value = [value]
        if isinstance(value, list):
            messages = self.messages(where, value)
            if len(messages) != 1 or messages[0]["role"] != "assistant":
                raise self.error("expected a string or a single assistant message", where)
            return messages[0]["content"]
        return self.check_text(value, where)

    def margin(self) -> float | None:
        value = self.data.get("margin")
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if isinstance(value, bool):
            raise self.error("wrong type: expected a number, got boolean", "margin")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise self.error(f"wrong type: expected a number, got {_type_name(value)} {value!r}", "margin") from None

    def system(self) -> str | None:
        value = self.data.get("system")
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if not isinstance(value, str):
            raise self.error(f"wrong type: expected a string, got {_type_name(value)}", "system")
        return value


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number",
            float: "number"}.get(type(value), type(value).__name__)


def _is_json_message_list(text: str) -> bool:
    stripped = text.strip()
    if not (stripped.startswith("[") and stripped.endswith("]")):
        return False
    try:
        value = json.loads(stripped)
    except json.JSONDecodeError:
        return False
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


def _content_text(content: Any, row: _Row, where: str) -> Any:
    """Message content: a string, or OpenAI-style text parts ``[{"type": "text", "text": ...}]``."""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else _type_name(part)
                raise row.error(f"only text content parts are supported, got {kind!r}", where)
            texts.append(part["text"])
        return "".join(texts)
    return content


# ------------------------------------------------------------------------------------ shape detection
def detect_format(row: dict) -> str | None:
    """The row shape from its keys (see the module docstring for the order), or None."""
    keys = set(row)
    if "messages" in keys or "conversations" in keys:
        return "messages"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "preference"
    if {"prompt", "responses"} <= keys:
        return "ranked"
    if {"chosen", "rejected"} <= keys:
        return "hh_pair"
    if "text" in keys:
        return "hh"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"question", "answer"} <= keys:
        return "question_answer"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if "prompt" in keys:
        return "prompt"
    return None


def _shape(row: _Row, format: str | None) -> str:
    if format is not None:
        return format
    shape = detect_format(row.data)
    if shape is None:
        keys = ", ".join(repr(k) for k in row.data) or "(none)"
        raise row.error(
            f"cannot tell the row's shape from its keys {keys}; expected messages, prompt+completion, "
            "prompt+chosen+rejected, prompt+responses, HH chosen+rejected or text, question+answer, "
            "instruction+output or prompt. Map your column names with columns= or choose format=")
    return shape


def _messages_key(row: _Row) -> str:
    return "messages" if row.has("messages") or not row.has("conversations") else "conversations"


# ------------------------------------------------------------------------------------ HH dialogues
def parse_hh_dialogue(text: str, row: _Row | None = None, field: str = "text") -> list[dict]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> ``[user a, assistant b]`` (contents stripped)."""
    row = row or _Row({}, "", None)
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise row.error("text before the first 'Human:' turn; expected '\\n\\nHuman: ...\\n\\nAssistant: ...'", field)
    if len(parts) < 3:
        raise row.error("not an HH dialogue: no '\\n\\nHuman:' or '\\n\\nAssistant:' turns", field)
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        content = content.strip()
        if not content:
            raise row.error(f"empty text in a '{speaker}:' turn", field)
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content})
    return messages


def _hh_pair(row: _Row) -> tuple[list[dict], str, str]:
    """Prompt and the two responses of two dialogues that differ only after the last assistant marker."""
    chosen_value, rejected_value = row.get("chosen"), row.get("rejected")
    if isinstance(chosen_value, list) or isinstance(rejected_value, list):
        chosen = row.messages("chosen")
        rejected = row.messages("rejected")
        for name, messages in (("chosen", chosen), ("rejected", rejected)):
            if messages[-1]["role"] != "assistant":
                raise row.error("a conversation pair must end with an assistant reply", name)
        prompt = chosen[:-1]
        if prompt != rejected[:-1]:
            raise row.error("chosen and rejected conversations differ before their last assistant reply", "rejected")
        if not prompt:
            raise row.error("missing prompt: the conversation has no turns before the assistant reply", "chosen")
        return prompt, chosen[-1]["content"], rejected[-1]["content"]
    chosen_text, rejected_text = row.text("chosen"), row.text("rejected")
    cut = chosen_text.rfind(HH_ASSISTANT)
    if cut < 0 or "Human:" not in chosen_text:
        raise row.error(
            "missing field (without a prompt, chosen/rejected must be HH dialogues "
            "'\\n\\nHuman: ...\\n\\nAssistant: ...' or message lists)", "prompt")
    end = cut + len(HH_ASSISTANT)
    if rejected_text[:end] != chosen_text[:end] or rejected_text.rfind(HH_ASSISTANT) != cut:
        raise row.error("chosen and rejected do not share the dialogue up to the last '\\n\\nAssistant:' marker",
                        "rejected")
    prompt = parse_hh_dialogue(chosen_text[:cut], row, "chosen")
    if prompt[-1]["role"] != "user":
        raise row.error("the dialogue before the last 'Assistant:' turn must end with a 'Human:' turn", "chosen")
    chosen = chosen_text[end:].strip()
    rejected = rejected_text[end:].strip()
    if not chosen:
        raise row.error("empty text after the last '\\n\\nAssistant:' marker", "chosen")
    if not rejected:
        raise row.error("empty text after the last '\\n\\nAssistant:' marker", "rejected")
    return prompt, chosen, rejected


# ------------------------------------------------------------------------------------ shapes -> parts
def _ranked(row: _Row, shape: str) -> tuple[list[dict], list[str]]:
    """Prompt messages and the responses best first (two for a chosen/rejected pair)."""
    if shape == "preference":
        prompt = row.prompt("prompt")
        responses = [row.response("chosen"), row.response("rejected")]
    elif shape == "hh_pair":
        prompt, chosen, rejected = _hh_pair(row)
        responses = [chosen, rejected]
    elif shape == "ranked":
        prompt = row.prompt("prompt")
        value = row.get("responses")
        if isinstance(value, str) and value.lstrip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise row.error(f"a list in a string must be valid JSON ({error.msg})", "responses") from None
        if not isinstance(value, list):
            raise row.error(f"wrong type: expected a list of responses (best first), got {_type_name(value)}",
                            "responses")
        if len(value) < 2:
            raise row.error(f"a ranking needs at least 2 responses, got {len(value)}", "responses")
        responses = [row.response("responses", item, index) for index, item in enumerate(value)]
    else:
        raise row.error(
            f"this row (shape '{shape}') has no ranked responses; preference data needs prompt+chosen+rejected, "
            "prompt+responses (best first) or HH chosen+rejected dialogues")
    seen: dict[str, int] = {}
    for index, response in enumerate(responses):
        key = response.strip()
        if key in seen:
            if shape == "ranked":
                raise row.error(f"responses[{seen[key]}] and responses[{index}] are identical", "responses")
            raise row.error("chosen and rejected are identical", "rejected")
        seen[key] = index
    return prompt, responses


def _alpaca_prompt(row: _Row) -> list[dict]:
    instruction = row.text("instruction")
    extra = row.get("input", required=False)
    if extra is not None and not isinstance(extra, str):
        raise row.error(f"wrong type: expected a string, got {_type_name(extra)}", "input")
    content = instruction + ("\n\n" + extra if extra and extra.strip() else "")
    return [{"role": "user", "content": content}]


def _assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def _completion(row: _Row, name: str) -> list[dict]:
    value = row.get(name)
    if isinstance(value, list) or (isinstance(value, str) and _is_json_message_list(value)):
        return row.messages(name, value)
    return [_assistant(row.check_text(value, name))]


def _with_system(row: _Row, messages: list[dict], system_prompt: str | None) -> list[dict]:
    system = row.system()
    has_system = bool(messages) and messages[0]["role"] == "system"
    if system is not None:
        if has_system:
            raise row.error("the row has both a 'system' column and a system message", "system")
        return [{"role": "system", "content": system}] + messages
    if system_prompt and not has_system:
        return [{"role": "system", "content": system_prompt}] + messages
    return messages


def _check_format(format: str | None) -> None:
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of: {', '.join(FORMATS)}")


# ------------------------------------------------------------------------------------ public converters
def to_chat_example(row: dict, source: str, columns: dict[str, str] | None = None, *,
                    format: str | None = None, system_prompt: str | None = None) -> ChatExample:
    """A row -> `ChatExample` (a conversation with at least one assistant turn)."""
    _check_format(format)
    r = _Row(row, source, columns)
    shape = _shape(r, format)
    if shape == "messages":
        messages = r.messages(_messages_key(r))
        where = _messages_key(r)
    elif shape == "prompt_completion":
        messages = r.prompt("prompt") + _completion(r, "completion")
        where = "completion"
    elif shape == "question_answer":
        messages = [{"role": "user", "content": r.text("question")}, _assistant(r.text("answer"))]
        where = "answer"
    elif shape == "alpaca":
        messages = _alpaca_prompt(r) + [_assistant(r.text("output"))]
        where = "output"
    elif shape == "hh":
        messages = parse_hh_dialogue(r.text("text"), r, "text")
        where = "text"
    elif shape in ("preference", "ranked", "hh_pair"):
        prompt, responses = _ranked(r, shape)
        messages = prompt + [_assistant(responses[0])]
        where = "chosen"
    else:  # "prompt"
        raise r.error("the row has a prompt but no response; SFT needs completion, messages, answer, output, "
                      "chosen, or an HH dialogue", "completion")
    if not any(m["role"] == "assistant" for m in messages):
        raise r.error("the conversation has no assistant turn (nothing to learn from)", where)
    return ChatExample(messages=_with_system(r, messages, system_prompt), source=source)


def to_preference_examples(row: dict, source: str, columns: dict[str, str] | None = None,
                           ranking_pairs: str = "all", *, format: str | None = None,
                           system_prompt: str | None = None) -> list[PreferenceExample]:
    """A row -> one `PreferenceExample` (a pair) or several (a ranking of n responses, best first:
    ``ranking_pairs="all"`` gives every (better, worse) pair, n(n-1)/2; ``"adjacent"`` gives n-1)."""
    _check_format(format)
    if ranking_pairs not in RANKING_PAIRS:
        raise ValueError(f"ranking_pairs must be one of {RANKING_PAIRS}, got {ranking_pairs!r}")
    r = _Row(row, source, columns)
    shape = _shape(r, format)
    prompt, responses = _ranked(r, shape)
    prompt = _with_system(r, prompt, system_prompt)
    margin = r.margin() if len(responses) == 2 else None
    if ranking_pairs == "adjacent":
        pairs = [(i, i + 1) for i in range(len(responses) - 1)]
    else:
        pairs = [(i, j) for i in range(len(responses)) for j in range(i + 1, len(responses))]
    return [PreferenceExample(prompt=[dict(m) for m in prompt], chosen=responses[i], rejected=responses[j],
                              source=source, margin=margin) for i, j in pairs]


def answer_value(answer: str) -> str:
    """The final value of a GSM8K-style answer: the text after the last ``####``, stripped, commas
    removed (``"... #### 1,234"`` -> ``"1234"``); without ``####`` the whole answer, stripped."""
    if "####" in answer:
        return answer.rsplit("####", 1)[1].strip().replace(",", "")
    return answer.strip()


def to_prompt_example(row: dict, source: str, columns: dict[str, str] | None = None, *,
                      format: str | None = None, system_prompt: str | None = None) -> PromptExample:
    """A row -> `PromptExample`: the prompt messages, and the other columns in ``fields``."""
    _check_format(format)
    r = _Row(row, source, columns)
    shape = _shape(r, format)
    extra: dict[str, Any] = {}
    if shape in ("prompt", "prompt_completion"):
        prompt, used = r.prompt("prompt"), {"prompt"}
    elif shape in ("preference", "ranked", "hh_pair"):
        prompt, _ = _ranked(r, shape)
        used = {"prompt"}
    elif shape == "question_answer":
        prompt, used = [{"role": "user", "content": r.text("question")}], {"question"}
        r.text("answer")
    elif shape == "alpaca":
        prompt, used = _alpaca_prompt(r), {"instruction", "input"}
    elif shape in ("messages", "hh"):
        if shape == "messages":
            key = _messages_key(r)
            prompt = r.messages(key)
        else:
            key = "text"
            text = r.text("text").rstrip()
            if text.endswith(HH_ASSISTANT.strip()) and text[: -len("Assistant:")].endswith("\n\n"):
                text = text[: -len(HH_ASSISTANT)]
            prompt = parse_hh_dialogue(text, r, "text")
        used = {key}
        if prompt[-1]["role"] == "assistant":
            extra["completion"] = prompt[-1]["content"]
            prompt = prompt[:-1]
        if not prompt or prompt[-1]["role"] == "system":
            raise r.error("the conversation has no user turn to use as a prompt", key)
    else:
        raise r.error(f"unsupported shape {shape!r}")
    fields = {k: v for k, v in r.data.items() if k not in used and k != "system"}
    fields.update(extra)
    if isinstance(fields.get("answer"), str):
        fields["answer_value"] = answer_value(fields["answer"])
    return PromptExample(prompt=_with_system(r, prompt, system_prompt), fields=fields, source=source)


# ------------------------------------------------------------------------------------ loading
@dataclass
class LoadReport:
    """What `load_examples` did: rows ``read``, rows ``kept`` and ``skipped`` (with every error message),
    and the number of ``examples`` made (more than ``kept`` when rankings expand into pairs)."""

    read: int = 0
    kept: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)
    examples: int = 0
    path: str = ""

    def summary(self) -> str:
        text = f"{self.path or 'data'}: read {self.read} rows, kept {self.kept}, skipped {self.skipped}"
        if self.examples != self.kept:
            text += f", {self.examples} examples"
        if self.errors:
            text += f"; first error: {self.errors[0]}"
        return text


def load_examples(path: str | os.PathLike, kind: str = "chat", columns: dict[str, str] | None = None,
                  on_error: str = "fail", limit: int | None = None, *, format: str | None = None,
                  system_prompt: str | None = None, split: str | None = None,
                  ranking_pairs: str = "all") -> tuple[list, LoadReport]:
    """Read a file (or ``hf://`` data set) into typed examples.

    ``kind``: ``"chat"`` -> `ChatExample`, ``"preference"`` -> `PreferenceExample` (rankings expanded
    per ``ranking_pairs``), ``"prompt"`` -> `PromptExample`. ``on_error="fail"`` raises the first
    `DataError`; ``"skip"`` skips bad rows, counting them and keeping every message in the report
    (rows are never dropped silently). ``limit`` keeps at most that many examples. Raises `DataError`
    when no row at all is usable.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    if ranking_pairs not in RANKING_PAIRS:
        raise ValueError(f"ranking_pairs must be one of {RANKING_PAIRS}, got {ranking_pairs!r}")
    _check_format(format)
    if kind == "preference" and format not in (None, "preference", "ranked", "hh_pair"):
        raise ValueError(f"format {format!r} has no chosen/rejected responses; preference data needs "
                         "format 'preference', 'ranked' or 'hh_pair'")
    if kind == "chat" and format == "prompt":
        raise ValueError("format 'prompt' has no responses to train on; SFT needs a response column")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")

    def convert(row: dict, source: str) -> list:
        if kind == "chat":
            return [to_chat_example(row, source, columns, format=format, system_prompt=system_prompt)]
        if kind == "preference":
            return to_preference_examples(row, source, columns, ranking_pairs, format=format,
                                          system_prompt=system_prompt)
        return [to_prompt_example(row, source, columns, format=format, system_prompt=system_prompt)]

    report = LoadReport(path=os.fspath(path))
    examples: list = []
    for source, record in iter_records(path, split=split):
        report.read += 1
        try:
            if isinstance(record, DataError):
                raise record
            made = convert(record, source)
        except DataError as error:
            if on_error == "fail":
                raise
            report.skipped += 1
            report.errors.append(str(error))
            continue
        report.kept += 1
        examples.extend(made)
        if limit is not None and len(examples) >= limit:
            break
    if limit is not None:
        examples = examples[:limit]
    report.examples = len(examples)
    if not examples:
        raise DataError(f"no usable rows: all {report.read} rows had errors; first: {report.errors[0]}",
                        source=report.path)
    return examples, report
