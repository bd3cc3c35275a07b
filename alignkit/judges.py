"""LLM judges: a model grades replies on a rubric (pointwise) or picks the better of two (pairwise).

    backend  = LocalChatBackend(model, tokenizer)                 # or OpenAICompatibleBackend(url, name)
    judge    = PairwiseJudge(backend, criteria="Which reply is more honest?", cache=JudgeCache("runs/cache"))
    verdicts = judge.compare(prompts, replies_a, replies_b)        # "A" | "B" | "tie" | None
    judge.stats.as_dict()                                          # calls, retries, malformed, cache hits

What the code really does:

* A *backend* turns conversations into replies (``ChatBackend.complete``). Two ship here: a local
  transformers model (through `alignkit.generation.chat_generate`) and any OpenAI-compatible HTTP
  server (``POST {base_url}/chat/completions``, standard library only, the API key read from an
  environment variable).
* A *template* is plain text with ``{placeholders}`` and optional ``[system]`` / ``[user]`` section
  lines; the defaults live in ``alignkit/assets/judge_*.txt`` and any file can replace them.
* ``method="generate"`` (the default): the judge writes free text that must contain a line
  ``Score: N`` (N a number on the scale) or ``Verdict: A|B|tie``. Parsing is strict: the last such
  line decides, conflicting lines or a number off the scale make the answer *malformed*. A malformed
  answer is sent back with a reminder of the format, up to ``max_retries`` times; if it is still
  malformed the result is ``None`` and counted in ``judge.stats`` — never guessed.
* ``method="logprobs"`` (local backends only): the judge's reply is forced to start with
  ``Score:`` / ``Verdict:`` and the log-probability of every allowed label is read from the model.
  The verdict is the most probable label; the score is the probability-weighted mean of the scale.
  There is nothing to parse, so nothing is malformed: it is how a small local model can judge at
  all (a 135M model rarely follows the written format), at the price of measuring a tiny model's
  taste rather than its reasoning.
* Every judgment is cached on disk (`JudgeCache`, one SQLite file) under the SHA-256 of the backend's
  identity, the rendered conversation (template + inputs) and the settings, so an identical rerun makes
  no model or HTTP call. Malformed results are cached too (a rerun is free and gives the same answer);
  ``refresh=True`` re-asks.

`PairwiseJudge.compare` answers one order (A shown first). Position bias is real: callers that need
it removed ask both orders (``compare_both_orders`` here; `alignkit eval` does its own combination).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import re
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import torch

from alignkit.data import tokenize_prompt
from alignkit.errors import UserError
from alignkit.evaluate.stats import cohen_kappa, percent_agreement
from alignkit.generation import chat_generate
from alignkit.model import load_model_and_tokenizer
from alignkit.rewards.registry import register_factory

Conversation = list[dict]
Prompt = str | list[dict]

ASSETS = Path(__file__).parent / "assets"
POINTWISE_TEMPLATE_FILE = ASSETS / "judge_pointwise.txt"
PAIRWISE_TEMPLATE_FILE = ASSETS / "judge_pairwise.txt"
DEFAULT_RUBRIC = (
    "Does the reply do what the request asks, correctly, specifically and honestly? Reward accurate, "
    "clear and useful content; penalise mistakes, evasion, padding, invented facts and unsafe advice."
)
DEFAULT_CRITERIA = "Which reply is more helpful, honest and harmless for the person who asked?"
VERDICTS = ("A", "B", "tie")
PARSER_VERSION = 1  # part of every cache key: bump when parsing rules change


class JudgeError(UserError, RuntimeError):
    """A backend failed in a way retries cannot fix (bad URL, refused key, server error after retries)."""


class EndpointDown(JudgeError):
    """The endpoint failed ``max_consecutive_failures`` requests in a row; it is not called again until
    ``reset_circuit()`` (which `CombinedReward` calls at the start of every batch, i.e. every step)."""


# ---------------------------------------------------------------------------------------- backends


@runtime_checkable
class ChatBackend(Protocol):
    """Turns conversations into assistant replies. ``identity`` names the model for cache keys."""

    identity: str

    def complete(self, conversations: list[Conversation], temperature: float = 0.0,
                 max_tokens: int = 512) -> list[str]: ...


class LocalChatBackend:
    """A transformers causal LM (with or without a LoRA adapter) as a judge or generator.

    ``identity`` is ``local:{name}:{fingerprint}``, where the fingerprint summarises the weights
    (per-tensor sums, computed once here), so a retrained model at the same path misses the cache.
    ``calls`` counts conversations sent to the model (replies generated or label sets scored).
    """

    def __init__(self, model, tokenizer, name: str | None = None, batch_size: int = 8, top_p: float = 1.0):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.top_p = batch_size, top_p
        self.name = name or str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
        self.identity = f"local:{self.name}:{weights_fingerprint(model)}"
        self.calls = 0

    def complete(self, conversations: list[Conversation], temperature: float = 0.0,
                 max_tokens: int = 512) -> list[str]:

        if not conversations:
            return []
        self.calls += len(conversations)
        return chat_generate(self.model, self.tokenizer, conversations, max_new_tokens=max_tokens,
                             temperature=temperature, top_p=self.top_p, batch_size=self.batch_size)

    def label_logprobs(self, conversations: list[Conversation], prefix: str,
                       labels: Sequence[str]) -> list[list[float]]:
        """``log p(" " + label | conversation, reply so far = prefix)`` for every label.

        The assistant's reply is forced to begin with ``prefix`` (``"Verdict:"``) and each label is
        scored as its full token sequence (``" A"``, ``" tie"``, ``" 10"``). One row ``prompt + prefix +
        label`` gives the next-token distribution after every proper prefix of that label, so a few
        rows cover all labels: one forward pass per conversation for ``A/B/tie`` and for ``1..10``.
        """


        if not conversations:
            return []
        self.calls += len(conversations)
        tokenizer, model = self.tokenizer, self.model
        prefix_ids = tokenizer.encode(prefix, add_special_tokens=False)
        label_ids = []
        for label in labels:
            full = tokenizer.encode(prefix + " " + label, add_special_tokens=False)
            if full[:len(prefix_ids)] == prefix_ids and len(full) > len(prefix_ids):
                label_ids.append(full[len(prefix_ids):])
            else:  # the label merged into the prefix's last token: encode it alone
                label_ids.append(tokenizer.encode(" " + label, add_special_tokens=False))
        # A row prompt + prefix + label yields the next-token distribution after every proper prefix
        # of that label; pick rows (longest labels first) until every such branch point is covered.
        needed = {tuple(ids[:k]) for ids in label_ids for k in range(len(ids))}
        covering: list[tuple[int, ...]] = []
        for ids in sorted(label_ids, key=len, reverse=True):
            branches = {tuple(ids[:k]) for k in range(len(ids))}
            if branches - {b for row in covering for b in (row[:k] for k in range(len(row)))}:
                covering.append(tuple(ids))
        keep = max(len(row) for row in covering) + 1
        starts = [tokenize_prompt(tokenizer, c) + prefix_ids for c in conversations]
        rows = [(c, start + list(path), path) for c, start in enumerate(starts) for path in covering]
        device = next(model.parameters()).device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        at: list[dict[tuple[int, ...], torch.Tensor]] = [{} for _ in conversations]
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for begin in range(0, len(rows), self.batch_size):
                chunk = rows[begin:begin + self.batch_size]
                width = max(len(r) for _, r, _ in chunk)
                input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                attention = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, (_, row, _) in enumerate(chunk):  # left padding: every row ends at the last column
                    input_ids[i, width - len(row):] = torch.tensor(row)
                    attention[i, width - len(row):] = 1
                positions = (attention.cumsum(-1) - 1).clamp(min=0)
                inputs = dict(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                              position_ids=positions.to(device))
                try:
                    logits = model(**inputs, logits_to_keep=keep).logits[:, -keep:]
                except TypeError:  # models without logits_to_keep
                    logits = model(**inputs).logits[:, -keep:]
                logps = torch.log_softmax(logits.float(), dim=-1).cpu()
                for i, (c, _, path) in enumerate(chunk):
                    for k in range(len(path)):  # the distribution after path[:k] sits len(path) - k + 1 from the end
                        at[c].setdefault(path[:k], logps[i, keep - (len(path) - k) - 1])
        if was_training:
            model.train()
        assert all(needed <= set(table) for table in at)
        return [[sum(float(at[c][tuple(ids[:k])][token]) for k, token in enumerate(ids)) for ids in label_ids]
                for c in range(len(conversations))]


def weights_fingerprint(model) -> str:
    """A short hash of every parameter's name, shape and sum: cheap, and changes when training does."""

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            digest.update(f"{name}:{tuple(parameter.shape)}:{float(parameter.detach().double().sum()):.10e};".encode())
    return digest.hexdigest()[:16]


class OpenAICompatibleBackend:
    """Any server speaking the OpenAI chat-completions protocol (OpenAI, vLLM, llama.cpp, TGI, ...).

    ``POST {base_url}/chat/completions`` with ``{"model", "messages", "temperature", "max_tokens"}``;
    the reply is ``choices[0].message.content``. The API key is read from the environment variable
    ``api_key_env`` at each request and sent as ``Authorization: Bearer``; when the variable is unset
    no header is sent (local servers usually need none). Connection errors, timeouts, 429 and 5xx
    answers are retried ``max_retries`` times with exponential back-off; other 4xx answers fail at
    once with the server's message. Up to ``max_workers`` requests run in parallel.
    ``calls`` counts HTTP requests made (retries included).

    Circuit breaker: after ``max_consecutive_failures`` requests in a row have failed (each after its
    retries), the endpoint is taken as down and every further request fails at once with
    `EndpointDown`, without touching the network, until ``reset_circuit()``. A dead endpoint thus
    costs one round of retries per step instead of one per completion. ``failed_requests``,
    ``skipped_requests`` (refused while down) and ``circuit_opened`` count what happened.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 max_retries: int = 3, backoff_s: float = 1.0, max_workers: int = 4,
                 extra_body: dict | None = None, max_consecutive_failures: int = 3):
        if not re.match(r"^https?://", base_url or ""):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if max_consecutive_failures < 1:
            raise ValueError(f"max_consecutive_failures must be >= 1, got {max_consecutive_failures}")
        self.base_url = base_url.rstrip("/")
        self.model, self.api_key_env, self.timeout = model, api_key_env, timeout
        self.max_retries, self.backoff_s, self.max_workers = max_retries, backoff_s, max(1, max_workers)
        self.extra_body = dict(extra_body or {})
        self.identity = f"openai:{self.base_url}:{model}"
        self.calls = 0
        self.max_consecutive_failures = max_consecutive_failures
        self.consecutive_failures = 0
        self.failed_requests = 0
        self.skipped_requests = 0
        self.circuit_opened = 0
        self.down_reason: str | None = None
        self._lock = threading.Lock()

    def reset_circuit(self) -> None:
        """Call the endpoint again (a new step): forget the failures that opened the circuit."""
        with self._lock:
            self.down_reason, self.consecutive_failures = None, 0

    def circuit_stats(self) -> dict:
        return {"endpoint": f"{self.base_url}/chat/completions", "failed_requests": self.failed_requests,
                "skipped_requests": self.skipped_requests, "circuit_opened": self.circuit_opened}

    def _refuse_if_down(self) -> None:
        with self._lock:
            if self.down_reason is None:
                return
            self.skipped_requests += 1
            reason = self.down_reason
        raise EndpointDown(reason)

    def _record(self, error: JudgeError | None) -> None:
        with self._lock:
            if error is None:
                self.consecutive_failures = 0
                return
            self.failed_requests += 1
            self.consecutive_failures += 1
            if self.down_reason is None and self.consecutive_failures >= self.max_consecutive_failures:
                self.circuit_opened += 1
                self.down_reason = (f"{self.base_url}/chat/completions is not called again until the next step: "
                                    f"{self.consecutive_failures} requests in a row failed; last: {error}")

    def complete(self, conversations: list[Conversation], temperature: float = 0.0,
                 max_tokens: int = 512) -> list[str]:
        if len(conversations) <= 1 or self.max_workers == 1:
            return [self._one(c, temperature, max_tokens) for c in conversations]
        with concurrent.futures.ThreadPoolExecutor(self.max_workers) as pool:
            return list(pool.map(lambda c: self._one(c, temperature, max_tokens), conversations))

    def _one(self, messages: Conversation, temperature: float, max_tokens: int) -> str:
        self._refuse_if_down()
        try:
            answer = self._request(messages, temperature, max_tokens)
        except EndpointDown:
            raise
        except JudgeError as error:
            self._record(error)
            raise
        self._record(None)
        return answer

    def _request(self, messages: Conversation, temperature: float, max_tokens: int) -> str:
        body = {"model": self.model, "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
                "temperature": temperature, "max_tokens": max_tokens, **self.extra_body}
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = f"{self.base_url}/chat/completions"
        last_error = "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
                self._refuse_if_down()  # other requests found the endpoint down meanwhile: stop retrying
            with self._lock:
                self.calls += 1
            request = urllib.request.Request(url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as error:
                detail = _http_detail(error)
                if error.code == 429 or error.code >= 500:
                    last_error = f"HTTP {error.code}: {detail}"
                    continue
                hint = f" (is ${self.api_key_env} set?)" if error.code in (401, 403) else ""
                raise JudgeError(f"{url}: HTTP {error.code}: {detail}{hint}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
                last_error = f"{type(error).__name__}: {getattr(error, 'reason', error)}"
                continue
            except json.JSONDecodeError as error:
                last_error = f"the reply is not JSON: {error}"
                continue
            try:
                content = payload["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                raise JudgeError(f"{url}: unexpected reply shape (no choices[0].message.content): "
                                 f"{json.dumps(payload)[:300]}") from None
            return content if isinstance(content, str) else ""
        raise JudgeError(f"{url}: failed after {self.max_retries + 1} attempts; last error: {last_error}")


def _http_detail(error: urllib.error.HTTPError) -> str:
    try:
        text = error.read().decode("utf-8", "replace")
        payload = json.loads(text)
        message = payload.get("error", payload)
        if isinstance(message, dict):
            message = message.get("message", message)
        return str(message)[:300]
    except Exception:  # noqa: BLE001 - a detail for the message only
        return str(error.reason)[:300]


def make_backend(model: str | None = None, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 adapter: str | None = None, device: str | None = None, dtype: str | None = None,
                 timeout: float = 60.0, max_retries: int = 3, loaded: tuple | None = None) -> ChatBackend:
    """A backend from command-line style options.

    ``base_url`` given: an OpenAI-compatible endpoint serving ``model``. Otherwise ``model`` is a local
    model (embedded name, folder, hub id) loaded here, or ``loaded=(model, tokenizer)`` reuses one
    already in memory.
    """
    if base_url:
        if not model:
            raise ValueError("an HTTP judge needs the served model's name (--judge-model)")
        return OpenAICompatibleBackend(base_url, model, api_key_env=api_key_env, timeout=timeout,
                                       max_retries=max_retries)
    if loaded is not None:
        return LocalChatBackend(*loaded, name=model)

    loaded_model, tokenizer = load_model_and_tokenizer(model or "smollm2-135m-instruct", device=device, dtype=dtype,
                                                       adapter=adapter)
    return LocalChatBackend(loaded_model, tokenizer, name=f"{model}+{adapter}" if adapter else model)


# ------------------------------------------------------------------------------------------ cache


class JudgeCache:
    """Judgments on disk, keyed by the SHA-256 of everything that could change them.

    ``path`` is a folder (the file ``judge_cache.sqlite`` is created in it) or a ``.sqlite``/``.db``
    file. SQLite keeps writes atomic and lets several processes share one cache.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path).expanduser()
        if path.suffix not in (".sqlite", ".db", ".sqlite3"):
            path = path / "judge_cache.sqlite"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), timeout=60, check_same_thread=False)
        self._db.execute("CREATE TABLE IF NOT EXISTS judgments (key TEXT PRIMARY KEY, value TEXT NOT NULL, "
                         "created REAL NOT NULL)")
        self._db.commit()

    @staticmethod
    def key(payload: Any) -> str:
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM judgments WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put_many(self, items: list[tuple[str, dict]]) -> None:
        if not items:
            return
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO judgments (key, value, created) VALUES (?, ?, ?)",
                                 [(k, json.dumps(v, ensure_ascii=False), time.time()) for k, v in items])
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _as_cache(cache: JudgeCache | str | os.PathLike | None) -> JudgeCache | None:
    if cache is None or isinstance(cache, JudgeCache):
        return cache
    return JudgeCache(cache)


# -------------------------------------------------------------------------------------- templates

_SECTION = re.compile(r"^\[(system|user)\]\s*$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Template:
    """A judge prompt: ``system`` (may be empty) and ``user`` texts with ``{placeholders}``."""

    system: str
    user: str
    source: str = "<text>"

    @classmethod
    def parse(cls, text: str, source: str = "<text>") -> "Template":
        sections: dict[str, list[str]] = {}
        current = None
        for line in text.splitlines():
            match = _SECTION.match(line.strip())
            if match:
                current = match.group(1).lower()
                if current in sections:
                    raise ValueError(f"judge template {source}: the [{current}] section appears twice")
                sections[current] = []
            else:
                sections.setdefault(current or "user", []).append(line)
        if None in sections:  # pragma: no cover - setdefault above keys by "user"
            sections["user"] = sections.pop(None)
        user = "\n".join(sections.get("user", [])).strip()
        if not user:
            raise ValueError(f"judge template {source}: the user message is empty")
        return cls(system="\n".join(sections.get("system", [])).strip(), user=user, source=source)

    def placeholders(self) -> set[str]:
        return set(re.findall(r"\{([a-z_]+)\}", self.system + "\n" + self.user))

    def render(self, values: dict[str, str]) -> Conversation:
        """Fill the known ``{name}`` placeholders; other braces are left as they are."""

        def fill(text: str) -> str:
            return re.sub(r"\{([a-z_]+)\}", lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0),
                          text)

        messages = [{"role": "system", "content": fill(self.system)}] if self.system else []
        return messages + [{"role": "user", "content": fill(self.user)}]


def load_template(template: "str | os.PathLike | Template | None", default: Path) -> Template:
    """``None``: the default file; a `Template`; a path (``Path`` or an existing file); or template text."""
    if isinstance(template, Template):
        return template
    if template is None:
        return Template.parse(default.read_text(), str(default))
    if isinstance(template, os.PathLike):
        path = Path(template)
        if not path.is_file():
            raise FileNotFoundError(f"judge template file not found: {path}")
        return Template.parse(path.read_text(), str(path))
    text = str(template)
    if "\n" not in text and "{" not in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"judge template {text!r} is neither an existing file nor template text "
                                    "(template text holds {placeholders})")
        return Template.parse(path.read_text(), str(path))
    return Template.parse(text)


def _check_placeholders(template: Template, required: set[str], allowed: set[str]) -> None:
    found = template.placeholders()
    missing = sorted(required - found)
    if missing:
        raise ValueError(f"judge template {template.source} lacks the placeholder(s) "
                         f"{', '.join('{' + m + '}' for m in missing)}")
    unknown = sorted(found - allowed)
    if unknown:
        raise ValueError(f"judge template {template.source} has unknown placeholder(s) "
                         f"{', '.join('{' + u + '}' for u in unknown)}; known: "
                         f"{', '.join('{' + a + '}' for a in sorted(allowed))} (write other braces as they are)")


def conversation_text(prompt: Prompt) -> str:
    """A prompt as the judge reads it: a string as is; a conversation as ``Role: text`` blocks."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0].get("role") == "user":
        return str(prompt[0]["content"])
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)


# ---------------------------------------------------------------------------------------- parsing

_CLEAN = re.compile(r"[*_`#>]+")


def _candidate_lines(text: str, keyword: str) -> list[str]:
    """Lines that begin with ``keyword`` (ignoring markdown decoration and case), cleaned."""
    lines = []
    for raw in text.splitlines():
        line = _CLEAN.sub("", raw).strip()
        if line.lower().startswith(keyword.lower()):
            lines.append(line)
    return lines


_VERDICT_LINE = re.compile(r"^verdict\s*:\s*(a|b|tie)\s*\.?$", re.IGNORECASE)
_SCORE_LINE = re.compile(r"^score\s*:\s*([+-]?\d+(?:\.\d+)?)\s*(?:/\s*(\d+(?:\.\d+)?))?\s*\.?$", re.IGNORECASE)


def parse_verdict(text: str) -> tuple[str | None, str | None]:
    """``(verdict, None)`` or ``(None, reason)``.

    The answer must hold a line ``Verdict: A``, ``Verdict: B`` or ``Verdict: tie`` (any case, markdown
    emphasis ignored). The last line starting with "Verdict" decides and must be exactly that form;
    lines that disagree make the answer malformed.
    """
    lines = _candidate_lines(text or "", "verdict")
    if not lines:
        return None, "no 'Verdict:' line"
    match = _VERDICT_LINE.match(lines[-1])
    if not match:
        return None, "the last 'Verdict:' line is not 'Verdict: A|B|tie'"
    values = {m.group(1).lower() for m in map(_VERDICT_LINE.match, lines) if m}
    if len(values) > 1:
        return None, "conflicting 'Verdict:' lines"
    value = match.group(1)
    return ("tie" if value.lower() == "tie" else value.upper()), None


def parse_score(text: str, scale: tuple[float, float]) -> tuple[float | None, str | None]:
    """``(score, None)`` or ``(None, reason)``: the last line starting with "Score" must read
    ``Score: N`` (optionally ``N/high``) with ``low <= N <= high``; disagreeing score lines are malformed."""
    low, high = scale
    lines = _candidate_lines(text or "", "score")
    if not lines:
        return None, "no 'Score:' line"
    match = _SCORE_LINE.match(lines[-1])
    if not match:
        return None, "the last 'Score:' line is not 'Score: N'"
    values = {float(m.group(1)) for m in map(_SCORE_LINE.match, lines) if m}
    if len(values) > 1:
        return None, "conflicting 'Score:' lines"
    value = float(match.group(1))
    if match.group(2) is not None and float(match.group(2)) != float(high):
        return None, f"score written out of {match.group(2)}, expected out of {high:g}"
    if not low <= value <= high:
        return None, f"score {value:g} outside the scale {low:g}..{high:g}"
    return value, None


# ----------------------------------------------------------------------------------------- judges


@dataclasses.dataclass
class JudgeResult:
    """One judgment: ``value`` (a score, a verdict, or None when malformed), the judge's raw answers
    (one per attempt), why it was malformed, whether it came from the cache, and label log-probs
    (``method="logprobs"``)."""

    value: Any
    answers: list[str] = dataclasses.field(default_factory=list)
    reason: str | None = None
    cached: bool = False
    label_logprobs: dict[str, float] | None = None

    def to_json(self) -> dict:
        return {"value": self.value, "answers": self.answers, "reason": self.reason,
                "label_logprobs": self.label_logprobs}


@dataclasses.dataclass
class JudgeStats:
    """Counters over the judge's life: items asked, answered from cache, conversations sent to the
    backend, retries, parsed and malformed results (with reasons)."""

    items: int = 0
    cache_hits: int = 0
    backend_calls: int = 0
    retries: int = 0
    parsed: int = 0
    malformed: int = 0
    malformed_reasons: Counter = dataclasses.field(default_factory=Counter)

    def as_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["malformed_reasons"] = dict(self.malformed_reasons)
        data["malformed_rate"] = self.malformed / self.items if self.items else 0.0
        return data


class _Judge:
    kind = "judge"
    keyword = ""
    default_template = POINTWISE_TEMPLATE_FILE
    required: set[str] = set()
    allowed: set[str] = set()

    def __init__(self, backend: ChatBackend, template=None, *, method: str = "generate", max_retries: int = 2,
                 temperature: float = 0.0, max_tokens: int = 512, cache=None, refresh: bool = False):
        if method not in ("generate", "logprobs"):
            raise ValueError(f"method must be 'generate' or 'logprobs', got {method!r}")
        if method == "logprobs" and not hasattr(backend, "label_logprobs"):
            raise ValueError(f"method='logprobs' needs a backend that exposes label log-probabilities (a local "
                             f"model); {type(backend).__name__} does not: use method='generate'")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.backend, self.method = backend, method
        self.template = load_template(template, self.default_template)
        _check_placeholders(self.template, self.required, self.allowed)
        self.max_retries, self.temperature, self.max_tokens = max_retries, temperature, max_tokens
        self.cache, self.refresh = _as_cache(cache), refresh
        self.stats = JudgeStats()

    # what subclasses define
    def _parse(self, text: str) -> tuple[Any, str | None]:
        raise NotImplementedError

    def _reminder(self) -> str:
        raise NotImplementedError

    def _labels(self) -> list[str]:
        raise NotImplementedError

    def _from_logprobs(self, logprobs: list[float]) -> Any:
        raise NotImplementedError

    def _settings(self) -> dict:
        return {"method": self.method, "max_retries": self.max_retries, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "parser": PARSER_VERSION}

    def _run(self, values: list[dict[str, str]]) -> list[JudgeResult]:
        conversations = [self.template.render(v) for v in values]
        keys = [JudgeCache.key({"kind": self.kind, "backend": self.backend.identity, "messages": c,
                                "settings": self._settings()}) for c in conversations]
        results: list[JudgeResult | None] = [None] * len(values)
        self.stats.items += len(values)
        if self.cache is not None and not self.refresh:
            for i, key in enumerate(keys):
                stored = self.cache.get(key)
                if stored is not None:
                    results[i] = JudgeResult(stored["value"], stored.get("answers", []), stored.get("reason"), True,
                                             stored.get("label_logprobs"))
                    self.stats.cache_hits += 1
        todo = [i for i, r in enumerate(results) if r is None]
        if todo:
            fresh = (self._run_logprobs if self.method == "logprobs" else self._run_generate)(
                [conversations[i] for i in todo])
            for i, result in zip(todo, fresh):
                results[i] = result
            if self.cache is not None:
                self.cache.put_many([(keys[i], results[i].to_json()) for i in todo])
        for i in todo:
            if results[i].value is None:
                self.stats.malformed += 1
                self.stats.malformed_reasons[results[i].reason or "?"] += 1
            else:
                self.stats.parsed += 1
        return results  # type: ignore[return-value]

    def _run_generate(self, conversations: list[Conversation]) -> list[JudgeResult]:
        results = [JudgeResult(None) for _ in conversations]
        pending = list(range(len(conversations)))
        current = [list(c) for c in conversations]
        for attempt in range(self.max_retries + 1):
            if not pending:
                break
            if attempt:
                self.stats.retries += len(pending)
            answers = self.backend.complete([current[i] for i in pending], temperature=self.temperature,
                                            max_tokens=self.max_tokens)
            if len(answers) != len(pending):
                raise JudgeError(f"backend {self.backend.identity} returned {len(answers)} answers for "
                                 f"{len(pending)} conversations")
            self.stats.backend_calls += len(pending)
            still = []
            for i, answer in zip(pending, answers):
                value, reason = self._parse(answer)
                results[i].answers.append(answer)
                results[i].value, results[i].reason = value, reason
                if value is None:
                    current[i] = current[i] + [{"role": "assistant", "content": answer},
                                               {"role": "user", "content": self._reminder()}]
                    still.append(i)
            pending = still
        return results

    def _run_logprobs(self, conversations: list[Conversation]) -> list[JudgeResult]:
        labels = self._labels()
        table = self.backend.label_logprobs(conversations, f"{self.keyword}:", labels)  # type: ignore[attr-defined]
        self.stats.backend_calls += len(conversations)
        results = []
        for row in table:
            logprobs = dict(zip(labels, row))
            results.append(JudgeResult(self._from_logprobs(row), [], None, False, logprobs))
        return results


class PointwiseJudge(_Judge):
    """Grades each (prompt, response) on ``scale`` following ``rubric``.

    ``score(prompts, responses) -> list[float | None]``; ``score_detailed`` returns `JudgeResult` s.
    Template placeholders: ``{prompt}``, ``{response}`` (required), ``{rubric}``, ``{low}``, ``{high}``.
    """

    kind = "pointwise"
    keyword = "Score"
    default_template = POINTWISE_TEMPLATE_FILE
    required = {"prompt", "response"}
    allowed = {"prompt", "response", "rubric", "low", "high"}

    def __init__(self, backend: ChatBackend, rubric_template=None, scale: tuple[float, float] = (1, 10), *,
                 rubric: str | None = None, **options):
        super().__init__(backend, rubric_template, **options)
        low, high = scale
        if not high > low:
            raise ValueError(f"scale must be (low, high) with high > low, got {scale}")
        self.scale = (low, high)
        self.rubric = _text_or_file(rubric) if rubric else DEFAULT_RUBRIC
        if self.method == "logprobs" and (float(low) != int(low) or float(high) != int(high) or high - low > 100):
            raise ValueError("method='logprobs' needs an integer scale of at most 101 points")

    def _settings(self) -> dict:
        return {**super()._settings(), "scale": list(self.scale)}

    def _parse(self, text):
        return parse_score(text, self.scale)

    def _reminder(self) -> str:
        low, high = self.scale
        return (f"Your reply did not end with the grade in the required form. Answer again with one line "
                f"only: Score: N, where N is a whole number from {low:g} to {high:g}.")

    def _labels(self):
        return [str(i) for i in range(int(self.scale[0]), int(self.scale[1]) + 1)]

    def _from_logprobs(self, logprobs):
        weights = _softmax(logprobs)
        return float(sum(w * int(label) for w, label in zip(weights, self._labels())))

    def score_detailed(self, prompts: Sequence[Prompt], responses: Sequence[str],
                       rubrics: Sequence[str] | None = None) -> list[JudgeResult]:
        _same_length(prompts=prompts, responses=responses, **({"rubrics": rubrics} if rubrics is not None else {}))
        low, high = self.scale
        values = [{"prompt": conversation_text(p), "response": r, "rubric": rubrics[i] if rubrics else self.rubric,
                   "low": f"{low:g}", "high": f"{high:g}"} for i, (p, r) in enumerate(zip(prompts, responses))]
        return self._run(values)

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str],
              rubrics: Sequence[str] | None = None) -> list[float | None]:
        return [r.value for r in self.score_detailed(prompts, responses, rubrics)]

    def normalize(self, value: float | None) -> float | None:
        """A score mapped to [0, 1] (None stays None)."""
        low, high = self.scale
        return None if value is None else (value - low) / (high - low)


class PairwiseJudge(_Judge):
    """Picks the better of two responses to the same prompt: ``"A"``, ``"B"``, ``"tie"`` or None.

    ``compare`` answers the order given (A shown first). Template placeholders: ``{prompt}``,
    ``{response_a}``, ``{response_b}`` (required) and ``{criteria}`` (default `DEFAULT_CRITERIA`, or
    per item through ``compare(..., criteria=[...])``).
    """

    kind = "pairwise"
    keyword = "Verdict"
    default_template = PAIRWISE_TEMPLATE_FILE
    required = {"prompt", "response_a", "response_b"}
    allowed = {"prompt", "response_a", "response_b", "criteria"}

    def __init__(self, backend: ChatBackend, template=None, *, criteria: str | None = None, **options):
        super().__init__(backend, template, **options)
        self.criteria = _text_or_file(criteria) if criteria else DEFAULT_CRITERIA

    def _parse(self, text):
        return parse_verdict(text)

    def _reminder(self) -> str:
        return ("Your reply did not end with the verdict in the required form. Answer again with one line "
                "only, exactly one of: Verdict: A / Verdict: B / Verdict: tie")

    def _labels(self):
        return list(VERDICTS)

    def _from_logprobs(self, logprobs):
        best = max(range(len(VERDICTS)), key=lambda i: logprobs[i])
        return VERDICTS[best]

    def compare_detailed(self, prompts: Sequence[Prompt], responses_a: Sequence[str], responses_b: Sequence[str],
                         criteria: Sequence[str] | None = None) -> list[JudgeResult]:
        _same_length(prompts=prompts, responses_a=responses_a, responses_b=responses_b,
                     **({"criteria": criteria} if criteria is not None else {}))
        values = [{"prompt": conversation_text(p), "response_a": a, "response_b": b,
                   "criteria": criteria[i] if criteria else self.criteria}
                  for i, (p, a, b) in enumerate(zip(prompts, responses_a, responses_b))]
        return self._run(values)

    def compare(self, prompts: Sequence[Prompt], responses_a: Sequence[str], responses_b: Sequence[str],
                criteria: Sequence[str] | None = None) -> list[str | None]:
        return [r.value for r in self.compare_detailed(prompts, responses_a, responses_b, criteria)]

    def compare_both_orders(self, prompts: Sequence[Prompt], responses_a: Sequence[str],
                            responses_b: Sequence[str], criteria: Sequence[str] | None = None) -> list[dict]:
        """Ask (A, B) and (B, A); combine so that the position of a reply cannot decide.

        ``generate``: the two verdicts must agree once the second is un-swapped (A/B or tie/tie); any
        disagreement gives ``verdict=None, reason="inconsistent"``. ``logprobs``: the margins
        ``log p(A) - log p(B)`` of the two orders are combined as ``first - second`` (the position
        preference cancels); > 0 means A, < 0 B, exactly 0 a tie. Each dict holds ``verdict``,
        ``reason``, ``first`` and ``second`` (the `JudgeResult` s).
        """
        first = self.compare_detailed(prompts, responses_a, responses_b, criteria)
        second = self.compare_detailed(prompts, responses_b, responses_a, criteria)
        swap = {"A": "B", "B": "A", "tie": "tie", None: None}
        combined = []
        for one, two in zip(first, second):
            if self.method == "logprobs":
                margin = _margin(one) - _margin(two)
                verdict = "A" if margin > 0 else "B" if margin < 0 else "tie"
                combined.append({"verdict": verdict, "reason": None, "margin": margin, "first": one, "second": two})
                continue
            if one.value is None or two.value is None:
                combined.append({"verdict": None, "reason": "malformed", "first": one, "second": two})
            elif one.value == swap[two.value]:
                combined.append({"verdict": one.value, "reason": None, "first": one, "second": two})
            else:
                combined.append({"verdict": None, "reason": "inconsistent", "first": one, "second": two})
        return combined


def _margin(result: JudgeResult) -> float:
    logprobs = result.label_logprobs or {}
    return float(logprobs.get("A", 0.0) - logprobs.get("B", 0.0))


def _softmax(values: Sequence[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def _same_length(**lists) -> None:
    lengths = {name: len(values) for name, values in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError("inputs differ in length: " + ", ".join(f"{k}={v}" for k, v in lengths.items()))


def _text_or_file(value: str | os.PathLike) -> str:
    """A rubric or criterion: text as is; a ``Path`` is read."""
    if isinstance(value, os.PathLike):
        return Path(value).read_text().strip()
    return str(value)


# -------------------------------------------------------------------------------------- agreement


def agreement(labels_a: Sequence[Any], labels_b: Sequence[Any]) -> dict:
    """Percent agreement and Cohen's kappa between two raters of the same items.

    Items where either rater has no label (None: a malformed judgment, a missing human label) are left
    out and counted in ``missing``. Returns ``{"items", "compared", "missing", "percent_agreement",
    "cohen_kappa"}`` (the statistics are None when nothing is left to compare).
    """

    if len(labels_a) != len(labels_b):
        raise ValueError(f"the two raters labelled different numbers of items: {len(labels_a)} vs {len(labels_b)}")
    pairs = [(a, b) for a, b in zip(labels_a, labels_b) if a is not None and b is not None]
    result = {"items": len(labels_a), "compared": len(pairs), "missing": len(labels_a) - len(pairs),
              "percent_agreement": None, "cohen_kappa": None}
    if pairs:
        a, b = zip(*pairs)
        result["percent_agreement"] = percent_agreement(a, b)
        result["cohen_kappa"] = cohen_kappa(a, b)
    return result


# ------------------------------------------------------------------------------- reward function


def llm_judge_reward(model: str | None = None, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                     rubric: str | None = None, template: str | None = None, scale: Sequence[float] = (1, 10),
                     method: str = "generate", cache_dir: str | None = None, max_retries: int = 2,
                     max_tokens: int = 512, temperature: float = 0.0, adapter: str | None = None,
                     device: str | None = None, dtype: str | None = None, backend: ChatBackend | None = None):
    """Reward factory ``llm_judge``: a pointwise judge's score mapped to [0, 1].

    ``get_reward_function("llm_judge", model="smollm2-135m-instruct", method="logprobs")`` or
    ``get_reward_function("llm_judge", base_url="http://localhost:8000/v1", model="served-name")``.
    A malformed judgment (after retries) gives ``None`` for that completion, which `CombinedReward`
    treats as a failed reward under its error policy (raise, or count and score 0): never a guess.
    The function's ``judge`` attribute holds the `PointwiseJudge` (``.judge.stats``).
    """
    if backend is None:
        backend = make_backend(model=model, base_url=base_url, api_key_env=api_key_env, adapter=adapter,
                               device=device, dtype=dtype)
    judge = PointwiseJudge(backend, template, tuple(scale), rubric=rubric, method=method, max_retries=max_retries,
                           max_tokens=max_tokens, temperature=temperature, cache=cache_dir)

    def llm_judge(prompts: list[str], completions: list[str], **fields) -> list[float | None]:
        return [judge.normalize(v) for v in judge.score(prompts, completions)]

    llm_judge.judge = judge  # type: ignore[attr-defined]
    if hasattr(backend, "reset_circuit"):  # CombinedReward resets it every batch and reports its counts
        llm_judge.reset_circuit = backend.reset_circuit  # type: ignore[attr-defined]
        llm_judge.circuit_stats = backend.circuit_stats  # type: ignore[attr-defined]
    return llm_judge


def _register() -> None:
    register_factory("llm_judge", llm_judge_reward)


_register()
