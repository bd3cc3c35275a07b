"""Fleiss' kappa and Krippendorff's alpha: published worked examples, a brute-force definition, edge cases."""
import itertools
import random

import pytest

from alignkit.evaluate.stats import cohen_kappa, fleiss_kappa, krippendorff_alpha

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 observers x 12 units,
# None = no value. Published alphas: nominal .743, ordinal .815, interval .849, ratio .797.
KRIPPENDORFF_OBSERVERS = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
    [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
]
KRIPPENDORFF_UNITS = [list(column) for column in zip(*KRIPPENDORFF_OBSERVERS)]

# Fleiss (1971) as reproduced on Wikipedia: 10 subjects, 14 raters, 5 categories (counts per category);
# P = 0.378, P_e = 0.213, kappa = 0.210.
FLEISS_COUNTS = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
                 [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]


def counts_to_items(counts):
    return [[category for category, count in enumerate(row) for _ in range(count)] for row in counts]


@pytest.mark.parametrize("level,published", [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849),
                                             ("ratio", 0.797)])
def test_krippendorff_alpha_reproduces_the_published_example(level, published):
    assert krippendorff_alpha(KRIPPENDORFF_UNITS, level) == pytest.approx(published, abs=5e-4)


def test_krippendorff_nominal_example_exact_fraction():
    # The paper's nominal computation: alpha = 1 - (n - 1) * sum_{c!=k} o_ck / (n^2 - sum n_c^2) with n = 40
    # pairable values, n_c = (9, 13, 10, 5, 3) for values 1..5, off-diagonal coincidences summing to 8.
    n, totals, observed = 40, [9, 13, 10, 5, 3], 8.0
    expected = 1 - (n - 1) * observed / (n * n - sum(t * t for t in totals))
    assert krippendorff_alpha(KRIPPENDORFF_UNITS, "nominal") == pytest.approx(expected, rel=1e-12)


def brute_force_alpha(units, distance):
    """alpha = 1 - D_o / D_e from pairs of values: within units (weighted 1/(m_u - 1)) vs across all values."""
    pairable = [[v for v in unit if v is not None] for unit in units]
    pairable = [u for u in pairable if len(u) >= 2]
    pool = [v for u in pairable for v in u]
    n = len(pool)
    observed = sum(distance(a, b) / (len(u) - 1) for u in pairable for a, b in itertools.permutations(u, 2)) / n
    expected = sum(distance(a, b) for a, b in itertools.permutations(pool, 2)) / (n * (n - 1))
    return 1 - observed / expected


@pytest.mark.parametrize("seed", range(6))
def test_krippendorff_alpha_equals_its_pairwise_definition(seed):
    rng = random.Random(seed)
    units = [[rng.choice([None, 1, 2, 3, 4, 5]) for _ in range(rng.randint(1, 5))] for _ in range(25)]
    assert krippendorff_alpha(units, "nominal") == pytest.approx(
        brute_force_alpha(units, lambda a, b: float(a != b)), rel=1e-10)
    assert krippendorff_alpha(units, "interval") == pytest.approx(
        brute_force_alpha(units, lambda a, b: (a - b) ** 2), rel=1e-10)
    assert krippendorff_alpha(units, "ratio") == pytest.approx(
        brute_force_alpha(units, lambda a, b: ((a - b) / (a + b)) ** 2), rel=1e-10)


def test_krippendorff_alpha_edge_cases():
    assert krippendorff_alpha([["a", "a"], ["b", "b", "b"], ["c"]]) == 1.0  # perfect agreement
    assert krippendorff_alpha([["x", "x"], ["x", "x"]]) == 1.0  # no variation at all: defined as 1
    # systematic disagreement on two units: alpha below zero
    assert krippendorff_alpha([["a", "b"], ["b", "a"]]) < 0
    # labels are names only: renaming categories changes nothing (nominal)
    renamed = [[{1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}.get(v) for v in unit]
               for unit in KRIPPENDORFF_UNITS]
    assert krippendorff_alpha(renamed) == pytest.approx(krippendorff_alpha(KRIPPENDORFF_UNITS))
    with pytest.raises(ValueError, match="two or more values"):
        krippendorff_alpha([["a"], ["b"], []])
    with pytest.raises(ValueError, match="numeric"):
        krippendorff_alpha([["a", "b"]], "interval")
    with pytest.raises(ValueError, match="level"):
        krippendorff_alpha([[1, 2]], "cardinal")


def test_fleiss_kappa_reproduces_the_published_example():
    items = counts_to_items(FLEISS_COUNTS)
    p_bar = sum((sum(c * c for c in row) - 14) / (14 * 13) for row in FLEISS_COUNTS) / 10
    p_e = sum((sum(row[j] for row in FLEISS_COUNTS) / 140) ** 2 for j in range(5))
    assert p_bar == pytest.approx(0.378, abs=5e-4) and p_e == pytest.approx(0.213, abs=5e-4)
    assert fleiss_kappa(items) == pytest.approx((p_bar - p_e) / (1 - p_e), rel=1e-12)
    assert fleiss_kappa(items) == pytest.approx(0.210, abs=5e-4)


def test_fleiss_kappa_order_of_raters_and_names_do_not_matter_and_edge_cases():
    rng = random.Random(3)
    items = [[rng.choice("ABT") for _ in range(3)] for _ in range(40)]
    shuffled = [rng.sample(item, len(item)) for item in items]
    renamed = [[{"A": 0, "B": 1, "T": 2}[label] for label in item] for item in items]
    assert fleiss_kappa(items) == pytest.approx(fleiss_kappa(shuffled)) == pytest.approx(fleiss_kappa(renamed))
    assert fleiss_kappa([["A", "A"], ["B", "B"]]) == 1.0
    assert fleiss_kappa([["A", "A"], ["A", "A"]]) == 1.0
    assert fleiss_kappa([["A", "B"], ["B", "A"]]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="same number of ratings"):
        fleiss_kappa([["A", "B"], ["A", "B", "A"]])
    with pytest.raises(ValueError, match="at least 2 ratings"):
        fleiss_kappa([["A"]])


def test_two_raters_fleiss_and_alpha_relate_to_scotts_pi():
    """With two raters and no gaps, Fleiss' kappa is Scott's pi, and alpha = 1 - (2N-1)/(2N) (1 - pi)."""
    rng = random.Random(7)
    a = [rng.choice("xyz") for _ in range(50)]
    b = [label if rng.random() < 0.7 else rng.choice("xyz") for label in a]
    pooled = a + b
    p_o = sum(x == y for x, y in zip(a, b)) / 50
    p_e = sum((pooled.count(c) / 100) ** 2 for c in "xyz")
    scott_pi = (p_o - p_e) / (1 - p_e)
    assert fleiss_kappa(list(zip(a, b))) == pytest.approx(scott_pi, rel=1e-12)
    assert krippendorff_alpha(list(zip(a, b))) == pytest.approx(1 - (99 / 100) * (1 - scott_pi), rel=1e-12)
    # and all three are close to Cohen's kappa when both raters use the labels alike
    assert abs(cohen_kappa(a, b) - scott_pi) < 0.05
