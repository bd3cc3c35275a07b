"""Built-in verifiable rewards.

Two kinds live here (both reachable by name through :func:`~alignkit.rewards.get_reward_function`):

* reward functions, called as ``fn(prompts, completions, **fields) -> list[float]``:
  ``numeric_match`` (alias ``gsm8k``), ``exact_match``, ``case_insensitive_match``, ``think_format``;
* factories, called with their options and returning a reward function:
  ``regex_format(pattern, ...)``, ``valid_json(schema=None)``, ``length_penalty(target_chars=...)``,
  ``contains(text, ...)``.

Every function reads its references from ``fields`` (lists aligned with ``completions``) and
ignores fields it does not know. See ``docs/rewards.md`` for the exact rules.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from transformers import AutoTokenizer

from alignkit.rewards.registry import register, register_factory

__all__ = [
    "THINK_ANSWER_PATTERN",
    "case_insensitive_match",
    "contains",
    "exact_match",
    "extract_final_number",
    "length_penalty",
    "numeric_match",
    "parse_number",
    "regex_format",
    "think_format",
    "valid_json",
]


# -- numbers ---------------------------------------------------------------------------------------

# One number as people write it in answers. Groups: sign (before a currency sign), sign2 (after it),
# number (digits, optional thousands commas, optional decimals), exponent, denominator (a fraction).
_NUMBER = re.compile(
    r"""
    (?:(?<![\w)\]}.])(?P<sign>[-+]))?            # a sign, unless it is a binary operator as in 3-4
    (?:[$€£¥]\s?)?                                 # a currency sign
    (?P<sign2>(?<![\w)\]}.])[-+])?                 # "$-5"
    (?<![\d.])                                     # never start in the middle of another number
    (?P<number>
        \d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?         # 1,234 / 1,234.50 (a comma needs exactly 3 digits)
      | \d+(?:\.\d+)?                              # 1234 / 12.0
      | \.\d+                                      # .5
    )
    (?P<exponent>[eE][-+]?\d+)?                    # 1e3, 2.5E-4
    (?:\s*/\s*(?P<denominator>\d+(?:\.\d+)?)(?![\d,]))?   # 3/4
    """,
    re.VERBOSE,
)

_LATEX_FRACTION = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]*?)\s*\}\s*\{\s*([^{}]*?)\s*\}")
_GSM8K_MARKER = "####"
_ANSWER_PHRASE = re.compile(r"\banswer\b\s*(?:is\b|:|=)", re.IGNORECASE)


def _normalise_math_text(text: str) -> str:
    text = text.replace("\u2212", "-")  # unicode minus
    text = text.replace("{,}", ",").replace("\\,", "").replace("\\!", "")
    text = text.replace("\\$", "$").replace("\\%", "%")
    return _LATEX_FRACTION.sub(r"\1/\2", text)


def _value_of(match: re.Match) -> float | None:
    digits = match["number"].replace(",", "") + (match["exponent"] or "")
    try:
        value = float(digits)
        if match["denominator"] is not None:
            denominator = float(match["denominator"])
            if denominator == 0:
                return None
            value /= denominator
    except (ValueError, OverflowError):
        return None
    if "-" in ((match["sign"] or "") + (match["sign2"] or "")):
        value = -value
    return value if math.isfinite(value) else None


def _numbers(text: str) -> list[float]:
    values = (_value_of(m) for m in _NUMBER.finditer(_normalise_math_text(text)))
    return [v for v in values if v is not None]


def parse_number(text: str) -> float | None:
    """The first number in ``text`` after normalisation (``"$1,234.50."`` -> 1234.5), or None."""
    found = _numbers(text)
    return found[0] if found else None


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if absent."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i]
        i += 1
    return text[begin:]  # unclosed: take the rest


def _number_after_marker(candidate: str) -> float | None:
    """The first number of the first non-empty line, read after its last '=' when it has one."""
    line = next((ln for ln in candidate.splitlines() if ln.strip()), "")
    if "=" in line:
        value = parse_number(line.rsplit("=", 1)[1])
        if value is not None:
            return value
    value = parse_number(line)
    return value if value is not None else parse_number(candidate)


def extract_final_number(text: str) -> float | None:
    """The model's final numeric answer in ``text``, or None when there is none.

    Where to look, first rule that yields a number wins:

    1. the text after the last ``####`` (GSM8K);
    2. the content of the last ``\\boxed{...}``;
    3. the text after the last "answer is" / "Answer:" / "answer =" (any case);
    4. otherwise the last number anywhere in the text.

    In rules 1-3 the answer is the first number on the first non-empty line after the marker, read
    after that line's last ``=`` if it has one (``"#### 12 apples, 3 pears"`` is 12, ``"The answer
    is 2 + 3 = 5"`` is 5). Normalisation: currency signs ``$ € £ ¥``, ``%``, trailing units or words and a trailing
    period are ignored; ``,`` is a thousands separator only before exactly three digits
    (``1,234`` is 1234, ``1,5`` is the two numbers 1 and 5, never 1.5); a leading ``+`` or ``-``
    counts (``3-4`` is 3 and 4, not -4); ``3/4`` and ``\\frac{3}{4}`` are 0.75; ``1e3`` is 1000.
    """
    if text is None:
        return None
    text = str(text)
    candidates: list[str] = []
    if _GSM8K_MARKER in text:
        candidates.append(text.rsplit(_GSM8K_MARKER, 1)[1])
    boxed = _last_boxed(text)
    if boxed is not None:
        candidates.append(boxed)
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if phrases:
        candidates.append(text[phrases[-1].end():])
    for candidate in candidates:
        value = _number_after_marker(candidate)
        if value is not None:
            return value
    found = _numbers(text)
    return found[-1] if found else None


def _numbers_equal(a: float, b: float, abs_tol: float, rel_tol: float) -> bool:
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)


def _reference_number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy / torch scalars
        try:
            return _reference_number(value.item())
        except (TypeError, ValueError):
            return None
    return extract_final_number(str(value))


_NUMERIC_REFERENCE_FIELDS = ("answer_value", "answer", "solution")


def _column(fields: dict, name: str, n: int, function: str) -> Sequence:
    column = fields[name]
    if isinstance(column, (str, bytes)) or not hasattr(column, "__len__"):
        raise TypeError(f"{function}: field {name!r} must be a list with one entry per completion, got {type(column).__name__}")
    if len(column) != n:
        raise ValueError(f"{function}: field {name!r} has {len(column)} entries for {n} completions")
    return column


@register("numeric_match", aliases=("gsm8k",))
def numeric_match(
    prompts: list[str],
    completions: list[str],
    *,
    field: str | None = None,
    abs_tol: float = 1e-6,
    rel_tol: float = 1e-6,
    **fields: Any,
) -> list[float]:
    """1.0 when the completion's final number equals the reference number, else 0.0.

    The completion's answer comes from :func:`extract_final_number`. The reference is read from
    ``field`` when given, else from the first of ``answer_value``, ``answer`` (a GSM8K answer is
    read after its ``####``), ``solution`` (its ``\\boxed{}``) that holds a number for that row. A
    row without any usable reference raises ``ValueError`` (a data problem, not a wrong answer).
    Numbers are equal within ``abs_tol`` or ``rel_tol`` (both 1e-6 by default).
    """
    n = len(completions)
    names = [field] if field is not None else [f for f in _NUMERIC_REFERENCE_FIELDS if f in fields]
    if not names or names[0] not in fields:
        wanted = repr(field) if field is not None else "'answer_value', 'answer' or 'solution'"
        raise KeyError(f"numeric_match needs a reference field {wanted}; got fields: {sorted(fields) or 'none'}")
    columns = [_column(fields, name, n, "numeric_match") for name in names]
    rewards = []
    for i, completion in enumerate(completions):
        reference = None
        for column in columns:
            reference = _reference_number(column[i])
            if reference is not None:
                break
        if reference is None:
            shown = {name: column[i] for name, column in zip(names, columns)}
            raise ValueError(f"numeric_match: no number in the reference of row {i}: {shown!r}")
        predicted = extract_final_number(completion)
        correct = predicted is not None and _numbers_equal(predicted, reference, abs_tol, rel_tol)
        rewards.append(1.0 if correct else 0.0)
    return rewards


# -- string matches ------------------------------------------------------------------------------

_TEXT_REFERENCE_FIELDS = ("answer", "reference")


def _text_references(fields: dict, field: str | None, n: int, function: str) -> Sequence:
    if field is None:
        field = next((f for f in _TEXT_REFERENCE_FIELDS if f in fields), None)
        if field is None:
            raise KeyError(f"{function} needs a reference field 'answer' or 'reference' (or field=...); got fields: {sorted(fields) or 'none'}")
    elif field not in fields:
        raise KeyError(f"{function}: reference field {field!r} missing; got fields: {sorted(fields) or 'none'}")
    return _column(fields, field, n, function)


def _as_options(reference: Any) -> list[str]:
    """A reference may be one string or a list of acceptable strings."""
    if isinstance(reference, (list, tuple, set, frozenset)):
        return [str(r) for r in reference]
    return [str(reference)]


def _match(completions, references, transform: Callable[[str], str]) -> list[float]:
    rewards = []
    for completion, reference in zip(completions, references):
        got = transform(str(completion).strip())
        rewards.append(1.0 if any(got == transform(r.strip()) for r in _as_options(reference)) else 0.0)
    return rewards


@register("exact_match")
def exact_match(prompts: list[str], completions: list[str], *, field: str | None = None, **fields: Any) -> list[float]:
    """1.0 when the completion equals the reference after stripping surrounding whitespace.

    The reference comes from ``field``, else ``answer``, else ``reference``; a list of strings means
    "any of these".
    """
    references = _text_references(fields, field, len(completions), "exact_match")
    return _match(completions, references, lambda s: s)


@register("case_insensitive_match")
def case_insensitive_match(
    prompts: list[str], completions: list[str], *, field: str | None = None, **fields: Any
) -> list[float]:
    """Like :func:`exact_match`, ignoring case (Unicode case folding)."""
    references = _text_references(fields, field, len(completions), "case_insensitive_match")
    return _match(completions, references, str.casefold)


# -- formats ---------------------------------------------------------------------------------------

#: ``<think>...</think>`` then ``<answer>...</answer>``, nothing else around them but whitespace. Neither
#: block may contain its own tags again, and the answer must hold some non-space text.
THINK_ANSWER_PATTERN = (
    r"\s*<think>(?:(?!</?think>).)*</think>"
    r"\s*<answer>(?=\s*(?!</answer>)\S)(?:(?!</?answer>).)*</answer>\s*"
)


def _flags(flags: int | str | Iterable[str] | None) -> int:
    """``re`` flags from an int, ``"DOTALL|IGNORECASE"``, ``"s"``-style letters, or a list of names."""
    if flags is None:
        return 0
    if isinstance(flags, (int, re.RegexFlag)):
        return int(flags)
    parts = re.split(r"[|,\s]+", flags) if isinstance(flags, str) else list(flags)
    value = 0
    for part in filter(None, (p.strip() for p in parts)):
        name = part.upper().removeprefix("RE.")
        flag = getattr(re, name, None)
        if not isinstance(flag, re.RegexFlag):
            raise ValueError(f"unknown regex flag {part!r} (use names like IGNORECASE, DOTALL, MULTILINE or letters I, S, M)")
        value |= int(flag)
    return value


def _regex_reward(compiled: re.Pattern, full_match: bool, name: str):
    def reward(prompts: list[str], completions: list[str], **fields: Any) -> list[float]:
        if full_match:
            return [1.0 if compiled.fullmatch(str(c).strip()) else 0.0 for c in completions]
        return [1.0 if compiled.search(str(c)) else 0.0 for c in completions]

    reward.__name__ = reward.__qualname__ = name
    reward.pattern = compiled.pattern  # type: ignore[attr-defined]
    return reward


@register_factory("regex_format")
def regex_format(pattern: str, flags: int | str | Iterable[str] | None = 0, full_match: bool = False):
    """Build a reward: 1.0 when ``pattern`` matches the completion, else 0.0.

    ``full_match=False`` searches anywhere (:func:`re.search`); ``full_match=True`` requires the
    whole completion, stripped of surrounding whitespace, to match (:func:`re.fullmatch`).
    ``flags``: an int, ``"DOTALL|IGNORECASE"`` or a list of flag names.
    """
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("regex_format needs a non-empty pattern string")
    try:
        compiled = re.compile(pattern, _flags(flags))
    except re.error as error:
        raise ValueError(f"regex_format: invalid pattern {pattern!r}: {error}") from error
    return _regex_reward(compiled, full_match, "regex_format")


_THINK_FORMAT = re.compile(THINK_ANSWER_PATTERN, re.DOTALL)


@register("think_format")
def think_format(prompts: list[str], completions: list[str], **fields: Any) -> list[float]:
    """1.0 for exactly ``<think>...</think>`` followed by ``<answer>...</answer>`` (see THINK_ANSWER_PATTERN)."""
    return [1.0 if _THINK_FORMAT.fullmatch(str(c)) else 0.0 for c in completions]


# -- JSON ------------------------------------------------------------------------------------------

_JSON_FENCE = re.compile(r"```[ \t]*json[ \t]*\r?\n(.*?)```", re.DOTALL | re.IGNORECASE)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _json_payload(completion: str) -> str:
    fenced = _JSON_FENCE.search(completion)
    return fenced.group(1) if fenced else completion


def _load_schema(schema: dict | str | os.PathLike) -> dict:
    if isinstance(schema, dict):
        return schema
    if isinstance(schema, str) and schema.lstrip().startswith("{"):
        return json.loads(schema)
    path = Path(schema).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"valid_json: schema file not found: {path}")
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


def _schema_validator(schema: dict):
    try:
        import jsonschema
    except ImportError as error:
        raise ImportError(
            "valid_json(schema=...) needs the optional package 'jsonschema': pip install jsonschema "
            "(or pip install 'alignkit[eval]')"
        ) from error
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.exceptions.SchemaError as error:
        raise ValueError(f"valid_json: the schema itself is invalid: {error.message}") from error
    return cls(schema)


@register_factory("valid_json")
def valid_json(schema: dict | str | os.PathLike | None = None):
    """Build a reward: 1.0 when the completion is JSON (and fits ``schema`` when given), else 0.0.

    The JSON is the first fenced ```` ```json ```` block when the completion has one, otherwise the
    whole completion. ``NaN``/``Infinity`` are not JSON. ``schema``: a dict, a path to a JSON
    schema file, or JSON text; it needs the optional ``jsonschema`` package and is checked now.
    """
    validator = None if schema is None else _schema_validator(_load_schema(schema))

    def reward(prompts: list[str], completions: list[str], **fields: Any) -> list[float]:
        rewards = []
        for completion in completions:
            try:
                value = json.loads(_json_payload(str(completion)), parse_constant=_reject_constant)
            except ValueError:  # JSONDecodeError is a ValueError
                rewards.append(0.0)
                continue
            rewards.append(1.0 if validator is None or validator.is_valid(value) else 0.0)
        return rewards

    reward.__name__ = reward.__qualname__ = "valid_json"
    return reward


# -- length ----------------------------------------------------------------------------------------


def _token_counter(tokenizer: Any) -> Callable[[str], int]:
    if tokenizer is None:
        # Documented approximation: about four characters per token for English text.
        return lambda text: math.ceil(len(text) / 4)
    if isinstance(tokenizer, str):

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    if hasattr(tokenizer, "encode"):
        try:
            tokenizer.encode("a", add_special_tokens=False)
            return lambda text: len(tokenizer.encode(text, add_special_tokens=False))
        except TypeError:
            return lambda text: len(tokenizer.encode(text))
    if callable(tokenizer):
        def count(text: str) -> int:
            result = tokenizer(text)
            return result if isinstance(result, int) else len(result)

        return count
    raise TypeError(f"length_penalty: tokenizer must be a name, an object with .encode or a callable, got {type(tokenizer).__name__}")


@register_factory("length_penalty")
def length_penalty(
    target_tokens: int | None = None,
    target_chars: int | None = None,
    max_tokens: int | None = None,
    max_chars: int | None = None,
    scale: float | None = None,
    tokenizer: Any = None,
):
    """Build a reward that is 0 up to a target length and falls linearly to -1 above it.

    ``reward = -min(1, (length - target) / scale)`` when ``length > target``, else 0, where length
    is counted in characters (``target_chars``) or tokens (``target_tokens``; counted with
    ``tokenizer`` — a tokenizer object, a hub name, or a callable — or, without one, estimated as
    ``ceil(chars / 4)``). ``scale`` is how far above the target the penalty reaches -1; by default
    ``max_chars - target_chars`` (or ``max_tokens - target_tokens``) when a max is given, else the
    target itself (so -1 at twice the target).
    """
    if (target_tokens is None) == (target_chars is None):
        raise ValueError("length_penalty needs exactly one of target_tokens= or target_chars=")
    if target_chars is not None:
        if max_tokens is not None:
            raise ValueError("length_penalty: max_tokens goes with target_tokens, not target_chars")
        target, maximum, unit = target_chars, max_chars, "chars"
        count: Callable[[str], int] = len
    else:
        if max_chars is not None:
            raise ValueError("length_penalty: max_chars goes with target_chars, not target_tokens")
        target, maximum, unit = target_tokens, max_tokens, "tokens"
        count = _token_counter(tokenizer)
    if target < 0:
        raise ValueError(f"length_penalty: target_{unit} must be >= 0, got {target}")
    if scale is None:
        if maximum is not None:
            if maximum <= target:
                raise ValueError(f"length_penalty: max_{unit} ({maximum}) must exceed target_{unit} ({target})")
            scale = maximum - target
        else:
            scale = target
    if not scale or scale <= 0:
        raise ValueError(f"length_penalty: scale must be > 0 (set scale= or max_{unit}=), got {scale}")

    def reward(prompts: list[str], completions: list[str], **fields: Any) -> list[float]:
        rewards = []
        for completion in completions:
            excess = count(str(completion)) - target
            rewards.append(-min(1.0, excess / scale) if excess > 0 else 0.0)
        return rewards

    reward.__name__ = reward.__qualname__ = "length_penalty"
    return reward


# -- toy -------------------------------------------------------------------------------------------


@register_factory("contains")
def contains(text: str | Sequence[str], ignore_case: bool = False):
    """Build a reward: 1.0 when the completion contains ``text`` (or any of a list of texts)."""
    needles = [text] if isinstance(text, str) else list(text)
    if not needles or not all(isinstance(n, str) and n for n in needles):
        raise ValueError(f"contains needs a non-empty text (or list of texts), got {text!r}")
    if ignore_case:
        needles = [n.casefold() for n in needles]

    def reward(prompts: list[str], completions: list[str], **fields: Any) -> list[float]:
        rewards = []
        for completion in completions:
            haystack = str(completion).casefold() if ignore_case else str(completion)
            rewards.append(1.0 if any(n in haystack for n in needles) else 0.0)
        return rewards

    reward.__name__ = reward.__qualname__ = "contains"
    return reward
