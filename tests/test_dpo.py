"""DPO recipe: the loss variants end to end, the reference (LoRA, frozen copy, cache), learning a preference."""
import copy
import math

import pytest
import torch

from alignkit.config import ConfigError
from alignkit.data.pairs import collate_pairs
from alignkit.engine import Engine
from alignkit.methods import build_job, load_job
from alignkit.methods.dpo import DPORecipe
from alignkit.model import add_lora
from alignkit.model.forward import response_logprob_sums
from tests.test_reward_model import synthetic_pairs, write_jsonl


@pytest.fixture(autouse=True)
def alignkit_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_HOME", str(tmp_path / "home"))


def dpo_job(tmp_path, train, **top):
    config = {"beta": 0.5, "data": {"train": str(train), "validation_fraction": 0.25, "max_length": 64},
              "training": {"output_dir": str(tmp_path / "run"), "max_steps": 10, "batch_size": 8,
                           "learning_rate": 3e-3, "lr_scheduler": "constant", "eval_steps": 10,
                           "progress": False, "tensorboard": False}}
    config.update(top)
    return build_job("dpo", config)


@pytest.fixture
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(32))


def naive_sums(model, pairs, pad_token_id=1):
    """Summed response log-probs from full-vocabulary logits over a padded batch (what we avoid)."""
    batch = collate_pairs(pairs, pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["response_mask"][:, 1:] & batch["attention_mask"][:, 1:].bool()
    return (logps * mask).sum(-1), mask.sum(-1).float()


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def test_one_forward_response_logprobs_equal_naive_full_logits(tiny_model, tiny_tokenizer):
    from alignkit.data.pairs import tokenize_pairs
    from alignkit.data.types import PreferenceExample

    words = "cat dog bird fish red green blue one two three".split()
    examples = [PreferenceExample(prompt=[{"role": "user", "content": " ".join(words[:2 + 3 * i])}],
                                  chosen=" ".join(words[i:]) + " yes", rejected=" ".join(words[:i + 1]) + " no")
                for i in range(5)]  # lengths differ, so sequences can share rows
    pairs, _ = tokenize_pairs(tiny_tokenizer, examples, max_length=64)
    expected_sums, expected_counts = naive_sums(tiny_model, pairs)
    layouts = {name: collate_pairs(pairs, tiny_tokenizer.pad_token_id, padding_free=free, share_prompt=share)
               for name, free, share in (("padded", False, False), ("packed", True, False),
                                         ("shared", False, True), ("shared+packed", True, True))}
    real_tokens = {name: int((b["input_ids"] != tiny_tokenizer.pad_token_id).sum()) for name, b in layouts.items()}
    prompt_tokens = sum(p.chosen_start for p in pairs)
    assert layouts["padded"]["input_ids"].shape[0] == 10  # the 2B sequences in one batch
    assert layouts["packed"]["input_ids"].shape[0] < 10 and real_tokens["packed"] == real_tokens["padded"]
    assert real_tokens["shared"] == real_tokens["padded"] - prompt_tokens  # each prompt once
    assert layouts["shared+packed"]["input_ids"].numel() <= layouts["shared"]["input_ids"].numel()
    for name, batch in layouts.items():
        sums, counts, tokens = response_logprob_sums(tiny_model, batch, chunk_size=7, per_token=True)
        torch.testing.assert_close(sums, expected_sums, atol=1e-4, rtol=1e-5, msg=name)
        assert torch.equal(counts, expected_counts) and (counts > 0).all()
        per_sequence = torch.split(tokens, counts.long().tolist())
        torch.testing.assert_close(torch.stack([t.sum() for t in per_sequence]), expected_sums, atol=1e-4, rtol=1e-5)


def expected_loss(job, policy, reference, counts):
    """The variant's loss written out in plain Python from per-pair numbers."""
    b, total = job.effective_beta, 0.0
    n = len(policy) // 2
    nll_terms = []
    for i in range(n):
        pc, pr, cc, cr = policy[i], policy[i + n], counts[i], counts[i + n]
        rc, rr = reference[i], reference[i + n]
        if job.loss_type == "ipo":
            h = (pc / cc - rc / cc) - (pr / cr - rr / cr)
            total += (h - 1 / (2 * b)) ** 2
        elif job.loss_type == "hinge":
            total += max(0.0, 1 - b * ((pc - rc) - (pr - rr)))
        elif job.loss_type == "robust":
            e, h = job.label_smoothing, (pc - rc) - (pr - rr)
            total += (-(1 - e) * log_sigmoid(b * h) + e * log_sigmoid(-b * h)) / (1 - 2 * e)
        elif job.loss_type == "sigmoid":
            e, h = job.label_smoothing, (pc - rc) - (pr - rr)
            total += -(1 - e) * log_sigmoid(b * h) - e * log_sigmoid(-b * h)
        elif job.loss_type == "simpo":
            gamma = job.simpo_gamma if job.simpo_gamma is not None else job.gamma_beta_ratio * b
            total += -log_sigmoid(b * (pc / cc - pr / cr) - gamma)
        elif job.loss_type == "orpo":
            def log_odds(avg):
                return avg - math.log(1 - math.exp(avg))
            total += -b * log_sigmoid(log_odds(pc / cc) - log_odds(pr / cr))
        nll_terms.append((pc, cc))
    loss = total / n
    weight = job.effective_nll_weight
    if weight:
        loss += weight * -sum(p for p, _ in nll_terms) / sum(c for _, c in nll_terms)
    return loss


VARIANTS = [
    {"loss_type": "sigmoid", "label_smoothing": 0.1},
    {"loss_type": "robust", "label_smoothing": 0.2},
    {"loss_type": "hinge"},
    {"loss_type": "ipo", "beta": 0.3},
    {"loss_type": "sigmoid", "nll_weight": 0.5},
    {"loss_type": "simpo", "beta": None, "simpo_gamma": 0.7},
    {"loss_type": "simpo", "beta": 2.5, "gamma_beta_ratio": 0.3},
    {"loss_type": "orpo", "beta": None},
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
def test_every_variant_through_the_recipe_equals_the_hand_computed_loss(tmp_path, pairs_file, tiny_model,
                                                                         tiny_tokenizer, variant):
    reference_model = copy.deepcopy(tiny_model)
    with torch.no_grad():  # a policy that differs from the reference, so log-ratios are not zero
        for parameter in tiny_model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    job = dpo_job(tmp_path, pairs_file, **variant)
    recipe = DPORecipe(job, model=tiny_model, tokenizer=tiny_tokenizer,
                       reference_model=None if job.loss_type in ("simpo", "orpo") else reference_model)
    indices = list(range(6))
    batch = recipe.training_batch(indices)
    loss, metrics = recipe.loss(batch)
    pairs = [recipe.train_pairs[i] for i in indices]
    policy, counts = naive_sums(tiny_model, pairs)
    reference, _ = naive_sums(reference_model, pairs)
    expected = expected_loss(job, policy.tolist(), reference.tolist(), counts.tolist())
    assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert {"reward_chosen", "reward_rejected", "reward_accuracy", "reward_margin", "logp_chosen",
            "logp_rejected"} <= set(metrics)
    assert metrics["logp_chosen"] == pytest.approx(policy[:6].mean().item(), rel=1e-4)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_model.parameters())


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo", "orpo"])
def test_a_few_steps_raise_reward_accuracy_on_a_learnable_preference(tmp_path, tiny_model, tiny_tokenizer, loss_type):
    train = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(40))
    job = dpo_job(tmp_path, train, loss_type=loss_type, beta=0.5 if loss_type == "sigmoid" else None)
    recipe = DPORecipe(job, model=tiny_model, tokenizer=tiny_tokenizer)
    result = Engine(job.training, recipe, tmp_path / "run").train()
    first, last = result["eval_history"][0], result["eval_history"][-1]
    assert last["eval/reward_accuracy"] >= 0.9 and last["eval/reward_accuracy"] > first["eval/reward_accuracy"]
    assert last["eval/reward_margin"] > first["eval/reward_margin"]
    assert first["eval/kl"] == pytest.approx(0.0, abs=1e-6) and last["eval/kl"] > 0
    if loss_type == "sigmoid":  # the policy is its reference at step 0: every pair a tie, counted half
        assert first["eval/reward_accuracy"] == 0.5


def test_eval_reward_accuracy_scores_a_dpo_policy_by_its_implicit_reward(tmp_path, tiny_model, tiny_tokenizer):
    from alignkit.evaluate.metrics import reward_accuracy

    train = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(40))
    held_out = write_jsonl(tmp_path / "held_out.jsonl", synthetic_pairs(24, seed=7))
    base = copy.deepcopy(tiny_model)
    policy = add_lora(tiny_model, rank=4, alpha=8, dropout=0.0)
    with pytest.raises(ValueError, match="--reference-model"):
        reward_accuracy(base, tiny_tokenizer, str(held_out))        # a plain model has no reference
    before = reward_accuracy(policy, tiny_tokenizer, str(held_out), beta=0.5)
    assert before["scored_by"] == "implicit reward" and before["reference"].startswith("base model")
    assert before["ties"] == before["n"] == 24 and before["accuracy"] == 0.5   # untrained adapter: all ties
    job = dpo_job(tmp_path, train, beta=0.5)
    Engine(job.training, DPORecipe(job, model=policy, tokenizer=tiny_tokenizer), tmp_path / "run").train()
    after = reward_accuracy(policy, tiny_tokenizer, str(held_out), beta=0.5)
    assert after["accuracy"] >= 0.9 and after["ties"] == 0 and after["accuracy_interval"][0] > 0.5
    # the same numbers with the untouched base model given as the reference
    explicit = reward_accuracy(policy, tiny_tokenizer, str(held_out), beta=0.5, reference_model=(base, tiny_tokenizer))
    assert explicit["accuracy"] == after["accuracy"]
    assert explicit["mean_margin"] == pytest.approx(after["mean_margin"], rel=1e-4, abs=1e-5)
    # beta scales margins, not accuracy
    doubled = reward_accuracy(policy, tiny_tokenizer, str(held_out), beta=1.0)
    assert doubled["mean_margin"] == pytest.approx(2 * after["mean_margin"], rel=1e-4)
    assert doubled["accuracy"] == after["accuracy"]


@pytest.mark.parametrize("precompute", [True, False])
def test_lora_reference_is_the_base_model_and_the_policy_moves(tmp_path, pairs_file, tiny_model, tiny_tokenizer,
                                                               precompute):
    base = copy.deepcopy(tiny_model)
    policy = add_lora(tiny_model, rank=4, alpha=8, dropout=0.0)
    job = dpo_job(tmp_path, pairs_file, precompute_reference_logprobs=precompute)
    recipe = DPORecipe(job, model=policy, tokenizer=tiny_tokenizer)
    indices = list(range(8))
    batch = recipe.training_batch(indices)
    base_sums, _ = naive_sums(base, [recipe.train_pairs[i] for i in indices])

    def reference_now():
        if precompute:
            return batch["reference"]
        return recipe._reference_logps(recipe.collate([recipe.train_pairs[i] for i in indices]), recipe.reference)[0]

    torch.testing.assert_close(reference_now(), base_sums, atol=1e-4, rtol=1e-5)
    engine = Engine(job.training.model_copy(update={"max_steps": 1, "eval_steps": None}), recipe, tmp_path / "run")
    engine.train()
    torch.testing.assert_close(reference_now(), base_sums, atol=1e-4, rtol=1e-5)
    moved, _ = response_logprob_sums(policy, batch)
    assert (moved - base_sums).abs().max() > 1e-3
    assert sum(p.numel() for p in policy.parameters()) == sum(p.numel() for p in base.parameters()) + sum(
        p.numel() for n, p in policy.named_parameters() if "lora_" in n)  # one copy of the base weights


def test_full_finetuning_live_reference_is_a_frozen_copy(tmp_path, pairs_file, tiny_model, tiny_tokenizer):
    start = copy.deepcopy(tiny_model)
    job = dpo_job(tmp_path, pairs_file, precompute_reference_logprobs=False)
    recipe = DPORecipe(job, model=tiny_model, tokenizer=tiny_tokenizer)
    batch = recipe.training_batch([0, 1, 2])
    assert "reference" not in batch
    Engine(job.training.model_copy(update={"max_steps": 2, "eval_steps": None}), recipe, tmp_path / "run").train()
    torch.testing.assert_close(recipe._reference_logps(batch, recipe.reference)[0], naive_sums(start, recipe.train_pairs[:3])[0],
                               atol=1e-4, rtol=1e-5)
    assert not any(p.requires_grad for p in recipe.reference.module.parameters())


def test_continuing_an_adapter_keeps_that_adapter_as_the_reference(tmp_path, pairs_file, tiny_model, tiny_tokenizer):
    policy = add_lora(tiny_model, rank=4, alpha=8, dropout=0.0)
    with torch.no_grad():  # an adapter that already changed the model (an SFT run's output)
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    start = copy.deepcopy(policy)
    job = dpo_job(tmp_path, pairs_file, precompute_reference_logprobs=False)
    recipe = DPORecipe(job, model=policy, tokenizer=tiny_tokenizer)
    assert recipe.reference.mode == "reference_adapter"
    batch = recipe.training_batch([0, 1, 2])
    Engine(job.training.model_copy(update={"max_steps": 2, "eval_steps": None}), recipe, tmp_path / "run").train()
    torch.testing.assert_close(recipe._reference_logps(batch, recipe.reference)[0], naive_sums(start, recipe.train_pairs[:3])[0],
                               atol=1e-4, rtol=1e-5)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)
    recipe.save_final(tmp_path / "final")
    assert not (tmp_path / "final" / "reference").exists()


def test_reference_cache_is_reused_and_keyed_by_tokenization(tmp_path, pairs_file, tiny_model, tiny_tokenizer,
                                                             monkeypatch):
    job = dpo_job(tmp_path, pairs_file)
    first = DPORecipe(job, model=tiny_model, tokenizer=tiny_tokenizer)
    assert first.cache_path().exists()

    def fail(*args, **kwargs):
        raise AssertionError("the reference was recomputed instead of read from the cache")

    monkeypatch.setattr(DPORecipe, "_reference_pass", fail)
    again = DPORecipe(job, model=tiny_model, tokenizer=tiny_tokenizer)
    assert any("loaded from cache" in note for note in again.notes)
    assert torch.equal(again.precomputed["train"], first.precomputed["train"])
    shorter = dpo_job(tmp_path, pairs_file)
    shorter.data.max_length = 20  # other token ids -> another key
    with pytest.raises(AssertionError, match="recomputed"):
        DPORecipe(shorter, model=tiny_model, tokenizer=tiny_tokenizer)
    with torch.no_grad():  # other weights -> another key
        next(tiny_model.parameters()).add_(1.0)
    with pytest.raises(AssertionError, match="recomputed"):
        DPORecipe(job, model=tiny_model, tokenizer=tiny_tokenizer)


def test_updates_are_a_pure_function_of_the_step(tmp_path, pairs_file, tiny_model, tiny_tokenizer):
    job = dpo_job(tmp_path, pairs_file)
    job.training.batch_size = 4
    recipe = DPORecipe(job, model=tiny_model, tokenizer=tiny_tokenizer)
    stream = recipe.updates(0)
    from_start = [next(stream) for _ in range(9)]  # crosses an epoch boundary (24 pairs / 4 = 6 steps)
    resumed = next(recipe.updates(7))
    for a, b in zip(from_start[7], resumed):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_config_names_aliases_and_errors(tmp_path):
    path = tmp_path / "dpo.yaml"
    path.write_text("method: dpo\nloss_type: simpo\nprecompute_ref_log_probs: false\nmax_prompt_length: 32\n"
                    "ranking_pairs: adjacent\ndata: {train: x.jsonl}\n")
    job = load_job("dpo", path)
    assert job.precompute_reference_logprobs is False and job.data.max_prompt_length == 32
    assert job.effective_beta == 2.0 and job.effective_nll_weight == 0.0
    assert build_job("dpo", {"loss_type": "orpo"}).effective_nll_weight == 1.0
    assert build_job("dpo", {}).effective_beta == 0.1
    with pytest.raises(ConfigError, match="label_smoothing"):
        build_job("dpo", {"loss_type": "hinge", "label_smoothing": 0.1})
    with pytest.raises(ConfigError, match="loss_type"):
        build_job("dpo", {"loss_type": "kto"})
    with pytest.raises(ConfigError, match="reference-free"):
        build_job("dpo", {"loss_type": "orpo", "reference_model": "somewhere"})
