"""Constitutional AI: principles written down, then used to make training data without human labels.

A *constitution* is a YAML file holding a list of principles; each has a ``critique_request`` (asks
the model to find where a reply falls short of the principle) and a ``revision_request`` (asks it to
rewrite the reply to fix that), plus an optional ``preference`` question for comparing two replies.

Two pipelines, both driven through a `alignkit.judges.ChatBackend` (a local model or an HTTP endpoint):

``revise`` (supervised data):

    y0 = model(x)
    for each round r:   p_r ~ principles (seeded)
        c_r = model(x, y_{r-1}, "critique request of p_r")
        y_r = model(x, y_{r-1}, critique request, c_r, "revision request of p_r")
    row = messages [x..., assistant: y_R]      (+ the whole chain in the "constitution" field)

``pairs`` (AI feedback for DPO / reward models, "RLAIF"):

    y_1..y_K = model(x) with different temperatures and system prompts (candidate styles), so the
               candidates differ in more than sampling noise; the styles' system prompts are not
               part of the written prompt
    drop pairs that are near-copies (same normalised text, or word-overlap >= max_overlap)
    p ~ principles (seeded); a pairwise judge asks p's preference question, in both orders by default
    row = prompt / chosen / rejected          (+ principle, styles and verdicts in "constitution")

Choices: a revision that comes back empty or merely repeats the critique (small models parrot their
previous turn), a candidate that is empty, a judgment that is malformed,
inconsistent across orders, or a tie all drop the item and are counted in the summary; nothing is
filled in. A leading label such as "Revised response:" is stripped from revisions (small models
like to write one). Principle sampling uses ``random.Random(seed)``, so a rerun picks the same
principles.
"""
from __future__ import annotations

import difflib
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from alignkit.data import normalize_text
from alignkit.errors import UsageError, UserError


class ConstitutionError(UserError, ValueError):
    """A constitution file that cannot be used; the message names the file, the principle and the key."""


@dataclass(frozen=True)
class Principle:
    name: str
    critique_request: str
    revision_request: str
    preference: str

    def to_json(self) -> dict:
        return {"name": self.name, "critique_request": self.critique_request,
                "revision_request": self.revision_request, "preference": self.preference}


@dataclass(frozen=True)
class CandidateStyle:
    """How one candidate of a pair is sampled: a temperature and an optional system prompt."""

    name: str
    temperature: float
    system: str | None = None


DEFAULT_STYLES = (
    CandidateStyle("plain", 0.7, None),
    CandidateStyle("careful", 1.0, "Think about what could go wrong for the person asking, say what you are "
                                   "unsure of, and keep to what you can support."),
    CandidateStyle("brief", 0.9, "Reply in two or three short, plain sentences."),
)

_TOP_KEYS = ("name", "description", "principles", "candidate_styles")
_PRINCIPLE_KEYS = ("name", "critique_request", "revision_request", "preference")
_STYLE_KEYS = ("name", "temperature", "system")


@dataclass
class Constitution:
    principles: list[Principle]
    candidate_styles: list[CandidateStyle] = field(default_factory=lambda: list(DEFAULT_STYLES))
    name: str = ""
    description: str = ""
    source: str = "<constitution>"

    def sample(self, rng: random.Random) -> Principle:
        return self.principles[rng.randrange(len(self.principles))]


def load_constitution(path: str | Path) -> Constitution:
    """Read and validate a constitution YAML file (see `parse_constitution`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"constitution file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConstitutionError(f"{path}: not valid YAML: {error}") from None
    return parse_constitution(data, str(path))


def _unknown(keys: Sequence[str], allowed: Sequence[str], where: str) -> None:
    for key in keys:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConstitutionError(f"{where}: unknown key '{key}'{hint}; valid keys: {', '.join(allowed)}")


def _text(value: Any, where: str, key: str, required: bool = True) -> str | None:
    if value is None:
        if required:
            raise ConstitutionError(f"{where}: missing key '{key}'")
        return None
    if not isinstance(value, str):
        raise ConstitutionError(f"{where}: '{key}' must be text, got {type(value).__name__}")
    if not value.strip():
        raise ConstitutionError(f"{where}: '{key}' is empty")
    return value.strip()


def parse_constitution(data: Any, source: str = "<constitution>") -> Constitution:
    """Validate a loaded YAML document: a mapping with ``principles`` (and optional ``name``,
    ``description``, ``candidate_styles``) or a bare list of principles.

    Each principle: ``critique_request`` and ``revision_request`` (required text), ``name`` (default
    ``principle-N``, must be unique), ``preference`` (the question a pairwise judge answers; default
    built from the critique request). Errors read e.g.
    ``constitution.yaml: principles[2] ('privacy'): missing key 'critique_request'``.
    """
    if isinstance(data, list):
        data = {"principles": data}
    if not isinstance(data, dict):
        raise ConstitutionError(f"{source}: expected a mapping with a 'principles' list (or a list of principles), "
                                f"got {type(data).__name__}")
    _unknown(list(data), _TOP_KEYS, source)
    raw = data.get("principles")
    if not isinstance(raw, list) or not raw:
        raise ConstitutionError(f"{source}: 'principles' must be a non-empty list")
    principles, names = [], set()
    for index, item in enumerate(raw):
        where = f"{source}: principles[{index}]"
        if not isinstance(item, dict):
            raise ConstitutionError(f"{where}: each principle must be a mapping with critique_request and "
                                    f"revision_request, got {type(item).__name__}")
        name = item.get("name")
        if name is not None:
            name = _text(name, where, "name")
            where += f" ('{name}')"
        _unknown(list(item), _PRINCIPLE_KEYS, where)
        critique = _text(item.get("critique_request"), where, "critique_request")
        revision = _text(item.get("revision_request"), where, "revision_request")
        preference = _text(item.get("preference"), where, "preference", required=False)
        name = name or f"principle-{index}"
        if name in names:
            raise ConstitutionError(f"{where}: the name '{name}' is used twice")
        names.add(name)
        principles.append(Principle(name, critique, revision,
                                    preference or f"Judge the replies by this request: {critique}"))
    styles = list(DEFAULT_STYLES)
    if data.get("candidate_styles") is not None:
        raw_styles = data["candidate_styles"]
        if not isinstance(raw_styles, list) or not raw_styles:
            raise ConstitutionError(f"{source}: 'candidate_styles' must be a non-empty list")
        styles = []
        for index, item in enumerate(raw_styles):
            where = f"{source}: candidate_styles[{index}]"
            if not isinstance(item, dict):
                raise ConstitutionError(f"{where}: must be a mapping with temperature (and system, name)")
            _unknown(list(item), _STYLE_KEYS, where)
            temperature = item.get("temperature")
            if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
                raise ConstitutionError(f"{where}: 'temperature' must be a number >= 0, got {temperature!r}")
            styles.append(CandidateStyle(_text(item.get("name", f"style-{index}"), where, "name"), float(temperature),
                                         _text(item.get("system"), where, "system", required=False)))
    return Constitution(principles, styles, str(data.get("name") or ""), str(data.get("description") or ""), source)


# ------------------------------------------------------------------------------------------- revise

_LABEL = re.compile(r"^\s*(?:\*\*)?(?:here is (?:the |my )?)?(?:revised (?:response|reply|answer)|revision|"
                    r"rewritten (?:response|reply|answer))(?:\*\*)?\s*:\s*(?:\*\*)?\s*", re.IGNORECASE)


def clean_revision(text: str) -> str:
    """Strip a leading "Revision:"-style label and surrounding whitespace."""
    return _LABEL.sub("", text, count=1).strip()


def critique_and_revise(backend, constitution: Constitution, prompts: Sequence[list[dict]], *, rounds: int = 1,
                        seed: int = 0, temperature: float = 0.0, max_tokens: int = 256,
                        sources: Sequence[str] | None = None) -> tuple[list[dict], dict]:
    """Run the revise pipeline; returns ``(sft_rows, summary)``.

    Every step of all prompts runs as one batched ``backend.complete`` call. Rows are
    ``{"messages": prompt + [assistant: final revision], "constitution": {"initial", "steps": [...]}, "source"}``.
    """

    if rounds < 1:
        raise UsageError(f"rounds must be at least 1, got {rounds}")
    _seed_torch(seed)
    started = time.time()
    rng = random.Random(seed)
    prompts = [list(p) for p in prompts]
    chosen = [[constitution.sample(rng) for _ in range(rounds)] for _ in prompts]
    initial = backend.complete(prompts, temperature=temperature, max_tokens=max_tokens)
    current = [text.strip() for text in initial]
    chains = [{"initial": text, "steps": []} for text in current]
    failed: dict[int, str] = {i: "empty initial response" for i, text in enumerate(current) if not text}
    for round_index in range(rounds):
        alive = [i for i in range(len(prompts)) if i not in failed]
        if not alive:
            break
        critique_turns = {i: [*prompts[i], {"role": "assistant", "content": current[i]},
                              {"role": "user", "content": chosen[i][round_index].critique_request}] for i in alive}
        critiques = backend.complete([critique_turns[i] for i in alive], temperature=temperature, max_tokens=max_tokens)
        revision_turns = {i: [*critique_turns[i], {"role": "assistant", "content": critique.strip()},
                              {"role": "user", "content": chosen[i][round_index].revision_request}]
                          for i, critique in zip(alive, critiques)}
        revisions = backend.complete([revision_turns[i] for i in alive], temperature=temperature, max_tokens=max_tokens)
        for i, critique, revision in zip(alive, critiques, revisions):
            revised = clean_revision(revision)
            principle = chosen[i][round_index]
            chains[i]["steps"].append({"principle": principle.name, "critique_request": principle.critique_request,
                                       "critique": critique.strip(), "revision_request": principle.revision_request,
                                       "revision": revised})
            if not revised:
                failed[i] = f"empty revision in round {round_index + 1}"
            elif normalize_text(revised) == normalize_text(critique):
                failed[i] = "the revision repeats the critique"
            else:
                current[i] = revised
    rows = []
    for i, prompt in enumerate(prompts):
        if i in failed:
            continue
        rows.append({"messages": [*prompt, {"role": "assistant", "content": current[i]}],
                     "constitution": chains[i], "source": sources[i] if sources else str(i)})
    reasons: dict[str, int] = {}
    for reason in failed.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    summary = {"prompts": len(prompts), "rows": len(rows), "dropped": len(failed), "dropped_reasons": reasons,
               "unchanged": sum(1 for row in rows if row["messages"][-1]["content"] == row["constitution"]["initial"]),
               "rounds": rounds, "seed": seed, "principles_used": _count(p.name for ps in chosen for p in ps),
               "seconds": round(time.time() - started, 1)}
    return rows, summary


# -------------------------------------------------------------------------------------------- pairs


def word_overlap(a: str, b: str) -> float:
    """Jaccard overlap of the two texts' normalised word sets (1.0 = same words)."""

    words_a, words_b = set(normalize_text(a).split()), set(normalize_text(b).split())
    if not words_a and not words_b:
        return 1.0
    return len(words_a & words_b) / len(words_a | words_b)


def near_duplicates(a: str, b: str, max_overlap: float) -> bool:
    return normalize_text(a) == normalize_text(b) or word_overlap(a, b) >= max_overlap


def _styled(prompt: list[dict], style: CandidateStyle) -> list[dict]:
    if not style.system:
        return list(prompt)
    if prompt and prompt[0]["role"] == "system":
        return [{"role": "system", "content": prompt[0]["content"] + "\n\n" + style.system}, *prompt[1:]]
    return [{"role": "system", "content": style.system}, *prompt]


def generate_candidates(backend, prompts: Sequence[list[dict]], styles: Sequence[CandidateStyle],
                        num_candidates: int, max_tokens: int) -> list[list[tuple[CandidateStyle, str]]]:
    """``num_candidates`` replies per prompt; candidate k uses ``styles[k % len(styles)]`` (one batched
    call per style)."""
    if num_candidates < 2:
        raise UsageError(f"pairs need at least 2 candidates per prompt, got {num_candidates}")
    out: list[list[tuple[CandidateStyle, str]]] = [[] for _ in prompts]
    for k in range(num_candidates):
        style = styles[k % len(styles)]
        texts = backend.complete([_styled(p, style) for p in prompts], temperature=style.temperature,
                                 max_tokens=max_tokens)
        for i, text in enumerate(texts):
            out[i].append((style, text.strip()))
    return out


def preference_pairs(backend, judge, constitution: Constitution, prompts: Sequence[list[dict]], *,
                     num_candidates: int = 2, seed: int = 0, max_tokens: int = 256, max_overlap: float = 0.8,
                     both_orders: bool = True, sources: Sequence[str] | None = None) -> tuple[list[dict], dict]:
    """Run the pairs pipeline; returns ``(pair_rows, summary)``. ``judge`` is a `PairwiseJudge`."""
    _seed_torch(seed)
    started = time.time()
    rng = random.Random(seed)
    prompts = [list(p) for p in prompts]
    principles = [constitution.sample(rng) for _ in prompts]
    candidates = generate_candidates(backend, prompts, constitution.candidate_styles, num_candidates, max_tokens)
    generated = time.time()
    counts = {"empty_candidates": 0, "near_duplicate_pairs": 0}
    jobs = []  # (prompt index, candidate i, candidate j)
    for p, group in enumerate(candidates):
        counts["empty_candidates"] += sum(1 for _, text in group if not text)
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                if not group[i][1] or not group[j][1]:
                    continue
                if near_duplicates(group[i][1], group[j][1], max_overlap):
                    counts["near_duplicate_pairs"] += 1
                    continue
                jobs.append((p, i, j))
    judge_prompts = [prompts[p] for p, _, _ in jobs]
    first = [candidates[p][i][1] for p, i, _ in jobs]
    second = [candidates[p][j][1] for p, _, j in jobs]
    criteria = [principles[p].preference for p, _, _ in jobs]
    if both_orders:
        decisions = judge.compare_both_orders(judge_prompts, first, second, criteria) if jobs else []
    else:
        decisions = [{"verdict": r.value, "reason": None if r.value else "malformed", "first": r}
                     for r in (judge.compare_detailed(judge_prompts, first, second, criteria) if jobs else [])]
    outcome = {"ties": 0, "malformed": 0, "inconsistent": 0}
    rows = []
    for (p, i, j), decision in zip(jobs, decisions):
        verdict = decision["verdict"]
        if verdict is None:
            outcome[decision["reason"] if decision["reason"] in outcome else "malformed"] += 1
            continue
        if verdict == "tie":
            outcome["ties"] += 1
            continue
        win, lose = (i, j) if verdict == "A" else (j, i)
        record = {"principle": principles[p].name, "preference": principles[p].preference,
                  "chosen_style": candidates[p][win][0].name, "rejected_style": candidates[p][lose][0].name,
                  "verdicts": [decision["first"].value] + ([decision["second"].value] if "second" in decision else [])}
        if "margin" in decision:
            record["margin"] = decision["margin"]
        rows.append({"prompt": prompts[p], "chosen": candidates[p][win][1], "rejected": candidates[p][lose][1],
                     "constitution": record, "source": sources[p] if sources else str(p)})
    summary = {"prompts": len(prompts), "candidates_per_prompt": num_candidates,
               "styles": [s.name for s in constitution.candidate_styles[:num_candidates]],
               "candidate_pairs": sum(len(g) * (len(g) - 1) // 2 for g in candidates),
               **counts, "judged_pairs": len(jobs), "pairs": len(rows), **outcome, "both_orders": both_orders,
               "principles_used": _count(p.name for p in principles), "seed": seed,
               "generation_seconds": round(generated - started, 1),
               "judging_seconds": round(time.time() - generated, 1), "judge": judge.stats.as_dict()}
    return rows, summary


def _count(names) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return counts


def _seed_torch(seed: int) -> None:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return
    torch.manual_seed(seed)
