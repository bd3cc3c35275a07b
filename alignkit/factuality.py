"""Factuality-aware alignment data (FLAME, Lin et al. 2024): SFT rows and preference pairs that do not
teach the model to invent facts.

**SFT** (`factual_sft_rows`). Training on a reference answer the model does not know teaches it to
produce fluent answers it cannot back: on new questions it then invents. For *fact-seeking* prompts
(rows with a reference answer) the builder instead samples the model's own answers and keeps one
that the fact check accepts (`alignkit.evaluate.factuality`), so the model is trained only on
knowledge it already has, in the wanted style. A prompt none of whose samples passes gets the
``fallback``: ``skip`` (drop it; default), ``abstain`` (train a short "I'm not sure" answer, so the
model learns to decline what it does not know) or ``reference`` (the reference answer: plain SFT).
Rows that are not fact-seeking (no reference, but a response) are kept as demonstrations.

**Pairs** (`choose_pair`, `factual_pairs`). Building pairs from a reward model or judge picks the
most and least helpful response; reward models prefer longer, more detailed replies, which carry
more invented facts. The factuality-aware rule, per prompt:

1. among responses whose helpfulness scores differ by at most ``tolerance``, prefer the more
   factual one when it is at least ``min_factuality_gap`` more factual (the largest such gap wins);
2. else, the most helpful over the least helpful (gap above ``min_helpfulness_gap``), but never
   choosing a response that is *less* factual than the one it beats (the next pair is tried);
3. else, no pair for this prompt.

A response without claims (an abstention) counts as factuality ``abstention_value`` (0.5): better
than an invented answer, worse than a correct one. The report counts pairs by rule, and the prompts
where the helpfulness-only pair would have chosen the less factual reply (what a plain builder
would have taught).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from alignkit.errors import UsageError
from alignkit.evaluate.factuality import FactChecker, is_abstention, reference_of
from alignkit.evaluate.metrics import sample_completions
from alignkit.judges import conversation_text

FALLBACKS = ("skip", "abstain", "reference")
DEFAULT_ABSTENTION = "I'm not sure about that, so I'd rather not guess."


@dataclass
class SFTDataReport:
    prompts: int = 0
    fact_seeking: int = 0
    demonstrations: int = 0
    dropped_no_response: int = 0
    samples: int = 0
    samples_accepted: int = 0
    prompts_accepted: int = 0
    fallback: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        share = self.prompts_accepted / self.fact_seeking if self.fact_seeking else 0.0
        return (f"{self.prompts} prompts: {self.fact_seeking} fact-seeking, of which {self.prompts_accepted} "
                f"({share:.0%}) had an accepted sample ({self.samples_accepted}/{self.samples} samples accepted); "
                f"fallback {self.fallback}; {self.demonstrations} demonstrations kept; "
                f"{self.dropped_no_response} rows with neither reference nor response dropped")


def _response_text(fields: dict) -> str | None:
    for name in ("completion", "response", "output", "chosen"):
        value = fields.get(name)
        if isinstance(value, str) and value.strip():
            return value
        if isinstance(value, list) and value and isinstance(value[-1], dict):
            return str(value[-1].get("content", "")) or None
    return None


def select_accepted(samples: Sequence[str], verdicts: Sequence[bool]) -> int | None:
    """Index of the sample to train on: the first accepted one, or None."""
    return next((i for i, ok in enumerate(verdicts) if ok), None)


def factual_sft_rows(model, tokenizer, examples, checker: FactChecker, *, samples: int = 4,
                     temperature: float = 0.7, top_p: float = 1.0, max_new_tokens: int = 128,
                     fallback: str = "skip", abstention: str = DEFAULT_ABSTENTION, reference_field: str | None = None,
                     seed: int = 0, batch_size: int = 8, sampler: Callable | None = None) -> tuple[list[dict], SFTDataReport]:
    """SFT rows (``{"messages", "origin", "source"}``) from `PromptExample` s; see the module docstring.

    ``sampler(examples, samples) -> list[str]`` (``samples`` consecutive answers per example) replaces
    sampling from ``model``: tests and other generators plug in there.
    """
    if fallback not in FALLBACKS:
        raise UsageError(f"fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}")
    report = SFTDataReport(prompts=len(examples), fallback={name: 0 for name in FALLBACKS})
    rows: list[dict] = []
    facts, references = [], []
    for example in examples:
        try:
            reference = reference_of(example.fields, example.source, reference_field)
        except ValueError:
            response = _response_text(example.fields)
            if response is None:
                report.dropped_no_response += 1
            else:
                rows.append({"messages": [*example.prompt, {"role": "assistant", "content": response}],
                             "origin": "demonstration", "source": example.source})
                report.demonstrations += 1
            continue
        facts.append(example)
        references.append(reference)
    report.fact_seeking = len(facts)
    if not facts:
        return rows, report
    if sampler is not None:
        answers = list(sampler(facts, samples))
    else:
        _, ids = sample_completions(model, tokenizer, facts, samples=samples, temperature=temperature, top_p=top_p,
                                    max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
        answers = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
    if len(answers) != len(facts) * samples:
        raise ValueError(f"expected {len(facts) * samples} sampled answers, got {len(answers)}")
    prompts = [conversation_text(e.prompt) for e in facts for _ in range(samples)]
    checked = checker.check(prompts, answers, [r for r in references for _ in range(samples)])
    report.samples = len(answers)
    for index, example in enumerate(facts):
        window = slice(index * samples, (index + 1) * samples)
        verdicts = [c.correct for c in checked[window]]
        report.samples_accepted += sum(verdicts)
        pick = select_accepted(answers[window], verdicts)
        if pick is not None:
            report.prompts_accepted += 1
            text, origin = answers[window][pick], "model"
        else:
            report.fallback[fallback] += 1
            if fallback == "skip":
                continue
            if fallback == "abstain":
                text, origin = abstention, "abstain"
            else:
                reference = references[index]
                text = _response_text(example.fields) or (reference if isinstance(reference, str) else reference[0])
                origin = "reference"
        rows.append({"messages": [*example.prompt, {"role": "assistant", "content": text}], "origin": origin,
                     "source": example.source})
    return rows, report


# ------------------------------------------------------------------------------------------------ pairs

@dataclass
class PairChoice:
    chosen: int
    rejected: int
    rule: str              # "factuality" | "helpfulness"


def choose_pair(helpfulness: Sequence[float], factuality: Sequence[float | None], tolerance: float = 0.5,
                min_factuality_gap: float = 0.25, min_helpfulness_gap: float = 0.0, use_factuality: bool = True,
                abstention_value: float = 0.5) -> tuple[PairChoice | None, bool]:
    """(the pair for one prompt or None, whether the helpfulness-only pair would prefer the less factual
    reply); see the module docstring.

    ``factuality[i]`` is the share of supported claims of response i, or None when it made no claim (an
    abstention), which counts as ``abstention_value``: better than an invented answer, worse than a
    correct one. ``use_factuality=False`` is the plain rule: most vs least helpful.
    """
    n = len(helpfulness)
    if n < 2:
        return None, False
    facts = [abstention_value if f is None else float(f) for f in factuality]
    best, worst = max(range(n), key=lambda i: helpfulness[i]), min(range(n), key=lambda i: helpfulness[i])
    plain = best != worst and helpfulness[best] - helpfulness[worst] > min_helpfulness_gap
    misleading = plain and facts[best] < facts[worst]
    if not use_factuality:
        return (PairChoice(best, worst, "helpfulness") if plain else None), misleading
    factual = [(facts[i] - facts[j], helpfulness[i] - helpfulness[j], i, j) for i in range(n) for j in range(n)
               if i != j and abs(helpfulness[i] - helpfulness[j]) <= tolerance
               and facts[i] - facts[j] >= min_factuality_gap]
    if factual:
        _, _, i, j = max(factual)
        return PairChoice(i, j, "factuality"), misleading
    ranked = sorted(((helpfulness[i] - helpfulness[j], i, j) for i in range(n) for j in range(n) if i != j),
                    reverse=True)
    for gap, i, j in ranked:
        if gap <= min_helpfulness_gap or gap <= 0:
            break
        if facts[i] < facts[j]:   # never teach that the less factual reply is the better one
            continue
        return PairChoice(i, j, "helpfulness"), misleading
    return None, misleading


@dataclass
class PairReport:
    prompts: int = 0
    pairs: int = 0
    by_rule: dict[str, int] = field(default_factory=lambda: {"factuality": 0, "helpfulness": 0})
    misleading_avoided: int = 0
    no_pair: int = 0

    def summary(self) -> str:
        return (f"{self.prompts} prompts -> {self.pairs} pairs ({self.by_rule['factuality']} by factuality among "
                f"similar helpfulness, {self.by_rule['helpfulness']} by helpfulness); on {self.misleading_avoided} prompts the "
                f"helpfulness-only pair would have chosen the less factual reply; {self.no_pair} prompts without a pair")


def factual_pairs(prompts: Sequence[list[dict]], candidates: Sequence[Sequence[str]],
                  helpfulness: Sequence[Sequence[float]], factuality: Sequence[Sequence[float | None]],
                  **rule) -> tuple[list[dict], PairReport]:
    """Preference rows ``{"prompt", "chosen", "rejected", "rule", ...}`` from scored candidates."""
    report = PairReport(prompts=len(prompts))
    rows = []
    for prompt, texts, helpful, factual in zip(prompts, candidates, helpfulness, factuality):
        choice, misleading = choose_pair(helpful, factual, **rule)
        report.misleading_avoided += misleading and rule.get("use_factuality", True)
        if choice is None:
            report.no_pair += 1
            continue
        report.pairs += 1
        report.by_rule[choice.rule] += 1
        rows.append({"prompt": prompt, "chosen": texts[choice.chosen], "rejected": texts[choice.rejected],
                     "rule": choice.rule,
                     "helpfulness": [helpful[choice.chosen], helpful[choice.rejected]],
                     "factuality": [factual[choice.chosen], factual[choice.rejected]]})
    return rows, report


def build_factual_pairs(model, tokenizer, examples, checker: FactChecker, helpfulness: Callable, *, n: int = 4,
                        temperature: float = 0.8, top_p: float = 1.0, max_new_tokens: int = 128, seed: int = 0,
                        batch_size: int = 8, reference_field: str | None = None, sampler: Callable | None = None,
                        **rule) -> tuple[list[dict], PairReport]:
    """Sample ``n`` answers per prompt, score helpfulness and factuality (``checker``), then `factual_pairs`.

    ``helpfulness`` is a best-of-n scorer (`alignkit.best_of_n`: ``RewardModelScorer``,
    ``RewardFunctionScorer``, ``JudgeScorer``): ``scorer(prompt messages, completions, row fields) ->
    scores``. An answer the scorer could not score (None) is left out of its prompt's candidates."""
    if sampler is not None:
        answers = list(sampler(examples, n))
    else:
        _, ids = sample_completions(model, tokenizer, examples, samples=n, temperature=temperature, top_p=top_p,
                                    max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
        answers = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
    prompts = [conversation_text(e.prompt) for e in examples for _ in range(n)]
    references = [reference_of(e.fields, e.source, reference_field) for e in examples for _ in range(n)]
    scores = list(helpfulness([e.prompt for e in examples for _ in range(n)], answers,
                              [e.fields for e in examples for _ in range(n)]))
    checked = checker.check(prompts, answers, references)
    groups = []
    for i in range(len(examples)):
        kept = [k for k in range(i * n, (i + 1) * n) if scores[k] is not None]
        groups.append(([answers[k] for k in kept], [float(scores[k]) for k in kept], [checked[k].score for k in kept]))
    return factual_pairs([e.prompt for e in examples], *[[g[part] for g in groups] for part in range(3)], **rule)


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def report_dict(report) -> dict[str, Any]:
    return {**asdict(report), "summary": report.summary()}


__all__ = ["DEFAULT_ABSTENTION", "FALLBACKS", "PairChoice", "PairReport", "SFTDataReport", "build_factual_pairs",
           "choose_pair", "factual_pairs", "factual_sft_rows", "is_abstention", "report_dict", "select_accepted",
           "write_jsonl"]
