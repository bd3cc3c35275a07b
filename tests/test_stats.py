"""alignkit.evaluate.stats against scipy, textbook examples and brute force."""
import itertools
import math

import numpy as np
import pytest

from alignkit.evaluate.stats import (
    binomial_test_greater,
    bootstrap_interval,
    bootstrap_ratings,
    bradley_terry_ratings,
    cohen_kappa,
    elo_ratings,
    normal_quantile,
    pass_at_k,
    percent_agreement,
    to_elo_scale,
    wilson_interval,
    win_rate_with_ties,
)

scipy_stats = pytest.importorskip("scipy.stats")

CASES = [(0, 1), (1, 1), (0, 10), (10, 10), (3, 10), (7, 20), (13, 20), (50, 100), (61, 100),
         (0, 57), (57, 57), (530, 1000), (1100, 2000), (5100, 10000)]


@pytest.mark.parametrize("k,n", CASES)
def test_binomial_p_value_matches_scipy(k, n):
    expected = scipy_stats.binomtest(k, n, 0.5, alternative="greater").pvalue
    assert binomial_test_greater(k, n) == pytest.approx(expected, rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("k,n,p", [(3, 10, 0.2), (30, 100, 0.2), (90, 100, 0.2), (0, 5, 0.9),
                                   (2990, 10000, 0.3), (30500, 60000, 0.5)])
def test_binomial_p_value_other_p_and_large_n(k, n, p):
    expected = scipy_stats.binom.sf(k - 1, n, p)
    assert binomial_test_greater(k, n, p) == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("k,n", CASES)
@pytest.mark.parametrize("confidence", [0.95, 0.9, 0.99])
def test_wilson_matches_scipy(k, n, confidence):
    ci = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    low, high = wilson_interval(k, n, confidence)
    assert low == pytest.approx(ci.low, abs=1e-12)
    assert high == pytest.approx(ci.high, abs=1e-12)


def test_wilson_empty_and_invalid():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(5, 4)
    with pytest.raises(ValueError):
        wilson_interval(1, 4, confidence=1.0)


@pytest.mark.parametrize("p", [1e-300, 1e-50, 1e-10, 1e-5, 0.001, 0.01, 0.02425, 0.025, 0.1,
                               0.3, 0.5, 0.6, 0.8, 0.95, 0.975, 0.99, 0.999, 1 - 1e-9, 1 - 1e-15])
def test_normal_quantile_matches_scipy(p):
    assert normal_quantile(p) == pytest.approx(scipy_stats.norm.ppf(p), rel=1e-9, abs=1e-9)


def test_normal_quantile_dense_grid():
    grid = np.linspace(1e-6, 1 - 1e-6, 2001)
    ours = np.array([normal_quantile(p) for p in grid])
    np.testing.assert_allclose(ours, scipy_stats.norm.ppf(grid), rtol=1e-9, atol=1e-9)
    assert normal_quantile(0.0) == -math.inf and normal_quantile(1.0) == math.inf


def test_win_rate_with_ties():
    result = win_rate_with_ties(wins=30, losses=14, ties=6)
    assert result["n"] == 50
    assert result["win_rate"] == pytest.approx(33 / 50)
    ci = scipy_stats.binomtest(33, 50).proportion_ci(method="wilson")  # 33 = 30 + 6 / 2
    assert result["interval"] == pytest.approx((ci.low, ci.high), abs=1e-12)
    sign_test = scipy_stats.binomtest(30, 44, 0.5, alternative="greater").pvalue
    assert result["p_value"] == pytest.approx(sign_test, rel=1e-12)
    # Fractional tie-split count: Wilson formula on 2.5 / 4 by hand.
    z = scipy_stats.norm.ppf(0.975)
    p, n = 2.5 / 4, 4
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert win_rate_with_ties(2, 1, 1)["interval"] == pytest.approx((center - half, center + half))
    # Ties never enter the p-value.
    assert win_rate_with_ties(5, 5, 100)["p_value"] == win_rate_with_ties(5, 5, 0)["p_value"]
    empty = win_rate_with_ties(0, 0, 0)
    assert math.isnan(empty["win_rate"]) and empty["p_value"] == 1.0


def test_bootstrap_interval_mean_and_callable():
    rng = np.random.default_rng(1)
    data = rng.normal(3.0, 1.0, size=400)
    low, high = bootstrap_interval(data, n_resamples=2000, seed=0)
    assert low < data.mean() < high
    # Close to the normal-theory interval mean +- 1.96 s / sqrt(n).
    se = data.std(ddof=1) / math.sqrt(len(data))
    assert low == pytest.approx(data.mean() - 1.96 * se, abs=0.3 * se)
    assert high == pytest.approx(data.mean() + 1.96 * se, abs=0.3 * se)
    # Same seed, same interval; a callable replicate generator works too.
    assert bootstrap_interval(data, seed=0) == (low, high)
    low2, high2 = bootstrap_interval(lambda r: r.choice(data, len(data)).mean(), n_resamples=500)
    assert low2 < data.mean() < high2
    low_med, high_med = bootstrap_interval(data, statistic=np.median, n_resamples=500)
    assert low_med < np.median(data) < high_med
    with pytest.raises(ValueError):
        bootstrap_interval([])


TRUE_STRENGTHS = {"weak": 1.0, "middle": 2.0, "strong": 4.0}


def simulate_games(num_games, seed):
    rng = np.random.default_rng(seed)
    names = list(TRUE_STRENGTHS)
    games = []
    for _ in range(num_games):
        i, j = rng.choice(len(names), size=2, replace=False)
        a, b = names[i], names[j]
        p_a = TRUE_STRENGTHS[a] / (TRUE_STRENGTHS[a] + TRUE_STRENGTHS[b])
        games.append((a, b) if rng.random() < p_a else (b, a))
    return games


def test_bradley_terry_recovers_known_strengths():
    games = simulate_games(600, seed=7)
    strengths = bradley_terry_ratings(games)
    assert strengths["weak"] < strengths["middle"] < strengths["strong"]
    for a, b in [("middle", "weak"), ("strong", "weak"), ("strong", "middle")]:
        truth = TRUE_STRENGTHS[a] / TRUE_STRENGTHS[b]
        assert strengths[a] / strengths[b] == pytest.approx(truth, rel=0.25)
    # Normalized to geometric mean 1.
    assert math.prod(strengths.values()) == pytest.approx(1.0)
    # Elo gives the same order, and the Elo scale of BT keeps the mean at base.
    elo = elo_ratings(games)
    assert elo["weak"] < elo["middle"] < elo["strong"]
    assert sum(elo.values()) == pytest.approx(3 * 1000)  # zero-sum updates
    scaled = to_elo_scale(strengths, base=1500)
    assert np.mean(list(scaled.values())) == pytest.approx(1500)
    assert scaled["strong"] - scaled["weak"] == pytest.approx(
        400 * math.log10(strengths["strong"] / strengths["weak"]))


def test_bradley_terry_is_consistent_with_many_games():
    strengths = bradley_terry_ratings(simulate_games(30000, seed=3))
    assert strengths["middle"] / strengths["weak"] == pytest.approx(2.0, rel=0.06)
    assert strengths["strong"] / strengths["weak"] == pytest.approx(4.0, rel=0.06)


def test_bradley_terry_matches_direct_likelihood_maximum():
    # Two players, w wins and l losses, plus the 0.5/0.5 prior against a fitted virtual
    # player; with prior=0 the MLE is exactly s_a / s_b = w / l.
    games = [("a", "b")] * 7 + [("b", "a")] * 3
    plain = bradley_terry_ratings(games, prior=0)
    assert plain["a"] / plain["b"] == pytest.approx(7 / 3, rel=1e-8)
    ties = bradley_terry_ratings([("a", "b", 1)] * 6 + [("a", "b", 0.5)] * 2 + [("a", "b", 0)] * 2,
                                 prior=0)
    assert ties["a"] / ties["b"] == pytest.approx(7 / 3, rel=1e-8)


def test_bradley_terry_prior_keeps_unbeaten_finite():
    strengths = bradley_terry_ratings([("x", "y")] * 5, players=["x", "y", "idle"])
    assert all(math.isfinite(s) and s > 0 for s in strengths.values())
    assert strengths["x"] > strengths["idle"] > strengths["y"]
    with pytest.raises(ValueError):
        bradley_terry_ratings([("x", "y")] * 5, prior=0)
    with pytest.raises(ValueError):
        bradley_terry_ratings([("x", "z")], players=["x", "y"])


def test_elo_single_update_by_hand():
    ratings = elo_ratings([("a", "b")], k=32, initial=1000)
    assert ratings == {"a": 1016.0, "b": 984.0}
    tie = elo_ratings([("a", "b"), ("a", "b", 0.5)], k=32, initial=1000)
    expected_a = 1 / (1 + 10 ** ((984 - 1016) / 400))
    assert tie["a"] == pytest.approx(1016 + 32 * (0.5 - expected_a))


@pytest.mark.parametrize("method", ["bradley_terry", "elo"])
def test_bootstrap_ratings_intervals(method):
    games = simulate_games(600, seed=7)
    ratings = bootstrap_ratings(games, method=method, n_resamples=200, seed=0)
    for rating, low, high in ratings.values():
        assert low <= rating <= high
        assert high - low > 0
    assert ratings["weak"][0] < ratings["middle"][0] < ratings["strong"][0]
    assert ratings["weak"][1] < ratings["middle"][1] < ratings["strong"][1]
    assert ratings["weak"][2] < ratings["middle"][2] < ratings["strong"][2]
    if method == "bradley_terry":
        point = to_elo_scale(bradley_terry_ratings(games))
        for name, (rating, _, _) in ratings.items():
            assert rating == pytest.approx(point[name])
    with pytest.raises(ValueError):
        bootstrap_ratings(games, method=method, n_resamples=2, not_an_option=1)


def test_cohen_kappa_wikipedia_example():
    # 50 items: 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no -> kappa = 0.4.
    a = ["yes"] * 20 + ["yes"] * 5 + ["no"] * 10 + ["no"] * 15
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert percent_agreement(a, b) == pytest.approx(0.7)
    assert cohen_kappa(a, b) == pytest.approx(0.4)


def test_cohen_kappa_hand_computed_three_labels():
    # Confusion matrix (rows: rater A, columns: rater B) over labels 0, 1, 2.
    confusion = [[10, 2, 3], [1, 8, 1], [4, 0, 11]]
    a, b = [], []
    for i, row in enumerate(confusion):
        for j, count in enumerate(row):
            a += [i] * count
            b += [j] * count
    n = 40
    p_o = (10 + 8 + 11) / n
    rows = [sum(r) for r in confusion]          # 15, 10, 15
    cols = [sum(c) for c in zip(*confusion)]    # 15, 10, 15
    p_e = sum(r * c for r, c in zip(rows, cols)) / n ** 2
    assert cohen_kappa(a, b) == pytest.approx((p_o - p_e) / (1 - p_e))
    assert percent_agreement(a, b) == pytest.approx(p_o)
    # Any hashable labels; relabelling does not change kappa.
    names = {0: ("t", 1), 1: None, 2: "x"}
    assert cohen_kappa([names[x] for x in a], [names[x] for x in b]) == pytest.approx(cohen_kappa(a, b))


def test_cohen_kappa_edge_cases():
    assert cohen_kappa(["a", "b", "a"], ["a", "b", "a"]) == 1.0
    assert cohen_kappa(["a"] * 5, ["a"] * 5) == 1.0  # p_e == 1 and p_o == 1
    assert cohen_kappa(["a", "b"], ["b", "a"]) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        cohen_kappa(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        percent_agreement([], [])


def brute_force_pass_at_k(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8, 10])
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_large_and_invalid():
    # Stable where the binomials would overflow floats.
    exact = 1 - math.comb(1900, 100) / math.comb(2000, 100)
    assert pass_at_k(2000, 100, 100) == pytest.approx(exact, rel=1e-12)
    assert pass_at_k(2000, 3, 1000) == pytest.approx(1 - math.comb(1997, 1000) / math.comb(2000, 1000))
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 6, 5) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 2, 6)
