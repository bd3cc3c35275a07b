"""Drift monitors: cheap alarms for reward hacking and policy collapse during RL fine-tuning.

A policy optimized against a reward model or a judge tends to fail in a few recognizable
ways long before the reward curve shows it: it wanders far from the reference model (large
KL), becomes deterministic (entropy collapse), writes much longer or shorter answers
(length hacking), repeats the same phrases (distinct-n drops) or starts refusing (refusal
rate rises). The functions here measure those from samples (texts, lengths, per-token
log-probs and entropies already computed elsewhere) and ``drift_report`` turns a
comparison against a baseline (usually the same metrics on the reference model or on the
first evaluation) into readable warnings.

All inputs are Python lists, numpy arrays or torch tensors; tensors are only converted to
numpy (torch is never imported here). Per-token inputs are ``[batch, seq]`` with an
optional mask of the same shape (1 = a real completion token), or a list of per-sequence
lists of possibly different lengths.
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterable, Sequence

import numpy as np

__all__ = [
    "DEFAULT_REFUSAL_PATTERNS",
    "DEFAULT_THRESHOLDS",
    "distinct_n",
    "refusal_rate",
    "sample_kl",
    "mean_entropy",
    "length_stats",
    "drift_report",
]

_APOSTROPHE = "['\u2019]"  # straight or typographic apostrophe

# Case-insensitive regular expressions; a text counts as a refusal if any matches anywhere.
# A heuristic: "I can't wait to help" also matches, so read the rate as a trend, not a count.
DEFAULT_REFUSAL_PATTERNS: tuple[str, ...] = (
    rf"\bI can{_APOSTROPHE}?t\b",
    r"\bI cannot\b",
    rf"\bI{_APOSTROPHE}m sorry\b",
    r"\bI am sorry\b",
    r"\bI apologi[sz]e\b",
    r"\bAs an AI\b",
    r"\bAs a language model\b",
    r"\bI am unable\b",
    rf"\bI{_APOSTROPHE}m unable\b",
    rf"\bI{_APOSTROPHE}m not able to\b",
    r"\bI am not able to\b",
    rf"\bI won{_APOSTROPHE}t be able to\b",
    r"\bI must decline\b",
    rf"\bI{_APOSTROPHE}m not comfortable\b",
)

# Thresholds of ``drift_report`` (None disables a check).
DEFAULT_THRESHOLDS: dict[str, float | None] = {
    "kl": 10.0,                 # warn if sample KL > 10 nats per sequence
    "entropy_ratio": 0.5,       # warn if entropy / baseline entropy < 0.5
    "length_ratio_high": 2.0,   # warn if mean length / baseline > 2
    "length_ratio_low": 0.5,    # warn if mean length / baseline < 0.5
    "distinct_2_ratio": 0.6,    # warn if distinct-2 / baseline distinct-2 < 0.6
    "refusal_rate_rise": 0.2,   # warn if refusal rate - baseline refusal rate > 0.2
}


# --------------------------------------------------------------------------------------
# Text metrics
# --------------------------------------------------------------------------------------

def _as_texts(texts: str | Iterable[str]) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


def distinct_n(texts: str | Iterable[str], n: int = 2) -> float:
    """Distinct-n: ``unique n-grams / total n-grams`` over whitespace tokens.

    n-grams are taken within each text (never across two texts) and counted over the whole
    collection, so a policy repeating one answer to every prompt scores low even if each
    answer is varied inside. 0.0 when there is no n-gram at all.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    unique: set[tuple[str, ...]] = set()
    total = 0
    for text in _as_texts(texts):
        tokens = text.split()
        grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def refusal_rate(texts: str | Iterable[str],
                 patterns: Sequence[str] = DEFAULT_REFUSAL_PATTERNS) -> float:
    """Fraction of texts matching any refusal pattern (case-insensitive ``re.search``).

    ``refusals / len(texts)``; 0.0 for no texts.
    """
    texts = _as_texts(texts)
    if not texts:
        return 0.0
    combined = re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)
    return sum(1 for text in texts if combined.search(text)) / len(texts)


# --------------------------------------------------------------------------------------
# Per-token metrics
# --------------------------------------------------------------------------------------

def _to_numpy(x: Any) -> Any:
    if hasattr(x, "detach"):  # a torch tensor; converted without importing torch
        return x.detach().float().cpu().numpy()
    return x


def _rows(values: Any, mask: Any = None) -> list[np.ndarray]:
    """Per-sequence 1-D float64 arrays of the unmasked tokens."""
    values = _to_numpy(values)
    if isinstance(values, np.ndarray):
        values = values.astype(np.float64)
        if values.ndim == 1:
            values = values[None, :]
        if values.ndim != 2:
            raise ValueError(f"per-token values must be [batch, seq], got shape {values.shape}")
        rows = list(values)
    else:
        rows = [np.asarray(_to_numpy(row), dtype=np.float64).reshape(-1) for row in values]
    if mask is None:
        return rows
    mask = _to_numpy(mask)
    mask_rows = list(np.atleast_2d(np.asarray(mask))) if isinstance(mask, np.ndarray) else \
        [np.asarray(_to_numpy(m)).reshape(-1) for m in mask]
    if len(mask_rows) != len(rows):
        raise ValueError(f"mask has {len(mask_rows)} sequences, values have {len(rows)}")
    out = []
    for i, (row, m) in enumerate(zip(rows, mask_rows)):
        if len(m) != len(row):
            raise ValueError(f"sequence {i}: mask length {len(m)} != values length {len(row)}")
        out.append(row[np.asarray(m, dtype=np.float64) > 0])
    return out


def sample_kl(policy_logps: Any, reference_logps: Any, mask: Any = None) -> dict[str, float]:
    """Monte-Carlo KL(policy || reference) from completions sampled from the policy.

    With ``r_t = log pi(y_t | ...) - log pi_ref(y_t | ...)`` on the sampled tokens:

    * ``kl``    = mean over sequences of ``sum_t r_t`` (the k1 estimator; unbiased for the
      sequence-level KL, but single samples can be negative);
    * ``kl_k3`` = mean over sequences of ``sum_t (exp(-r_t) - 1 + r_t)`` (Schulman's k3:
      unbiased per token under the policy's sampling and never negative);
    * ``kl_per_token`` = ``sum r_t / number of tokens`` over the whole batch;
    * ``num_sequences``, ``num_tokens``.

    Units are nats per sequence (per token for ``kl_per_token``). Only meaningful when the
    tokens were sampled from the policy whose log-probs are given.
    """
    policy = _rows(policy_logps, mask)
    reference = _rows(reference_logps, mask)
    if len(policy) != len(reference):
        raise ValueError(f"{len(policy)} policy sequences vs {len(reference)} reference ones")
    k1, k3, tokens = [], [], 0
    for i, (p, q) in enumerate(zip(policy, reference)):
        if p.shape != q.shape:
            raise ValueError(f"sequence {i}: policy and reference log-probs differ in length")
        log_ratio = p - q
        k1.append(log_ratio.sum())
        k3.append((np.expm1(-log_ratio) + log_ratio).sum())
        tokens += log_ratio.size
    if not k1:
        return {"kl": math.nan, "kl_k3": math.nan, "kl_per_token": math.nan,
                "num_sequences": 0, "num_tokens": 0}
    return {
        "kl": float(np.mean(k1)),
        "kl_k3": float(np.mean(k3)),
        "kl_per_token": float(np.sum(k1) / tokens) if tokens else math.nan,
        "num_sequences": len(k1),
        "num_tokens": tokens,
    }


def mean_entropy(entropies: Any, mask: Any = None) -> float:
    """Token-weighted mean entropy: ``sum_t H_t m_t / sum_t m_t`` (NaN with no tokens).

    ``entropies`` are per-token entropies of the policy's next-token distribution (nats),
    e.g. ``-(softmax(logits) * log_softmax(logits)).sum(-1)``.
    """
    rows = _rows(entropies, mask)
    tokens = sum(row.size for row in rows)
    return float(sum(row.sum() for row in rows) / tokens) if tokens else math.nan


def length_stats(lengths: Any) -> dict[str, float]:
    """``mean``, ``median``, ``p90`` (linear-interpolated 90th percentile) and ``count``.

    Lengths are anything array-like (tokens or characters, the caller's choice); NaN
    statistics for an empty input.
    """
    values = np.asarray(_to_numpy(lengths), dtype=np.float64).reshape(-1)
    if values.size == 0:
        return {"mean": math.nan, "median": math.nan, "p90": math.nan, "count": 0}
    return {
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "p90": float(np.percentile(values, 90)),
        "count": int(values.size),
    }


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------

def _metric(metrics: dict[str, Any], name: str, inner: str) -> float | None:
    """A metric as a float: plain numbers, or the ``inner`` key of a dict such as the
    output of ``sample_kl`` / ``length_stats``. None when absent or NaN."""
    value = metrics.get(name)
    if isinstance(value, dict):
        value = value.get(inner)
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def drift_report(current: dict[str, Any], baseline: dict[str, Any] | None = None,
                 thresholds: dict[str, float | None] | None = None) -> list[str]:
    """Compare current metrics with a baseline and return one warning sentence per alarm.

    Metric keys (each optional; a check runs only when its inputs are present):

    * ``kl``: nats/sequence (a number or the dict of ``sample_kl``); absolute, needs no
      baseline. Warns if ``kl > thresholds["kl"]`` (default 10).
    * ``entropy``: mean token entropy. Warns if ``entropy / baseline < entropy_ratio``
      (default 0.5: entropy more than halved, the policy collapsing).
    * ``length``: mean length (a number or the dict of ``length_stats``). Warns if
      ``length / baseline > length_ratio_high`` (default 2) or ``< length_ratio_low``
      (default 0.5).
    * ``distinct_2``: distinct-2. Warns if ``distinct_2 / baseline < distinct_2_ratio``
      (default 0.6: repetitive outputs).
    * ``refusal_rate``: warns if ``refusal_rate - baseline > refusal_rate_rise``
      (default 0.2).

    ``thresholds`` overrides ``DEFAULT_THRESHOLDS`` key by key; None disables a check and an
    unknown key raises. Ratio checks are skipped when the baseline is 0.
    """
    baseline = baseline or {}
    unknown = set(thresholds or {}) - set(DEFAULT_THRESHOLDS)
    if unknown:
        raise ValueError(f"unknown drift threshold(s) {sorted(unknown)}; "
                         f"known: {sorted(DEFAULT_THRESHOLDS)}")
    limits = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    warnings: list[str] = []

    def ratio(name: str, inner: str = "mean") -> tuple[float, float, float] | None:
        now, before = _metric(current, name, inner), _metric(baseline, name, inner)
        if now is None or before is None or before == 0.0:
            return None
        return now, before, now / before

    kl = _metric(current, "kl", "kl")
    if limits["kl"] is not None and kl is not None and kl > limits["kl"]:
        before = _metric(baseline, "kl", "kl")
        since = f" (baseline {before:.3g})" if before is not None else ""
        warnings.append(
            f"KL to the reference is {kl:.3g} nats/sequence{since}, above the threshold of "
            f"{limits['kl']:.3g}: the policy is drifting far from the reference model "
            f"(possible reward hacking).")

    entropy = ratio("entropy")
    if limits["entropy_ratio"] is not None and entropy and entropy[2] < limits["entropy_ratio"]:
        now, before, r = entropy
        warnings.append(
            f"Mean entropy fell to {now:.3g} nats/token from a baseline of {before:.3g} "
            f"(ratio {r:.2f}, below the threshold of {limits['entropy_ratio']:.3g}): "
            f"the policy may be collapsing onto a few outputs.")

    length = ratio("length")
    if length:
        now, before, r = length
        high, low = limits["length_ratio_high"], limits["length_ratio_low"]
        if high is not None and r > high:
            warnings.append(
                f"Mean length grew to {now:.4g} from a baseline of {before:.4g} (ratio {r:.2f}, "
                f"above the threshold of {high:.3g}): possible length hacking.")
        elif low is not None and r < low:
            warnings.append(
                f"Mean length shrank to {now:.4g} from a baseline of {before:.4g} (ratio {r:.2f}, "
                f"below the threshold of {low:.3g}): answers are getting truncated or evasive.")

    distinct = ratio("distinct_2")
    if (limits["distinct_2_ratio"] is not None and distinct
            and distinct[2] < limits["distinct_2_ratio"]):
        now, before, r = distinct
        warnings.append(
            f"Distinct-2 fell to {now:.3g} from a baseline of {before:.3g} (ratio {r:.2f}, "
            f"below the threshold of {limits['distinct_2_ratio']:.3g}): outputs are getting "
            f"repetitive.")

    refusals_now = _metric(current, "refusal_rate", "rate")
    refusals_before = _metric(baseline, "refusal_rate", "rate")
    if (limits["refusal_rate_rise"] is not None and refusals_now is not None
            and refusals_before is not None
            and refusals_now - refusals_before > limits["refusal_rate_rise"]):
        warnings.append(
            f"Refusal rate rose to {refusals_now:.1%} from a baseline of {refusals_before:.1%} "
            f"(rise of {refusals_now - refusals_before:.1%}, above the threshold of "
            f"{limits['refusal_rate_rise']:.1%}): the policy may be refusing to avoid penalties.")
    return warnings
