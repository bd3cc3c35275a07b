"""GRPO: learning on a tiny model, the reference switch, micro-batch invariance, resume, config aliases."""
import json

import pytest
import torch

from alignkit.config import ConfigError
from alignkit.data import PromptExample
from alignkit.engine import Engine
from alignkit.methods import build_job
from alignkit.methods.grpo import GRPORecipe
from alignkit.aliases import BASE_LEARNING_RATE
from alignkit.methods.online import final_answer
from alignkit.rewards import CombinedReward

WORDS = "hello cat dog red one two apple paris".split()


def favour_yes(prompts, completions, **fields):
    """Dense toy reward: how often the word 'yes' appears (the tiny tokenizer has it as one token)."""
    return [c.count("yes") / 4 for c in completions]


def prompt_set(n=8):
    return [PromptExample(prompt=[{"role": "user", "content": WORDS[i % len(WORDS)]}], fields={"answer": "yes"},
                          source=f"t:{i}") for i in range(n)]


def make_job(tmp_path, **overrides):
    training = {"learning_rate": 2e-2, "max_steps": 18, "batch_size": 32, "lr_scheduler": "constant",
                "output_dir": str(tmp_path / "run"), "progress": False, "tensorboard": False,
                **overrides.pop("training", {})}
    raw = {"num_generations": 8, "prompts_per_step": 4, "max_completion_length": 8, "rollout_backend": "hf",
           "training": training, **overrides}
    return build_job("grpo", raw)


def make_recipe(job, model, tokenizer, reward=favour_yes, validation=()):
    return GRPORecipe(job, model=model, tokenizer=tokenizer, train=prompt_set(), validation=list(validation),
                      reward=CombinedReward([reward], on_error=job.reward_on_error))


def test_grpo_raises_the_reward_of_a_favoured_token(tmp_path, tiny_model, tiny_tokenizer):
    job = make_job(tmp_path)
    result = Engine(job.training, make_recipe(job, tiny_model, tiny_tokenizer), tmp_path / "run").train()
    rewards = [h["rollout/reward"] for h in result["history"]]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.3 and last > 5 * max(first, 0.02), rewards
    step = result["history"][0]
    for key in ("rollout/reward_std", "rollout/rewards/favour_yes", "rollout/zero_spread_share", "clip_fraction",
                "entropy", "rollout/completion_length", "rollout/truncated_share", "time/generation",
                "time/training", "time/reward"):
        assert key in step, key
    assert step["time/generation"] > 0 and step["time/training"] > 0
    assert "kl" not in step  # beta = 0


def test_beta_zero_never_runs_a_reference_and_lora_reference_disables_adapters(tmp_path, tiny_model, tiny_tokenizer,
                                                                             monkeypatch):
    from alignkit.model import add_lora

    job = make_job(tmp_path, training={"max_steps": 2})
    recipe = make_recipe(job, tiny_model, tiny_tokenizer)
    monkeypatch.setattr(recipe, "reference_logprobs", lambda *a, **k: pytest.fail("reference forward with beta 0"))
    Engine(job.training, recipe, tmp_path / "run").train()
    assert recipe.reference is None

    lora_job = make_job(tmp_path, beta=0.1, lora={"rank": 4, "dropout": 0.0}, training={"max_steps": 2})
    policy = add_lora(tiny_model, rank=4, dropout=0.0)
    recipe = make_recipe(lora_job, policy, tiny_tokenizer)
    calls = []
    original = type(policy).disable_adapter

    def counting(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(type(policy), "disable_adapter", counting)
    result = Engine(lora_job.training, recipe, tmp_path / "run2").train()
    assert recipe.reference.mode == "adapters_off" and len(calls) == 2  # once per rollout, no model copy
    assert result["history"][0]["kl"] == pytest.approx(0.0, abs=1e-6)  # LoRA B = 0: policy == reference
    assert result["history"][1]["kl"] > 0


def by_length(prompts, completions, **fields):
    return [float(len(c)) for c in completions]


def test_micro_batch_split_and_shared_prompt_forward_do_not_change_the_gradient(tmp_path, tiny_model,
                                                                                tiny_tokenizer):
    grads = {}
    for size, shared in ((32, True), (5, True), (5, False)):
        for aggregation in ("token", "sequence"):
            job = make_job(tmp_path, beta=0.05, loss_aggregation=aggregation, stop_strings=["e", "a"],
                           share_prompt_forward=shared, training={"batch_size": size})
            model = type(tiny_model)(tiny_model.config)
            model.load_state_dict(tiny_model.state_dict())
            recipe = make_recipe(job, model, tiny_tokenizer, reward=by_length)
            micro_batches = next(recipe.updates(0))
            assert hasattr(micro_batches[0], "prompt_ids") == shared
            model.zero_grad()
            total = sum(recipe.loss_weight(mb) for mb in micro_batches)  # what the engine divides by
            for mb in micro_batches:
                loss, _ = recipe.loss(mb)
                (loss * recipe.loss_weight(mb) / total).backward()
            grads[size, shared, aggregation] = torch.cat([p.grad.flatten() for p in model.parameters()
                                                          if p.grad is not None])
    assert len(set(recipe.current.completion_mask.sum(-1).tolist())) > 1  # lengths differ
    for aggregation in ("token", "sequence"):
        reference = grads[32, True, aggregation]
        for key in ((5, True, aggregation), (5, False, aggregation)):
            assert torch.allclose(reference, grads[key], atol=1e-6, rtol=1e-4), key
    assert grads[32, True, "token"].abs().max() > 0
    assert not torch.allclose(grads[32, True, "token"], grads[32, True, "sequence"], atol=1e-6, rtol=1e-4)


def test_resume_in_the_middle_of_a_rollout_is_exact(tmp_path, tiny_model, tiny_tokenizer):
    def run(folder, resume=False, max_steps=4):
        job = make_job(tmp_path, num_iterations=2, epsilon_high=0.28,
                       training={"max_steps": max_steps, "save_steps": 1, "save_total_limit": 10,
                                 "output_dir": str(folder), "resume": resume})
        model = type(tiny_model)(tiny_model.config)
        model.load_state_dict(tiny_model.state_dict())
        return Engine(job.training, make_recipe(job, model, tiny_tokenizer), folder).train()["history"]

    full = run(tmp_path / "a")
    run(tmp_path / "b", max_steps=3)  # stops after step 3: in the middle of the second rollout
    import shutil

    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-0000003")
    resumed = run(tmp_path / "b", resume=True)  # from step 2's checkpoint: the first step of rollout 1
    assert [h["step"] for h in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["rollout/reward"] == b["rollout/reward"]
    assert full[1]["clip_fraction"] >= 0 and full[1]["time/generation"] == 0.0  # 2nd iteration reuses samples


def test_reward_errors_raise_or_count(tmp_path, tiny_model, tiny_tokenizer):
    def broken(prompts, completions, **fields):
        return [None] * len(completions)

    job = make_job(tmp_path, training={"max_steps": 1})
    with pytest.raises(Exception, match="broken"):
        Engine(job.training, make_recipe(job, tiny_model, tiny_tokenizer, reward=broken), tmp_path / "r").train()
    job = make_job(tmp_path, reward_on_error="zero", training={"max_steps": 1})
    # every completion of the step failed: scores of 0 would train on nothing, so the run stops
    with pytest.raises(Exception, match="'broken' failed on every one of the 32 completions"):
        Engine(job.training, make_recipe(job, tiny_model, tiny_tokenizer, reward=broken), tmp_path / "r2").train()

    def broken_half(prompts, completions, **fields):
        return [None if i % 2 else 1.0 for i in range(len(completions))]

    result = Engine(job.training, make_recipe(job, tiny_model, tiny_tokenizer, reward=broken_half),
                    tmp_path / "r3").train()
    assert result["history"][0]["rollout/reward_errors"] == 16


def test_managed_rft_keys_resolve_to_the_same_config():
    managed = {"samplesPerPrompt": 4, "epochCount": 2, "batchSize": 16, "learningRateMultiplier": 2.0,
               "adapterSize": 8, "maxOutputTokens": 64, "evaluateInterval": 10, "checkpointInterval": 20,
               "thinkingLevel": "LOW", "data": {"train": "prompts.jsonl"}, "rewards": [{"name": "numeric_match"}]}
    native = {"num_generations": 4, "training": {"epochs": 2, "learning_rate": 2.0 * BASE_LEARNING_RATE["lora"],
                                                 "eval_steps": 10, "save_steps": 20},
              "prompts_per_step": 16, "lora": {"rank": 8}, "max_completion_length": 64, "thinking_level": "low",
              "data": {"train": "prompts.jsonl"}, "rewards": [{"name": "numeric_match"}]}
    a, b = build_job("grpo", managed), build_job("grpo", native)
    assert a.model_dump() == b.model_dump()
    assert a.thinking_tokens() == 512 and a.lora.rank == 8
    full = build_job("grpo", {"learningRateMultiplier": 0.5})
    assert full.training.learning_rate == pytest.approx(0.5 * BASE_LEARNING_RATE["full"])
    with pytest.raises(ConfigError, match="disagree"):
        build_job("grpo", {"samplesPerPrompt": 4, "num_generations": 8})
    with pytest.raises(ConfigError, match="thinking_level"):
        build_job("grpo", {"thinkingLevel": "extreme"})
    with pytest.raises(ConfigError, match="disagree"):
        build_job("grpo", {"learningRateMultiplier": 2, "training": {"learning_rate": 0.5}})


def test_thinking_level_instruction_budget_and_final_answer(tmp_path, tiny_model, tiny_tokenizer):
    assert final_answer("<think>2+2 is 4</think> 4") == "4"
    assert final_answer("<think>never closed 4") == ""
    job = make_job(tmp_path, thinking_level="minimal", max_completion_length=8)
    recipe = make_recipe(job, tiny_model, tiny_tokenizer)
    assert recipe.sampling.max_new_tokens == 128 + 8
    text = tiny_tokenizer.decode(recipe.train_prompt_ids[0])
    assert "<think>" in text and "128 tokens" in text
    seen = []

    def spy(prompts, completions, full_completion=None, **fields):
        seen.extend(completions)
        assert full_completion == ["<think>a</think> 7", "no thinking 7"]
        return [0.0] * len(completions)

    recipe.reward = CombinedReward([spy])
    _, result = recipe.score(prompt_set(1), ["<think>a</think> 7", "no thinking 7"], 2)
    assert seen == ["7", ""]


def test_grpo_command_line_run(tmp_path, tiny_model, tiny_tokenizer):
    from alignkit.cli import main

    tiny_model.save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": w, "answer": "yes"}) + "\n" for w in WORDS * 2))
    config = tmp_path / "grpo.yaml"
    config.write_text(f"""
method: grpo
model: {{name_or_path: {tmp_path / 'model'}, device: cpu}}
data: {{train: {data}, validation_fraction: 0.25}}
samplesPerPrompt: 4
batchSize: 2
maxOutputTokens: 6
rewards:
  - {{name: contains, kwargs: {{text: "yes"}}}}
  - {{name: exact_match, weight: 0.5}}
training: {{max_steps: 2, eval_steps: 2, output_dir: {tmp_path / 'run'}, progress: false, tensorboard: false}}
""")
    assert main(["grpo", "--config", str(config)]) == 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/reward" in line for line in lines)
    train = [line for line in lines if "rollout/reward" in line]
    assert len(train) == 2 and "rollout/rewards/contains" in train[0] and "rollout/rewards/exact_match" in train[0]
    assert (tmp_path / "run" / "final" / "config.json").exists()
