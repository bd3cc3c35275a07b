"""Constitutional AI: file validation, the revise chain, diverse candidates and judged pairs, and
the written files going unchanged through the SFT and DPO recipes."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from alignkit.constitution import (
    ConstitutionError,
    clean_revision,
    critique_and_revise,
    load_constitution,
    near_duplicates,
    parse_constitution,
    preference_pairs,
)
from alignkit.data import load_examples
from alignkit.judges import PairwiseJudge

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def principle(name, **extra):
    return {"name": name, "critique_request": f"critique {name}", "revision_request": f"revise {name}", **extra}


class RecordingBackend:
    """A scripted generator: answers by what the last user turn asks; records (conversation, temperature)."""

    identity = "scripted:gen"

    def __init__(self, empty_revision_for=(), same_candidates=False, parrot_for=()):
        self.requests = []
        self.empty_revision_for = set(empty_revision_for)
        self.parrot_for = set(parrot_for)
        self.same_candidates = same_candidates

    def complete(self, conversations, temperature=0.0, max_tokens=512):
        out = []
        for conversation in conversations:
            self.requests.append((conversation, temperature))
            last = conversation[-1]["content"]
            question = next(m["content"] for m in conversation if m["role"] == "user")
            turn = sum(m["role"] == "assistant" for m in conversation)  # 0 reply, 1 critique, 2 revision
            if turn == 1:
                out.append(f"The reply ignores '{last}'.")
            elif turn == 2 and question in self.parrot_for:
                out.append(conversation[-2]["content"] + " ")  # repeats its critique
            elif turn == 2:
                out.append("" if question in self.empty_revision_for else f"Revised response: better answer to {question}")
            elif self.same_candidates:
                out.append(f"An answer to {question}.")
            else:
                style = conversation[0]["content"] if conversation[0]["role"] == "system" else "no system"
                out.append(f"{question} answered at temperature {temperature} with {style} words {len(out)}")
        return out


# -- the file -------------------------------------------------------------------------------------------------


def test_example_constitution_and_prompts_are_valid():
    constitution = load_constitution(EXAMPLES / "constitution.yaml")
    assert 4 <= len(constitution.principles) <= 6
    assert len({p.name for p in constitution.principles}) == len(constitution.principles)
    assert len({(s.temperature, s.system) for s in constitution.candidate_styles}) == len(constitution.candidate_styles)
    prompts, report = load_examples(EXAMPLES / "constitution_prompts.jsonl", kind="prompt", on_error="fail")
    assert 20 <= len(prompts) <= 30 and report.skipped == 0


@pytest.mark.parametrize("data, message", [
    ({"principles": [principle("a"), {"name": "b", "revision_request": "r"}]},
     r"principles\[1\] \('b'\): missing key 'critique_request'"),
    ({"principles": [{"critique_request": "c"}]}, r"principles\[0\]: missing key 'revision_request'"),
    ({"principles": [principle("a", critque_request="x")]},
     r"principles\[0\] \('a'\): unknown key 'critque_request' \(did you mean 'critique_request'\?\)"),
    ({"principles": [principle("a", critique_request="  ")]}, r"'critique_request' is empty"),
    ({"principles": [principle("a", revision_request=3)]}, r"'revision_request' must be text"),
    ({"principles": []}, "non-empty list"),
    ({"principle": [principle("a")]}, r"unknown key 'principle' \(did you mean 'principles'\?\)"),
    ({"principles": [principle("a"), principle("a")]}, "used twice"),
    ({"principles": ["be nice"]}, r"principles\[0\]: each principle must be a mapping"),
    ({"principles": [principle("a")], "candidate_styles": [{"temperature": -1}]},
     r"candidate_styles\[0\]: 'temperature' must be a number"),
    ("just text", "expected a mapping"),
])
def test_constitution_errors_name_the_principle_and_key(data, message):
    with pytest.raises(ConstitutionError, match=message):
        parse_constitution(data, "c.yaml")


def test_constitution_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_constitution(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("principles: [unclosed\n")
    with pytest.raises(ConstitutionError, match="not valid YAML"):
        load_constitution(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- critique_request: c\n  revision_request: r\n")
    constitution = load_constitution(listed)
    assert constitution.principles[0].name == "principle-0"
    assert "c" in constitution.principles[0].preference


def test_clean_revision_and_near_duplicates():
    assert clean_revision("Revised response: Hello.") == "Hello."
    assert clean_revision("**Revision:** Fine") == "Fine"
    assert clean_revision("Here is the revised reply: ok") == "ok"
    assert clean_revision("Revisions are hard: yes") == "Revisions are hard: yes"
    assert near_duplicates("Hello, World!", "hello world", 0.99)
    assert near_duplicates("the cat sat on the mat today", "the cat sat on the mat", 0.8)
    assert not near_duplicates("use a timer for six minutes", "ask a doctor first", 0.8)


# -- revise -------------------------------------------------------------------------------------------------------


def test_revise_keeps_the_chain_and_samples_principles_with_the_seed():
    constitution = parse_constitution({"principles": [principle(n) for n in "abcde"]})
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(8)]
    backend = RecordingBackend(empty_revision_for={"question 3"}, parrot_for={"question 5"})
    rows, summary = critique_and_revise(backend, constitution, prompts, rounds=2, seed=7)
    assert summary["prompts"] == 8 and summary["rows"] == 6 and summary["dropped"] == 2
    assert summary["dropped_reasons"] == {"empty revision in round 1": 1, "the revision repeats the critique": 1}
    rng = random.Random(7)
    expected = [[constitution.principles[rng.randrange(5)].name for _ in range(2)] for _ in prompts]
    kept = [i for i in range(8) if i not in (3, 5)]
    for row, i in zip(rows, kept):
        chain = row["constitution"]
        assert [step["principle"] for step in chain["steps"]] == expected[i]
        assert chain["initial"].startswith(f"question {i} answered")
        assert row["messages"] == [*prompts[i], {"role": "assistant", "content": f"better answer to question {i}"}]
        assert chain["steps"][0]["critique"] == f"The reply ignores 'critique {expected[i][0]}'."
    # the revision request sees the prompt, the reply, the critique request and the critique
    revision_request = [c for c, _ in backend.requests if c[-1]["content"].startswith("revise")][0]
    assert [m["role"] for m in revision_request] == ["user", "assistant", "user", "assistant", "user"]
    again, _ = critique_and_revise(RecordingBackend(empty_revision_for={"question 3"}, parrot_for={"question 5"}),
                                   constitution, prompts, rounds=2, seed=7)
    assert again == rows


# -- pairs --------------------------------------------------------------------------------------------------------


class PreferShortJudgeBackend:
    """Judge backend: prefers the shorter reply, regardless of position; says tie on request."""

    identity = "scripted:judge"

    def __init__(self):
        self.calls = 0
        self.texts = []

    def complete(self, conversations, temperature=0.0, max_tokens=512):
        self.calls += len(conversations)
        out = []
        for conversation in conversations:
            text = conversation[-1]["content"]
            self.texts.append(text)
            a = text.split("<reply_A>")[1].split("</reply_A>")[0].strip()
            b = text.split("<reply_B>")[1].split("</reply_B>")[0].strip()
            if "tie please" in text:
                out.append("Verdict: tie")
            else:
                out.append("Shorter wins.\nVerdict: " + ("A" if len(a) < len(b) else "B"))
        return out


def test_pairs_use_diverse_styles_and_judge_both_orders():
    constitution = parse_constitution({
        "principles": [principle("a", preference="Which is shorter?")],
        "candidate_styles": [{"name": "cold", "temperature": 0.2},
                             {"name": "hot", "temperature": 1.3, "system": "Be long-winded and elaborate."}]})
    prompts = [[{"role": "user", "content": "what is rain"}], [{"role": "user", "content": "tie please"}],
               [{"role": "system", "content": "You are kind."}, {"role": "user", "content": "why"}]]
    generator, judge_backend = RecordingBackend(), PreferShortJudgeBackend()
    judge = PairwiseJudge(judge_backend)
    rows, summary = preference_pairs(generator, judge, constitution, prompts, num_candidates=2, seed=1)
    temperatures = sorted({t for _, t in generator.requests})
    assert temperatures == [0.2, 1.3]
    hot = [c for c, t in generator.requests if t == 1.3]
    assert hot[0][0] == {"role": "system", "content": "Be long-winded and elaborate."}
    assert hot[2][0]["content"] == "You are kind.\n\nBe long-winded and elaborate."  # appended to the prompt's own
    assert summary["judged_pairs"] == 3 and summary["pairs"] == 2 and summary["ties"] == 1
    assert judge_backend.calls == 6  # both orders
    for row in rows:
        assert len(row["chosen"]) < len(row["rejected"])
        assert row["constitution"]["chosen_style"] == "cold" and row["constitution"]["verdicts"] in (["A", "B"], ["B", "A"])
        assert all(m["content"] != "Be long-winded and elaborate." for m in row["prompt"])  # style not in the prompt
        assert row["constitution"]["preference"] == "Which is shorter?"
    assert all("Which is shorter?" in text for text in judge_backend.texts)  # the principle's question
    rows_one, summary_one = preference_pairs(RecordingBackend(), PairwiseJudge(PreferShortJudgeBackend()),
                                             constitution, prompts, both_orders=False)
    assert summary_one["judge"]["items"] == 3 and len(rows_one) == 2


def test_pairs_drop_near_duplicates_and_inconsistent_verdicts():
    constitution = parse_constitution({"principles": [principle("a")]})
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(3)]
    rows, summary = preference_pairs(RecordingBackend(same_candidates=True), PairwiseJudge(PreferShortJudgeBackend()),
                                     constitution, prompts, num_candidates=3)
    assert rows == [] and summary["near_duplicate_pairs"] == 9 and summary["judged_pairs"] == 0

    class AlwaysA:
        identity = "scripted:first"

        def complete(self, conversations, temperature=0.0, max_tokens=512):
            return ["Verdict: A"] * len(conversations)

    rows, summary = preference_pairs(RecordingBackend(), PairwiseJudge(AlwaysA()), constitution, prompts)
    assert rows == [] and summary["inconsistent"] == 3
    with pytest.raises(ValueError, match="at least 2"):
        preference_pairs(RecordingBackend(), PairwiseJudge(AlwaysA()), constitution, prompts, num_candidates=1)


# -- the files go through sft and dpo unchanged ---------------------------------------------------------------------


def _write(path, rows):
    from alignkit.best_of_n import write_jsonl

    return write_jsonl(path, rows)


def _train_one_step(method, data_path, tmp_path):
    from alignkit.engine import Engine
    from alignkit.methods import load_job
    from tests.helpers import make_tiny_model, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(tokenizer)
    overrides = [f"data.train={data_path}", f"training.output_dir={tmp_path / method}", "training.max_steps=1",
                 "training.batch_size=2", "training.progress=false", "training.tensorboard=false",
                 "training.eval_at_start=false", "data.validation_fraction=0", "data.max_length=256", "lora.enabled=false"]
    if method == "sft":
        from alignkit.methods.sft import SFTRecipe as Recipe
    else:
        Recipe = pytest.importorskip("alignkit.methods.dpo").DPORecipe
    job = load_job(method, None, overrides)
    recipe = Recipe(job, model=model, tokenizer=tokenizer)
    result = Engine(job.training, recipe, tmp_path / method).train()
    assert result["steps"] == 1
    return result


def test_written_files_load_and_train(tmp_path):
    constitution = load_constitution(EXAMPLES / "constitution.yaml")
    examples, _ = load_examples(EXAMPLES / "constitution_prompts.jsonl", kind="prompt", limit=4)
    prompts = [e.prompt for e in examples]
    sft_rows, _ = critique_and_revise(RecordingBackend(), constitution, prompts)
    pair_rows, _ = preference_pairs(RecordingBackend(), PairwiseJudge(PreferShortJudgeBackend()), constitution, prompts)
    assert len(sft_rows) == 4 and len(pair_rows) == 4
    sft_path, pairs_path = _write(tmp_path / "sft.jsonl", sft_rows), _write(tmp_path / "pairs.jsonl", pair_rows)
    chats, report = load_examples(sft_path, kind="chat", on_error="fail")
    assert report.kept == 4 and chats[0].messages[-1]["content"].startswith("better answer to")
    pairs, report = load_examples(pairs_path, kind="preference", on_error="fail")
    assert report.kept == 4 and pairs[0].prompt == prompts[0]
    _train_one_step("sft", sft_path, tmp_path)
    _train_one_step("dpo", pairs_path, tmp_path)


# -- the CLI on a tiny model ---------------------------------------------------------------------------------------


def test_cli_constitution_revise_and_pairs(tiny_model, tiny_tokenizer, tmp_path):
    from alignkit.cli import main
    from alignkit.model import save_model

    model_dir = save_model(tiny_model, tiny_tokenizer, tmp_path / "model")
    common = ["--constitution", str(EXAMPLES / "constitution.yaml"), "--data", str(EXAMPLES / "constitution_prompts.jsonl"),
              "--model", str(model_dir), "--limit", "3", "--max-new-tokens", "6"]
    assert main(["constitution", "revise", *common, "--out", str(tmp_path / "rev")]) == 0
    summary = json.loads((tmp_path / "rev" / "summary.json").read_text())
    assert summary["prompts"] == 3 and summary["rows"] + summary["dropped"] == 3
    rows = [json.loads(line) for line in (tmp_path / "rev" / "sft.jsonl").read_text().splitlines()]
    assert all(len(row["constitution"]["steps"]) == 1 for row in rows)
    assert main(["constitution", "pairs", *common, "--judge-method", "logprobs", "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "pairs")]) == 0
    summary = json.loads((tmp_path / "pairs" / "summary.json").read_text())
    assert summary["prompts"] == 3 and summary["candidate_pairs"] == 3
    assert summary["pairs"] + summary["near_duplicate_pairs"] + summary["ties"] + summary["inconsistent"] \
        + summary["malformed"] + (3 - summary["judged_pairs"] - summary["near_duplicate_pairs"]) == 3
    assert (tmp_path / "pairs" / "pairs.jsonl").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("principles:\n  - name: x\n    revision_request: r\n")
    assert main(["constitution", "check", "--constitution", str(bad)]) == 2
