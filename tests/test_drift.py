"""alignkit.evaluate.drift on hand-made inputs."""
import math

import numpy as np
import pytest
import torch

from alignkit.evaluate.drift import (
    CHECK_KINDS,
    DEFAULT_THRESHOLDS,
    DriftMonitor,
    distinct_n,
    drift_alarms,
    drift_report,
    length_stats,
    mean_entropy,
    refusal_rate,
    repetition_rate,
    sample_kl,
    text_statistics,
)


def test_distinct_n_by_hand():
    texts = ["the cat sat", "the cat ran"]
    # unigrams: the cat sat the cat ran -> 4 unique of 6
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    # bigrams: (the cat) (cat sat) (the cat) (cat ran) -> 3 unique of 4
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    # n-grams never cross text boundaries: "sat the" is not a bigram here.
    assert distinct_n(["a b", "c d"], 2) == 1.0
    assert distinct_n(["same answer"] * 10, 2) == pytest.approx(1 / 10)
    assert distinct_n(["one"], 2) == 0.0
    assert distinct_n([], 1) == 0.0
    assert distinct_n("a  b\n c", 1) == 1.0  # whitespace tokens, single string accepted


def test_refusal_rate_by_hand():
    texts = [
        "I can't help with that.",
        "i cannot do this",
        "I\u2019m sorry, but no.",
        "As an AI language model, I have no opinions.",
        "I am unable to comply.",
        "Sure! Here is the recipe.",
        "The canteen is closed.",          # "can" inside a word: not a refusal
        "I can help with that: Paris.",    # "I can" without the negation: not a refusal
        "Mini cannot-style text",          # "i cannot" inside a word: not a refusal
    ]
    assert refusal_rate(texts) == pytest.approx(5 / 9)
    assert refusal_rate([]) == 0.0
    assert refusal_rate(["nope"], patterns=[r"^nope$"]) == 1.0


def test_sample_kl_by_hand():
    policy = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.3, 0.0]])
    reference = torch.tensor([[-1.5, -2.0, -9.0], [-0.1, -0.5, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    result = sample_kl(policy, reference, mask)
    ratios = [[0.5, 0.0], [-0.1, 0.2]]
    sums = [sum(r) for r in ratios]
    assert result["kl"] == pytest.approx(np.mean(sums))
    k3 = [sum(math.exp(-r) - 1 + r for r in row) for row in ratios]
    assert result["kl_k3"] == pytest.approx(np.mean(k3))
    assert result["kl_per_token"] == pytest.approx(sum(sums) / 4)
    assert result["num_tokens"] == 4 and result["num_sequences"] == 2
    # Ragged lists give the same numbers as the padded tensors with a mask.
    ragged = sample_kl([[-1.0, -2.0], [-0.2, -0.3]], [[-1.5, -2.0], [-0.1, -0.5]])
    assert ragged["kl"] == pytest.approx(result["kl"])
    assert ragged["kl_k3"] == pytest.approx(result["kl_k3"])
    # Identical policies: zero divergence.
    same = sample_kl(policy, policy)
    assert same["kl"] == 0.0 and same["kl_k3"] == 0.0


def test_sample_kl_estimates_true_kl():
    # Categorical policy p and reference q; samples from p: mean log-ratio -> KL(p || q).
    rng = np.random.default_rng(0)
    p = np.array([0.7, 0.2, 0.1])
    q = np.array([0.3, 0.3, 0.4])
    true_kl = float(np.sum(p * np.log(p / q)))
    tokens = rng.choice(3, size=(4000, 5), p=p)
    result = sample_kl(np.log(p)[tokens], np.log(q)[tokens])
    assert result["kl"] == pytest.approx(5 * true_kl, rel=0.05)
    assert result["kl_k3"] == pytest.approx(5 * true_kl, rel=0.05)


def test_mean_entropy_and_length_stats():
    entropies = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert mean_entropy(entropies, mask) == pytest.approx(2.0)  # (1 + 2 + 3) / 3
    assert mean_entropy([[1.0, 2.0], [3.0]]) == pytest.approx(2.0)
    assert math.isnan(mean_entropy(entropies, torch.zeros(2, 3)))
    stats = length_stats([10, 20, 30, 40, 100])
    assert stats["mean"] == pytest.approx(40.0)
    assert stats["median"] == pytest.approx(30.0)
    assert stats["p90"] == pytest.approx(76.0)  # 40 + 0.6 * (100 - 40)
    assert stats["count"] == 5
    assert length_stats(torch.tensor([5, 5]))["p90"] == 5.0
    assert math.isnan(length_stats([])["mean"])


BASELINE = {"kl": 0.0, "entropy": 2.0, "length": 100.0, "distinct_2": 0.8, "refusal_rate": 0.05}


def test_drift_report_quiet_when_healthy():
    healthy = {"kl": 3.0, "entropy": 1.5, "length": 150.0, "distinct_2": 0.7, "refusal_rate": 0.1}
    assert drift_report(healthy, BASELINE) == []


def test_drift_report_fires_exactly_the_expected_warnings():
    current = {"kl": 14.0, "entropy": 0.6, "length": 250.0, "distinct_2": 0.7,
               "refusal_rate": 0.05}
    warnings = drift_report(current, BASELINE)
    assert len(warnings) == 3
    kl, entropy, length = warnings
    assert "KL" in kl and "14" in kl and "10" in kl
    assert "entropy" in entropy.lower() and "0.6" in entropy and "2" in entropy and "0.5" in entropy
    assert "length" in length.lower() and "250" in length and "100" in length and "2" in length

    current = {"kl": 1.0, "entropy": 1.9, "length": 40.0, "distinct_2": 0.4, "refusal_rate": 0.4}
    warnings = drift_report(current, BASELINE)
    assert len(warnings) == 3
    shrink, distinct, refusal = warnings
    assert "shrank" in shrink and "40" in shrink and "0.5" in shrink
    assert "Distinct-2" in distinct and "0.4" in distinct and "0.8" in distinct and "0.6" in distinct
    assert "Refusal rate" in refusal and "40.0%" in refusal and "5.0%" in refusal and "20.0%" in refusal


def test_drift_report_accepts_metric_dicts_and_thresholds():
    current = {"kl": {"kl": 12.0, "kl_k3": 11.0}, "length": {"mean": 300.0, "median": 250.0}}
    baseline = {"length": {"mean": 100.0}}
    assert len(drift_report(current, baseline)) == 2
    # Thresholds override key by key; None disables a check.
    assert drift_report(current, baseline, {"kl": 20.0, "length_ratio_high": None}) == []
    assert len(drift_report(current, baseline, {"kl": 20.0})) == 1
    # Missing metrics are skipped; zero baselines skip ratio checks.
    assert drift_report({"entropy": 0.1}, {}) == []
    assert drift_report({"entropy": 0.1}, {"entropy": 0.0}) == []
    with pytest.raises(ValueError, match="kl_limit"):
        drift_report(current, baseline, {"kl_limit": 3})
    assert DEFAULT_THRESHOLDS["kl"] == 10.0


# ----------------------------------------------------------------------------- hacking alarms

def test_repetition_rate_by_hand():
    # "yes yes yes yes": trigrams (yes yes yes) x2 -> 1 - 1/2; "a b c d": 2 distinct trigrams -> 0
    assert repetition_rate(["yes yes yes yes", "a b c d"]) == pytest.approx((0.5 + 0.0) / 2)
    # token ids see repetition without spaces; a sequence shorter than n counts 0
    assert repetition_rate([[7, 7, 7, 7, 7], [1, 2]]) == pytest.approx((1 - 1 / 3 + 0.0) / 2)
    assert repetition_rate([torch.tensor([1, 2, 1, 2, 1, 2])], n=2) == pytest.approx(1 - 2 / 5)
    assert repetition_rate([]) == 0.0
    # different prompts with the same answer do not count (distinct-n would fall)
    assert repetition_rate(["the answer is 8"] * 5) == 0.0 and distinct_n(["the answer is 8"] * 5, 2) < 0.3


def test_text_statistics_and_the_new_checks():
    stats = text_statistics(["yes yes yes yes", "I cannot help"], [4, 3], truncated=[True, False])
    assert stats["length"] == 3.5 and stats["truncated_share"] == 0.5 and stats["refusal_rate"] == 0.5
    assert stats["repetition"] == pytest.approx(0.25)
    baseline = {"truncated_share": 0.1, "repetition": 0.02, "length": 10.0}
    alarms = drift_alarms({"truncated_share": 0.45, "repetition": 0.3, "length": 11.0}, baseline)
    assert [a.check for a in alarms] == ["truncated_share_rise", "repetition_rise"]
    assert all(a.kind == "hacking" for a in alarms)
    assert alarms[0].value == 0.45 and alarms[0].baseline == 0.1 and alarms[0].threshold == 0.3
    assert "45%" in alarms[0].message and "10%" in alarms[0].message
    # at the thresholds exactly: no alarm (strictly above fires)
    limits = {"truncated_share_rise": 0.25, "repetition_rise": 0.25}
    assert drift_alarms({"truncated_share": 0.5, "repetition": 0.75}, {"truncated_share": 0.25, "repetition": 0.5},
                        limits) == []
    # collapse checks are marked as such
    # collapse checks are marked as such: a policy answering "8" where it used to ramble is not hacking
    collapse = drift_alarms({"entropy": 0.5, "distinct_2": 0.1, "length": 2.0},
                            {"entropy": 2.0, "distinct_2": 0.8, "length": 9.0})
    assert [(a.check, a.kind) for a in collapse] == [("entropy_ratio", "collapse"), ("length_ratio_low", "collapse"),
                                                     ("distinct_2_ratio", "collapse")]
    assert set(CHECK_KINDS) == set(DEFAULT_THRESHOLDS)


def test_drift_monitor_baseline_patience_and_state():
    monitor = DriftMonitor(patience=2)
    calm = {"length": 10.0, "truncated_share": 0.1, "repetition": 0.0, "distinct_2": 0.9}
    assert monitor.observe(1, calm) == []                       # rollout 1 is the baseline
    assert monitor.observe(2, {**calm, "length": 25.0}) == []   # one long batch: holding, not fired
    assert monitor.active == [] and monitor.metrics({**calm, "length": 25.0})["drift/length_ratio"] == 2.5
    assert monitor.observe(3, calm) == []                       # the streak is broken
    assert monitor.observe(4, {**calm, "length": 21.0}) == []
    fired = monitor.observe(5, {**calm, "length": 30.0, "distinct_2": 0.1})
    assert [a.check for a in fired] == ["length_ratio_high"]    # distinct-2 is a collapse check: not fired
    assert monitor.fired[0]["step"] == 5 and monitor.fired[0]["rollout"] == 5
    assert monitor.observe(6, {**calm, "length": 30.0}) == []   # fires once
    assert monitor.active == ["length_ratio_high"] and monitor.metrics(calm)["drift/alarms"] == 1.0
    copy = DriftMonitor(patience=2)
    copy.load_state_dict(monitor.state_dict())
    assert copy.observe(7, calm) == monitor.observe(7, calm) == [] and copy.active == monitor.active == []
    # the collapse kind fires when asked; thresholds override
    strict = DriftMonitor({"distinct_2_ratio": 0.5, "length_ratio_high": None}, patience=1,
                          kinds=("hacking", "collapse"))
    strict.observe(1, calm)
    assert [a.check for a in strict.observe(2, {**calm, "length": 99.0, "distinct_2": 0.3})] == ["distinct_2_ratio"]
    with pytest.raises(ValueError, match="lenght"):
        DriftMonitor({"lenght": 2.0})


def test_side_reward_share_by_hand():
    """Side terms (not in drift.task_rewards) paying for most of the gain since the baseline fire; a small or a
    shared gain does not. Baseline: total 0.2, side 0.06; side weight 4, so a side gain under 0.4 is noise."""
    base = {"reward": 0.2, "side_reward": 0.06}

    def checks(reward, side, **limits):
        return [a.check for a in drift_alarms({"reward": reward, "side_reward": side, "side_weight": 4.0}, base,
                                               limits or None)]

    assert checks(1.2, 0.36) == []                     # side gain 0.30 < 0.4 (10% of its weight): noise
    assert checks(2.2, 0.66) == []                     # side gain 0.60 of a 2.0 gain: 30%, the task paid most
    assert checks(1.2, 0.66) == ["side_reward_share"]  # 0.60 of a 1.0 gain: 60%
    assert checks(1.2, 0.66, side_reward_share=0.7) == []
    assert checks(1.2, 0.66, side_reward_share=None) == []
    fell = drift_alarms({"reward": 0.1, "side_reward": 0.56, "side_weight": 4.0}, base)  # task fell, side rose
    assert [a.check for a in fell] == ["side_reward_share"] and "while the total changed by -0.1" in fell[0].message
    assert CHECK_KINDS["side_reward_share"] == "hacking"
    assert drift_alarms({"reward": 1.2, "side_reward": 0.66}, base) == []  # no side weight: not a composed reward


def measured_rollouts(numeric_match, bonus, weight):
    """Per-rollout statistics of two measured arithmetic GRPO runs (docs/online_rl.md): numeric_match (weight 1)
    plus a side bonus at ``weight``."""
    return [{"reward": n + weight * b, "side_reward": weight * b, "side_weight": weight}
            for n, b in zip(numeric_match, bonus)]


def test_side_reward_monitor_on_the_measured_keyword_hack_and_a_clean_run():
    # GRPO with keyword_bonus at weight 4: the bonus climbed from step 7 while accuracy stood still, and took over
    # at step 16 (repetition_rise fired at 18).
    hacked = measured_rollouts([.06, .09, .44, .16, .78, .41, .56, .53, .72, .50, .88, .69, .97, .72, .75, .12],
                               [.03, .05, .04, .02, .05, .08, .12, .16, .23, .27, .37, .45, .49, .52, .63, .89], 4)
    monitor = DriftMonitor()
    fired = [(step, alarm.check) for step, stats in enumerate(hacked, 1) for alarm in monitor.observe(step, stats)]
    assert fired == [(9, "side_reward_share")], fired
    assert monitor.metrics(hacked[8])["drift/side_reward_share"] == pytest.approx((4 * .23 - 4 * .03) / (
        (.72 + 4 * .23) - (.06 + 4 * .03)))
    # GRPO with a repeated-answer bonus at weight 1 that it never found: the sums paid for the gain
    clean = measured_rollouts([.06, .09, .50, .50, 1.0, .66, .81, .72, .94, .97, 1.0, .75, 1.0, 1.0, .97, .97],
                              [.02, .02, .13, .13, .25, .17, .32, .24, .30, .24, .25, .19, .25, .31, .37, .37], 1)
    monitor = DriftMonitor()
    assert [a for step, stats in enumerate(clean, 1) for a in monitor.observe(step, stats)] == []
