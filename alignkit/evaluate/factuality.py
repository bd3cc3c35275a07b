"""Factuality: how many of a response's atomic claims a trusted reference supports.

FLAME (Lin et al. 2024) found that ordinary alignment makes models *less* factual: SFT on reference
answers the model does not know teaches it to produce confident answers it cannot back, and reward
models prefer longer, more detailed replies. Measuring that needs a number per response, not a
"looks right": this module gives it, and the data builders in `alignkit.factuality` use it.

What the code does:

* **Claims.** A response is split into atomic claims: by rule (`split_claims`: sentences and list
  items, without questions and "I don't know"-style abstentions) or by an LLM (`ClaimExtractor`:
  "one fact per line"). For short answers (a capital, a year) the whole response is one claim.
* **Checks.** Each claim is checked against the reference:
  - `RuleChecker` (short answers, no model): supported when the response mentions an accepted answer
    (any alias; case, accents and punctuation ignored, whole words) and no other member of the answer
    set (``candidates``, e.g. every capital; mentions that merely repeat the question don't count);
    an abstention with no answer in it is *no claim* (not a hallucination); anything else is
    unsupported.
  - `JudgeChecker`: an LLM judge (`alignkit.judges.PointwiseJudge`, score 0 or 1, the template
    ``assets/judge_factuality.txt``) grades each claim against the reference; a malformed judgement
    is *unknown*, counted, never guessed.
* **Numbers** (the ``factuality`` metric): ``factuality`` = supported / (supported + unsupported)
  claims, with a Wilson interval when every response has at most one claim, else a bootstrap over
  responses (claims of one response are not independent); ``hallucination_rate`` = share of
  responses with at least one unsupported claim, ``correct_rate`` = share with a supported claim and
  no unsupported one, ``abstention_rate`` = share that declined to answer (all with Wilson intervals).
  Abstaining lowers hallucination but not correctness, so read the three together.
* ``factual_answer`` is the rule check as a reward function (1 correct, 0 otherwise; registered).
"""
from __future__ import annotations

import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from alignkit.errors import UsageError
from alignkit.evaluate.metrics import (
    _load_prompts,
    _temperature,
    metric,
    sample_completions,
)
from alignkit.evaluate.stats import bootstrap_interval, wilson_interval
from alignkit.judges import (
    PointwiseJudge,
    conversation_text,
    load_template,
    make_backend,
)
from alignkit.rewards.registry import register

ASSETS = Path(__file__).resolve().parent.parent / "assets"
ABSTENTION = re.compile(
    r"\b(i\s*(?:do\s*not|don'?t|dont)\s*know|i'?\s*a?m\s*not\s*(?:sure|certain)|i\s*am\s*not\s*(?:sure|certain)|"
    r"not\s*sure|no\s*idea|i\s*(?:cannot|can'?t|am\s*unable\s*to)\s*(?:answer|say|tell)|unsure|"
    r"i\s*(?:do\s*not|don'?t)\s*have\s*(?:that\s*)?information)\b", re.IGNORECASE)
REFERENCE_FIELDS = ("answers", "answer", "reference", "references")
_SENTENCE = re.compile(r"(?<=[.!?;])\s+|\n+")
_LIST_MARKER = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")


def normalize(text: str) -> str:
    """Lower case, accents and punctuation removed, single spaces: what the rule compares."""
    decomposed = unicodedata.normalize("NFKD", str(text))
    plain = "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()
    return " ".join(re.sub(r"[^0-9a-z]+", " ", plain).split())


def mentions(text: str, phrase: str) -> bool:
    """Whether ``phrase`` occurs in ``text`` as whole words, after `normalize`."""
    needle = normalize(phrase)
    return bool(needle) and f" {needle} " in f" {normalize(text)} "


def is_abstention(text: str) -> bool:
    return bool(ABSTENTION.search(text or ""))


def split_claims(text: str) -> list[str]:
    """Sentences and list items of ``text`` that state something: no questions, no abstentions."""
    claims = []
    for part in _SENTENCE.split(text or ""):
        part = _LIST_MARKER.sub("", part).strip()
        if len(normalize(part).split()) < 1 or part.endswith("?") or is_abstention(part):
            continue
        claims.append(part)
    return claims


def accepted_answers(reference: Any) -> list[str]:
    """A reference as a list of accepted answers: a string, or a list of aliases."""
    if isinstance(reference, (list, tuple, set)):
        return [str(r) for r in reference if str(r).strip()]
    if reference is None or not str(reference).strip():
        return []
    return [str(reference)]


@dataclass
class ResponseFactuality:
    """One response: its claims, a verdict per claim (True supported, False unsupported, None unknown)."""

    claims: list[str]
    verdicts: list[bool | None]
    abstained: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def supported(self) -> int:
        return sum(v is True for v in self.verdicts)

    @property
    def unsupported(self) -> int:
        return sum(v is False for v in self.verdicts)

    @property
    def unknown(self) -> int:
        return sum(v is None for v in self.verdicts)

    @property
    def hallucinated(self) -> bool:
        return self.unsupported > 0

    @property
    def correct(self) -> bool:
        return self.supported > 0 and self.unsupported == 0

    @property
    def score(self) -> float | None:
        """Share of checked claims that are supported; None with no checked claim (e.g. an abstention)."""
        checked = self.supported + self.unsupported
        return self.supported / checked if checked else None


class FactChecker(Protocol):
    name: str

    def check(self, prompts: Sequence[str], responses: Sequence[str],
              references: Sequence[Any]) -> list[ResponseFactuality]: ...


class RuleChecker:
    """Short answers checked by rule: see the module docstring. ``candidates`` is the answer set."""

    name = "rule"

    def __init__(self, candidates: Sequence[str] | str | Path | None = None):
        self.candidates = load_candidates(candidates)

    def check_one(self, prompt: str, response: str, reference: Any) -> ResponseFactuality:
        accepted = accepted_answers(reference)
        if not accepted:
            raise UsageError("the rule check needs a reference answer for every prompt")
        hit = next((a for a in accepted if mentions(response, a)), None)
        rest = f" {normalize(response)} "
        for answer in accepted:   # an accepted answer's words can't also count as a wrong candidate
            rest = rest.replace(f" {normalize(answer)} ", " | ")
        accepted_norm = {normalize(a) for a in accepted}
        wrong = [c for c in self.candidates if normalize(c) not in accepted_norm and mentions(rest, c)
                 and not mentions(prompt, c)]
        text = (response or "").strip()
        if wrong:
            claim = [f"{text} (names {', '.join(wrong[:3])})"]
            return ResponseFactuality(claim + ([f"names {hit}"] if hit else []), [False] + ([True] if hit else []))
        if hit:
            return ResponseFactuality([text], [True])
        if not text or is_abstention(text):
            return ResponseFactuality([], [], abstained=bool(text))
        return ResponseFactuality([text], [False])

    def check(self, prompts, responses, references):
        return [self.check_one(p, r, ref) for p, r, ref in zip(prompts, responses, references)]


def load_candidates(candidates: Sequence[str] | str | Path | None) -> list[str]:
    """A list as is; a ``.json`` file holding a list; any other file: one candidate per line."""
    if candidates is None:
        return []
    if isinstance(candidates, (str, Path)):
        path = Path(candidates)
        if not path.is_file():
            raise FileNotFoundError(f"candidates file not found: {path}")
        if path.suffix == ".json":
            values = json.loads(path.read_text())
            if not isinstance(values, list):
                raise UsageError(f"{path}: expected a JSON list of candidate answers")
            return [str(v) for v in values]
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [str(c) for c in candidates]


class ClaimExtractor:
    """Atomic claims by an LLM (`ChatBackend`): the reply is rewritten as "- fact" lines."""

    def __init__(self, backend, template: str | Path | None = None, max_tokens: int = 512):
        self.backend = backend
        self.template = load_template(template if template is not None else None, ASSETS / "factuality_claims.txt")
        self.max_tokens = max_tokens

    def __call__(self, responses: Sequence[str]) -> list[list[str]]:
        conversations = [self.template.render({"response": r}) for r in responses]
        answers = self.backend.complete(conversations, temperature=0.0, max_tokens=self.max_tokens)
        claims = []
        for answer in answers:
            lines = [line.strip()[2:].strip() for line in (answer or "").splitlines() if line.strip().startswith("- ")]
            claims.append([line for line in lines if line and normalize(line) != "none"])
        return claims


class JudgeChecker:
    """Each claim graded against the reference by an LLM judge (0 or 1); malformed grades are unknown.

    Claims come from ``extractor`` (a `ClaimExtractor`) or `split_claims`. ``method="logprobs"``
    reads the grade from label probabilities (local models), ``"generate"`` parses ``Score: N``.
    """

    def __init__(self, backend, *, extractor: ClaimExtractor | None = None, method: str = "generate",
                 template: str | Path | None = None, cache=None, max_retries: int = 2):
        self.judge = PointwiseJudge(backend, template if template is not None else ASSETS / "judge_factuality.txt",
                                    scale=(0, 1), method=method, cache=cache, max_retries=max_retries)
        self.extractor = extractor
        self.name = f"judge:{getattr(backend, 'identity', type(backend).__name__)}"

    def check(self, prompts, responses, references):
        claims = self.extractor(list(responses)) if self.extractor else [split_claims(r) for r in responses]
        flat_prompts, flat_claims, flat_references, owners = [], [], [], []
        for index, (prompt, items, reference) in enumerate(zip(prompts, claims, references)):
            text = "; ".join(accepted_answers(reference)) if not isinstance(reference, str) else reference
            for claim in items:
                flat_prompts.append(prompt)
                flat_claims.append(claim)
                flat_references.append(text)
                owners.append(index)
        scores = self.judge.score(flat_prompts, flat_claims, rubrics=flat_references) if flat_claims else []
        results = [ResponseFactuality([], [], abstained=not items and is_abstention(r))
                   for items, r in zip(claims, responses)]
        for owner, claim, score in zip(owners, flat_claims, scores):
            results[owner].claims.append(claim)
            results[owner].verdicts.append(None if score is None else score >= 0.5)
        return results


def make_checker(spec: Any = None, candidates=None, device=None, dtype=None) -> FactChecker:
    """``None``/``"rule"``: `RuleChecker`; ``"llm:MODEL"`` (local, log-prob grades) or ``"llm:MODEL@URL"``
    (an OpenAI-compatible server): `JudgeChecker`; an object with ``check``: itself."""
    if hasattr(spec, "check"):
        return spec
    if spec in (None, "", "rule"):
        return RuleChecker(candidates)
    text = str(spec)
    if text.startswith("llm:"):
        model, _, url = text[4:].partition("@")
        if url:
            return JudgeChecker(make_backend(model=model, base_url=url), method="generate")
        return JudgeChecker(make_backend(model=model or None, device=device, dtype=dtype), method="logprobs")
    raise UsageError(f"factuality checker {text!r}: expected 'rule', 'llm:MODEL' or 'llm:MODEL@URL'")


def reference_of(fields: dict, source: str, reference_field: str | None = None) -> Any:
    names = [reference_field] if reference_field else list(REFERENCE_FIELDS)
    for name in names:
        if name in fields and accepted_answers(fields[name]):
            return fields[name]
    raise UsageError(f"{source}: no reference answer (a field {' / '.join(names)}); the factuality check "
                     "needs one per prompt")


def summarize_factuality(checked: list[ResponseFactuality], confidence: float = 0.95, seed: int = 0) -> dict:
    """The metric's numbers from checked responses (see the module docstring)."""
    n = len(checked)
    supported = sum(r.supported for r in checked)
    unsupported = sum(r.unsupported for r in checked)
    claims = supported + unsupported
    result: dict[str, Any] = {"factuality": supported / claims if claims else math.nan}
    if claims and max(r.supported + r.unsupported for r in checked) <= 1:
        result["factuality_interval"] = list(wilson_interval(supported, claims, confidence))
        result["factuality_interval_method"] = "wilson (one claim per response)"
    elif claims:
        counts = np.array([[r.supported, r.supported + r.unsupported] for r in checked], dtype=float)

        def draw(rng):
            pick = counts[rng.integers(0, n, n)]
            return pick[:, 0].sum() / max(1.0, pick[:, 1].sum())
        result["factuality_interval"] = list(bootstrap_interval(draw, n_resamples=2000, confidence=confidence,
                                                                seed=seed))
        result["factuality_interval_method"] = "bootstrap over responses"
    for name, flags in (("hallucination_rate", [r.hallucinated for r in checked]),
                        ("correct_rate", [r.correct for r in checked]),
                        ("abstention_rate", [r.abstained for r in checked])):
        k = sum(flags)
        result[name] = k / n if n else math.nan
        result[f"{name}_interval"] = list(wilson_interval(k, n, confidence)) if n else [math.nan, math.nan]
    result.update({"n": n, "claims": claims, "supported_claims": supported, "unsupported_claims": unsupported,
                   "unknown_claims": sum(r.unknown for r in checked),
                   "mean_claims_per_response": (claims / n) if n else math.nan})
    return result


@metric("factuality")
def factuality(model, tokenizer, data: str, judge=None, candidates=None, reference_field: str | None = None,
               temperature: float | None = None, top_p: float = 1.0, max_new_tokens: int = 256,
               limit: int | None = None, seed: int = 0, batch_size: int = 8, confidence: float = 0.95,
               device=None, dtype=None, _cache: dict | None = None, **_) -> dict[str, Any]:
    """Factuality of greedy (or sampled) answers to fact-seeking prompts with reference answers.

    ``judge``: ``rule`` (default; short answers), ``llm:MODEL`` / ``llm:MODEL@URL`` (claims graded by
    an LLM), or a checker object. ``candidates``: the answer set for the rule (a list or a file).
    """
    examples, report = _load_prompts(data, limit)
    references = [reference_of(e.fields, e.source, reference_field) for e in examples]
    checker = make_checker(judge if judge not in (None, "") else "rule", candidates, device, dtype)
    temperature = _temperature(temperature, 1)
    _, ids = sample_completions(model, tokenizer, examples, samples=1, temperature=temperature, top_p=top_p,
                                max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, cache=_cache)
    responses = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
    prompts = [conversation_text(e.prompt) for e in examples]
    checked = checker.check(prompts, responses, references)
    result = summarize_factuality(checked, confidence, seed)
    result.update({"checker": getattr(checker, "name", type(checker).__name__), "temperature": temperature,
                   "max_new_tokens": max_new_tokens, "seed": seed, "confidence": confidence,
                   "data": report.summary(),
                   "examples": [{"prompt": p[:200], "response": r[:300], "reference": ref, "claims": c.claims[:5],
                                 "verdicts": c.verdicts[:5], "abstained": c.abstained}
                                for p, r, ref, c in list(zip(prompts, responses, references, checked))[:8]]})
    return result


def factual_answer(prompts: list[str], completions: list[str], *, field: str | None = None,
                   candidates=None, **fields: Any) -> list[float]:
    """Reward: 1.0 when the rule check finds the completion correct (names an accepted answer and no
    other candidate), else 0.0. The reference comes from ``field`` or ``answers``/``answer``/``reference``."""
    names = [field] if field else [name for name in REFERENCE_FIELDS if name in fields]
    if not names or names[0] not in fields:
        raise KeyError(f"factual_answer needs a reference field ({field or 'answers, answer or reference'}); "
                       f"got fields: {sorted(fields) or 'none'}")
    checker = RuleChecker(candidates)
    column = fields[names[0]]
    return [1.0 if checker.check_one(p, c, ref).correct else 0.0 for p, c, ref in zip(prompts, completions, column)]


def _register() -> None:
    register("factual_answer", factual_answer)   # the same object again is a no-op


_register()
