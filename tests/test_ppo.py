"""PPO: learning on a tiny model, critic options, KL in the reward, what a run saves."""
import pytest
import torch

from alignkit.data import PromptExample
from alignkit.engine import Engine
from alignkit.losses import whiten
from alignkit.methods import build_job
from alignkit.methods.ppo import PPORecipe
from alignkit.rewards import CombinedReward
from tests.test_grpo import favour_yes, prompt_set


def make_job(tmp_path, **overrides):
    training = {"learning_rate": 3e-2, "max_steps": 20, "max_grad_norm": None, "batch_size": 32, "lr_scheduler": "constant",
                "output_dir": str(tmp_path / "run"), "progress": False, "tensorboard": False,
                **overrides.pop("training", {})}
    raw = {"num_generations": 4, "prompts_per_step": 8, "max_completion_length": 8, "rollout_backend": "hf",
           "ppo_epochs": 2, "num_mini_batches": 1, "kl_coef": 0.0, "critic": "separate", "vf_coef": 0.1,
           "training": training, **overrides}
    return build_job("ppo", raw)


def make_recipe(job, model, tokenizer, **parts):
    return PPORecipe(job, model=model, tokenizer=tokenizer, train=prompt_set(), validation=[],
                     reward=CombinedReward([favour_yes]), **parts)


def held_out_prompts():
    """Prompts whose words never appear in the training prompts."""
    return [PromptExample(prompt=[{"role": "user", "content": word}], fields={}, source=f"v:{i}")
            for i, word in enumerate("bird fish green blue three four".split())]


def test_ppo_raises_the_held_out_reward_of_a_favoured_token(tmp_path, tiny_model, tiny_tokenizer):
    job = make_job(tmp_path, eval_max_prompts=6, training={"max_steps": 32, "eval_steps": 32})
    recipe = PPORecipe(job, model=tiny_model, tokenizer=tiny_tokenizer, train=prompt_set(),
                       validation=held_out_prompts(), reward=CombinedReward([favour_yes]))
    result = Engine(job.training, recipe, tmp_path / "run").train()
    start, end = result["eval_history"][0], result["eval_history"][-1]
    assert start["step"] == 0 and end["step"] == 32
    # greedy answers to unseen prompts: no 'yes' at the start, several at the end
    assert start["eval/reward"] < 0.1 and end["eval/reward"] > start["eval/reward"] + 0.5, (start, end)
    rewards = [h["rollout/reward"] for h in result["history"]][::2]  # one value per rollout (2 epochs each)
    assert sum(rewards[-2:]) / 2 > sum(rewards[:3]) / 3 + 0.3, rewards
    step = result["history"][-1]
    for key in ("policy_loss", "value_loss", "rollout/explained_variance", "clip_fraction", "value_clip_fraction",
                "entropy", "rollout/kl", "rollout/completion_length", "time/generation", "time/training"):
        assert key in step, key


def test_separate_critic_kl_penalty_and_saving(tmp_path, tiny_model, tiny_tokenizer):
    job = make_job(tmp_path, critic="separate", kl_coef=0.1, num_mini_batches=2, training={"max_steps": 5})
    recipe = make_recipe(job, tiny_model, tiny_tokenizer)
    assert recipe.reference.mode == "frozen_copy"  # full weights: a frozen copy of the start
    assert recipe.model.critic is not None and recipe.model.critic.backbone is not tiny_model
    result = Engine(job.training, recipe, tmp_path / "run").train()
    history = result["history"]
    assert history[0]["rollout/kl"] == pytest.approx(0.0, abs=1e-5)  # nothing trained yet
    # 2 epochs x 2 minibatches per rollout: rollout metrics repeat for 4 steps, then a new rollout
    assert len({h["rollout/reward"] for h in history[:4]}) == 1 and history[1]["time/generation"] == 0.0
    assert history[4]["time/generation"] > 0
    assert history[4]["rollout/kl"] != 0.0 and history[4]["rollout/non_score_reward"] != 0.0
    recipe.save_final(tmp_path / "final")
    from alignkit.model.heads import load_scalar_model

    critic, _ = load_scalar_model(tmp_path / "final" / "critic")
    ids = torch.tensor([[1, 5, 7]])
    assert torch.allclose(critic.values(ids), recipe.model.critic.values(ids), atol=1e-5)


def test_reward_model_as_reward_function(tmp_path, tiny_model, tiny_tokenizer):
    from alignkit.model.heads import ScalarHeadModel
    from alignkit.rewards import get_reward_function, load_reward_plugins

    reward_model = ScalarHeadModel(tiny_model)
    reward_model.save(tmp_path / "rm", tiny_tokenizer)
    load_reward_plugins()
    score = get_reward_function("reward_model", path=str(tmp_path / "rm"), batch_size=2)
    messages = [[{"role": "user", "content": "hello"}]] * 3
    values = score(["hello"] * 3, ["yes yes", "cat", "yes yes"], prompt_messages=messages)
    assert len(values) == 3 and values[0] == pytest.approx(values[2], abs=1e-5) and values[0] != values[1]
    # the same number the head gives on the chat-templated conversation
    text = tiny_tokenizer.apply_chat_template(messages[0] + [{"role": "assistant", "content": "cat"}], tokenize=False)
    ids = torch.tensor([tiny_tokenizer(text.rstrip("\n"), add_special_tokens=False)["input_ids"]])
    assert values[1] == pytest.approx(float(reward_model.sequence_scores(ids)), abs=1e-4)
    # and in a PPO job, `reward_model: PATH` adds it as a reward term
    job = make_job(tmp_path, reward_model=str(tmp_path / "rm"), training={"max_steps": 1})
    recipe = PPORecipe(job, model=tiny_model, tokenizer=tiny_tokenizer, train=prompt_set(), validation=[])
    assert recipe.reward.labels == ["reward_model"]


def test_shared_critic_runs_one_forward_and_saves_its_head(tmp_path, tiny_model, tiny_tokenizer, monkeypatch):
    job = make_job(tmp_path, critic="shared", training={"max_steps": 2})
    recipe = make_recipe(job, tiny_model, tiny_tokenizer)
    assert recipe.model.critic is None and recipe.model.value_head is not None
    import alignkit.model.forward as logprobs

    calls = []
    original = logprobs.decoder_hidden_states
    monkeypatch.setattr(logprobs, "decoder_hidden_states", lambda *a, **k: calls.append(1) or original(*a, **k))
    micro_batches = next(recipe.updates(0))
    calls.clear()
    loss, metrics = recipe.loss(micro_batches[0])
    loss.backward()
    assert len(calls) == 1 and recipe.model.value_head.weight.grad is not None
    recipe.save_final(tmp_path / "final")
    assert (tmp_path / "final" / "value_head.safetensors").exists()


def test_zero_value_head_places_the_score_at_the_last_token(tmp_path, tiny_model, tiny_tokenizer):
    """V = 0 at the start, kl_coef = 0, gamma = 1: returns_t = lam^(L-1-t) * score, advantages = whitened returns;
    with missing_eos_penalty a completion cut at the length limit scores (reward - penalty)."""
    job = make_job(tmp_path, critic="shared", lam=0.9, missing_eos_penalty=0.5, training={"max_steps": 2})
    recipe = make_recipe(job, tiny_model, tiny_tokenizer)
    assert float(recipe.model.value_head.weight.abs().sum()) == 0.0
    next(recipe.updates(0))
    rollout = recipe.current
    mask = rollout.completion_mask
    assert bool(rollout.truncated.all())  # a random tiny model never says EOS within 8 tokens
    assert float(rollout.per_token["values"].abs().sum()) == 0.0
    length = int(mask[0].sum())
    score = float(rollout.rewards[0]) - 0.5
    expected = torch.tensor([0.9 ** (length - 1 - t) * score for t in range(length)])
    assert torch.allclose(rollout.per_token["returns"][0, :length], expected, atol=1e-6)
    assert torch.allclose(rollout.per_token["advantages"], whiten(rollout.per_token["returns"], mask), atol=1e-5)
    assert rollout.metrics["rollout/value_mean"] == 0.0
    normal = make_recipe(make_job(tmp_path, critic="shared", value_head_init="normal", training={"max_steps": 2}),
                         tiny_model, tiny_tokenizer)
    assert float(normal.model.value_head.weight.abs().sum()) > 0


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_critic_warmup_leaves_the_actor_untouched(tmp_path, tiny_tokenizer, critic):
    from tests.helpers import make_tiny_model

    model = make_tiny_model(tiny_tokenizer)
    job = make_job(tmp_path, critic=critic, critic_warmup_rollouts=1, ppo_epochs=2, training={"max_steps": 4})
    recipe = make_recipe(job, model, tiny_tokenizer)
    actor = {k: v.clone() for k, v in model.state_dict().items()}
    critic_module = recipe.model.value_head if critic == "shared" else recipe.model.critic.head
    head = critic_module.weight.detach().clone()
    engine = Engine(job.training, recipe, tmp_path / "run")
    engine.total_steps = 2  # the two optimizer steps of the first (warm-up) rollout
    engine.train()
    assert all(torch.equal(actor[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(head, critic_module.weight.detach())
    engine.total_steps = 4  # the second rollout trains the actor
    engine.train()
    assert any(not torch.equal(actor[k], v) for k, v in model.state_dict().items())
