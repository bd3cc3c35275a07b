"""Pairwise judging: the position swap, the combination rule, the reward-model judge, win_rate/elo metrics."""
from __future__ import annotations

import pytest
import torch

from alignkit.evaluate.pairwise import (
    RewardModelJudge,
    combine_orders,
    judge_both_orders,
    load_judge,
    win_rate,
)




class AlwaysFirst:
    """The worst position bias: always prefers the response shown first."""

    name = "always-A"

    def __init__(self):
        self.calls = []

    def compare(self, prompts, responses_a, responses_b):
        self.calls.append((list(responses_a), list(responses_b)))
        return ["A"] * len(prompts)


class Constant:
    def __init__(self, verdict):
        self.verdict = verdict

    def compare(self, prompts, responses_a, responses_b):
        return [self.verdict] * len(prompts)


class Longer:
    """Prefers the longer response wherever it is shown; equal lengths tie."""

    def compare(self, prompts, responses_a, responses_b):
        return ["A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie" for a, b in zip(responses_a, responses_b)]


class LongerButFirstOnTies(Longer):
    def compare(self, prompts, responses_a, responses_b):
        return ["A" if v == "tie" else v for v in super().compare(prompts, responses_a, responses_b)]


PROMPTS = [f"question {i}" for i in range(10)]
A = [f"a long answer number {i}" for i in range(10)]
B = [f"short {i}" for i in range(10)]


def test_always_first_judge_gives_half_not_all():
    judge = AlwaysFirst()
    result = win_rate(judge, PROMPTS, A, B)
    assert result["win_rate"] == pytest.approx(0.5)          # a one-order evaluation would say 1.0
    assert (result["wins"], result["ties"], result["losses"]) == (0, 10, 0)
    assert result["p_value"] == 1.0                         # no decided comparison: no evidence for A
    assert result["position_consistency"] == 0.0
    assert result["first_position_rate"] == 1.0
    lo, hi = result["win_rate_interval"]
    assert lo < 0.5 < hi
    # both orders really were asked: (a, b) then (b, a)
    assert judge.calls == [(A, B), (B, A)]


@pytest.mark.parametrize("verdict", ["A", "B", "tie"])
def test_any_constant_judge_gives_half(verdict):
    result = win_rate(Constant(verdict), PROMPTS, A, B)
    assert result["win_rate"] == pytest.approx(0.5)
    assert result["ties"] == len(PROMPTS)


def test_content_judge_wins_in_both_orders():
    result = win_rate(Longer(), PROMPTS, A, B)
    assert result["win_rate"] == 1.0 and result["wins"] == 10
    assert result["position_consistency"] == 1.0
    assert result["p_value"] == pytest.approx(0.5 ** 10)
    reverse = win_rate(Longer(), PROMPTS, B, A)
    assert reverse["win_rate"] == 0.0 and reverse["losses"] == 10


def test_win_and_tie_is_a_win_and_split_is_a_tie():
    # Equal-length answers: the biased judge says "A" in both orders -> each response won once -> tie.
    same = [f"x{i}" for i in range(4)]
    other = [f"y{i}" for i in range(4)]
    result = judge_both_orders(LongerButFirstOnTies(), PROMPTS[:4], same, other)
    assert result.outcomes == ["tie"] * 4


def test_combination_rule_table():
    forward = ["A", "A", "A", "tie", "tie", "tie", "B", "B", "B"]
    swapped = ["B", "tie", "A", "B", "tie", "A", "B", "tie", "A"]
    # swapped verdicts are about (b, a): "B" there means model A won.
    assert combine_orders(forward, swapped) == ["win", "win", "tie", "win", "tie", "loss", "tie", "loss", "loss"]


def test_missing_verdicts_are_left_out_and_counted():
    class Sometimes:
        def compare(self, prompts, a, b):
            return [None if i == 0 else "A" if len(x) > len(y) else "B" for i, (x, y) in enumerate(zip(a, b))]

    result = win_rate(Sometimes(), PROMPTS, A, B)
    assert result["invalid"] == 1 and result["n"] == 9 and result["win_rate"] == 1.0


def test_bad_verdicts_and_lengths_raise():
    with pytest.raises(ValueError, match="expected 'A', 'B' or 'tie'"):
        win_rate(Constant("first"), PROMPTS, A, B)

    class Short:
        def compare(self, prompts, a, b):
            return ["A"]

    with pytest.raises(ValueError, match="1 verdicts for 10 items"):
        win_rate(Short(), PROMPTS, A, B)


class LengthScorer(torch.nn.Module):
    """A fake reward model: the score is the number of real tokens."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def sequence_scores(self, input_ids, attention_mask):
        return attention_mask.sum(-1).float()


def test_reward_model_judge_scores_and_ties(tiny_tokenizer):
    judge = RewardModelJudge(LengthScorer(), tiny_tokenizer)
    scores = judge.score(["hi", "hi"], ["yes", "yes yes yes"])
    assert scores[1] > scores[0]
    assert judge.compare(["hi", "hi", "hi"], ["yes yes", "yes", "ok"], ["yes", "yes yes", "ok"]) == ["A", "B", "tie"]
    margin = RewardModelJudge(LengthScorer(), tiny_tokenizer, tie_margin=100.0)
    assert margin.compare(["hi"], ["yes yes"], ["yes"]) == ["tie"]


def test_reward_model_judge_with_a_real_head_is_position_free(tiny_tokenizer, tmp_path):
    from alignkit.model.heads import ScalarHeadModel
    from tests.helpers import make_tiny_model

    head = ScalarHeadModel(make_tiny_model(tiny_tokenizer, seed=3))
    head.save(tmp_path / "rm", tiny_tokenizer)
    judge = load_judge(f"reward-model:{tmp_path / 'rm'}")
    assert isinstance(judge, RewardModelJudge)
    result = judge_both_orders(judge, PROMPTS, A, B)
    assert result.position_consistency == 1.0
    # scores do not depend on the batch they are computed in (padding is handled)
    alone = [judge.score([p], [a])[0] for p, a in zip(PROMPTS[:3], A[:3])]
    assert judge.score(PROMPTS[:3], A[:3]) == pytest.approx(alone, abs=1e-4)


def test_load_judge_errors(tmp_path):
    with pytest.raises(ValueError, match="needs a judge"):
        load_judge(None)
    with pytest.raises(ValueError, match="unknown judge"):
        load_judge(str(tmp_path))
    judge = AlwaysFirst()
    assert load_judge(judge) is judge


def test_win_rate_and_elo_metrics(tiny_tokenizer, tmp_path):
    import json

    from alignkit.evaluate.metrics import run_metrics
    from tests.helpers import make_tiny_model

    model_a, model_b, model_c = (make_tiny_model(tiny_tokenizer, seed=s) for s in (0, 1, 2))
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"hello {w}"}) for w in ["cat", "dog", "bird", "fish"]))
    results = run_metrics(model_a, tiny_tokenizer, ["win_rate", "elo"], data=str(path), judge=AlwaysFirst(),
                          model_b=(model_b, tiny_tokenizer, "B"),
                          models=[(model_b, tiny_tokenizer, "B"), (model_c, tiny_tokenizer, "C")],
                          model_name="A", max_new_tokens=4, n_resamples=50)
    result = results["win_rate"]
    assert result["win_rate"] == 0.5 and result["ties"] == 4 and result["model_b"] == "B"
    assert len(result["examples"]) == 4 and result["judge"] == "always-A"
    elo = results["elo"]
    assert set(elo["ratings"]) == {"A", "B", "C"}
    assert elo["n"] == 3 * 4                                  # 3 pairs x 4 prompts
    # a judge that only reads positions gives everyone the same rating
    ratings = [r["rating"] for r in elo["ratings"].values()]
    assert max(ratings) - min(ratings) < 1e-6

    longer = run_metrics(model_a, tiny_tokenizer, ["elo"], data=str(path), judge=Longer(),
                         models=[(model_b, tiny_tokenizer, "B")], model_name="A", max_new_tokens=4,
                         n_resamples=50, elo_method="elo", k_factor=16)["elo"]
    assert longer["method"] == "elo" and longer["k_factor"] == 16
    for rating in longer["ratings"].values():
        low, high = rating["interval"]
        assert low <= rating["rating"] <= high


def test_llm_judge_spec_builds_a_pairwise_judge(monkeypatch):
    import types

    from alignkit.evaluate import pairwise

    made = {}
    fake = types.SimpleNamespace()

    def make_backend(model=None, base_url=None, device=None, dtype=None):
        made["backend"] = (model, base_url)
        return "backend"

    class PairwiseJudge:
        def __init__(self, backend, method="generate"):
            made["judge"] = (backend, method)

        def compare(self, prompts, a, b):
            return ["A"] * len(prompts)

    fake.make_backend, fake.PairwiseJudge = make_backend, PairwiseJudge
    monkeypatch.setattr(pairwise, "judges", fake)
    local = load_judge("llm:smollm2-135m-instruct")
    assert made == {"backend": ("smollm2-135m-instruct", None), "judge": ("backend", "logprobs")}
    assert "llm:smollm2-135m-instruct" in local.name
    load_judge("llm:gpt-judge@http://localhost:8000/v1")
    assert made == {"backend": ("gpt-judge", "http://localhost:8000/v1"), "judge": ("backend", "generate")}
    assert win_rate(local, PROMPTS, A, B)["win_rate"] == 0.5
