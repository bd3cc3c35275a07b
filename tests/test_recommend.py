"""`alignkit recommend`: each kind of input gets the documented method, and its starter file is valid."""
import json

import pytest
import yaml

from alignkit.methods.registry import build_job
from alignkit.recommend import inspect_input, recommend

DEMOS = [{"messages": [{"role": "user", "content": f"How do I reset my password, take {i}?"},
                       {"role": "assistant", "content": "Open settings, choose security, then reset it."}]}
         for i in range(6)]
FACT_DEMOS = [{"prompt": f"What is the capital of country {i}?", "completion": f"The capital is City {i}."}
              for i in range(6)]
PAIRS = [{"prompt": f"Say hi {i}", "chosen": "Hello, how can I help?", "rejected": "Go away."} for i in range(6)]
HH = [{"chosen": f"\n\nHuman: hi {i}\n\nAssistant: Hello!", "rejected": f"\n\nHuman: hi {i}\n\nAssistant: No."}
      for i in range(6)]
RANKED = [{"prompt": f"Greet {i}", "responses": ["Hello there!", "hi", "no"]} for i in range(6)]
MATH = [{"question": f"What is {i} + 2?", "answer": f"{i} plus 2 is {i + 2}.\n#### {i + 2}"} for i in range(6)]
NUMBERS = [{"prompt": f"What is {i} + 2? Reply with a number.", "answer": str(i + 2)} for i in range(6)]
CAPITALS = [{"prompt": f"Which city is the capital of land {i}?", "answer": f"City {i}"} for i in range(6)]
PROMPTS = [{"prompt": f"Write a short poem about the number {i}."} for i in range(6)]
RUBRIC_ROWS = [{"prompt": f"Explain topic {i}.", "rubric": "Clear, correct, under 100 words."} for i in range(6)]


def _jsonl(folder, name, rows):
    path = folder / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture
def files(tmp_path):
    made = {name: _jsonl(tmp_path, f"{name}.jsonl", rows) for name, rows in {
        "demos": DEMOS, "fact_demos": FACT_DEMOS, "pairs": PAIRS, "hh": HH, "ranked": RANKED, "math": MATH,
        "numbers": NUMBERS, "capitals": CAPITALS, "prompts": PROMPTS, "rubric_rows": RUBRIC_ROWS}.items()}
    (tmp_path / "rubric.txt").write_text("A good answer is correct, kind and under 100 words.")
    made["rubric"] = str(tmp_path / "rubric.txt")
    reward_model = tmp_path / "rm"
    reward_model.mkdir()
    (reward_model / "head.json").write_text("{}")
    made["reward_model"] = str(reward_model)
    return made


# (inputs, method, kinds of the first input, words the reasons must contain) — the table of docs/choosing.md
CASES = [
    (["demos"], "sft", ["demonstrations"], "supervised fine-tuning"),
    (["fact_demos"], "sft", ["demonstrations"], "factuality-aware"),
    (["pairs"], "dpo", ["pairs"], "DPO learns the preference directly"),
    (["hh"], "dpo", ["pairs"], "DPO learns"),
    (["ranked"], "dpo", ["rankings"], "rankings"),
    (["demos", "pairs"], "sft+dpo", ["demonstrations"], "SFT on them first"),
    (["pairs", "prompts"], "rm+ppo", ["pairs"], "nobody labelled"),
    (["numbers"], "grpo", ["checkable"], "numeric_match"),
    (["capitals"], "grpo", ["checkable"], "factual_answer"),
    (["math"], "sft+grpo", ["demonstrations", "checkable"], "worked answers"),
    (["reward_model", "prompts"], "ppo", ["reward_model"], "KL penalty"),
    (["prompts", "rubric"], "grpo", ["prompts"], "LLM judge"),
    (["rubric_rows"], "grpo", ["prompts", "rubric"], "LLM judge"),
    (["prompts"], "none", ["prompts"], "nothing says which answers are good"),
    (["reward_model"], "none", ["reward_model"], "no prompts"),
]


@pytest.mark.parametrize("inputs, method, kinds, reason", CASES, ids=["+".join(c[0]) for c in CASES])
def test_each_kind_of_input_gets_the_documented_method(files, tmp_path, monkeypatch, inputs, method, kinds, reason):
    monkeypatch.chdir(tmp_path)
    answer = recommend([files[name] for name in inputs])
    assert answer.method == method
    assert answer.found[0].kinds == kinds
    assert reason in " ".join(answer.reasons)
    if answer.starter_kind == "job":
        job = build_job(None, yaml.safe_load(answer.starter), "starter")   # the starter is a valid job
        assert job.method == method
        assert job.data.train == files[inputs[0] if "reward_model" not in inputs else "prompts"] or \
            job.data.train in files.values()
    elif answer.starter_kind == "pipeline":
        from alignkit.pipeline import load_pipeline

        path = tmp_path / "pipeline.yaml"
        path.write_text(answer.starter)
        pipeline = load_pipeline(path)                                      # every stage validates
        assert "+".join(name for name in pipeline.stages if name != "eval") == method
    else:
        assert answer.starter == ""
    assert f"Recommended: {answer.title}" in answer.render()


def test_missing_and_unreadable_inputs_fail_with_one_clear_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
        recommend([str(tmp_path / "nope.jsonl")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"colour": "red"}) + "\n")
    with pytest.raises(Exception, match=r"bad.jsonl:1.*no row shape recognised"):
        inspect_input(str(bad))


def test_cli_prints_the_answer_and_writes_the_starter(files, tmp_path, capsys):
    from alignkit.cli import main

    out = tmp_path / "dpo.yaml"
    assert main(["recommend", "--data", files["pairs"], "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Recommended: DPO" in printed and "6 rows of preference pairs" in printed
    assert yaml.safe_load(out.read_text())["method"] == "dpo"
