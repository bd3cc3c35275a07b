"""Statistics for evaluation: intervals, tests, ratings and agreement, without scipy.

Everything here is a pure function of plain Python numbers, sequences or numpy arrays; no
model code and no scipy (the test-suite checks these against scipy instead).

What is in the file, and the formula each one implements:

* ``normal_quantile(p)``: the inverse standard-normal CDF. Acklam's rational approximation
  (relative error about 1e-9) followed by one Halley step on ``Phi(x) - p`` computed with
  ``math.erfc``, which brings it to near machine precision.
* ``wilson_interval(successes, n)``: the Wilson score interval for a binomial proportion.
* ``binomial_test_greater(k, n, p)``: exact one-sided binomial p-value ``P(X >= k)``.
* ``win_rate_with_ties(wins, losses, ties)``: win rate counting a tie as half a win, its
  Wilson interval, and the sign-test p-value of "A beats B".
* ``bootstrap_interval(values, statistic)``: percentile bootstrap.
* ``bradley_terry_ratings`` / ``to_elo_scale`` / ``elo_ratings`` / ``bootstrap_ratings``:
  pairwise-comparison ratings (MM fit of Bradley-Terry; online Elo; bootstrap intervals).
* ``cohen_kappa`` / ``percent_agreement``: agreement between two raters (e.g. a judge and a
  human, or two judges).
* ``fleiss_kappa`` (any number of raters, the same number per item) and ``krippendorff_alpha``
  (any number of raters, missing ratings allowed; nominal, ordinal, interval or ratio values):
  agreement among several human annotators.
* ``pass_at_k(n, c, k)``: the unbiased pass@k estimator of Chen et al. (2021).

Comparisons, wherever they appear, are tuples ``(winner, loser)`` or ``(a, b, outcome)``
with ``outcome`` the score of ``a``: 1 (a wins), 0 (b wins) or 0.5 (tie). Players can be
any hashable values.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any, Callable, Hashable, Iterable, Sequence

import numpy as np

__all__ = [
    "normal_quantile",
    "wilson_interval",
    "binomial_test_greater",
    "win_rate_with_ties",
    "bootstrap_interval",
    "bradley_terry_ratings",
    "to_elo_scale",
    "elo_ratings",
    "bootstrap_ratings",
    "cohen_kappa",
    "percent_agreement",
    "fleiss_kappa",
    "krippendorff_alpha",
    "pass_at_k",
]


# --------------------------------------------------------------------------------------
# Normal quantile
# --------------------------------------------------------------------------------------

# Coefficients of Acklam's rational approximation to the normal quantile (a published
# algorithm; numerator/denominator of the central region and of the tails).
_CENTRAL_NUM = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02,
                1.383577518672690e02, -3.066479806614716e01, 2.506628277459239e00)
_CENTRAL_DEN = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02,
                6.680131188771972e01, -1.328068155288572e01)
_TAIL_NUM = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00,
             -2.549732539343734e00, 4.374664141464968e00, 2.938163982698783e00)
_TAIL_DEN = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00,
             3.754408661907416e00)
_TAIL_START = 0.02425


def _horner(coefficients: Sequence[float], x: float) -> float:
    result = 0.0
    for c in coefficients:
        result = result * x + c
    return result


def normal_quantile(p: float) -> float:
    """Inverse CDF of the standard normal: the ``x`` with ``Phi(x) = p``.

    Acklam's approximation: for ``p_low <= p <= 1/2`` with ``q = p - 1/2, r = q^2``,
    ``x = q * A(r) / B(r)``; in the lower tail ``p < p_low`` with ``q = sqrt(-2 log p)``,
    ``x = C(q) / D(q)`` (A..D fixed polynomials, ``p_low = 0.02425``). One Halley step then
    refines it: with ``e = Phi(x) - p`` and ``u = e * sqrt(2 pi) * exp(x^2 / 2)``,
    ``x <- x - u / (1 + x u / 2)``. The upper half uses ``x(p) = -x(1 - p)``, so the tails
    keep full relative precision. Accurate to about 1e-15 (1e-9 before refinement).
    """
    p = float(p)
    if not 0.0 <= p <= 1.0 or math.isnan(p):
        raise ValueError(f"normal_quantile needs 0 <= p <= 1, got {p}")
    if p == 0.0:
        return -math.inf
    if p == 1.0:
        return math.inf
    if p > 0.5:
        return -normal_quantile(1.0 - p)
    if p < _TAIL_START:
        q = math.sqrt(-2.0 * math.log(p))
        x = _horner(_TAIL_NUM, q) / (_horner(_TAIL_DEN, q) * q + 1.0)
    else:
        q = p - 0.5
        r = q * q
        x = q * _horner(_CENTRAL_NUM, r) / (_horner(_CENTRAL_DEN, r) * r + 1.0)
    # One Halley step on f(x) = Phi(x) - p (Phi through erfc keeps the lower tail precise).
    error = 0.5 * math.erfc(-x / math.sqrt(2.0)) - p
    u = error * math.sqrt(2.0 * math.pi) * math.exp(0.5 * x * x)
    return x - u / (1.0 + 0.5 * x * u)


def _two_sided_z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence}")
    return normal_quantile(0.5 + 0.5 * confidence)


# --------------------------------------------------------------------------------------
# Binomial proportions
# --------------------------------------------------------------------------------------

def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``successes / n``.

    With ``p = successes / n`` and ``z = Phi^-1((1 + confidence) / 2)``::

        center = (p + z^2 / (2n)) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))
        (low, high) = (center - half, center + half)

    ``successes`` may be fractional (ties counted as half a success). ``n == 0`` gives
    the uninformative ``(0.0, 1.0)``.
    """
    z = _two_sided_z(confidence)
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    z2 = z * z
    scale = 1.0 + z2 / n
    center = (p + z2 / (2.0 * n)) / scale
    half = z / scale * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n))
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return (low, high)


def _as_count(value: Any, name: str) -> int:
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{name} must be a whole number, got {value}")
    count = int(value)
    if count < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return count


_EXACT_BINOMIAL_LIMIT = 20_000


def binomial_test_greater(k: int, n: int, p: float = 0.5) -> float:
    """Exact one-sided binomial test: ``P(X >= k)`` for ``X ~ Binomial(n, p)``.

    ``sum_{i=k}^{n} C(n, i) p^i (1 - p)^(n - i)``. Up to ``n = 20000`` the binomials are
    exact big integers (``C(n, i+1) = C(n, i) (n - i) / (i + 1)``); for ``p = 1/2`` the whole
    tail is then the exact rational ``sum_i C(n, i) / 2^n``, rounded once. Otherwise the
    terms are summed in log space (log-sum-exp; ``lgamma`` binomials beyond the limit), so
    large ``n`` neither overflows nor underflows.
    """
    k = _as_count(max(k, 0), "k")  # P(X >= k) = 1 for any k <= 0
    n = _as_count(n, "n")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if k == 0:
        return 1.0
    if k > n:
        return 0.0
    if p == 0.0:
        return 0.0
    if p == 1.0:
        return 1.0
    if n <= _EXACT_BINOMIAL_LIMIT:
        combs = [math.comb(n, k)]
        for i in range(k, n):
            combs.append(combs[-1] * (n - i) // (i + 1))
        if p == 0.5:
            return sum(combs) / (1 << n)
        log_combs = [math.log(c) for c in combs]  # math.log takes arbitrarily large ints
    else:
        log_combs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                     for i in range(k, n + 1)]
    log_p, log_q = math.log(p), math.log1p(-p)
    logs = [lc + i * log_p + (n - i) * log_q for i, lc in zip(range(k, n + 1), log_combs)]
    top = max(logs)
    return min(1.0, math.exp(top) * math.fsum(math.exp(v - top) for v in logs))


def win_rate_with_ties(wins: int, losses: int, ties: int = 0,
                       confidence: float = 0.95) -> dict[str, Any]:
    """Win rate of A over B with ties split, its interval, and a one-sided p-value.

    * ``win_rate = (wins + ties / 2) / n`` with ``n = wins + losses + ties``;
    * ``interval`` = Wilson interval of the tie-split count ``wins + ties / 2`` out of ``n``;
    * ``p_value`` for H1 "A beats B": the sign test, ties dropped,
      ``P(X >= wins)`` with ``X ~ Binomial(wins + losses, 1/2)``;
    * ``n``: the number of comparisons including ties.

    With no comparisons at all the win rate is NaN, the interval (0, 1) and the p-value 1.
    """
    wins, losses, ties = (_as_count(v, name) for v, name in
                          ((wins, "wins"), (losses, "losses"), (ties, "ties")))
    n = wins + losses + ties
    score = wins + 0.5 * ties
    return {
        "win_rate": score / n if n else math.nan,
        "interval": wilson_interval(score, n, confidence),
        "p_value": binomial_test_greater(wins, wins + losses, 0.5),
        "n": n,
    }


# --------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------

def bootstrap_interval(values: Any, statistic: Callable[[np.ndarray], float] = np.mean,
                       n_resamples: int = 2000, confidence: float = 0.95,
                       seed: int | None = 0) -> tuple[float, float]:
    """Percentile bootstrap interval.

    ``values`` is either data (resampled with replacement along the first axis, then
    ``statistic`` applied to each resample), or a callable ``values(rng) -> float`` that
    draws one bootstrap replicate itself (for paired, clustered or stratified schemes; then
    ``statistic`` is unused). With replicates ``t_1..t_B`` and ``alpha = 1 - confidence``
    the interval is their ``(alpha/2, 1 - alpha/2)`` quantiles (linear interpolation).
    """
    _two_sided_z(confidence)  # validates confidence
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    if callable(values):
        replicates = np.array([float(values(rng)) for _ in range(n_resamples)])
    else:
        data = np.asarray(values)
        if data.ndim == 0 or len(data) == 0:
            raise ValueError("bootstrap_interval needs at least one value")
        size = len(data)
        replicates = np.array([float(statistic(data[rng.integers(0, size, size)]))
                               for _ in range(n_resamples)])
    alpha = 1.0 - confidence
    low, high = np.quantile(replicates, [alpha / 2.0, 1.0 - alpha / 2.0])
    return (float(low), float(high))


# --------------------------------------------------------------------------------------
# Pairwise ratings
# --------------------------------------------------------------------------------------

def _parse_comparisons(comparisons: Iterable[Sequence[Any]], players: Iterable[Hashable] | None
                       ) -> tuple[list[Hashable], np.ndarray, np.ndarray, np.ndarray]:
    """Comparisons -> (players, index of a, index of b, score of a)."""
    rows = []
    for row in comparisons:
        if len(row) == 2:
            a, b, score = row[0], row[1], 1.0
        elif len(row) == 3:
            a, b, score = row[0], row[1], float(row[2])
        else:
            raise ValueError(f"a comparison is (winner, loser) or (a, b, outcome), got {row!r}")
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"outcome must be in [0, 1] (1: a wins, 0: b wins, 0.5: tie), "
                             f"got {row!r}")
        if a == b:
            raise ValueError(f"a player cannot be compared with itself: {row!r}")
        rows.append((a, b, score))
    if players is None:
        names = list(dict.fromkeys(p for a, b, _ in rows for p in (a, b)))
    else:
        names = list(dict.fromkeys(players))
        unknown = {p for a, b, _ in rows for p in (a, b)} - set(names)
        if unknown:
            raise ValueError(f"comparisons mention players not in `players`: {sorted(map(repr, unknown))}")
    index = {name: i for i, name in enumerate(names)}
    a_idx = np.array([index[a] for a, _, _ in rows], dtype=np.int64)
    b_idx = np.array([index[b] for _, b, _ in rows], dtype=np.int64)
    score = np.array([s for _, _, s in rows], dtype=np.float64)
    return names, a_idx, b_idx, score


def _fit_bradley_terry(a_idx: np.ndarray, b_idx: np.ndarray, score: np.ndarray, size: int,
                       prior: float, iterations: int, tol: float) -> np.ndarray:
    """MM iterations on index arrays; returns strengths with geometric mean 1.

    The prior is a virtual player (index ``size``) with whom every real player has drawn
    ``prior`` wins and ``prior`` losses. Its strength is fitted like any other; the scale,
    which the likelihood does not fix, is reset to geometric mean 1 over the real players
    after every step, so the iteration never crawls along that flat direction.
    """
    total = size + 1 if prior > 0.0 else size
    games = np.zeros((total, total))
    np.add.at(games, (a_idx, b_idx), 1.0)
    wins = (np.bincount(a_idx, weights=score, minlength=total)
            + np.bincount(b_idx, weights=1.0 - score, minlength=total))
    if prior > 0.0:
        games[:size, size] = 2.0 * prior
        wins[:size] += prior
        wins[size] = size * prior
    elif np.any(wins <= 0.0):
        raise ValueError("a player has no wins, so its maximum-likelihood strength is 0; "
                         "use prior > 0")
    games = games + games.T
    strength = np.ones(total)
    for _ in range(iterations):
        updated = wins / (games / (strength[:, None] + strength[None, :])).sum(axis=1)
        updated /= np.exp(np.mean(np.log(updated[:size])))
        change = np.max(np.abs(np.log(updated) - np.log(strength)))
        strength = updated
        if change < tol:
            break
    return strength[:size]


def bradley_terry_ratings(comparisons: Iterable[Sequence[Any]],
                          players: Iterable[Hashable] | None = None, iterations: int = 10_000,
                          tol: float = 1e-10, prior: float = 0.5) -> dict[Hashable, float]:
    """Bradley-Terry strengths by the MM algorithm (Hunter 2004).

    Model: ``P(i beats j) = s_i / (s_i + s_j)``. With ``W_i`` the (tie-split) wins of ``i``
    and ``N_ij`` the games between ``i`` and ``j``, each MM step is::

        s_i <- W_i / sum_j N_ij / (s_i + s_j)

    A tie counts as half a win for each side. The prior: every player also gets ``prior``
    virtual wins and ``prior`` virtual losses against a virtual average player (itself
    fitted, so it sits in the middle of the field). This keeps unbeaten and winless players
    finite and makes the fit unique even when the comparison graph is disconnected; with
    hundreds of real games it moves the ratios by well under a percent. ``prior=0`` is the
    plain maximum-likelihood fit, which exists only when every player has both won and lost
    within a strongly connected comparison graph (it raises if a player never won).

    Returns ``{player: strength}`` normalized so the geometric mean is 1; only ratios mean
    anything. Iterates until the largest change of ``log s`` is below ``tol``.
    """
    if prior < 0:
        raise ValueError(f"prior must be >= 0, got {prior}")
    names, a_idx, b_idx, score = _parse_comparisons(comparisons, players)
    if not names:
        return {}
    strength = _fit_bradley_terry(a_idx, b_idx, score, len(names), float(prior), iterations, tol)
    return {name: float(s) for name, s in zip(names, strength)}


def to_elo_scale(strengths: dict[Hashable, float], base: float = 1000.0) -> dict[Hashable, float]:
    """Bradley-Terry strengths on the Elo scale: ``400 * log10(s_i) + offset``.

    ``offset`` makes the mean rating equal ``base``. On this scale a 400-point gap means
    10:1 odds, matching ``elo_ratings``.
    """
    if not strengths:
        return {}
    logs = {name: 400.0 * math.log10(s) for name, s in strengths.items()}
    offset = base - sum(logs.values()) / len(logs)
    return {name: value + offset for name, value in logs.items()}


def _run_elo(a_idx: np.ndarray, b_idx: np.ndarray, score: np.ndarray, size: int,
             k: float, initial: float) -> np.ndarray:
    ratings = np.full(size, float(initial))
    for a, b, s in zip(a_idx.tolist(), b_idx.tolist(), score.tolist()):
        expected = 1.0 / (1.0 + 10.0 ** ((ratings[b] - ratings[a]) / 400.0))
        delta = k * (s - expected)
        ratings[a] += delta
        ratings[b] -= delta
    return ratings


def elo_ratings(comparisons: Iterable[Sequence[Any]], k: float = 32.0, initial: float = 1000.0,
                players: Iterable[Hashable] | None = None) -> dict[Hashable, float]:
    """Online Elo over the comparisons in the order given.

    For each game with score ``S_a`` (1, 0 or 0.5)::

        E_a = 1 / (1 + 10^((R_b - R_a) / 400))
        R_a <- R_a + k (S_a - E_a);   R_b <- R_b - k (S_a - E_a)

    Order matters (recent games weigh more); ``bootstrap_ratings`` averages that away.
    """
    names, a_idx, b_idx, score = _parse_comparisons(comparisons, players)
    ratings = _run_elo(a_idx, b_idx, score, len(names), k, initial)
    return {name: float(r) for name, r in zip(names, ratings)}


def bootstrap_ratings(comparisons: Iterable[Sequence[Any]], method: str = "bradley_terry",
                      n_resamples: int = 1000, confidence: float = 0.95, seed: int | None = 0,
                      players: Iterable[Hashable] | None = None, base: float = 1000.0,
                      **fit_options: Any) -> dict[Hashable, tuple[float, float, float]]:
    """Ratings with percentile-bootstrap intervals: ``{player: (rating, low, high)}``.

    Each replicate resamples the comparisons with replacement (which also shuffles their
    order, for Elo) and refits; ``low``/``high`` are the ``(alpha/2, 1 - alpha/2)``
    quantiles of a player's replicate ratings. Both methods report on the Elo scale.
    ``rating`` is, for Bradley-Terry, the fit on all comparisons (``to_elo_scale(..., base)``);
    for Elo, the median of the replicates, because a single pass in the given order depends
    on that order (the last games weigh most) and can even fall outside its own interval. ``fit_options`` go to the fit (``prior``, ``iterations``, ``tol`` for
    Bradley-Terry; ``k`` for Elo, whose ``initial`` is ``base``).
    """
    if method not in ("bradley_terry", "elo"):
        raise ValueError(f"method must be 'bradley_terry' or 'elo', got {method!r}")
    _two_sided_z(confidence)
    names, a_idx, b_idx, score = _parse_comparisons(comparisons, players)
    size = len(names)

    def fit(a: np.ndarray, b: np.ndarray, s: np.ndarray) -> np.ndarray:
        if method == "elo":
            return _run_elo(a, b, s, size, fit_options.get("k", 32.0), base)
        strength = _fit_bradley_terry(a, b, s, size, float(fit_options.get("prior", 0.5)),
                                      fit_options.get("iterations", 10_000),
                                      fit_options.get("tol", 1e-10))
        elo = 400.0 * np.log10(strength)
        return elo - elo.mean() + base

    unknown = set(fit_options) - ({"k"} if method == "elo" else {"prior", "iterations", "tol"})
    if unknown:
        raise ValueError(f"unknown option(s) for method {method!r}: {sorted(unknown)}")
    rng = np.random.default_rng(seed)
    count = len(score)
    replicates = np.empty((n_resamples, size))
    for r in range(n_resamples):
        pick = rng.integers(0, count, count) if count else np.zeros(0, dtype=np.int64)
        replicates[r] = fit(a_idx[pick], b_idx[pick], score[pick])
    alpha = 1.0 - confidence
    low, high = np.quantile(replicates, [alpha / 2.0, 1.0 - alpha / 2.0], axis=0)
    point = np.median(replicates, axis=0) if method == "elo" else fit(a_idx, b_idx, score)
    return {name: (float(point[i]), float(low[i]), float(high[i])) for i, name in enumerate(names)}


# --------------------------------------------------------------------------------------
# Agreement
# --------------------------------------------------------------------------------------

def _check_pair(labels_a: Sequence[Hashable], labels_b: Sequence[Hashable]) -> tuple[list, list]:
    a, b = list(labels_a), list(labels_b)
    if len(a) != len(b):
        raise ValueError(f"the two raters labelled different numbers of items: {len(a)} vs {len(b)}")
    if not a:
        raise ValueError("need at least one labelled item")
    return a, b


def percent_agreement(labels_a: Sequence[Hashable], labels_b: Sequence[Hashable]) -> float:
    """Fraction of items on which the two raters give the same label: ``p_o``."""
    a, b = _check_pair(labels_a, labels_b)
    return sum(x == y for x, y in zip(a, b)) / len(a)


def cohen_kappa(labels_a: Sequence[Hashable], labels_b: Sequence[Hashable]) -> float:
    """Cohen's kappa between two raters: ``(p_o - p_e) / (1 - p_e)``.

    ``p_o`` = observed agreement; ``p_e = sum_c (n_a(c) / n) (n_b(c) / n)`` = agreement
    expected if each rater labelled at random with their own label frequencies. Computed in
    exact integers as ``(n * agreements - sum_c n_a(c) n_b(c)) / (n^2 - sum_c n_a(c) n_b(c))``.
    When ``p_e = 1`` (both raters always use the same single label) agreement is perfect and
    kappa is defined as 1.0. Labels can be any hashable values.
    """
    a, b = _check_pair(labels_a, labels_b)
    n = len(a)
    agreements = sum(x == y for x, y in zip(a, b))
    counts_a, counts_b = Counter(a), Counter(b)
    chance = sum(count * counts_b.get(label, 0) for label, count in counts_a.items())
    if chance == n * n:
        return 1.0
    return (n * agreements - chance) / (n * n - chance)


def fleiss_kappa(items: Sequence[Sequence[Hashable]]) -> float:
    """Fleiss' kappa: chance-corrected agreement of ``n`` raters per item over ``N`` items.

    ``items[i]`` is the list of labels item ``i`` received (one per rater; raters need not be
    the same people across items, but every item needs the same number ``n >= 2``). With
    ``n_ij`` the number of raters who put item ``i`` in category ``j``::

        P_i  = (sum_j n_ij^2 - n) / (n (n - 1))        agreement on item i
        P    = mean_i P_i                              observed agreement
        p_j  = sum_i n_ij / (N n)                      share of category j
        P_e  = sum_j p_j^2                             agreement expected by chance
        kappa = (P - P_e) / (1 - P_e)

    Computed in exact integers. When ``P_e = 1`` (every rating is the same category) agreement
    is perfect and kappa is 1.0, as for `cohen_kappa`.
    """
    rows = [list(item) for item in items]
    if not rows:
        raise ValueError("fleiss_kappa needs at least one item")
    n = len(rows[0])
    if n < 2:
        raise ValueError(f"fleiss_kappa needs at least 2 ratings per item, item 0 has {n}")
    for index, row in enumerate(rows):
        if len(row) != n:
            raise ValueError(f"fleiss_kappa needs the same number of ratings for every item: item 0 has {n}, "
                             f"item {index} has {len(row)} (use krippendorff_alpha for uneven or missing ratings)")
    count = len(rows)
    totals: Counter = Counter()
    squares = 0  # sum_i sum_j n_ij^2
    for row in rows:
        counts = Counter(row)
        totals.update(counts)
        squares += sum(c * c for c in counts.values())
    # P = (squares - N n) / (N n (n - 1));  P_e = sum_j T_j^2 / (N n)^2 with T_j = sum_i n_ij.
    ratings = count * n
    chance_numerator = sum(t * t for t in totals.values())
    if chance_numerator == ratings * ratings:
        return 1.0
    observed_numerator = squares - ratings
    # kappa = (P - P_e) / (1 - P_e), multiplied through by (N n)^2 (n - 1):
    return (observed_numerator * ratings - chance_numerator * (n - 1)) / \
        ((ratings * ratings - chance_numerator) * (n - 1))


_ALPHA_LEVELS = ("nominal", "ordinal", "interval", "ratio")


def krippendorff_alpha(units: Sequence[Sequence[Any]], level: str = "nominal") -> float:
    """Krippendorff's alpha: ``1 - D_o / D_e``, agreement for any number of raters with gaps.

    ``units[u]`` is the list of values unit ``u`` received (a missing rating is simply absent,
    ``None`` entries are dropped too); units with fewer than two values are not pairable and
    are left out. From the coincidence matrix ``o_ck = sum_u (pairs of values c, k in u) /
    (m_u - 1)`` (ordered pairs of different raters; ``m_u`` values in unit u), the value totals
    ``n_c = sum_k o_ck`` and ``n = sum_c n_c``::

        alpha = 1 - (n - 1) * sum_{c,k} o_ck delta^2(c, k) / sum_{c,k} n_c n_k delta^2(c, k)

    with the metric of the ``level``: nominal ``[c != k]``; interval ``(c - k)^2``; ratio
    ``((c - k) / (c + k))^2``; ordinal ``(sum_{g=c..k} n_g - (n_c + n_k) / 2)^2`` over the sorted
    values that occur. Nominal values can be any hashable; the others must be numbers. When all
    pairable values are equal there is no disagreement to expect (``D_e = 0``): alpha is then
    1.0, as for `cohen_kappa`.
    """
    if level not in _ALPHA_LEVELS:
        raise ValueError(f"level must be one of {_ALPHA_LEVELS}, got {level!r}")
    pairable = []
    for unit in units:
        values = [value for value in unit if value is not None]
        if level != "nominal":
            for value in values:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                    raise ValueError(f"{level} alpha needs numeric values, got {value!r}")
        if len(values) >= 2:
            pairable.append(values)
    if not pairable:
        raise ValueError("krippendorff_alpha needs at least one unit with two or more values")
    categories = sorted(set(v for values in pairable for v in values), key=lambda v: (str(type(v)), v)) \
        if level == "nominal" else sorted(set(v for values in pairable for v in values))
    index = {value: i for i, value in enumerate(categories)}
    size = len(categories)
    coincidences = np.zeros((size, size))
    for values in pairable:
        counts = np.bincount([index[v] for v in values], minlength=size).astype(np.float64)
        # ordered pairs of different raters: counts_c counts_k, minus the m_u self-pairs on the diagonal
        coincidences += (np.outer(counts, counts) - np.diag(counts)) / (len(values) - 1)
    totals = coincidences.sum(axis=1)
    n = totals.sum()
    if level == "nominal":
        delta = 1.0 - np.eye(size)
    else:
        numbers = np.array(categories, dtype=np.float64)
        if level == "interval":
            delta = (numbers[:, None] - numbers[None, :]) ** 2
        elif level == "ratio":
            sums = numbers[:, None] + numbers[None, :]
            with np.errstate(divide="ignore", invalid="ignore"):
                delta = np.where(sums == 0, 0.0, ((numbers[:, None] - numbers[None, :]) / sums) ** 2)
        else:  # ordinal
            cumulative = np.concatenate([[0.0], np.cumsum(totals)])
            low = np.minimum.outer(np.arange(size), np.arange(size))
            high = np.maximum.outer(np.arange(size), np.arange(size))
            between = cumulative[high + 1] - cumulative[low]  # sum_{g=c..k} n_g
            delta = (between - (totals[:, None] + totals[None, :]) / 2.0) ** 2
    expected = float((np.outer(totals, totals) * delta).sum())
    if expected == 0.0:
        return 1.0
    observed = float((coincidences * delta).sum())
    return 1.0 - (n - 1.0) * observed / expected


# --------------------------------------------------------------------------------------
# pass@k
# --------------------------------------------------------------------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021) from ``n`` samples of which ``c`` are correct.

    ``pass@k = 1 - C(n - c, k) / C(n, k)``: one minus the chance that ``k`` samples drawn
    without replacement are all wrong. The ratio is evaluated as a product of
    ``min(k, c)`` factors, never forming the (huge) binomials::

        C(n - c, k) / C(n, k) = prod_{j=0}^{k-1} (n - c - j) / (n - j)
                              = prod_{i=n-c+1}^{n} (1 - k / i)
    """
    n, c, k = _as_count(n, "n"), _as_count(c, "c"), _as_count(k, "k")
    if c > n:
        raise ValueError(f"c (correct samples) cannot exceed n (samples): c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    all_wrong = 1.0
    if c < k:
        for i in range(n - c + 1, n + 1):
            all_wrong *= 1.0 - k / i
    else:
        for j in range(k):
            all_wrong *= (n - c - j) / (n - j)
    return 1.0 - all_wrong
