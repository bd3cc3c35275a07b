"""Candidate generation: nc conditioning, round robin over models, retries, diversity metrics, the CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch

import alignkit.label.generate as generate_module
from alignkit.data import PromptExample
from alignkit.label.generate import (
    CandidateModel,
    candidate_diversity,
    clip_text,
    diversity_table,
    generate_candidates,
    lexical_similarity,
    nc_conversation,
)
from alignkit.label.tasks import read_tasks

PROMPT = [{"role": "user", "content": "How do I stay focused?"}]


def test_nc_conversation_lists_earlier_candidates_in_a_system_message():
    assert nc_conversation(PROMPT, []) == PROMPT
    conversation = nc_conversation(PROMPT, ["Use a timer.\n\nWork in  25-minute blocks.", "word " * 100], context_chars=40)
    assert conversation[1:] == PROMPT and conversation[0]["role"] == "system"
    system = conversation[0]["content"]
    assert "- Use a timer. Work in 25-minute blocks.\n" in system  # whitespace collapsed, one line per answer
    assert "- " + "word " * 6 + "word ...\n" in system  # clipped to 40 characters, then back to a whole word
    assert "clearly different approach or viewpoint" in system
    with_system = nc_conversation([{"role": "system", "content": "Be brief."}] + PROMPT, ["Use a timer."])
    assert len(with_system) == 2 and with_system[0]["content"].startswith("Be brief.\n\nAnswers to the next request")
    assert clip_text("short", 10) == "short" and clip_text("abcdefghijkl", 5) == "abcde ..."


class Scripted:
    """Stands in for `_sample`: records every conversation per model and answers from a script."""

    def __init__(self, replies):
        self.calls = []
        self.replies = replies

    def __call__(self, candidate_model, conversations, settings):
        self.calls.append((candidate_model.name, conversations))
        return [self.replies(candidate_model.name, conversation) for conversation in conversations]


def examples(count):
    return [PromptExample(prompt=[{"role": "user", "content": f"question {i}"}], fields={"id": f"q{i}"} if i else {},
                          source=f"prompts.jsonl:{i + 1}") for i in range(count)]


def test_nc_conditions_each_candidate_on_the_earlier_ones_round_robin_over_models(monkeypatch):
    def reply(name, conversation):
        system = conversation[0]["content"] if conversation[0]["role"] == "system" else ""
        earlier = sum(line.startswith("- ") for line in system.splitlines())
        return f"{name} answer {earlier} to {conversation[-1]['content']}"

    scripted = Scripted(reply)
    monkeypatch.setattr(generate_module, "_sample", scripted)
    models = [CandidateModel("m1", None, None), CandidateModel("m2", None, None)]
    tasks, report = generate_candidates(models, examples(2), candidates=3, diversity="nc")
    # three steps (candidate 0, 1, 2), each one batch over both prompts, from m1, m2, m1
    assert [(name, len(batch)) for name, batch in scripted.calls] == [("m1", 2), ("m2", 2), ("m1", 2)]
    step_three = scripted.calls[2][1][1]
    assert step_three[0]["role"] == "system" and "m1 answer 0 to question 1" in step_three[0]["content"]
    assert "m2 answer 1 to question 1" in step_three[0]["content"] and step_three[1:] == examples(2)[1].prompt
    assert [[(c.text, c.model, c.metadata) for c in t.candidates] for t in tasks][1] == [
        ("m1 answer 0 to question 1", "m1", {"order": 0}), ("m2 answer 1 to question 1", "m2", {"order": 1}),
        ("m1 answer 2 to question 1", "m1", {"order": 2})]
    assert tasks[1].id == "q1" and tasks[0].id == "sha256:" + tasks[0].fingerprint()[:16]
    assert tasks[0].metadata == {"diversity": "nc", "source": "prompts.jsonl:1"}
    assert report["tasks"] == 2 and report["empty_dropped"] == 0


def test_nc_pool_keeps_the_draw_least_like_the_earlier_candidates(monkeypatch):
    scripts = {0: ["red apples are sweet"],  # the first candidate: one draw, nothing to compare with
               1: ["red apples are tasty", "blue sky over the sea", "red apples and pears"],
               2: ["blue sky over the sea today", "green grass grows", "red apples are sweet sweet"]}
    steps = []

    def reply(name, conversation):
        system = conversation[0]["content"] if conversation[0]["role"] == "system" else ""
        step = sum(line.startswith("- ") for line in system.splitlines())
        steps.append(step)
        return scripts[step][steps.count(step) - 1]

    monkeypatch.setattr(generate_module, "_sample", Scripted(reply))
    tasks, report = generate_candidates([CandidateModel("m1", None, None)], examples(1), candidates=3,
                                        diversity="nc", nc_pool=3)
    assert steps == [0, 1, 1, 1, 2, 2, 2]  # one draw for the first candidate, three for each later one
    assert [c.text for c in tasks[0].candidates] == ["red apples are sweet", "blue sky over the sea", "green grass grows"]
    assert report["nc_pool"] == 3
    with pytest.raises(ValueError, match="applies to --diversity nc only"):
        generate_candidates([CandidateModel("m1", None, None)], examples(1), diversity="independent", nc_pool=2)


def test_independent_samples_see_only_the_prompt_and_empty_samples_are_redrawn_then_dropped(monkeypatch):
    attempts = {}

    def reply(name, conversation):
        key = conversation[-1]["content"]
        attempts[key] = attempts.get(key, 0) + 1
        if key == "question 0":
            return ""  # never answers: its three candidates are dropped after one redraw, and the task with them
        if key == "question 1" and attempts[key] == 1:
            return ""  # the first draw is empty, the redraw is not
        return f"{name} says {attempts[key]}"

    scripted = Scripted(reply)
    monkeypatch.setattr(generate_module, "_sample", scripted)
    tasks, report = generate_candidates([CandidateModel("m1", None, None)], examples(3), candidates=3,
                                        diversity="independent", retries=1)
    assert all(conversation == example.prompt for _, batch in scripted.calls for conversation in batch
               for example in examples(3) if conversation[-1] == example.prompt[-1])
    assert all(conversation[0]["role"] == "user" for _, batch in scripted.calls for conversation in batch)
    assert [t.id for t in tasks] == ["q1", "q2"] and report["tasks_dropped"] == 1 and report["empty_dropped"] == 3
    assert attempts["question 0"] == 6  # 3 candidates x (1 draw + 1 redraw)
    with pytest.raises(ValueError, match="at least 2"):
        generate_candidates([CandidateModel("m1", None, None)], examples(1), candidates=1)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        generate_candidates([CandidateModel("m1", None, None)], examples(1), temperature=0)


def test_diversity_metrics_by_hand(tiny_model, tiny_tokenizer):
    assert lexical_similarity("a b", "a c") == pytest.approx(0.5)
    assert lexical_similarity("The cat, the CAT", "the cat") == pytest.approx(1.0)
    assert lexical_similarity("x y", "z") == 0.0
    same = ["red cat", "red cat"]
    different = ["one two three", "four five six", "one four"]
    result = candidate_diversity([same, different, ["lonely"]])  # a set of one is not a set to compare
    assert result["prompts"] == 2 and result["candidates"] == 5
    assert result["distinct_1"] == pytest.approx((2 / 4 + 6 / 8) / 2)
    assert result["distinct_2"] == pytest.approx((1 / 2 + 5 / 5) / 2)
    pair_similarities = [0.0, 1 / math.sqrt(6), 1 / math.sqrt(6)]
    assert result["lexical_similarity"] == pytest.approx((1.0 + sum(pair_similarities) / 3) / 2)
    assert result["mean_words"] == pytest.approx((2 + 2 + 3 + 3 + 2) / 5)
    embedded = candidate_diversity([same, different], embedder=CandidateModel("tiny", tiny_model, tiny_tokenizer))
    vectors = generate_module.text_embeddings(tiny_model, tiny_tokenizer, different)
    cosine = torch.nn.functional.cosine_similarity
    expected_different = (cosine(vectors[0], vectors[1], dim=0) + cosine(vectors[0], vectors[2], dim=0)
                          + cosine(vectors[1], vectors[2], dim=0)) / 3
    assert embedded["embedding_similarity"] == pytest.approx((1.0 + float(expected_different)) / 2, abs=1e-5)
    table = diversity_table({"nc": embedded, "independent": result})
    assert table.splitlines()[0].startswith("| sampling | prompts | candidates | distinct-1")
    assert "| nc | 2 | 5 |" in table and "embedding similarity" in table


def test_text_embeddings_ignore_padding(tiny_model, tiny_tokenizer):
    alone = generate_module.text_embeddings(tiny_model, tiny_tokenizer, ["red cat"])
    batched = generate_module.text_embeddings(tiny_model, tiny_tokenizer, ["red cat", "one two three four five six"])
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-4)


def test_cli_generate_with_two_models_writes_a_tasks_file_serve_reads(tmp_path, tiny_tokenizer, capsys, monkeypatch):
    from alignkit.cli import main
    from tests.helpers import make_tiny_model

    monkeypatch.setenv("ALIGNKIT_HOME", str(tmp_path / "home"))
    for name, seed in (("m1", 0), ("m2", 1)):
        make_tiny_model(tiny_tokenizer, seed=seed).save_pretrained(tmp_path / name)
        tiny_tokenizer.save_pretrained(tmp_path / name)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"cat dog {i}"}) + "\n" for i in range(3)))
    out = tmp_path / "tasks.jsonl"
    models = f"{tmp_path / 'm1'},{tmp_path / 'm2'}"
    assert main(["label", "generate", "--prompts", str(prompts), "--models", models, "--candidates", "3",
                 "--diversity", "nc", "--compare", "--max-new-tokens", "8", "--temperature", "1.0",
                 "--out", str(out), "--report", str(tmp_path / "report.json"), "--device", "cpu"]) == 0
    printed = capsys.readouterr()
    assert "| nc | 3 | 9 |" in printed.out and "| independent | 3 | 9 |" in printed.out
    tasks = read_tasks(out)
    assert [t.id for t in tasks] == ["p0", "p1", "p2"]
    assert [c.model for c in tasks[0].candidates] == [str(tmp_path / "m1"), str(tmp_path / "m2"), str(tmp_path / "m1")]
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["diversity"]) == {"nc", "independent"} and report["generation"]["nc"]["candidates"] == 3
    assert main(["label", "generate", "--prompts", str(prompts), "--models", f"{tmp_path / 'm1'},{tmp_path / 'm1'}",
                 "--out", str(out)]) == 2
    assert "names a model twice" in capsys.readouterr().err
