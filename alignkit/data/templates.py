"""Chat templates by name or file, for base models that have none (``model.chat_template:``).

    model:
      name_or_path: ./my-base-model
      chat_template: chatml          # or llama3, gemma, zephyr, or a path: templates/mine.jinja

`apply_chat_template_setting` sets ``tokenizer.chat_template``; `save_model` then writes it into every
output (``chat_template.jinja`` beside the tokenizer), so vLLM, TRL or ``transformers`` format prompts
exactly as training did. A tokenizer with no template and no setting gets the documented fallback
(`fallback_template_source`, the same text `render_fallback_template` produces) written into it the
same way, so nothing trained by alignkit leaves without its template.

The named templates (written for alignkit; each renders one block per message, so every prefix of a
conversation renders as a prefix of the whole, which the loss mask relies on):

* ``chatml`` — ``<|im_start|>role\\ncontent<|im_end|>\\n``; ``<|im_end|>`` is the tokenizer's EOS
  token when it has no ``<|im_end|>`` token. Tool definitions go into the system block inside
  ``<tools></tools>``, an assistant's calls are ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``
  lines after its text, and a tool result is a ``tool`` block holding ``<tool_response>...</tool_response>``.
* ``llama3`` — ``<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>`` after the BOS token.
* ``gemma`` — ``<start_of_turn>user|model\\ncontent<end_of_turn>\\n`` after the BOS token; a system
  message is a user turn of its own (Gemma has no system role).
* ``zephyr`` — ``<|role|>\\ncontent`` + EOS + ``\\n``.

Each named template needs its end-of-turn marker to be a token of the tokenizer (the loss mask ends
each turn on it, which is how the model learns to stop); a tokenizer without it gets one clear error.
"""
from __future__ import annotations

import json
from pathlib import Path

from alignkit.data.tokenize import IM_END, fallback_end_marker
from alignkit.errors import UserError

NAMED_TEMPLATES = ("chatml", "llama3", "gemma", "zephyr")
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")

# Every piece of output is a Jinja expression (no raw text between tags), so the rendering does not
# depend on the whitespace options a library compiles templates with (transformers: trim_blocks).
_CHATML = (
    "{% set end = '@END@' %}"
    "{% if tools %}"
    "{{ '<|im_start|>system\n' }}"
    "{% if messages and messages[0].role == 'system' %}{{ messages[0].content + '\n\n' }}{% endif %}"
    "{{ 'You can call these functions. To call one, write <tool_call>{\"name\": NAME, \"arguments\": "
    "{...}}</tool_call>.\n<tools>' }}"
    "{% for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}"
    "{{ '\n</tools>' + end + '\n' }}"
    "{% elif messages and messages[0].role == 'system' %}"
    "{{ '<|im_start|>system\n' + messages[0].content + end + '\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if not (loop.first and message.role == 'system') %}"
    "{% if message.role == 'tool' %}"
    "{{ '<|im_start|>tool\n<tool_response>\n' + message.content + '\n</tool_response>' + end + '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message.role + '\n' }}"
    "{% if message.content is string %}{{ message.content }}{% endif %}"
    "{% for call in message.tool_calls or [] %}"
    "{% if message.content or not loop.first %}{{ '\n' }}{% endif %}"
    "{{ '<tool_call>' + ({'name': call.function.name, 'arguments': call.function.arguments} | tojson)"
    " + '</tool_call>' }}"
    "{% endfor %}"
    "{{ end + '\n' }}"
    "{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message.role + '<|end_header_id|>\n\n' + message.content + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

_GEMMA = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message.role == 'assistant' else 'user') + '\n' + message.content"
    " + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

_ZEPHYR = (
    "{% for message in messages %}"
    "{{ '<|' + message.role + '|>\n' + message.content + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

class TemplateError(UserError, ValueError):
    """A chat template that cannot be used with this tokenizer (or cannot be read)."""


_END_MARKERS = {"llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}


def _knows_token(tokenizer, token: str) -> bool:
    if token in (getattr(tokenizer, "get_added_vocab", dict)() or {}):
        return True
    token_id = tokenizer.convert_tokens_to_ids(token)
    return token_id is not None and token_id != getattr(tokenizer, "unk_token_id", None)


def fallback_template_source(tokenizer) -> str:
    """The fallback template (``docs/data.md``) as Jinja: the same text `render_fallback_template` writes."""
    end = fallback_end_marker(tokenizer).replace("\\", "\\\\").replace("'", "\\'")
    return ("{% for message in messages %}{{ '<|im_start|>' + message.role + '\n' + message.content + '"
            + end + "\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def named_template(name: str, tokenizer) -> str:
    """The Jinja source of a named template for this tokenizer; `ValueError` when unknown or when the
    tokenizer lacks the template's end-of-turn token."""
    key = name.strip().lower()
    if key == "chatml":
        end = IM_END if _knows_token(tokenizer, IM_END) else getattr(tokenizer, "eos_token", None)
        if not end:
            raise TemplateError("chat_template 'chatml': the tokenizer has neither an <|im_end|> nor an EOS token")
        return _CHATML.replace("@END@", end.replace("'", "\\'"))
    if key == "zephyr":
        if not getattr(tokenizer, "eos_token", None):
            raise TemplateError("chat_template 'zephyr' ends each turn with the EOS token; this tokenizer has none")
        return _ZEPHYR
    if key in _END_MARKERS:
        marker = _END_MARKERS[key]
        if not _knows_token(tokenizer, marker):
            raise TemplateError(f"chat_template '{key}' ends each turn with {marker}, which this tokenizer does not "
                             "have as a token (the model could not learn to stop); use 'chatml'")
        return {"llama3": _LLAMA3, "gemma": _GEMMA}[key]
    raise TemplateError(f"unknown chat_template '{name}': use one of {', '.join(NAMED_TEMPLATES)}, "
                     "or the path of a .jinja file (or of a folder / tokenizer_config.json holding one)")


def read_template_file(path: str | Path) -> str:
    """A template from a ``.jinja`` (or any text) file, a ``tokenizer_config.json`` / ``chat_template.json``
    with a ``chat_template`` key, or a folder holding one of those."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = next((path / name for name in TEMPLATE_FILES if (path / name).is_file()), None)
        if found is None:
            raise TemplateError(f"chat_template {path}: the folder holds none of {', '.join(TEMPLATE_FILES)}")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"chat_template file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            value = json.loads(text).get("chat_template")
        except (ValueError, AttributeError):
            value = None
        if isinstance(value, list):  # several named templates: take the default one
            value = next((t.get("template") for t in value if t.get("name") == "default"), None)
        if not isinstance(value, str) or not value.strip():
            raise TemplateError(f"chat_template {path}: no 'chat_template' string in this JSON file")
        return value
    if not text.strip():
        raise TemplateError(f"chat_template {path}: the file is empty")
    return text


def apply_chat_template_setting(tokenizer, setting: str | None) -> str | None:
    """Give ``tokenizer`` the template the job asks for (``setting``: a name or a path) or, when it has
    none and nothing is asked, the fallback template. Returns a line for the run notes, or None when
    the tokenizer's own template is kept."""
    if setting:
        had = getattr(tokenizer, "chat_template", None) is not None
        if setting.strip().lower() in NAMED_TEMPLATES:
            tokenizer.chat_template = named_template(setting, tokenizer)
            what = f"'{setting.strip().lower()}' (alignkit's)"
        else:
            tokenizer.chat_template = read_template_file(setting)
            what = f"from {setting}"
        return f"chat template: {what}" + ("; it replaces the tokenizer's own template" if had else "")
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = fallback_template_source(tokenizer)
        return ("chat template: the tokenizer has none; using alignkit's fallback (ChatML-like, turns end with "
                f"{fallback_end_marker(tokenizer)}), saved with the outputs; set model.chat_template to choose")
    return None
