"""Hostile or careless input gets one clear line naming what is wrong and where: non-finite numbers,
keys written twice, unknown placeholders, alias case, secrets, undecodable CSV rows, missing paths."""
import json
import time

import pytest
import yaml

from alignkit.cli import main
from alignkit.config import ConfigError, job_to_yaml, redact_secret_text
from alignkit.methods import load_job
from alignkit.data import DataError, load_examples


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- 7: non-finite numbers

@pytest.mark.parametrize("value", [".inf", ".nan", "-.inf"])
def test_non_finite_config_numbers_are_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"training.learning_rate: .*finite"):
        load_job("sft", None, [f"training.learning_rate={value}"])
    with pytest.raises(ConfigError, match=r"lora.alpha: .*finite"):
        load_job("sft", None, [f"lora.alpha={value}"])


@pytest.mark.parametrize("margin", ["NaN", '"inf"', "Infinity", '"-Infinity"'])
def test_non_finite_margins_are_refused_naming_the_row(tmp_path, margin):
    good = '{"prompt": "hi", "chosen": "a", "rejected": "b", "margin": 1.5}\n'
    bad = '{"prompt": "hi", "chosen": "c", "rejected": "d", "margin": %s}\n' % margin
    path = write(tmp_path, "pairs.jsonl", good + bad)
    with pytest.raises(DataError, match=r"pairs.jsonl:2: field 'margin': expected a finite number"):
        load_examples(path, kind="preference")
    examples, report = load_examples(path, kind="preference", on_error="skip")
    assert [e.margin for e in examples] == [1.5] and report.skipped == 1


# ----------------------------------------------------------------------------- 9: keys written twice

def test_a_key_written_twice_is_refused_naming_it_and_both_lines(tmp_path):
    path = write(tmp_path, "job.yaml", "method: sft\ntraining:\n  max_steps: 10\n  learning_rate: 0.1\n"
                                       "lora: {rank: 4}\ntraining:\n  max_steps: 4\n")
    with pytest.raises(ConfigError, match=r"job.yaml: key 'training' is written twice \(lines 2 and 6\)"):
        load_job("sft", path)
    nested = write(tmp_path, "nested.yaml", "training:\n  max_steps: 10\n  max_steps: 4\n")
    with pytest.raises(ConfigError, match=r"key 'training.max_steps' is written twice \(lines 2 and 3\)"):
        load_job("sft", nested)


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    text = "base: &base {max_steps: 3}\ntraining:\n  <<: *base\n  learning_rate: 0.01\n"
    raw = yaml.safe_load(text)
    assert raw["training"] == {"max_steps": 3, "learning_rate": 0.01}
    job = load_job("sft", write(tmp_path, "merge.yaml", text.split("\n", 1)[1].replace("*base", "{max_steps: 3}")))
    assert job.training.max_steps == 3 and job.training.learning_rate == 0.01


# ----------------------------------------------------------------------------- 10: smaller items

def test_unknown_output_dir_placeholder_is_a_config_error_not_a_key_error():
    with pytest.raises(ConfigError, match=r"training.output_dir: unknown placeholder \{foo\}; known: \{method\}, \{time\}"):
        load_job("sft", None, ["training.output_dir=runs/{foo}"])
    with pytest.raises(ConfigError, match="training.output_dir"):
        load_job("sft", None, ["training.output_dir=runs/{method"])
    assert str(load_job("sft", None, ["training.output_dir=runs/{method}-x"]).output_dir()) == "runs/sft-x"


def test_learning_rate_multiplier_conflict_is_one_plain_line(capsys):
    code = main(["grpo", "--set", "learningRateMultiplier=2", "--set", "training.learning_rate=0.5",
                 "--set", "rewards=[{name: numeric_match}]", "--print-config"])
    error = capsys.readouterr().err
    assert code == 2
    assert "learningRateMultiplier (2.0 x 1e-05 = 2e-05) and training.learning_rate (0.5) disagree" in error
    assert ": Value error" not in error and "Value error," not in error
    assert "'rewards'" not in error  # the raw config is not dumped


def test_thinking_level_alias_agrees_whatever_the_case():
    job = load_job("grpo", None, ["thinkingLevel=HIGH", "thinking_level=high", "rewards=[{name: numeric_match}]"])
    assert job.thinking_level == "high"
    with pytest.raises(ConfigError, match="disagree"):
        load_job("grpo", None, ["thinkingLevel=low", "thinking_level=high", "rewards=[{name: numeric_match}]"])


def test_secrets_in_reward_options_are_never_written_out(tmp_path, capsys):
    reward = write(tmp_path, "reward.py", "def graded(prompts, completions, api_key=None, hf_token=None, "
                                          "max_tokens=16, api_key_env=None, **fields):\n    return [0.0] * len(completions)\n")
    spec = (f"rewards=[{{name: '{reward}:graded', kwargs: {{api_key: sk-live-1234, hf_token: hf_abcd, "
            "api_key_env: JUDGE_KEY, max_tokens: 16}}]")
    job = load_job("grpo", None, [spec])
    assert job.rewards[0].kwargs["api_key"] == "sk-live-1234"  # the job itself keeps it for the run
    text = job_to_yaml(job)
    assert "sk-live-1234" not in text and "hf_abcd" not in text
    kwargs = yaml.safe_load(text)["rewards"][0]["kwargs"]
    assert kwargs == {"api_key": "<redacted>", "hf_token": "<redacted>", "api_key_env": "JUDGE_KEY", "max_tokens": 16}
    # a rejected job does not echo the secret in its error either
    with pytest.raises(ConfigError) as rejected:
        load_job("grpo", None, [spec.replace("max_tokens: 16", "max_tokens: 16, colour: red")])
    assert "has no option 'colour'" in str(rejected.value) and "sk-live-1234" not in str(rejected.value)


def test_secrets_in_a_command_line_are_redacted_and_nothing_else():
    command = ("alignkit grpo --set \"rewards=[{name: x, kwargs: {api_key: sk-live-1234, max_tokens: 16, "
               "api_key_env: KEY}}]\" --set model.hf_token=hf_abcd --set data.max_length=512 --set pad_token=x")
    assert redact_secret_text(command) == (
        "alignkit grpo --set \"rewards=[{name: x, kwargs: {api_key: <redacted>, max_tokens: 16, "
        "api_key_env: KEY}}]\" --set model.hf_token=<redacted> --set data.max_length=512 --set pad_token=x")


def test_a_csv_row_with_invalid_utf8_is_named_and_can_be_skipped(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_bytes(b"prompt,completion\nhello,world\nbad \xff\xfe byte,x\nthird,row\n")
    with pytest.raises(DataError, match=r"rows.csv:3: not valid UTF-8 text \(byte 0xff in column 'prompt'"):
        load_examples(path, kind="chat")
    examples, report = load_examples(path, kind="chat", on_error="skip")
    assert [e.messages[-1]["content"] for e in examples] == ["world", "row"]
    assert report.skipped == 1 and "rows.csv:3" in report.errors[0]


def test_a_missing_extensionless_local_path_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    started = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"data file not found: data/train: no such file \(the folder 'data' exists"):
        load_examples("data/train", kind="chat")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"owner/name: no such file \(HF_HUB_OFFLINE is set"):
        load_examples("owner/name", kind="chat")
    assert time.perf_counter() - started < 2


def test_a_row_file_still_reads_after_the_checks(tmp_path):
    path = write(tmp_path, "rows.jsonl", json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    examples, _ = load_examples(path, kind="chat")
    assert examples[0].messages[-1]["content"] == "b"
