"""Job configs: YAML in, validated model out; clear errors for unknown or mistyped keys."""
import pytest

from alignkit.config import ConfigError
from alignkit.methods import load_job


def write(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_resolve(tmp_path):
    path = write(tmp_path, "method: sft\ndata: {train: a.jsonl}\ntraining: {learning_rate: 0.001}\nlora: {rank: 8}\n")
    job = load_job("sft", path, ["training.max_steps=7", "lora.alpha=4", "data.columns.prompt=instruction"])
    assert job.training.max_steps == 7 and isinstance(job.training.max_steps, int)
    assert job.training.learning_rate == 0.001
    assert job.lora.rank == 8 and job.lora.alpha == 4
    assert job.data.columns == {"prompt": "instruction"}


def test_unknown_key_names_the_key_and_the_closest_valid_one(tmp_path):
    path = write(tmp_path, "method: sft\ntraining: {learning_rat: 0.1}\n")
    with pytest.raises(ConfigError) as error:
        load_job("sft", path)
    message = str(error.value)
    assert "job.yaml" in message and "unknown key 'training.learning_rat'" in message
    assert "did you mean 'training.learning_rate'" in message


def test_unknown_top_level_key_and_wrong_type(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'complection_only_loss'.*completion_only_loss"):
        load_job("sft", write(tmp_path, "complection_only_loss: false\n"))
    with pytest.raises(ConfigError, match=r"training.batch_size: .*integer"):
        load_job("sft", None, ["training.batch_size=many"])


def test_method_mismatch_and_unknown_method(tmp_path):
    with pytest.raises(ConfigError, match="file says method 'dpo'"):
        load_job("sft", write(tmp_path, "method: dpo\n"))
    with pytest.raises(ConfigError, match="unknown method 'sfft'.*did you mean 'sft'"):
        load_job(None, write(tmp_path, "method: sfft\n"))


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="config file not found: nowhere.yaml"):
        load_job("sft", "nowhere.yaml")
    with pytest.raises(ConfigError, match="must look like key.subkey=value"):
        load_job("sft", None, ["training.max_steps"])
