"""Pairwise judgments: which of two responses to a prompt is better, asked in both orders.

The judge protocol (shared with the LLM judges in ``alignkit.judges``) is one method::

    judge.compare(prompts: list[str], responses_a: list[str], responses_b: list[str]) -> list[str]

returning ``"A"``, ``"B"`` or ``"tie"`` per item, where ``"A"`` means the response *shown first*
won, or None when the judge could not give a verdict (an LLM judge's malformed answer). A judge
may also have a ``name``.

Judges are biased towards a position (LLM judges often prefer the first answer), so
``judge_both_orders`` asks every question twice, (a, b) and then (b, a), and combines the two
verdicts from model A's point of view with a score per order::

    +1  A's response won,   0  tie,   -1  B's response won
    sum  > 0  -> A wins     (won both orders, or won one and tied the other)
    sum == 0  -> tie        (tied both, or each response won once: the judge only followed the position)
    sum  < 0  -> B wins

A judge that always answers "A" therefore gives every item a tie and a 50% win rate, not 100%.
An item missing a verdict in either order is ``"invalid"``: left out of the win rate and counted.
The win rate counts a tie as half a win (``stats.win_rate_with_ties``), with a Wilson interval
and the sign-test p-value of "A beats B". ``position_consistency`` is the fraction of items on
which the two orders agree (a low value means the judge mostly reads positions, not content).

``RewardModelJudge`` implements the protocol with a reward model (``alignkit rm`` output): each
response is scored on its own (position cannot matter), and |score_a - score_b| < ``tie_margin``
is a tie.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

from alignkit import judges
from alignkit.errors import UsageError
from alignkit.evaluate.stats import win_rate_with_ties
from alignkit.model.heads import is_scalar_model, load_scalar_model, score_responses

VERDICTS = ("A", "B", "tie")


@runtime_checkable
class PairwiseJudge(Protocol):
    def compare(self, prompts: list[str], responses_a: list[str], responses_b: list[str]) -> list[str]: ...


def _normalise_verdict(verdict: Any, index: int) -> str | None:
    if verdict is None:
        return None
    text = str(verdict).strip()
    lowered = text.lower()
    if lowered in ("a", "b"):
        return lowered.upper()
    if lowered in ("tie", "draw", "equal", "="):
        return "tie"
    raise ValueError(f"judge returned {verdict!r} for item {index}; expected 'A', 'B' or 'tie'")


def _ask(judge: PairwiseJudge, prompts: list[str], first: list[str], second: list[str]) -> list[str]:
    verdicts = list(judge.compare(list(prompts), list(first), list(second)))
    if len(verdicts) != len(prompts):
        raise ValueError(f"judge {judge_name(judge)} returned {len(verdicts)} verdicts for {len(prompts)} items")
    return [_normalise_verdict(v, i) for i, v in enumerate(verdicts)]


def judge_name(judge: Any) -> str:
    return str(getattr(judge, "name", None) or type(judge).__name__)


@dataclass
class PairwiseResult:
    """Verdicts of both orders and the combined outcome per item (from A's side: "win"/"tie"/"loss")."""

    forward: list[str | None]               # judge's answers for (a, b)
    swapped: list[str | None]               # judge's answers for (b, a), as the judge gave them
    outcomes: list[str] = field(default_factory=list)

    @property
    def wins(self) -> int:
        return self.outcomes.count("win")

    @property
    def losses(self) -> int:
        return self.outcomes.count("loss")

    @property
    def ties(self) -> int:
        return self.outcomes.count("tie")

    @property
    def invalid(self) -> int:
        return self.outcomes.count("invalid")

    @property
    def scores(self) -> list[float]:
        """A's score per valid item: 1 win, 0.5 tie, 0 loss (the ``(a, b, outcome)`` of ``stats``)."""
        return [{"win": 1.0, "tie": 0.5, "loss": 0.0}[o] for o in self.outcomes if o != "invalid"]

    @property
    def position_consistency(self) -> float:
        """Fraction of items where both orders name the same response (or both say tie)."""
        pairs = [(f, s) for f, s in zip(self.forward, self.swapped) if f is not None and s is not None]
        if not pairs:
            return float("nan")
        flip = {"A": "B", "B": "A", "tie": "tie"}
        return sum(f == flip[s] for f, s in pairs) / len(pairs)

    @property
    def first_position_rate(self) -> float:
        """Fraction of all verdicts (both orders) that chose the response shown first."""
        verdicts = [v for v in self.forward + self.swapped if v is not None]
        return verdicts.count("A") / len(verdicts) if verdicts else float("nan")


def combine_orders(forward: Sequence[str | None], swapped: Sequence[str | None]) -> list[str]:
    """Per-item outcome for A from the (a, b) verdict and the (b, a) verdict (rule in the module doc)."""
    if len(forward) != len(swapped):
        raise ValueError(f"{len(forward)} forward verdicts vs {len(swapped)} swapped ones")
    first = {"A": 1, "tie": 0, "B": -1}     # in (a, b), "A" is model A
    second = {"A": -1, "tie": 0, "B": 1}    # in (b, a), "A" is model B
    outcomes = []
    for f, s in zip(forward, swapped):
        if f is None or s is None:
            outcomes.append("invalid")
            continue
        total = first[f] + second[s]
        outcomes.append("win" if total > 0 else "loss" if total < 0 else "tie")
    return outcomes


def judge_both_orders(judge: PairwiseJudge, prompts: Sequence[str], responses_a: Sequence[str],
                      responses_b: Sequence[str]) -> PairwiseResult:
    """Ask ``judge`` about (a, b) and (b, a) for every prompt; combine as in the module docstring."""
    prompts, responses_a, responses_b = list(prompts), list(responses_a), list(responses_b)
    if not (len(prompts) == len(responses_a) == len(responses_b)):
        raise ValueError(f"{len(prompts)} prompts, {len(responses_a)} responses A, {len(responses_b)} responses B")
    forward = _ask(judge, prompts, responses_a, responses_b)
    swapped = _ask(judge, prompts, responses_b, responses_a)
    return PairwiseResult(forward, swapped, combine_orders(forward, swapped))


def win_rate(judge: PairwiseJudge, prompts: Sequence[str], responses_a: Sequence[str],
             responses_b: Sequence[str], confidence: float = 0.95) -> dict[str, Any]:
    """Win rate of A over B with both orders asked: counts, rate, interval, p-value, consistency."""
    result = judge_both_orders(judge, prompts, responses_a, responses_b)
    return summarize(result, confidence) | {"judge": judge_name(judge)}


def summarize(result: PairwiseResult, confidence: float = 0.95) -> dict[str, Any]:
    stats = win_rate_with_ties(result.wins, result.losses, result.ties, confidence)
    return {
        "win_rate": stats["win_rate"],
        "win_rate_interval": list(stats["interval"]),
        "p_value": stats["p_value"],
        "n": stats["n"],
        "wins": result.wins,
        "losses": result.losses,
        "ties": result.ties,
        "invalid": result.invalid,
        "position_consistency": result.position_consistency,
        "first_position_rate": result.first_position_rate,
        "confidence": confidence,
    }


# ---------------------------------------------------------------------------------------- judges

class RewardModelJudge:
    """A pairwise judge from a reward model: the higher score wins; |difference| < tie_margin is a tie.

    ``model`` is a ``ScalarHeadModel`` (``alignkit.model.heads.load_scalar_model``) or anything with
    ``sequence_scores(input_ids, attention_mask) -> [B]``. Prompts are user messages; each text is
    ``chat_template(user prompt, assistant response)`` tokenized like preference training data.
    """

    def __init__(self, model, tokenizer, tie_margin: float = 0.0, batch_size: int = 8,
                 max_length: int | None = None, name: str | None = None):
        if tie_margin < 0:
            raise UsageError(f"tie_margin must be >= 0, got {tie_margin}")
        self.model, self.tokenizer = model, tokenizer
        self.tie_margin, self.batch_size, self.max_length = float(tie_margin), batch_size, max_length
        self.name = name or "reward-model"

    @classmethod
    def from_path(cls, path: str, device=None, dtype=None, **options) -> "RewardModelJudge":
        model, tokenizer = load_scalar_model(path, device=device, dtype=dtype)
        return cls(model, tokenizer, name=f"reward-model:{path}", **options)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        self.model.eval()
        conversations = [[{"role": "user", "content": prompt}] for prompt in prompts]
        return score_responses(self.model, self.tokenizer, list(zip(conversations, responses)), self.batch_size,
                               self.max_length)

    def compare(self, prompts: list[str], responses_a: list[str], responses_b: list[str]) -> list[str]:
        scores = self.score(list(prompts) * 2, list(responses_a) + list(responses_b))
        n = len(prompts)
        verdicts = []
        for a, b in zip(scores[:n], scores[n:]):
            verdicts.append("tie" if abs(a - b) < self.tie_margin or a == b else "A" if a > b else "B")
        return verdicts


def load_judge(spec: Any, device=None, dtype=None, tie_margin: float = 0.0):
    """A judge from a spec: an object with ``compare`` (returned as is), ``reward-model:PATH``, a path
    to a reward-model folder, or ``llm:...`` (built by ``alignkit.judges``)."""
    if hasattr(spec, "compare"):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError("a pairwise metric needs a judge: --judge reward-model:PATH or --judge llm:MODEL")
    spec = spec.strip()
    kind, _, rest = spec.partition(":")
    if kind in ("reward-model", "reward_model", "rm") and rest:
        return RewardModelJudge.from_path(rest, device=device, dtype=dtype, tie_margin=tie_margin)
    if kind == "llm":
        return llm_judge(rest, device=device, dtype=dtype)

    if is_scalar_model(spec):
        return RewardModelJudge.from_path(spec, device=device, dtype=dtype, tie_margin=tie_margin)
    raise UsageError(f"unknown judge {spec!r}; expected reward-model:PATH (a folder saved by `alignkit rm`) "
                     "or llm:MODEL")


def llm_judge(spec: str, device=None, dtype=None):
    """A pairwise LLM judge from ``alignkit.judges``: ``MODEL`` (a local model; verdicts read from the
    label log-probabilities, the only method a small model manages) or ``MODEL@URL`` (an
    OpenAI-compatible server; verdicts parsed from the reply, None when malformed)."""
    model, _, url = spec.partition("@")
    if url:
        backend, method = judges.make_backend(model=model, base_url=url), "generate"
    else:
        backend, method = judges.make_backend(model=model or None, device=device, dtype=dtype), "logprobs"
    judge = judges.PairwiseJudge(backend, method=method)
    judge.name = f"llm:{spec} ({method})"
    return judge
