"""Factuality: the rule and judge checks, the metric's numbers, the FLAME SFT data and pair builders."""
import pytest

from alignkit.data import PromptExample
from alignkit.evaluate.factuality import (ClaimExtractor, JudgeChecker, RuleChecker, split_claims,
                                          summarize_factuality)
from alignkit.evaluate.stats import wilson_interval
from alignkit.factuality import build_factual_pairs, choose_pair, factual_pairs, factual_sft_rows

CAPITALS = ["Paris", "Rome", "Lyon", "Brasília", "Luxembourg", "Canberra", "Sydney"]


@pytest.mark.parametrize("prompt, response, reference, expected", [
    ("What is the capital of France?", "The capital of France is Paris.", "Paris", "correct"),
    ("What is the capital of France?", "paris", ["Paris", "Paris, France"], "correct"),
    ("What is the capital of Brazil?", "It is Brasilia.", "Brasília", "correct"),           # accents ignored
    ("What is the capital of Luxembourg?", "Luxembourg is its own capital.", "Luxembourg", "correct"),
    ("What is the capital of France?", "The capital of France is Lyon.", "Paris", "hallucinated"),
    ("What is the capital of France?", "Paris or maybe Lyon.", "Paris", "hallucinated"),     # hedging with a wrong one
    ("What is the capital of France?", "It is Parisville.", "Paris", "hallucinated"),        # whole words only
    ("What is the capital of Australia?", "Sydney, I think.", "Canberra", "hallucinated"),
    ("What is the capital of France?", "I'm not sure.", "Paris", "abstained"),
    ("What is the capital of France?", "I don't know that one.", "Paris", "abstained"),
    ("What is the capital of France?", "I'm not sure, but it might be Lyon.", "Paris", "hallucinated"),
    ("Is Rome or Paris the capital of France?", "Paris.", "Paris", "correct"),   # Rome only repeats the question
])
def test_rule_check_of_short_answers(prompt, response, reference, expected):
    [checked] = RuleChecker(CAPITALS).check([prompt], [response], [reference])
    outcome = "correct" if checked.correct else "hallucinated" if checked.hallucinated else \
        "abstained" if checked.abstained else "neither"
    assert outcome == expected


def test_summary_numbers_and_intervals_match_hand_computation():
    checker = RuleChecker(CAPITALS)
    responses = ["Paris.", "Lyon.", "I am not sure.", "Paris!", "Rome."]
    checked = checker.check(["capital of France?"] * 5, responses, ["Paris"] * 5)
    result = summarize_factuality(checked)
    # claims: Paris (yes), Lyon (no), none, Paris (yes), Rome (no) -> 2 of 4 supported
    assert result["factuality"] == pytest.approx(0.5)
    assert result["factuality_interval"] == pytest.approx(list(wilson_interval(2, 4)))
    assert result["hallucination_rate"] == pytest.approx(2 / 5)
    assert result["correct_rate"] == pytest.approx(2 / 5)
    assert result["abstention_rate"] == pytest.approx(1 / 5)
    assert result["abstention_rate_interval"] == pytest.approx(list(wilson_interval(1, 5)))
    assert (result["n"], result["claims"]) == (5, 4)


def test_split_claims_drops_questions_and_abstentions():
    text = "Paris is the capital of France. Is it big? It has 2 million people.\n- The Seine runs through it\n" \
           "I'm not sure about its founding year."
    assert split_claims(text) == ["Paris is the capital of France.", "It has 2 million people.",
                                  "The Seine runs through it"]


class ScriptedBackend:
    """A chat backend that answers by rule: extraction requests get fixed facts; grading requests get
    'Score: 1' when the claim names the reference, 'Score: 0' otherwise, and garbage for 'Zurich'."""

    identity = "scripted"

    def __init__(self, facts):
        self.facts = facts
        self.seen = []

    def complete(self, conversations, temperature=0.0, max_tokens=512):
        answers = []
        for conversation in conversations:
            text = conversation[-1]["content"]
            self.seen.append(text)
            if "<reply>" in text:
                reply = text.split("<reply>")[1].split("</reply>")[0].strip()
                answers.append("\n".join(f"- {fact}" for fact in self.facts[reply]) or "- none")
                continue
            claim = text.split("<claim>")[1].split("</claim>")[0].strip()
            reference = text.split("<reference>")[1].split("</reference>")[0].strip()
            if "Zurich" in claim:
                answers.append("I cannot grade this.")
            else:
                answers.append("Looks fine.\nScore: 1" if reference.split()[0] in claim else "Score: 0")
        return answers


def test_judge_checker_grades_each_extracted_claim_and_counts_malformed_as_unknown():
    facts = {"Bern is the capital; Zurich is the largest city; Geneva hosts the UN.":
             ["Bern is the capital of Switzerland", "Zurich is the largest city", "Geneva is the capital"],
             "No idea.": []}
    backend = ScriptedBackend(facts)
    checker = JudgeChecker(backend, extractor=ClaimExtractor(backend), max_retries=0)
    checked = checker.check(["capital of Switzerland?"] * 2, list(facts), ["Bern", "Bern"])
    assert checked[0].claims == facts[list(facts)[0]]
    assert checked[0].verdicts == [True, None, False]          # Zurich: malformed grade -> unknown
    assert checked[1].claims == [] and checked[1].abstained
    result = summarize_factuality(checked)
    assert result["factuality"] == pytest.approx(0.5) and result["unknown_claims"] == 1
    assert result["factuality_interval_method"] == "bootstrap over responses"
    assert checker.judge.stats.malformed == 1


def _examples(rows):
    return [PromptExample(prompt=[{"role": "user", "content": q}], fields=fields, source=f"mem:{i}")
            for i, (q, fields) in enumerate(rows)]


def test_factual_sft_rows_keep_the_models_own_accepted_answers_and_apply_the_fallback():
    examples = _examples([
        ("What is the capital of France?", {"answer": "Paris"}),
        ("What is the capital of Australia?", {"answer": "Canberra"}),
        ("Write a haiku about rain.", {"completion": "Rain taps the window"}),
        ("Say hi.", {}),
    ])
    samples = {"What is the capital of France?": ["Lyon.", "It is Paris.", "Paris."],
               "What is the capital of Australia?": ["Sydney.", "Sydney!", "I don't know."]}

    def sampler(facts, n):
        return [answer for e in facts for answer in samples[e.prompt[0]["content"]][:n]]

    checker = RuleChecker(CAPITALS)
    rows, report = factual_sft_rows(None, None, examples, checker, samples=3, sampler=sampler, fallback="skip")
    assert [(r["messages"][-1]["content"], r["origin"]) for r in rows] == [
        ("Rain taps the window", "demonstration"), ("It is Paris.", "model")]
    assert (report.fact_seeking, report.prompts_accepted, report.samples, report.samples_accepted) == (2, 1, 6, 2)
    assert report.fallback["skip"] == 1 and report.dropped_no_response == 1
    rows, report = factual_sft_rows(None, None, examples, checker, samples=3, sampler=sampler, fallback="abstain",
                                    abstention="I'm not sure.")
    assert [r["messages"][-1]["content"] for r in rows if r["origin"] == "abstain"] == ["I'm not sure."]
    rows, _ = factual_sft_rows(None, None, examples, checker, samples=3, sampler=sampler, fallback="reference")
    assert [r["messages"][-1]["content"] for r in rows if r["origin"] == "reference"] == ["Canberra"]


@pytest.mark.parametrize("helpfulness, factuality, expected, vetoed", [
    # similar helpfulness: the more factual reply wins, not the slightly more helpful one
    ([0.9, 1.0, 0.2], [1.0, 0.5, 1.0], (0, 1, "factuality"), True),
    # the most helpful reply is the least factual: helpfulness-only would pick (1, 0); vetoed, next best pair
    ([0.1, 3.0, 1.5], [1.0, 0.0, 1.0], (2, 0, "helpfulness"), True),
    # no factuality signal (abstentions): helpfulness decides
    ([0.0, 2.0], [None, None], (1, 0, "helpfulness"), False),
    # equal scores everywhere: no pair
    ([1.0, 1.0], [1.0, 1.0], None, False),
])
def test_choose_pair_prefers_the_more_factual_among_similar_helpfulness(helpfulness, factuality, expected, vetoed):
    choice, was_vetoed = choose_pair(helpfulness, factuality, tolerance=0.5, min_factuality_gap=0.25)
    assert (None if choice is None else (choice.chosen, choice.rejected, choice.rule)) == expected
    assert was_vetoed == vetoed
    plain, _ = choose_pair(helpfulness, factuality, use_factuality=False)
    if expected is not None:  # the plain rule always takes most vs least helpful
        assert (plain.chosen, plain.rejected) == (helpfulness.index(max(helpfulness)),
                                                  helpfulness.index(min(helpfulness)))


def test_pairs_from_a_length_loving_reward_keep_the_factual_reply_chosen():
    examples = _examples([("What is the capital of France?", {"answer": "Paris"})])
    answers = ["Paris.", "The capital of France is Lyon, a large and historic city on the Rhone.", "I don't know."]

    def longer_is_better(prompts, completions, fields):  # a reward model's length bias, scripted
        return [len(c) / 10 for c in completions]

    rows, report = build_factual_pairs(None, None, examples, RuleChecker(CAPITALS), longer_is_better, n=3,
                                       sampler=lambda e, n: answers, tolerance=1.0)
    [row] = rows
    # helpfulness 0.6 / 7.0 / 1.3: the correct short answer beats the abstention of similar helpfulness
    assert (row["chosen"], row["rejected"], row["rule"]) == ("Paris.", "I don't know.", "factuality")
    assert row["factuality"] == [1.0, None]
    assert report.misleading_avoided == 1        # helpfulness alone: the invented Lyon answer over "Paris."
    rows, _ = build_factual_pairs(None, None, examples, RuleChecker(CAPITALS), longer_is_better, n=3,
                                  sampler=lambda e, n: answers, tolerance=0.5)
    assert rows == []                            # no pair that prefers a less factual reply exists
    plain, _ = factual_pairs([e.prompt for e in examples], [answers], [[0.6, 7.2, 1.3]], [[1.0, 0.0, None]],
                             use_factuality=False)
    assert plain[0]["chosen"].startswith("The capital of France is Lyon")   # what the plain builder teaches


def test_the_metric_checks_the_models_greedy_answers(tmp_path, tiny_model, tiny_tokenizer):
    """`alignkit eval --metrics factuality`: the checker sees exactly the greedy answers, the numbers are its verdicts."""
    import json

    from alignkit.evaluate.factuality import ResponseFactuality
    from alignkit.evaluate.metrics import METRICS, sample_completions
    from alignkit.data import load_examples

    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"what is the capital of {c}?", "answer": a}) + "\n"
                            for c, a in (("france", "paris"), ("italy", "rome"), ("spain", "madrid"))))

    class Scripted:
        name = "scripted"
        seen = None

        def check(self, prompts, responses, references):
            Scripted.seen = (list(prompts), list(responses), list(references))
            return [ResponseFactuality(["a"], [True]), ResponseFactuality(["b", "c"], [True, False]),
                    ResponseFactuality([], [], abstained=True)]

    result = METRICS["factuality"](tiny_model, tiny_tokenizer, data=str(data), judge=Scripted(), max_new_tokens=5)
    examples, _ = load_examples(str(data), kind="prompt")
    _, ids = sample_completions(tiny_model, tiny_tokenizer, examples, max_new_tokens=5)
    assert Scripted.seen[1] == [tiny_tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
    assert Scripted.seen[2] == ["paris", "rome", "madrid"]
    assert result["factuality"] == pytest.approx(2 / 3)
    assert (result["hallucination_rate"], result["correct_rate"], result["abstention_rate"]) == \
        pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert result["checker"] == "scripted" and result["n"] == 3
