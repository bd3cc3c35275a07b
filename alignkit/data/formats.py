"""Row shapes -> typed examples, with one specific error message per problem.

A row's shape is detected from its keys, in this order (the first match wins):

1. ``openai_preference`` — OpenAI's DPO rows: ``input`` (``{"messages": [...]}``) + ``preferred_output``
   + ``non_preferred_output`` (each a list holding one assistant message).
2. ``gemini_preference`` — Vertex/Gemini preference rows: ``contents`` + ``completions``
   (``[{"score": 1, "completion": {"role": "model", "parts": [...]}}, {"score": 0, ...}]``).
3. ``gemini`` — Vertex/Gemini supervised rows: ``contents`` (``[{"role": "user"|"model", "parts":
   [{"text": ...}]}]``) with optional ``systemInstruction``.
4. ``unpaired`` — KTO-style binary feedback: ``label`` + ``prompt`` + ``completion`` (or ``label`` with
   a true/false value beside ``messages``).
5. ``messages`` (or ShareGPT ``conversations``): a list of ``{"role", "content"}`` (or ``{"from", "value"}``),
   with tool calls in OpenAI's form (``tool_calls``, ``content: null``, ``tool`` role) or ShareGPT's
   (``function_call`` / ``observation`` turns), and OpenAI's per-turn ``weight`` (0 = no loss).
6. ``preference`` — ``prompt`` + ``chosen`` + ``rejected``.
7. ``ranked`` — ``prompt`` + ``responses`` (a list, best first).
8. ``hh_pair`` — ``chosen`` + ``rejected`` without ``prompt``: two HH dialogues
   (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) or two message lists sharing all turns but the last.
9. ``hh`` — ``text`` holding an HH dialogue (it starts with ``Human:`` and has an ``Assistant:`` turn).
10. ``text`` — ``text`` holding anything else: plain language-modelling text (TRL's ``{"text": ...}``).
11. ``prompt_completion`` — ``prompt`` + ``completion``.
12. ``question_answer`` — ``question`` + ``answer`` (GSM8K: the answer ends in ``#### value``).
13. ``alpaca`` — ``instruction`` + ``output`` (+ optional ``input``).
14. ``prompt`` — ``prompt`` alone (prompt data sets for GRPO/PPO).

``format=`` skips detection and names the shape; its fields are then required (for example
``format="preference"`` on a row without ``prompt`` fails with "missing field"). ``columns`` maps our
field names to the file's: ``{"prompt": "instruction", "completion": "output"}``; errors name the
file's column. A ``system`` column, or the ``system_prompt`` argument for rows without one, adds a
system message in front. Prompts and completions may be strings or message lists. A ``tools`` column
(OpenAI's list of function definitions, ShareGPT's JSON string, Gemini's ``functionDeclarations``)
is kept with the conversation for the chat template.

Which shapes serve which kind of example:

* ``chat`` (SFT): every shape with a response. Preference rows give ``prompt + chosen`` (ranked rows:
  the best response) so that a preference set can also be used for SFT. ``text`` rows give a
  `TextExample` (every token trained). ``unpaired`` rows are refused (SFT would imitate the thumbs-down
  answers too) unless ``desirable_only=True``, which keeps the ``label: true`` rows and counts the others.
* ``preference`` (reward models, DPO): the pair shapes (``openai_preference``, ``gemini_preference``,
  ``preference``, ``ranked`` expanded into pairs, ``hh_pair``).
* ``unpaired`` (KTO): ``unpaired`` rows, and the pair shapes split into a desirable and an undesirable
  example (a ranking: its best and its worst response).
* ``prompt`` (GRPO, PPO): every shape with a prompt; the response columns stay in ``fields`` as
  references, and an ``answer`` field also gets ``answer_value`` (the text after ``####``, stripped,
  commas removed).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from alignkit.data.errors import DataError, FatalDataError
from alignkit.data.read import iter_records
from alignkit.data.types import (
    ROLES,
    ChatExample,
    PreferenceExample,
    PromptExample,
    TextExample,
    UnpairedExample,
)

KINDS = ("chat", "preference", "prompt", "unpaired")
FORMATS = ("openai_preference", "gemini_preference", "gemini", "unpaired", "messages", "preference", "ranked",
           "hh_pair", "hh", "text", "prompt_completion", "question_answer", "alpaca", "prompt")
PAIR_SHAPES = ("openai_preference", "gemini_preference", "preference", "ranked", "hh_pair")
RANKING_PAIRS = ("all", "adjacent")
# other tools' role names -> ours (ShareGPT, Gemini, OpenAI's legacy "function" result, Llama 3's "ipython")
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "model": "assistant", "observation": "tool",
                "function": "tool", "ipython": "tool", "function_response": "tool"}
CALL_ROLES = ("function_call", "tool_call")  # ShareGPT turns whose value is the call itself
HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_OPTIONAL_COLUMNS = {"system", "margin", "input", "tools"}
TRUE_LABELS = frozenset({"true", "1", "yes", "y", "up", "good", "desirable", "thumbs_up", "thumbsup", "+1"})
FALSE_LABELS = frozenset({"false", "0", "no", "n", "down", "bad", "undesirable", "thumbs_down", "thumbsdown", "-1"})


def parse_label(value: Any) -> bool | None:
    """A feedback label as a bool: booleans, 1/0, and (any case) true/false, yes/no, up/down,
    good/bad, desirable/undesirable, thumbs_up/thumbs_down; None for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower().replace("-", "_").replace(" ", "_")
        if text in TRUE_LABELS:
            return True
        if text in FALSE_LABELS:
            return False
    return None


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

    def error(self, message: str, field: str | None = None, fatal: bool = False) -> DataError:
        if field is not None:
            head, dot, rest = field.partition("[")
            head, sep, tail = head.partition(".")
            field = self.file_names.get(head, head) + sep + tail + (dot + rest if dot else "")
        return (FatalDataError if fatal else DataError)(message, source=self.source, field=field)

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

    def json_value(self, value: Any, name: str, what: str) -> Any:
        """A list or object, also when written as JSON text (CSV cells, ShareGPT's ``tools``)."""
        if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
            try:
                return json.loads(value)
            except json.JSONDecodeError as error:
                raise self.error(f"{what} in a string must be valid JSON ({error.msg})", name) from None
        return value

    # -- messages
    def messages(self, name: str, value: Any = None) -> list[dict]:
        """A validated message list (a JSON-encoded list in a string is accepted, for CSV files)."""
        if value is None:
            value = self.get(name)
        value = self.json_value(value, name, "a message list")
        if not isinstance(value, list):
            raise self.error(f"wrong type: expected a list of messages, got {_type_name(value)}", name)
        if not value:
            raise self.error("empty message list", name)
        messages = []
        for index, item in enumerate(value):
            message = self.message(item, f"{name}[{index}]")
            if message["role"] == "system" and index > 0:
                raise self.error("a system message must come first", f"{name}[{index}].role")
            messages.append(message)
        return messages

    def message(self, item: Any, where: str) -> dict:
        if not isinstance(item, dict):
            raise self.error(f"wrong type: expected a message object, got {_type_name(item)}", where)
        role_key = "role" if "role" in item else "from" if "from" in item else None
        content_key = "content" if "content" in item else "value" if "value" in item else None
        if role_key is None:
            raise self.error("missing field 'role'", where)
        raw_role = item[role_key]
        if not isinstance(raw_role, str):
            raise self.error(f"wrong type: expected a string, got {_type_name(raw_role)}", f"{where}.role")
        key = raw_role.strip().lower()
        if key in CALL_ROLES:  # ShareGPT: the turn's value is the call (JSON), spoken by the assistant
            if content_key is None:
                raise self.error("missing field 'value' (the function call as JSON)", where)
            calls = self.json_value(item[content_key], f"{where}.{content_key}", "a function call")
            calls = calls if isinstance(calls, list) else [calls]
            return {"role": "assistant", "content": "",
                    "tool_calls": [self.tool_call(c, f"{where}.{content_key}") for c in calls]}
        role = ROLE_ALIASES.get(key, key)
        if role not in ROLES:
            raise self.error(
                f"unknown role '{raw_role}'; valid roles: {', '.join(ROLES)} (ShareGPT 'human'/'gpt'/"
                "'function_call'/'observation' and Gemini 'model' are accepted too)", f"{where}.role")
        calls = item.get("tool_calls")
        if calls is None and isinstance(item.get("function_call"), dict):  # OpenAI's legacy single call
            calls = [{"type": "function", "function": item["function_call"]}]
        message: dict[str, Any] = {"role": role}
        if calls:
            if role != "assistant":
                raise self.error(f"tool_calls on a '{role}' message; only assistant messages call tools",
                                 f"{where}.tool_calls")
            calls = self.json_value(calls, f"{where}.tool_calls", "tool_calls")
            if not isinstance(calls, list):
                raise self.error(f"wrong type: expected a list of tool calls, got {_type_name(calls)}",
                                 f"{where}.tool_calls")
            message["tool_calls"] = [self.tool_call(c, f"{where}.tool_calls[{i}]") for i, c in enumerate(calls)]
        content = item.get(content_key) if content_key else None
        if content is None:
            if content_key is None and not calls:
                raise self.error("missing field 'content'", where)
            if not calls:
                raise self.error("content is null; null content is only valid beside tool_calls",
                                 f"{where}.{content_key}")
            message["content"] = ""
        elif role == "tool" and isinstance(content, (dict, list)) and not _is_text_parts(content):
            message["content"] = json.dumps(content, ensure_ascii=False)
        else:
            text = _content_text(content, self, f"{where}.content")
            if calls and isinstance(text, str) and not text.strip():
                message["content"] = ""
            else:
                message["content"] = self.check_text(text, f"{where}.content")
        if role == "tool":
            for extra in ("tool_call_id", "name"):
                if isinstance(item.get(extra), str) and item[extra]:
                    message[extra] = item[extra]
        weight = item.get("weight")
        if weight is not None:
            if role != "assistant":
                raise self.error("weight applies to assistant messages only", f"{where}.weight")
            if isinstance(weight, bool) or weight not in (0, 1):
                raise self.error(f"weight must be 0 (no loss on this turn) or 1, got {weight!r}", f"{where}.weight")
            message["weight"] = int(weight)
        return message

    def tool_call(self, call: Any, where: str) -> dict:
        """One call as chat templates expect it: ``{"type": "function", "function": {"name", "arguments"}}``
        with ``arguments`` a dict (OpenAI stores it as JSON text, ShareGPT as an object)."""
        if not isinstance(call, dict):
            raise self.error(f"wrong type: expected a tool call object, got {_type_name(call)}", where)
        function = call.get("function", call)
        if not isinstance(function, dict):
            raise self.error(f"wrong type: expected an object, got {_type_name(function)}", f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            raise self.error("a tool call needs a function name", f"{where}.name")
        arguments = function.get("arguments", function.get("args", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as error:
                raise self.error(f"arguments must be JSON ({error.msg})", f"{where}.arguments") from None
        if not isinstance(arguments, dict):
            raise self.error(f"arguments must be a JSON object, got {_type_name(arguments)}", f"{where}.arguments")
        out: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
        if isinstance(call.get("id"), str):
            out["id"] = call["id"]
        return out

    def tools(self) -> list[dict] | None:
        """The row's tool definitions as ``[{"type": "function", "function": {name, description,
        parameters}}]``: OpenAI's ``tools`` (or legacy ``functions``), ShareGPT's JSON text, Gemini's
        ``[{"functionDeclarations": [...]}]``."""
        name = "tools" if self.has("tools") else "functions" if self.has("functions") else None
        value = self.data.get(name) if name else None
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        value = self.json_value(value, name, "tools")
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list):
            raise self.error(f"wrong type: expected a list of tool definitions, got {_type_name(value)}", name)
        tools = []
        for index, item in enumerate(value):
            where = f"{name}[{index}]"
            if not isinstance(item, dict):
                raise self.error(f"wrong type: expected a tool definition object, got {_type_name(item)}", where)
            declarations = item.get("functionDeclarations", item.get("function_declarations"))
            functions = declarations if isinstance(declarations, list) else [item.get("function", item)]
            for function in functions:
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise self.error("a tool definition needs a function name", where)
                tools.append({"type": "function", "function": {k: v for k, v in function.items() if k != "type"}})
        return tools or None

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
            if len(messages) != 1 or messages[0]["role"] != "assistant" or messages[0].get("tool_calls"):
                raise self.error("expected a string or a single assistant message (without tool calls)", where)
            return messages[0]["content"]
        return self.check_text(value, where)

    def margin(self) -> float | None:
        value = self.data.get("margin")
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if isinstance(value, bool):
            raise self.error("wrong type: expected a number, got boolean", "margin")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise self.error(f"wrong type: expected a number, got {_type_name(value)} {value!r}", "margin") from None
        if not math.isfinite(number):
            raise self.error(f"expected a finite number, got {value!r}", "margin")
        return number

    def label(self) -> bool:
        value = self.get("label")
        label = parse_label(value)
        if label is None:
            raise self.error(f"expected true (desirable) or false (undesirable), got {_type_name(value)} {value!r}",
                             "label")
        return label

    def system(self) -> str | None:
        value = self.data.get("system")
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if not isinstance(value, str):
            raise self.error(f"wrong type: expected a string, got {_type_name(value)}", "system")
        return value

    # -- Gemini / Vertex
    def gemini_contents(self, name: str = "contents", value: Any = None) -> list[dict]:
        """Gemini ``contents`` -> our messages: ``model`` turns are assistant turns, ``text`` parts are
        joined, ``functionCall`` parts become tool calls, ``functionResponse`` parts tool messages."""
        if value is None:
            value = self.get(name)
        value = self.json_value(value, name, "contents")
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list) or not value:
            raise self.error(f"wrong type: expected a non-empty list of contents, got {_type_name(value)}", name)
        messages: list[dict] = []
        for index, content in enumerate(value):
            messages += self.gemini_turn(content, f"{name}[{index}]")
        return messages

    def gemini_turn(self, content: Any, where: str) -> list[dict]:
        if not isinstance(content, dict):
            raise self.error(f"wrong type: expected a content object, got {_type_name(content)}", where)
        raw_role = content.get("role", "user")
        role = ROLE_ALIASES.get(str(raw_role).strip().lower(), str(raw_role).strip().lower())
        if role not in ("user", "assistant", "tool", "system"):
            raise self.error(f"unknown role '{raw_role}'; Gemini roles are user and model", f"{where}.role")
        parts = content.get("parts")
        if not isinstance(parts, list) or not parts:
            raise self.error("missing or empty 'parts' list", f"{where}.parts")
        texts, calls, results = [], [], []
        for number, part in enumerate(parts):
            at = f"{where}.parts[{number}]"
            if not isinstance(part, dict):
                raise self.error(f"wrong type: expected a part object, got {_type_name(part)}", at)
            if part.get("thought"):
                continue  # a model's thought summary is not a trained answer
            if "text" in part:
                texts.append(self.check_text(part["text"], f"{at}.text") if len(parts) == 1 else str(part["text"]))
            elif "functionCall" in part or "function_call" in part:
                calls.append(self.tool_call(part.get("functionCall", part.get("function_call")), at))
            elif "functionResponse" in part or "function_response" in part:
                response = part.get("functionResponse", part.get("function_response"))
                if not isinstance(response, dict) or not isinstance(response.get("name"), str):
                    raise self.error("a functionResponse needs a name and a response", at)
                results.append({"role": "tool", "name": response["name"],
                                "content": json.dumps(response.get("response", {}), ensure_ascii=False)})
            else:
                kind = next(iter(part), "empty")
                raise self.error(f"only text, functionCall and functionResponse parts are supported, got '{kind}'", at)
        if results:
            if texts or calls:
                raise self.error("a turn with functionResponse parts must hold only those", where)
            return results
        text = "".join(texts)
        if calls:
            if role != "assistant":
                raise self.error("functionCall parts belong in a 'model' turn", where)
            return [{"role": "assistant", "content": text, "tool_calls": calls}]
        if not text.strip():
            raise self.error("empty text", f"{where}.parts")
        return [{"role": role, "content": text}]

    def gemini_system(self) -> list[dict]:
        for name in ("systemInstruction", "system_instruction"):
            if name in self.data and self.data[name] not in (None, ""):
                value = self.data[name]
                if isinstance(value, str):
                    return [{"role": "system", "content": self.check_text(value, name)}]
                turn = self.gemini_turn({**value, "role": "user"} if isinstance(value, dict) else value, name)
                return [{"role": "system", "content": turn[0]["content"]}]
        return []


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


def _is_text_parts(content: Any) -> bool:
    return isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content)


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


def is_hh_dialogue(text: Any) -> bool:
    """True for Anthropic HH text: it starts with a ``Human:`` turn and has an ``Assistant:`` turn."""
    return isinstance(text, str) and text.lstrip().startswith("Human:") and HH_ASSISTANT in text


# ------------------------------------------------------------------------------------ shape detection
def detect_format(row: dict) -> str | None:
    """The row shape from its keys (see the module docstring for the order), or None."""
    keys = set(row)
    if {"input", "preferred_output", "non_preferred_output"} <= keys:
        return "openai_preference"
    if {"contents", "completions"} <= keys:
        return "gemini_preference"
    if "contents" in keys:
        return "gemini"
    if "label" in keys and ({"prompt", "completion"} <= keys or (
            ("messages" in keys or "conversations" in keys) and parse_label(row["label"]) is not None)):
        return "unpaired"
    if "messages" in keys or "conversations" in keys:
        return "messages"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "preference"
    if {"prompt", "responses"} <= keys:
        return "ranked"
    if {"chosen", "rejected"} <= keys:
        return "hh_pair"
    if "text" in keys:
        return "hh" if is_hh_dialogue(row["text"]) else "text"
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
            "instruction+output, prompt+completion+label, OpenAI input+preferred_output+non_preferred_output, "
            "Gemini contents, or prompt. Map your column names with columns= or choose format=")
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
def _openai_input(row: _Row) -> list[dict]:
    """The prompt of an OpenAI DPO row: ``input.messages`` (``input`` may also be the list itself)."""
    value = row.json_value(row.get("input"), "input", "input")
    if isinstance(value, dict):
        if "messages" not in value:
            raise row.error("missing field 'messages' (OpenAI DPO rows hold the prompt in input.messages)", "input")
        if value.get("tools") and not row.has("tools"):
            row.data["tools"] = value["tools"]
        return row.messages("input.messages", value["messages"])
    return row.messages("input", value)


def _gemini_ranked(row: _Row) -> tuple[list[dict], list[str]]:
    prompt = row.gemini_contents("contents")
    value = row.json_value(row.get("completions"), "completions", "completions")
    if not isinstance(value, list) or len(value) < 2:
        raise row.error("expected a list of at least 2 scored completions "
                        "([{\"score\": 1, \"completion\": {...}}, {\"score\": 0, ...}])", "completions")
    scored = []
    for index, item in enumerate(value):
        where = f"completions[{index}]"
        if not isinstance(item, dict) or "completion" not in item or "score" not in item:
            raise row.error("each completion needs 'score' and 'completion'", where)
        score = item["score"]
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise row.error(f"wrong type: expected a number, got {_type_name(score)}", f"{where}.score")
        turn = row.gemini_turn(item["completion"], f"{where}.completion")
        if len(turn) != 1 or turn[0]["role"] != "assistant" or turn[0].get("tool_calls"):
            raise row.error("a completion must be one 'model' turn with text", f"{where}.completion")
        scored.append((float(score), index, turn[0]["content"]))
    if len({score for score, _, _ in scored}) != len(scored):
        raise row.error("completions need different scores (1 = preferred, 0 = dispreferred)", "completions")
    scored.sort(key=lambda item: -item[0])
    return row.gemini_system() + prompt, [text for _, _, text in scored]


def _ranked(row: _Row, shape: str) -> tuple[list[dict], list[str]]:
    """Prompt messages and the responses best first (two for a chosen/rejected pair)."""
    if shape == "preference":
        prompt = row.prompt("prompt")
        responses = [row.response("chosen"), row.response("rejected")]
    elif shape == "openai_preference":
        prompt = _openai_input(row)
        responses = [row.response("preferred_output"), row.response("non_preferred_output")]
    elif shape == "gemini_preference":
        prompt, responses = _gemini_ranked(row)
    elif shape == "hh_pair":
        prompt, chosen, rejected = _hh_pair(row)
        responses = [chosen, rejected]
    elif shape == "ranked":
        prompt = row.prompt("prompt")
        value = row.json_value(row.get("responses"), "responses", "a list")
        if not isinstance(value, list):
            raise row.error(f"wrong type: expected a list of responses (best first), got {_type_name(value)}",
                            "responses")
        if len(value) < 2:
            raise row.error(f"a ranking needs at least 2 responses, got {len(value)}", "responses")
        responses = [row.response("responses", item, index) for index, item in enumerate(value)]
    elif shape == "unpaired":
        raise row.error(
            "unpaired feedback (prompt/completion/label) has no chosen/rejected pair; train on it with "
            "'alignkit kto', or pair the answers first", "label", fatal=True)
    else:
        raise row.error(
            f"this row (shape '{shape}') has no ranked responses; preference data needs prompt+chosen+rejected, "
            "prompt+responses (best first), HH chosen+rejected dialogues, OpenAI input+preferred_output+"
            "non_preferred_output or Gemini contents+completions")
    if prompt and prompt[-1]["role"] == "assistant":
        raise row.error("the prompt ends with an assistant turn; it must end with a user (or tool) turn",
                        "input" if shape == "openai_preference" else "contents" if shape.startswith("gemini")
                        else "prompt")
    seen: dict[str, int] = {}
    names = {"openai_preference": "non_preferred_output", "gemini_preference": "completions"}
    for index, response in enumerate(responses):
        key = response.strip()
        if key in seen:
            if shape == "ranked":
                raise row.error(f"responses[{seen[key]}] and responses[{index}] are identical", "responses")
            raise row.error("chosen and rejected are identical", names.get(shape, "rejected"))
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
    if isinstance(value, (list, dict)) or (isinstance(value, str) and _is_json_message_list(value)):
        return row.messages(name, [value] if isinstance(value, dict) else value)
    return [_assistant(row.check_text(value, name))]


def _unpaired_parts(row: _Row) -> tuple[list[dict], str, bool]:
    """Prompt messages, the judged response and its label from an ``unpaired`` row."""
    label = row.label()
    if row.has("prompt"):
        prompt = row.prompt("prompt")
        completion = row.response("completion")
        return prompt, completion, label
    key = _messages_key(row)
    messages = row.messages(key)
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise row.error("a labelled conversation must end with the assistant reply being judged", key)
    return messages[:-1], messages[-1]["content"], label


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
        raise DataError(f"unknown format {format!r}; choose one of: {', '.join(FORMATS)}")


def _strip_weights(messages: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "weight"} for m in messages]


# ------------------------------------------------------------------------------------ public converters
def to_chat_example(row: dict, source: str, columns: dict[str, str] | None = None, *,
                    format: str | None = None, system_prompt: str | None = None,
                    desirable_only: bool = False) -> ChatExample | TextExample | None:
    """A row -> `ChatExample` (a conversation with at least one trained assistant turn), or a
    `TextExample` for plain ``text`` rows. An ``unpaired`` (labelled) row is refused with a
    `FatalDataError`; with ``desirable_only`` a ``label: true`` row is kept and a ``label: false``
    row gives None (the caller counts it)."""
    _check_format(format)
    r = _Row(row, source, columns)
    shape = _shape(r, format)
    if shape == "text":
        return TextExample(text=r.text("text"), source=source)
    if shape == "messages":
        messages = r.messages(_messages_key(r))
        where = _messages_key(r)
    elif shape == "gemini":
        messages = r.gemini_system() + r.gemini_contents("contents")
        where = "contents"
    elif shape == "unpaired":
        if not desirable_only:
            raise r.error(
                "this row is unpaired feedback (a 'label' column: KTO's prompt/completion/label); SFT would "
                "imitate the label-false answers too. Train it with 'alignkit kto', or set "
                "data.desirable_only: true to fine-tune on the label-true rows only", "label", fatal=True)
        prompt, completion, label = _unpaired_parts(r)
        if not label:
            return None
        messages, where = prompt + [_assistant(completion)], "completion"
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
    elif shape in PAIR_SHAPES:
        prompt, responses = _ranked(r, shape)
        messages = _strip_weights(prompt) + [_assistant(responses[0])]
        where = "chosen"
    else:  # "prompt"
        raise r.error("the row has a prompt but no response; SFT needs completion, messages, answer, output, "
                      "chosen, or an HH dialogue", "completion")
    assistants = [m for m in messages if m["role"] == "assistant"]
    if not assistants:
        raise r.error("the conversation has no assistant turn (nothing to learn from)", where)
    if all(m.get("weight") == 0 for m in assistants):
        raise r.error("every assistant turn has weight 0 (nothing to learn from)", where)
    return ChatExample(messages=_with_system(r, messages, system_prompt), source=source, tools=r.tools())


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
    prompt = _strip_weights(_with_system(r, prompt, system_prompt))
    margin = r.margin() if len(responses) == 2 else None
    if ranking_pairs == "adjacent":
        pairs = [(i, i + 1) for i in range(len(responses) - 1)]
    else:
        pairs = [(i, j) for i in range(len(responses)) for j in range(i + 1, len(responses))]
    tools = r.tools()
    return [PreferenceExample(prompt=[dict(m) for m in prompt], chosen=responses[i], rejected=responses[j],
                              source=source, margin=margin, tools=tools) for i, j in pairs]


def to_unpaired_examples(row: dict, source: str, columns: dict[str, str] | None = None, *,
                         format: str | None = None, system_prompt: str | None = None) -> list[UnpairedExample]:
    """A row -> `UnpairedExample`s for KTO: one from a labelled row; two from a preference pair (the
    chosen response desirable, the rejected one undesirable); a ranking gives its best (desirable) and
    its worst (undesirable) response."""
    _check_format(format)
    r = _Row(row, source, columns)
    shape = _shape(r, format)
    if shape == "unpaired":
        prompt, completion, label = _unpaired_parts(r)
        prompt = _strip_weights(_with_system(r, prompt, system_prompt))
        return [UnpairedExample(prompt=prompt, completion=completion, label=label, source=source, tools=r.tools())]
    if shape in PAIR_SHAPES:
        prompt, responses = _ranked(r, shape)
        prompt = _strip_weights(_with_system(r, prompt, system_prompt))
        tools = r.tools()
        return [UnpairedExample(prompt=[dict(m) for m in prompt], completion=responses[0], label=True,
                                source=source, tools=tools),
                UnpairedExample(prompt=[dict(m) for m in prompt], completion=responses[-1], label=False,
                                source=source, tools=tools)]
    raise r.error(
        f"this row (shape '{shape}') has no feedback label; KTO needs prompt+completion+label (true = desirable, "
        "false = undesirable) or preference pairs", "label")


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
    if r.tools():
        raise r.error("tool definitions in prompt rows are not supported for sampling (GRPO/PPO) yet; "
                      "remove the column or map another one", "tools", fatal=True)
    if shape in ("prompt", "prompt_completion"):
        prompt, used = r.prompt("prompt"), {"prompt"}
    elif shape == "unpaired":
        prompt, used = (r.prompt("prompt"), {"prompt"}) if r.has("prompt") else (_unpaired_parts(r)[0], {"messages"})
    elif shape in PAIR_SHAPES:
        prompt, _ = _ranked(r, shape)
        used = {"prompt", "input", "contents", "systemInstruction", "system_instruction"}
    elif shape == "question_answer":
        prompt, used = [{"role": "user", "content": r.text("question")}], {"question"}
        r.text("answer")
    elif shape == "alpaca":
        prompt, used = _alpaca_prompt(r), {"instruction", "input"}
    elif shape == "text":
        raise r.error("plain text has no prompt to sample from; GRPO/PPO need a prompt column", "text")
    elif shape in ("messages", "hh", "gemini"):
        if shape == "messages":
            key = _messages_key(r)
            prompt = r.messages(key)
        elif shape == "gemini":
            key = "contents"
            prompt = r.gemini_system() + r.gemini_contents("contents")
        else:
            key = "text"
            text = r.text("text").rstrip()
            if text.endswith(HH_ASSISTANT.strip()) and text[: -len("Assistant:")].endswith("\n\n"):
                text = text[: -len(HH_ASSISTANT)]
            prompt = parse_hh_dialogue(text, r, "text")
        used = {key, "systemInstruction", "system_instruction"}
        if prompt[-1]["role"] == "assistant":
            if prompt[-1].get("tool_calls"):
                raise r.error("the conversation ends with a tool call; a prompt must end with a user or tool turn", key)
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
    return PromptExample(prompt=_strip_weights(_with_system(r, prompt, system_prompt)), fields=fields, source=source)


# ------------------------------------------------------------------------------------ loading
@dataclass
class LoadReport:
    """What `load_examples` did: rows ``read``, rows ``kept`` and ``skipped`` (with every error message),
    rows ``filtered`` on purpose (``desirable_only``), and the number of ``examples`` made (more than
    ``kept`` when rankings expand into pairs)."""

    read: int = 0
    kept: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)
    examples: int = 0
    path: str = ""
    filtered: int = 0
    shapes: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        text = f"{self.path or 'data'}: read {self.read} rows, kept {self.kept}, skipped {self.skipped}"
        if self.filtered:
            text += f", dropped {self.filtered} label-false rows (desirable_only)"
        if self.examples != self.kept:
            text += f", {self.examples} examples"
        if self.errors:
            text += f"; first error: {self.errors[0]}"
        return text


def load_examples(path: str | os.PathLike, kind: str = "chat", columns: dict[str, str] | None = None,
                  on_error: str = "fail", limit: int | None = None, *, format: str | None = None,
                  system_prompt: str | None = None, split: str | None = None,
                  ranking_pairs: str = "all", desirable_only: bool = False) -> tuple[list, LoadReport]:
    """Read a file (or ``hf://`` data set) into typed examples.

    ``kind``: ``"chat"`` -> `ChatExample` (or `TextExample` for plain text rows), ``"preference"`` ->
    `PreferenceExample` (rankings expanded per ``ranking_pairs``), ``"unpaired"`` -> `UnpairedExample`,
    ``"prompt"`` -> `PromptExample`. ``on_error="fail"`` raises the first `DataError`; ``"skip"`` skips
    bad rows, counting them and keeping every message in the report (rows are never dropped silently).
    A `FatalDataError` (data of the wrong kind for the method) is raised in both modes. ``limit`` keeps
    at most that many examples. Raises `DataError` when no row at all is usable.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    if ranking_pairs not in RANKING_PAIRS:
        raise ValueError(f"ranking_pairs must be one of {RANKING_PAIRS}, got {ranking_pairs!r}")
    _check_format(format)
    if kind == "preference" and format not in (None, *PAIR_SHAPES):
        raise DataError(f"format {format!r} has no chosen/rejected responses; preference data needs "
                         f"format {', '.join(repr(f) for f in PAIR_SHAPES)}")
    if kind == "chat" and format == "prompt":
        raise DataError("format 'prompt' has no responses to train on; SFT needs a response column")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")

    def convert(row: dict, source: str) -> list:
        if kind == "chat":
            example = to_chat_example(row, source, columns, format=format, system_prompt=system_prompt,
                                      desirable_only=desirable_only)
            return [] if example is None else [example]
        if kind == "preference":
            return to_preference_examples(row, source, columns, ranking_pairs, format=format,
                                          system_prompt=system_prompt)
        if kind == "unpaired":
            return to_unpaired_examples(row, source, columns, format=format, system_prompt=system_prompt)
        return [to_prompt_example(row, source, columns, format=format, system_prompt=system_prompt)]

    report = LoadReport(path=os.fspath(path))
    examples: list = []
    for source, record in iter_records(path, split=split):
        report.read += 1
        try:
            if isinstance(record, DataError):
                raise record
            made = convert(record, source)
        except FatalDataError:
            raise
        except DataError as error:
            if on_error == "fail":
                raise
            report.skipped += 1
            report.errors.append(str(error))
            continue
        if not made:
            report.filtered += 1
            continue
        report.kept += 1
        shape = format or detect_format(_Row(record, source, columns).data) or "?"
        report.shapes[shape] = report.shapes.get(shape, 0) + 1
        examples.extend(made)
        if limit is not None and len(examples) >= limit:
            break
    if limit is not None:
        examples = examples[:limit]
    report.examples = len(examples)
    if not examples:
        if report.filtered and not report.errors:
            raise DataError(f"no usable rows: all {report.filtered} rows with a label are label-false "
                            "(desirable_only keeps the label-true ones)", source=report.path)
        raise DataError(f"no usable rows: all {report.read} rows had errors; first: {report.errors[0]}",
                        source=report.path)
    return examples, report
