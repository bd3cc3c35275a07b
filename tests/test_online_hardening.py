"""GRPO/PPO jobs: prompts follow the same length rule as every other row (cut or skipped, counted), rewards are checked before
anything loads, a failing reward is one line, and a secret passed to a reward never reaches the disk."""
import json

import pytest

from alignkit.cli import main
from alignkit.data import PromptExample
from alignkit.methods import build_job
from alignkit.methods.grpo import GRPORecipe
from alignkit.rewards import CombinedReward
from tests.helpers import save_tiny_model

SHORT = [PromptExample(prompt=[{"role": "user", "content": word}], fields={}, source=f"mem:{i}")
         for i, word in enumerate("hello cat dog red".split())]
LONG = PromptExample(prompt=[{"role": "user", "content": "the cat " * 200}], fields={}, source="mem:long")


def recipe(tiny_model, tiny_tokenizer, **data):
    job = build_job("grpo", {"num_generations": 2, "prompts_per_step": 2, "max_completion_length": 8,
                             "rollout_backend": "hf", "data": {"max_length": 64, **data},
                             "training": {"progress": False}})
    return GRPORecipe(job, model=tiny_model, tokenizer=tiny_tokenizer, train=SHORT + [LONG], validation=[LONG],
                      reward=CombinedReward([lambda p, c, **f: [0.0] * len(c)]))


def test_long_prompts_are_cut_from_the_left_or_skipped_and_counted(tiny_model, tiny_tokenizer):
    cutting = recipe(tiny_model, tiny_tokenizer)  # data.max_length 64 - 8 sampled tokens = 56
    assert [e.source for e in cutting.train_examples][-1] == "mem:long"
    whole = cutting.encode_prompt(LONG.prompt)
    assert len(whole) > 56 and cutting.train_prompt_ids[-1] == whole[-56:]  # the end of the conversation stays
    assert max(len(ids) for ids in cutting.train_prompt_ids) == 56
    assert ("train prompts: 1 of 5 cut to their last 56 tokens (prompt + 8 sampled tokens <= data.max_length 64): "
            "mem:long") in cutting.notes
    assert "validation prompts: 1 of 1 cut" in " ".join(cutting.notes)
    skipping = recipe(tiny_model, tiny_tokenizer, on_error="skip")
    assert [e.source for e in skipping.train_examples] == ["mem:0", "mem:1", "mem:2", "mem:3"]
    assert skipping.validation_examples == []
    assert any(note.startswith("train prompts: 1 of 5 longer than 56 tokens skipped (data.on_error: skip)")
               for note in skipping.notes)
    explicit = recipe(tiny_model, tiny_tokenizer, on_error="skip", max_prompt_length=40)  # asks for the cut
    assert len(explicit.train_examples) == 5 and len(explicit.train_prompt_ids[-1]) == 40


def test_the_default_max_length_bounds_prompts_unless_thinking_needs_more():
    assert build_job("grpo", {"max_completion_length": 100}).prompt_token_limit() == 1024 - 100
    assert build_job("grpo", {"thinking_level": "high"}).prompt_token_limit() is None  # 4096 + 256 > 1024
    with pytest.raises(Exception, match="leaves no room for a prompt"):
        build_job("grpo", {"thinking_level": "high", "data": {"max_length": 2048}})


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    save_tiny_model(root / "tiny")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": w, "answer": "yes"}) + "\n"
                                                for w in "hello cat dog red one two".split()))
    (root / "reward.py").write_text(
        "def keyed(prompts, completions, api_key=None, **fields):\n"
        "    assert api_key == 'sk-live-1234'\n"
        "    return [float(len(c) % 3) for c in completions]\n\n"
        "def boom(prompts, completions, **fields):\n"
        "    raise ZeroDivisionError('division by zero in the grader')\n\n"
        "def half(prompts, completions, **fields):\n"
        "    return [None if i % 2 else 1.0 for i in range(len(completions))]\n")
    return root


def grpo(assets, run, reward):
    return ["grpo", "--set", f"model.name_or_path={assets / 'tiny'}", "--set", f"data.train={assets / 'prompts.jsonl'}",
            "--set", "data.validation_fraction=0", "--set", f"training.output_dir={run}", "--set", "training.max_steps=1",
            "--set", "training.progress=false", "--set", "training.tensorboard=false", "--set", "num_generations=2",
            "--set", "prompts_per_step=2", "--set", "max_completion_length=4", "--set", "training.save_steps=1",
            "--set", f"rewards=[{reward}]"]


def test_a_secret_given_to_a_reward_is_used_but_never_written(assets, tmp_path, capsys):
    run = tmp_path / "run"
    spec = f"{{name: '{assets / 'reward.py'}:keyed', kwargs: {{api_key: sk-live-1234}}}}"
    assert main(grpo(assets, run, spec)) == 0
    written = [p for p in run.rglob("*") if p.is_file() and b"sk-live-1234" in p.read_bytes()]
    assert written == []
    assert "api_key: <redacted>" in (run / "config.yaml").read_text()
    assert "sk-live-1234" not in capsys.readouterr().out


def test_a_rejected_reward_spec_fails_before_anything_is_loaded_or_written(assets, tmp_path, capsys):
    run = tmp_path / "rejected"
    spec = f"{{name: '{assets / 'reward.py'}:keyed', kwargs: {{api_key: sk-live-1234, colour: red}}}}"
    assert main(grpo(assets, run, spec)) == 2
    assert "has no option 'colour'" in capsys.readouterr().err and not run.exists()
    assert main(["grpo", "--set", "rewards=[{name: numeric_mach}]", "--print-config"]) == 2
    error = capsys.readouterr().err
    assert "unknown reward function 'numeric_mach'. Did you mean 'numeric_match'?" in error


def test_a_failing_reward_function_is_one_line_not_a_traceback(assets, tmp_path, capsys):
    assert main(grpo(assets, tmp_path / "run", f"{{name: '{assets / 'reward.py'}:boom'}}")) == 2
    error = capsys.readouterr().err
    error = error[error.index("alignkit: error:"):]  # after the model loading's progress bar
    assert error.startswith("alignkit: error: reward function 'boom' failed on item 0: "
                            "ZeroDivisionError: division by zero in the grader")
    assert "Traceback" not in error and len(error.splitlines()) <= 3


def test_reward_failures_under_zero_are_counted_in_the_run_report(assets, tmp_path):
    run = tmp_path / "run"
    args = grpo(assets, run, f"{{name: '{assets / 'reward.py'}:half'}}") + ["--set", "reward_on_error=zero"]
    assert main(args) == 0
    report = (run / "report.md").read_text()
    assert "## Failures (contained)" in report
    assert "- reward half: 2 of 4 items failed in 1 batches (0 not called after 3 failures in a row)" in report
