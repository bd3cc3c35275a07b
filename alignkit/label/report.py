"""What the admin sees: agreement between annotators, a leaderboard of the models, rating distributions.

Everything is computed from `LabelStore.judgements()` (one dict per label) with the statistics of
`alignkit.evaluate.stats`, so the web page, ``alignkit label stats`` and tests share one definition:

* **agreement** on the items labelled by two or more annotators (the overlap share). Outcomes are
  compared in each item's fixed candidate order (``first``/``second``/``tie``/``both_bad``), never in
  the A/B order an annotator happened to see. Reported: percent agreement (the share of agreeing
  annotator pairs per item, averaged over items), Cohen's kappa for every pair of annotators who share
  items, Fleiss' kappa over the items with the most common number of labels, and Krippendorff's alpha
  (nominal) over all overlap items (it allows any number of labels per item). For the 1-5 ratings,
  Krippendorff's alpha at the interval level, each (item, response) being one unit.
* **leaderboard**: Bradley-Terry strengths of the models that wrote the candidates, on the Elo scale
  with 95% percentile-bootstrap intervals (`bootstrap_ratings`). Every label of a pair from two
  different models is one comparison; ``tie`` and ``both_bad`` count as a draw (half a win each), as
  on LMArena. Pairs from the same model say nothing about models and are left out.
* **position bias**: the share of decisive labels (A or B) that chose the response shown first (A),
  with its Wilson interval; far from 50% means annotators favour a side.
* **ratings**: how often each score 1-5 was given, for helpfulness and harmlessness, overall and per model.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from itertools import combinations
from typing import Any

from alignkit.evaluate.stats import (
    bootstrap_ratings,
    cohen_kappa,
    fleiss_kappa,
    krippendorff_alpha,
    percent_agreement,
    wilson_interval,
)
from alignkit.label.store import RATING_NAMES, RATING_RANGE

OUTCOMES = ("first", "second", "tie", "both_bad")


def _by_item(judgements: list[dict]) -> dict[int, list[dict]]:
    items: dict[int, list[dict]] = defaultdict(list)
    for record in judgements:
        items[record["item_id"]].append(record)
    return items


def agreement(judgements: list[dict], min_shared_items: int = 1) -> dict[str, Any]:
    """Agreement statistics over the items with two or more labels (see the module docstring).

    Statistics that cannot be computed yet (no overlap items) are None. ``pairs`` lists Cohen's kappa
    for every two annotators with at least ``min_shared_items`` items in common.
    """
    items = {item: records for item, records in _by_item(judgements).items() if len(records) >= 2}
    result: dict[str, Any] = {"overlap_items": len(items), "labels_on_overlap_items": sum(map(len, items.values())),
                              "percent_agreement": None, "krippendorff_alpha": None, "fleiss_kappa": None,
                              "fleiss_items": 0, "fleiss_raters": None, "pairs": [], "ratings_alpha": {}}
    if items:
        shares = []
        for records in items.values():
            outcomes = [r["outcome"] for r in records]
            pairs = list(combinations(outcomes, 2))
            shares.append(sum(a == b for a, b in pairs) / len(pairs))
        result["percent_agreement"] = sum(shares) / len(shares)
        result["krippendorff_alpha"] = krippendorff_alpha([[r["outcome"] for r in records] for records in items.values()])
        sizes = Counter(len(records) for records in items.values())
        raters = max(sizes, key=lambda size: (sizes[size], size))
        same_size = [[r["outcome"] for r in records] for records in items.values() if len(records) == raters]
        result["fleiss_kappa"] = fleiss_kappa(same_size)
        result["fleiss_items"], result["fleiss_raters"] = len(same_size), raters
        shared: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
        for records in items.values():
            by_annotator = {r["annotator"]: r["outcome"] for r in records}
            for a, b in combinations(sorted(by_annotator), 2):
                shared[(a, b)].append((by_annotator[a], by_annotator[b]))
        for (a, b), outcomes in sorted(shared.items()):
            if len(outcomes) >= min_shared_items:
                first, second = zip(*outcomes)
                result["pairs"].append({"annotators": [a, b], "shared_items": len(outcomes),
                                        "percent_agreement": percent_agreement(first, second),
                                        "cohen_kappa": cohen_kappa(first, second)})
    for name in RATING_NAMES:
        units: dict[tuple[int, str], list[int]] = defaultdict(list)
        for record in judgements:
            for which in ("first", "second"):
                value = record.get(f"{name}_{which}")
                if value is not None:
                    units[(record["item_id"], which)].append(value)
        pairable = [values for values in units.values() if len(values) >= 2]
        result["ratings_alpha"][name] = {"units": len(pairable),
                                         "alpha": krippendorff_alpha(pairable, "interval") if pairable else None}
    return result


def model_comparisons(judgements: list[dict]) -> list[tuple[str, str, float]]:
    """``(first model, second model, score of the first)`` for every label of a two-model pair."""
    scores = {"first": 1.0, "second": 0.0, "tie": 0.5, "both_bad": 0.5}
    return [(r["first_model"], r["second_model"], scores[r["outcome"]]) for r in judgements
            if r["first_model"] != r["second_model"]]


def leaderboard(judgements: list[dict], n_resamples: int = 1000, confidence: float = 0.95,
                seed: int = 0) -> list[dict]:
    """Models by Bradley-Terry rating (Elo scale, mean 1000) with bootstrap intervals, best first."""
    comparisons = model_comparisons(judgements)
    if not comparisons:
        return []
    ratings = bootstrap_ratings(comparisons, n_resamples=n_resamples, confidence=confidence, seed=seed)
    wins: Counter = Counter()
    games: Counter = Counter()
    for first, second, score in comparisons:
        wins[first] += score
        wins[second] += 1.0 - score
        games[first] += 1
        games[second] += 1
    rows = [{"model": model, "rating": rating, "low": low, "high": high, "comparisons": games[model],
             "win_share": wins[model] / games[model]} for model, (rating, low, high) in ratings.items()]
    return sorted(rows, key=lambda row: -row["rating"])


def position_bias(judgements: list[dict], confidence: float = 0.95) -> dict[str, Any]:
    """The share of decisive labels that picked the response shown as A."""
    decisive = [r for r in judgements if r["choice"] in ("A", "B")]
    chose_a = sum(r["choice"] == "A" for r in decisive)
    return {"decisive": len(decisive), "chose_a": chose_a,
            "share_a": chose_a / len(decisive) if decisive else None,
            "interval": wilson_interval(chose_a, len(decisive), confidence)}


def rating_distributions(judgements: list[dict]) -> dict[str, dict[str, dict[int, int]]]:
    """``{rating name: {"all" | model: {score: count}}}`` with every score 1-5 present (zero when unused)."""
    low, high = RATING_RANGE
    out: dict[str, dict[str, dict[int, int]]] = {}
    for name in RATING_NAMES:
        tables: dict[str, Counter] = defaultdict(Counter)
        for record in judgements:
            for which in ("first", "second"):
                value = record.get(f"{name}_{which}")
                if value is not None:
                    tables["all"][value] += 1
                    tables[record[f"{which}_model"]][value] += 1
        out[name] = {key: {score: counts.get(score, 0) for score in range(low, high + 1)}
                     for key, counts in sorted(tables.items(), key=lambda kv: (kv[0] != "all", kv[0]))}
    return out


def outcome_counts(judgements: list[dict]) -> dict[str, int]:
    counts = Counter(r["outcome"] for r in judgements)
    return {"decisive": counts["first"] + counts["second"], "tie": counts["tie"], "both_bad": counts["both_bad"]}


def summary(store, n_resamples: int = 1000, cache: dict | None = None) -> dict[str, Any]:
    """Everything the admin page and ``alignkit label stats`` show, from one read of the database.

    The bootstrap behind the leaderboard is the slow part (seconds for thousands of labels); with a
    ``cache`` dict it is recomputed only when labels were added since the last call.
    """
    judgements = store.judgements()
    key = (len(judgements), judgements[-1]["label_id"] if judgements else 0, n_resamples)
    if cache is not None and cache.get("key") == key:
        board = cache["leaderboard"]
    else:
        board = leaderboard(judgements, n_resamples=n_resamples)
        if cache is not None:
            cache.update(key=key, leaderboard=board)
    return {"counts": store.counts(), "annotators": store.annotator_progress(), "outcomes": outcome_counts(judgements),
            "agreement": agreement(judgements), "leaderboard": board,
            "position_bias": position_bias(judgements), "ratings": rating_distributions(judgements)}
