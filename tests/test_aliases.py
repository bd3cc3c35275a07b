"""Other tools' names: every alias lands on its alignkit key (table-driven), every hint says what to
write, managed job files (OpenAI, Vertex AI) are read as they are, and OpenAI graders score as stated."""
import json

import pytest

from alignkit.aliases import BASE_LEARNING_RATE
from alignkit.config import ConfigError
from alignkit.methods import build_job, load_job
from alignkit.rewards import get_reward_function, load_reward_plugins


def value_at(job, dotted):
    value = job
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


ALIAS_CASES = [  # method, raw keys, alignkit key, expected value
    ("sft", {"num_train_epochs": 3}, "training.epochs", 3),
    ("dpo", {"training": {"num_train_epochs": 2}}, "training.epochs", 2),
    ("sft", {"per_device_train_batch_size": 4}, "training.batch_size", 4),
    ("sft", {"lr_scheduler_type": "constant_with_warmup"}, "training.lr_scheduler", "constant"),
    ("sft", {"training": {"lr_scheduler_type": "linear"}}, "training.lr_scheduler", "linear"),
    ("sft", {"bf16": True}, "training.precision", "bf16"),
    ("rm", {"bf16": False}, "training.precision", "fp32"),
    ("sft", {"max_seq_length": 512}, "data.max_length", 512),
    *[(method, {"max_length": 333}, "data.max_length", 333) for method in ("sft", "rm", "dpo", "kto", "grpo", "ppo")],
    ("grpo", {"max_prompt_length": 99}, "data.max_prompt_length", 99),
    ("sft", {"dataset_text_field": "body"}, "data.columns", {"text": "body"}),
    ("sft", {"assistant_only_loss": False}, "completion_only_loss", False),
    ("sft", {"model_name_or_path": "some/model"}, "model.name_or_path", "some/model"),
    ("sft", {"torch_dtype": "bfloat16"}, "model.dtype", "bfloat16"),
    ("sft", {"chat_template": "chatml"}, "model.chat_template", "chatml"),
    ("sft", {"chat_template_path": "t.jinja"}, "model.chat_template", "t.jinja"),
    ("sft", {"use_peft": True, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.1}, "lora.rank", 8),
    ("sft", {"use_peft": True, "lora_alpha": 16}, "lora.alpha", 16),
    ("sft", {"lora": {"r": 4}}, "lora.rank", 4),
    ("grpo", {"reward_funcs": ["numeric_match", "think_format"], "reward_weights": [1.0, 0.5]}, "rewards",
     [("numeric_match", 1.0), ("think_format", 0.5)]),
    ("grpo", {"reward_funcs": "numeric_match"}, "rewards", [("numeric_match", 1.0)]),
    ("grpo", {"use_vllm": True}, "rollout_backend", "vllm"),
    ("ppo", {"use_vllm": False}, "rollout_backend", "hf"),
    ("ppo", {"num_ppo_epochs": 2}, "ppo_epochs", 2),
    ("grpo", {"loss_type": "grpo"}, "loss_aggregation", "sequence"),
    ("grpo", {"loss_type": "dapo"}, "loss_aggregation", "token"),
    ("grpo", {"loss_type": "dr_grpo"}, "scale_rewards", False),
    ("grpo", {"loss_type": "dr_grpo"}, "loss_aggregation", "token"),
    ("grpo", {"scale_rewards": "none"}, "scale_rewards", False),
    ("grpo", {"steps_per_generation": 2}, "num_iterations", 2),
    ("dpo", {"ref_model": "ref/model"}, "reference_model", "ref/model"),
    ("kto", {"precompute_ref_log_probs": False}, "precompute_reference_logprobs", False),
    # managed fine-tuning names, for every method they apply to
    ("sft", {"epochCount": 3}, "training.epochs", 3),
    ("kto", {"epochCount": 2}, "training.epochs", 2),
    ("sft", {"adapterSize": "ADAPTER_SIZE_EIGHT"}, "lora.rank", 8),
    ("dpo", {"adapterSize": 4}, "lora.rank", 4),
    ("sft", {"batchSize": 4}, "training.batch_size", 4),
    ("grpo", {"batchSize": 4}, "prompts_per_step", 4),
    ("sft", {"learningRateMultiplier": 2.0}, "training.learning_rate", 2.0 * BASE_LEARNING_RATE["full"]),
    ("dpo", {"learningRateMultiplier": 0.5, "adapterSize": "ADAPTER_SIZE_FOUR"}, "training.learning_rate",
     0.5 * BASE_LEARNING_RATE["lora"]),
    ("grpo", {"samplesPerPrompt": 4, "thinkingLevel": "LOW"}, "num_generations", 4),
]


@pytest.mark.parametrize("method,raw,key,expected", ALIAS_CASES)
def test_alias_lands_on_its_alignkit_key(method, raw, key, expected):
    job = build_job(method, raw)
    value = value_at(job, key)
    if key == "rewards":
        value = [(term.name, term.weight) for term in value]
    if isinstance(expected, float):
        assert value == pytest.approx(expected)
    else:
        assert value == expected
    assert job.notes or method == "grpo" and "samplesPerPrompt" in raw  # translations are stated


def test_alias_notes_and_conflicts():
    job = build_job("sft", {"num_train_epochs": 3, "adapterSize": "ADAPTER_SIZE_FOUR"})
    assert "TRL key 'num_train_epochs: 3' read as training.epochs: 3" in job.notes
    assert job.lora is not None and job.lora.enabled
    with pytest.raises(ConfigError, match=r"'num_train_epochs' \(3\) and 'training.epochs' \(2\) disagree"):
        build_job("sft", {"num_train_epochs": 3, "training": {"epochs": 2}})
    with pytest.raises(ConfigError, match="'fp16: true': alignkit trains in bf16 or fp32"):
        build_job("sft", {"fp16": True})
    with pytest.raises(ConfigError, match="loss_type 'bnpo' .TRL. has no alignkit equivalent"):
        build_job("grpo", {"loss_type": "bnpo"})
    with pytest.raises(ConfigError, match="lr_scheduler_type 'polynomial' has no alignkit equivalent"):
        build_job("sft", {"lr_scheduler_type": "polynomial"})
    assert build_job("dpo", {"loss_type": "ipo"}).loss_type == "ipo"  # DPO's own loss_type is untouched


def test_max_length_bounds_prompt_plus_completion_in_online_methods():
    job = build_job("grpo", {"max_length": 300, "max_completion_length": 100, "thinking_budget": 50})
    assert job.prompt_token_limit() == 150
    assert build_job("grpo", {"max_prompt_length": 99, "max_length": 1000}).prompt_token_limit() == 99
    assert build_job("ppo", {}).prompt_token_limit() == 1024 - 256  # the default max_length bounds them too
    with pytest.raises(ConfigError, match=r"data.max_length \(100\) leaves no room for a prompt"):
        build_job("grpo", {"max_length": 100, "max_completion_length": 100})


HINT_CASES = [  # method, raw keys, what the error says
    ("sft", {"learning_rate": 1e-4}, "unknown key 'learning_rate'; did you mean 'training.learning_rate'?"),
    ("dpo", {"gradient_accumulation_steps": 2},
     "unknown key 'gradient_accumulation_steps'; did you mean 'training.gradient_accumulation_steps'?"),
    ("sft", {"training": {"max_prompt_length": 5}}, "did you mean 'data.max_prompt_length'?"),
    ("sft", {"stage": "sft"}, "LLaMA-Factory's 'stage' is alignkit's method: write 'method: sft'"),
    ("sft", {"finetuning_type": "lora"}, "for lora add a 'lora:' section"),
    ("sft", {"cutoff_len": 1024}, "LLaMA-Factory's 'cutoff_len' is data.max_length"),
    ("sft", {"template": "qwen"}, "LLaMA-Factory's 'template' is model.chat_template"),
    ("sft", {"dataset": "alpaca_en"}, "name the file itself: data.train"),
    ("sft", {"lora_rank": 8}, "LLaMA-Factory's 'lora_rank' is lora.rank"),
    ("dpo", {"pref_beta": 0.1}, "LLaMA-Factory's 'pref_beta' is beta"),
    ("sft", {"base_model": "x"}, "Axolotl's 'base_model' is model.name_or_path"),
    ("sft", {"sequence_len": 512}, "Axolotl's 'sequence_len' is data.max_length"),
    ("sft", {"micro_batch_size": 2}, "Axolotl's 'micro_batch_size' is training.batch_size"),
    ("sft", {"num_epochs": 2}, "Axolotl's 'num_epochs' is training.epochs"),
    ("sft", {"eval_strategy": "steps"}, "every training.eval_steps steps"),
    ("sft", {"report_to": "wandb"}, "metrics.jsonl"),
    ("sft", {"reward_funcs": ["x"]}, "unknown key 'reward_funcs'"),  # a GRPO name in an SFT job stays unknown
]


@pytest.mark.parametrize("method,raw,message", HINT_CASES)
def test_hint_says_what_to_write(method, raw, message):
    with pytest.raises(ConfigError) as error:
        build_job(method, raw)
    assert message in str(error.value)


def test_every_unknown_key_is_reported_even_without_a_method():
    with pytest.raises(ConfigError) as error:
        build_job(None, {"stage": "sft", "cutoff_len": 512, "learning_rate": 1e-5, "num_train_epochs": 2,
                         "training": {"epoch": 3}})
    lines = str(error.value).splitlines()
    assert lines[0] == "<config>: no method given (add 'method: sft' or use 'alignkit sft')"
    unknown = [line for line in lines if "unknown key" in line]
    assert [line.split("'")[1] for line in unknown] == ["cutoff_len", "learning_rate", "stage", "training.epoch"]
    assert "did you mean 'training.learning_rate'?" in str(error.value)
    assert "write 'method: sft'" in str(error.value)  # num_train_epochs is an alias in every method: not listed


# ---------------------------------------------------------------------------------------- managed job files
def write(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(json.dumps(body))
    return path


def test_openai_supervised_and_dpo_jobs(tmp_path):
    train = write(tmp_path, "train.jsonl", {})
    body = {"model": "gpt-4o-mini-2024-07-18", "training_file": str(train), "validation_file": str(train),
            "suffix": "acme support", "seed": 7, "integrations": [{"type": "wandb"}],
            "method": {"type": "supervised", "supervised": {"hyperparameters": {
                "n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 2}}}}
    job = load_job(None, write(tmp_path, "job.json", body))
    assert job.method == "sft" and job.data.train == str(train) and job.data.validation == str(train)
    assert (job.training.epochs, job.training.batch_size, job.training.seed) == (3, 8, 7)
    assert job.training.learning_rate == pytest.approx(2 * BASE_LEARNING_RATE["full"])
    assert job.training.output_dir == "runs/acme-support" and job.model.name_or_path == "smollm2-135m-instruct"
    assert any("'gpt-4o-mini-2024-07-18' is hosted" in note for note in job.notes)
    assert any(note.startswith("job.integrations is not supported") for note in job.notes)
    body["method"] = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": "auto"}}}
    job = load_job(None, write(tmp_path, "dpo.json", body))
    assert job.method == "dpo" and job.beta == 0.2 and job.training.epochs == 1.0
    with pytest.raises(ConfigError, match="the job file is a dpo job but the command is 'sft'"):
        load_job("sft", write(tmp_path, "dpo.json", body))
    body["training_file"] = "file-abc123"
    with pytest.raises(ConfigError, match="training_file 'file-abc123' is an OpenAI file id; give the local JSONL"):
        load_job(None, write(tmp_path, "id.json", body))


def test_openai_reinforcement_job_and_its_graders(tmp_path):
    grader = {"type": "multi", "calculate_output": "0.6 * exact + 0.4 * code", "graders": {
        "exact": {"type": "string_check", "input": "{{ sample.output_text }}", "reference": "{{ item.answer }}",
                  "operation": "eq"},
        "code": {"type": "python", "source": "def grade(sample, item):\n    return len(sample['output_text']) / 10\n"}}}
    body = {"model": "o4-mini", "training_file": str(write(tmp_path, "t.jsonl", {})),
            "method": {"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": {
                "reasoning_effort": "medium", "compute_multiplier": 2, "batch_size": 4, "eval_interval": 5}}}}
    job = load_job(None, write(tmp_path, "rft.json", body))
    assert job.method == "grpo" and job.thinking_level == "medium" and job.prompts_per_step == 4
    assert job.training.eval_steps == 5
    assert [(t.name, t.weight, t.label) for t in job.rewards] == [("openai_string_check", 0.6, "exact"),
                                                                  ("openai_python_grader", 0.4, "code")]
    assert any("compute_multiplier is not supported" in note for note in job.notes)
    load_reward_plugins()
    check = get_reward_function(job.rewards[0].name, **job.rewards[0].kwargs)
    assert check(["p", "p"], ["42", "41"], answer=["42", "42"]) == [1.0, 0.0]
    code = get_reward_function(job.rewards[1].name, **job.rewards[1].kwargs)
    assert code(["p"], ["hello"], answer=["x"]) == [0.5]
    similarity = get_reward_function("openai_text_similarity", reference="{{ item.answer }}",
                                     evaluation_metric="fuzzy_match")
    assert similarity(["p"], ["abcd"], answer=["abce"]) == [pytest.approx(0.75)]
    with pytest.raises(ConfigError, match="not a weighted sum"):
        load_job(None, write(tmp_path, "bad.json", {**body, "method": {"type": "reinforcement", "reinforcement": {
            "grader": {**grader, "calculate_output": "min(exact, code)"}}}}))


def test_openai_score_model_grader_reads_the_number_the_model_gives():
    class Scripted:
        identity = "scripted"

        def __init__(self):
            self.seen = []

        def complete(self, conversations, temperature=0.0, max_tokens=256):
            self.seen += conversations
            return ["Score: 7", "no number here"]

    backend = Scripted()
    load_reward_plugins()
    reward = get_reward_function("openai_score_model", model="judge", range=[0, 5], backend=backend,
                                 input=[{"role": "user", "content": "Rate {{ sample.output_text }} vs {{ item.ref }}"}])
    assert reward(["p", "p"], ["a", "b"], ref=["r1", "r2"]) == [5.0, None]  # clamped to the range; None counted
    assert backend.seen[1] == [{"role": "user", "content": "Rate b vs r2"}]


def test_vertex_tuning_jobs(tmp_path):
    train = write(tmp_path, "train.jsonl", {})
    body = {"baseModel": "gemini-2.0-flash-001", "tunedModelDisplayName": "my model",
            "supervisedTuningSpec": {"trainingDatasetUri": str(train), "exportLastCheckpointOnly": True,
                                     "hyperParameters": {"epochCount": 2, "learningRateMultiplier": 0.5,
                                                         "adapterSize": "ADAPTER_SIZE_FOUR"}}}
    job = load_job(None, write(tmp_path, "vertex.json", body))
    assert job.method == "sft" and job.training.epochs == 2 and job.lora.rank == 4
    assert job.training.learning_rate == pytest.approx(0.5 * BASE_LEARNING_RATE["lora"])
    assert job.training.output_dir == "runs/my-model"
    assert any("exportLastCheckpointOnly is not supported" in note for note in job.notes)
    preference = {"baseModel": "gemini-2.5-flash", "preferenceOptimizationSpec": {
        "trainingDatasetUri": str(train), "hyperParameters": {"beta": 0.3, "epochCount": 1}}}
    job = load_job(None, write(tmp_path, "pref.json", preference))
    assert job.method == "dpo" and job.beta == 0.3 and job.lora is not None
    preference["preferenceOptimizationSpec"]["trainingDatasetUri"] = "gs://bucket/train.jsonl"
    with pytest.raises(ConfigError, match="is a Cloud Storage URI; copy the file here"):
        load_job(None, write(tmp_path, "gs.json", preference))
