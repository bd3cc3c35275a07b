"""Reward hacking caught on a tiny model: an exploitable reward (paid per keyword) makes GRPO and PPO stuff
the keyword, and the drift alarms fire in the training log and in `alignkit eval`'s drift metric; a clean
reward (exactly one keyword) is learned too, and raises no alarm."""
import json

from alignkit.engine import Engine
from alignkit.evaluate import metrics
from alignkit.methods.grpo import GRPORecipe
from alignkit.methods.ppo import PPORecipe
from alignkit.rewards import CombinedReward
from tests.helpers import make_tiny_model
from tests.test_grpo import WORDS, make_job, make_recipe, prompt_set
from tests.test_ppo import make_job as make_ppo_job


def stuff_yes(prompts, completions, **fields):
    """Exploitable: pays for every 'yes' (the tiny tokenizer has it as one token)."""
    return [c.count("yes") / 4 for c in completions]


def one_yes(prompts, completions, **fields):
    """Clean: pays only for exactly one 'yes', so stuffing it earns nothing."""
    return [1.0 if c.count("yes") == 1 else 0.0 for c in completions]


def flat_bonus(prompts, completions, **fields):
    """A side term nothing can exploit: the same for every completion."""
    return [0.5 for _ in completions]


def train_grpo(tmp_path, tokenizer, reward, name):
    job = make_job(tmp_path, training={"max_steps": 18, "output_dir": str(tmp_path / name)})
    recipe = make_recipe(job, make_tiny_model(tokenizer), tokenizer, reward=reward)
    result = Engine(job.training, recipe, tmp_path / name).train()
    logged = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return recipe, [h["rollout/reward"] for h in result["history"]], logged


def test_grpo_alarm_fires_on_keyword_stuffing_in_training_and_eval_and_not_on_a_clean_reward(tmp_path, tiny_tokenizer):
    hacked, hacked_rewards, hacked_log = train_grpo(tmp_path, tiny_tokenizer, stuff_yes, "hacked")
    clean, clean_rewards, clean_log = train_grpo(tmp_path, tiny_tokenizer, one_yes, "clean")
    # both rewards are learned
    assert sum(hacked_rewards[-3:]) / 3 > sum(hacked_rewards[:3]) / 3 + 0.5, hacked_rewards
    assert sum(clean_rewards[-3:]) / 3 > sum(clean_rewards[:3]) / 3 + 0.15, clean_rewards
    # training log: the repetition alarm fires within the 18 steps, is logged, printed into the notes
    fired = hacked.monitor.fired
    assert [f["check"] for f in fired][:1] == ["repetition_rise"] and fired[0]["step"] <= 18, fired
    assert any(h.get("drift/alarms", 0) >= 1 for h in hacked_log)
    assert any(f"drift alarm at step {fired[0]['step']}" in note for note in hacked.notes)
    # ... and the clean run raises nothing
    assert clean.monitor.fired == [] and all(h.get("drift/alarms", 0) == 0 for h in clean_log)
    assert not any("drift alarm" in note for note in clean.notes)
    # `alignkit eval --metrics drift` against the starting model: the same verdicts
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": word}) + "\n" for word in WORDS * 2))
    # (the KL budget is absolute: on this random 8-token model the clean policy moved 13 nats from its start,
    # so the budget is set for the scale of the model, as a user sets it for theirs)
    start = (make_tiny_model(tiny_tokenizer), tiny_tokenizer, "start")
    budget = {"kl": 30.0}
    on_hacked = metrics.drift(hacked.policy, tiny_tokenizer, str(data), reference_model=start, max_new_tokens=8,
                              drift_thresholds=budget)
    on_clean = metrics.drift(clean.policy, tiny_tokenizer, str(data), reference_model=start, max_new_tokens=8,
                             drift_thresholds=budget)
    assert {"repetition_rise", "kl"} <= set(on_hacked["alarms"]), on_hacked["warnings"]
    assert on_hacked["policy"]["repetition"] > on_hacked["reference"]["repetition"] + 0.2
    assert on_clean["alarms"] == [], on_clean["warnings"]


def test_ppo_alarm_fires_on_keyword_stuffing(tmp_path, tiny_tokenizer):
    job = make_ppo_job(tmp_path, training={"max_steps": 32}, drift={"patience": 2})
    recipe = PPORecipe(job, model=make_tiny_model(tiny_tokenizer), tokenizer=tiny_tokenizer, train=prompt_set(),
                       validation=[], reward=CombinedReward([stuff_yes]))
    result = Engine(job.training, recipe, tmp_path / "run").train()
    rewards = [h["rollout/reward"] for h in result["history"]]
    assert rewards[-1] > rewards[0] + 0.5, rewards
    checks = [f["check"] for f in recipe.monitor.fired]
    assert "repetition_rise" in checks, (checks, [h["rollout/repetition"] for h in result["history"]])
    # PPO logs its rollout KL, which the monitor reads too
    assert "rollout/kl" in result["history"][-1] and "drift/repetition_rise" in result["history"][-1]


def test_side_reward_alarm_fires_when_a_bonus_pays_for_the_gain_and_not_when_the_task_does(tmp_path, tiny_tokenizer):
    """drift.task_rewards names the task's own term (exactly one 'yes'); a keyword bonus at weight 4 (per 'yes')
    then pays more for stuffing than the task does, and the side_reward_share alarm fires; with a flat bonus the
    task's term pays for the whole gain and nothing fires."""
    def run(name, side, weight):
        rewards = [{"name": "tests.test_reward_hacking:one_yes", "label": "task"},
                   {"name": f"tests.test_reward_hacking:{side}", "label": "bonus", "weight": weight}]
        job = make_job(tmp_path, rewards=rewards, drift={"task_rewards": ["task"]},
                       training={"max_steps": 18, "output_dir": str(tmp_path / name)})
        recipe = GRPORecipe(job, model=make_tiny_model(tiny_tokenizer), tokenizer=tiny_tokenizer, train=prompt_set(),
                            validation=[])
        history = Engine(job.training, recipe, tmp_path / name).train()["history"]
        return recipe, history

    hacked, hacked_history = run("hacked", "stuff_yes", 4.0)
    assert hacked_history[-1]["rollout/rewards/bonus"] > hacked_history[0]["rollout/rewards/bonus"] + 0.3
    checks = [f["check"] for f in hacked.monitor.fired]
    assert "side_reward_share" in checks, [(h.get("drift/side_reward_share"), h["rollout/rewards/task"],
                                            h["rollout/rewards/bonus"]) for h in hacked_history]
    clean, clean_history = run("clean", "flat_bonus", 1.0)
    assert clean_history[-1]["rollout/rewards/task"] > clean_history[0]["rollout/rewards/task"] + 0.15
    assert clean.monitor.fired == [] and "drift/side_reward_gain" in clean_history[-1]


def test_task_rewards_must_name_a_reward_term(tmp_path):
    import pytest

    from alignkit.config import ConfigError

    rewards = [{"name": "numeric_match"}, {"name": "tests.test_reward_hacking:stuff_yes", "label": "bonus"}]
    with pytest.raises(ConfigError, match=r"drift.task_rewards names \['accuracy'\].*its terms: \['numeric_match', 'bonus'\]"):
        make_job(tmp_path, rewards=rewards, drift={"task_rewards": ["accuracy"]})
    assert make_job(tmp_path, rewards=rewards, drift={"task_rewards": ["numeric_match"]}).drift.task_rewards
    # a function named by module or file is logged (and named here) by its function name, as CombinedReward does
    unlabelled = [{"name": "numeric_match"}, {"name": "tests.test_reward_hacking:stuff_yes"}]
    assert make_job(tmp_path, rewards=unlabelled, drift={"task_rewards": ["stuff_yes"]}).reward_labels() == \
        ["numeric_match", "stuff_yes"]
    ppo = make_ppo_job(tmp_path, reward_model=str(tmp_path / "rm"), drift={"task_rewards": ["reward_model"]})
    assert ppo.reward_labels() == ["reward_model"]
