"""Best-of-N: selection rules (ties, unscored, empty, min_score), scorers, files, and the CLI."""
from __future__ import annotations

import json

import pytest

from alignkit.best_of_n import (
    JudgeScorer,
    RewardFunctionScorer,
    RewardModelScorer,
    best_of_n,
    select_best_of_n,
    write_result,
)
from alignkit.data import PromptExample, load_examples


def user(text):
    return [{"role": "user", "content": text}]


def by_table(table):
    """A scorer reading scores from a dict keyed by completion text."""
    return lambda prompts, completions, fields: [table[c] for c in completions]


def test_selection_keeps_best_and_worst_and_counts_what_it_skips():
    prompts = [user("p0"), user("p1"), user("p2"), user("p3"), user("p4")]
    candidates = [["good", "bad", "ok"],          # ordinary
                  ["same1", "same2"],             # all scores tie -> SFT row, no pair
                  ["junk", "  ", "fine"],         # an empty completion and an unscorable one
                  ["x", "y"],                     # nothing scorable
                  ["Hello!", "hello"]]            # best and worst are the same text once normalised
    table = {"good": 3.0, "bad": -1.0, "ok": 1.0, "same1": 0.5, "same2": 0.5, "junk": None, "fine": 2.0,
             "x": None, "y": float("nan"), "Hello!": 2.0, "hello": 1.0}
    scorer = lambda prompts, completions, fields: [table[c] for c in completions]  # noqa: E731
    result = select_best_of_n(prompts, candidates, scorer)
    s = result.summary
    assert [row["messages"][-1]["content"] for row in result.sft_rows] == ["good", "same1", "fine", "Hello!"]
    assert [(p["chosen"], p["rejected"]) for p in result.pairs] == [("good", "bad")]
    assert s["empty_completions"] == 1 and s["unscored_completions"] == 3
    assert s["no_valid_score"] == 1 and s["ties_skipped"] == 2 and s["identical_skipped"] == 1
    # "fine" alone is best and worst of p2: a tie by itself
    assert s["mean_best"] == pytest.approx((3 + 0.5 + 2 + 2) / 4)
    assert s["mean_all"] == pytest.approx((3 - 1 + 1 + 0.5 + 0.5 + 2 + 2 + 1) / 8)
    assert s["mean_worst"] == pytest.approx((-1 + 0.5 + 2 + 1) / 4)
    assert result.items[3]["outcome"] == "no candidate could be scored"


def test_min_score_drops_weak_sft_rows_but_keeps_pairs():
    result = select_best_of_n([user("a"), user("b")], [["hi", "lo"], ["meh", "worse"]],
                              by_table({"hi": 5.0, "lo": 1.0, "meh": 2.0, "worse": 0.0}), min_score=3.0)
    assert [r["messages"][-1]["content"] for r in result.sft_rows] == ["hi"]
    assert len(result.pairs) == 2 and result.summary["below_min_score"] == 1


def test_reward_function_scorer_passes_fields():
    scorer = RewardFunctionScorer("numeric_match")
    fields = [{"answer_value": "4"}, {"answer_value": "9"}]
    assert scorer([user("2+2"), user("3*3")], ["it is 4", "#### 8"], fields) == [1.0, 0.0]


def test_judge_scorer_uses_the_pointwise_judge():
    from alignkit.judges import PointwiseJudge
    from tests.test_judges import ScriptedBackend

    judge = PointwiseJudge(ScriptedBackend(lambda c: "Score: 9" if "long answer" in c[-1]["content"] else "nope"),
                           max_retries=0)
    scorer = JudgeScorer(judge)
    assert scorer([user("q"), user("q")], ["long answer", "short"], [{}, {}]) == [9.0, None]


def test_reward_model_scorer_matches_the_head(tiny_model, tiny_tokenizer):
    import torch

    from alignkit.data import tokenize_prompt_response
    from alignkit.model.heads import ScalarHeadModel

    torch.manual_seed(0)
    rm = ScalarHeadModel(tiny_model)
    scorer = RewardModelScorer(rm, tiny_tokenizer, batch_size=2)
    prompts, texts = [user("the cat"), user("a dog is red"), user("hi")], ["yes", "no it is blue", "ok"]
    got = scorer(prompts, texts, [{}] * 3)
    for prompt, text, value in zip(prompts, texts, got):
        p, r, _ = tokenize_prompt_response(tiny_tokenizer, prompt, text, 1024)
        with torch.no_grad():
            expected = rm.sequence_scores(torch.tensor([p + r]))[0].item()
        assert value == pytest.approx(expected, abs=1e-5)


def test_best_of_n_with_a_tiny_model_writes_loadable_files(tiny_model, tiny_tokenizer, tmp_path):
    examples = [PromptExample(user(f"what is the capital of {c}"), {}, f"mem:{i}")
                for i, c in enumerate(["france", "italy", "spain"])]
    length = lambda prompts, completions, fields: [float(len(c)) for c in completions]  # noqa: E731
    result = best_of_n(tiny_model, tiny_tokenizer, examples, length, n=4, max_new_tokens=12, temperature=1.0)
    s = result.summary
    assert s["prompts"] == 3 and s["candidates"] == 12 and s["n"] == 4
    assert s["mean_best"] >= s["mean_all"] >= s["mean_worst"]
    for item in result.items:  # the best really is the longest candidate
        scored = [c for c in item["candidates"] if c["score"] is not None]
        if scored:
            best = max(c["score"] for c in scored)
            row = [r for r in result.sft_rows if r["source"] == item["source"]][0]
            assert len(row["messages"][-1]["content"]) == best
    paths = write_result(result, tmp_path / "out")
    assert json.loads(paths["summary"].read_text())["candidates"] == 12
    if result.sft_rows:
        chats, _ = load_examples(paths["sft"], kind="chat", on_error="fail")
        assert len(chats) == len(result.sft_rows)
    if result.pairs:
        pairs, _ = load_examples(paths["pairs"], kind="preference", on_error="fail")
        assert [p.chosen for p in pairs] == [p["chosen"] for p in result.pairs]


def test_sampling_is_seeded(tiny_model, tiny_tokenizer):
    from alignkit.best_of_n import sample_completions

    prompts = [user("hello the cat")]
    one = sample_completions(tiny_model, tiny_tokenizer, prompts, 3, temperature=1.0, max_new_tokens=6, seed=3)
    two = sample_completions(tiny_model, tiny_tokenizer, prompts, 3, temperature=1.0, max_new_tokens=6, seed=3)
    assert one == two and len(one[0]) == 3


def test_cli_best_of_n_end_to_end(tiny_model, tiny_tokenizer, tmp_path):
    from alignkit.cli import main
    from alignkit.model import save_model

    model_dir = save_model(tiny_model, tiny_tokenizer, tmp_path / "model")
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p}) for p in ["hello", "the cat is", "two plus two"]) + "\n")
    scorer_file = tmp_path / "scorer.py"
    scorer_file.write_text("def chars(prompts, completions, bonus=0.0, **fields):\n"
                           "    return [len(c) + bonus for c in completions]\n")
    out = tmp_path / "bon"
    code = main(["best-of-n", "--model", str(model_dir), "--data", str(data), "--n", "3", "--max-new-tokens", "8",
                 "--temperature", "1.0", "--scorer", f"reward:{scorer_file}:chars", "--scorer-arg", "bonus=0.5",
                 "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompts"] == 3 and summary["candidates"] == 9
    assert summary["scorer"].startswith("reward:")
    candidates = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
    assert all(c["score"] == len(c["text"]) + 0.5 for item in candidates for c in item["candidates"])
    assert (out / "sft.jsonl").exists() and (out / "pairs.jsonl").exists()
    with pytest.raises(SystemExit):
        main(["best-of-n", "--data", str(data), "--out", str(out)])  # --scorer is required
    assert main(["best-of-n", "--model", str(model_dir), "--data", str(data), "--scorer", "magic",
                 "--out", str(out)]) == 2
