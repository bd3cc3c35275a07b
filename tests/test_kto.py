"""KTO: the loss equals its equation, the recipe's loss equals one computed from full logits, it learns."""
import math

import pytest
import torch

from alignkit.config import ConfigError
from alignkit.data import UnpairedExample
from alignkit.data.unpaired import mismatch_order, tokenize_unpaired
from alignkit.engine import Engine
from alignkit.losses import kto_loss
from alignkit.methods import build_job
from alignkit.methods.kto import KTORecipe, weight_balance_note
from tests.helpers import make_tiny_model, make_tiny_tokenizer

CAPITALS = [("france", "paris", "rome"), ("italy", "rome", "berlin"), ("spain", "madrid", "paris"),
            ("germany", "berlin", "madrid"), ("england", "london", "rome")]


def examples():
    out = []
    for i, (country, good, bad) in enumerate(CAPITALS):
        prompt = [{"role": "user", "content": f"what is the capital of {country}?"}]
        out.append(UnpairedExample(prompt, good, True, f"mem:{i}a"))
        out.append(UnpairedExample(prompt, bad, False, f"mem:{i}b"))
    return out


def job(tmp_path, **keys):
    return build_job("kto", {"training": {"output_dir": str(tmp_path), "progress": False, "tensorboard": False,
                                          "batch_size": 4, "learning_rate": 0.01, "lr_scheduler": "constant",
                                          "max_steps": 1, "eval_at_start": False},
                             "data": {"max_length": 64}, "reference_cache_dir": str(tmp_path / "cache"), **keys})


def test_kto_loss_is_its_equation():
    policy = torch.tensor([-1.0, -2.0, -3.0])
    reference = torch.tensor([-1.5, -1.0, -3.0])
    desirable = torch.tensor([True, False, True])
    kl_policy, kl_reference = torch.tensor([-4.0, -5.0]), torch.tensor([-4.6, -5.0])  # z0 = mean(0.6, 0) = 0.3
    losses, rewards, z0 = kto_loss(policy, reference, desirable, kl_policy, kl_reference, beta=0.5,
                                   desirable_weight=1.5, undesirable_weight=0.7)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert float(z0) == pytest.approx(0.3)
    expected = [1.5 * (1 - sigmoid(0.5 * (0.5 - 0.3))), 0.7 * (1 - sigmoid(0.5 * (0.3 - (-1.0)))),
                1.5 * (1 - sigmoid(0.5 * (0.0 - 0.3)))]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert rewards.tolist() == pytest.approx([0.25, -0.5, 0.0])
    # z0 is clamped at 0 and carries no gradient
    kl = torch.tensor([-5.0], requires_grad=True)
    _, _, z0 = kto_loss(policy, reference, desirable, kl, torch.tensor([-4.0]))
    assert float(z0) == 0.0 and not z0.requires_grad


def test_mismatch_is_a_seeded_derangement():
    partner = mismatch_order(7, seed=3)
    assert sorted(partner) == list(range(7)) and all(p != i for i, p in enumerate(partner))
    assert partner == mismatch_order(7, seed=3) and partner != mismatch_order(7, seed=4)


def _sequence_logp(model, ids: list[int], start: int) -> float:
    """log p(ids[start:] | ids[:start]) from the model's full logits (the plain way)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logps = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    return float(logps[start - 1:].sum())


def test_recipe_loss_equals_the_loss_from_full_logits(tmp_path):
    tokenizer = make_tiny_tokenizer()
    policy, reference = make_tiny_model(tokenizer, seed=0), make_tiny_model(tokenizer, seed=1)
    data = examples()[:6]
    recipe = KTORecipe(job(tmp_path, beta=0.3, desirable_weight=1.2), model=policy, tokenizer=tokenizer,
                       train=data, validation=[], reference_model=reference)
    indices = [0, 1, 2, 5]
    batch = recipe.training_batch(indices)
    loss, metrics = recipe.loss(batch)
    pairs, labels, _ = tokenize_unpaired(tokenizer, data, 64, seed=0)
    own = [(pairs[i].chosen_ids, pairs[i].chosen_start) for i in indices]
    mismatched = [(pairs[i].rejected_ids, pairs[i].rejected_start) for i in indices]
    logp = torch.tensor([_sequence_logp(policy, *s) for s in own])
    logp_ref = torch.tensor([_sequence_logp(reference, *s) for s in own])
    z0 = max(0.0, sum(_sequence_logp(policy, *s) - _sequence_logp(reference, *s) for s in mismatched) / 4)
    sigmoid = torch.sigmoid
    r = logp - logp_ref
    desirable = torch.tensor([labels[i] for i in indices])
    expected = torch.where(desirable, 1.2 * (1 - sigmoid(0.3 * (r - z0))), 1 - sigmoid(0.3 * (z0 - r))).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), abs=1e-5)
    assert metrics["kl"] == pytest.approx(z0, abs=1e-5)
    assert metrics["reward_desirable"] == pytest.approx(float(0.3 * r[desirable].mean()), abs=1e-5)


def test_kto_learns_the_labels(tmp_path):
    tokenizer = make_tiny_tokenizer()
    data = examples()
    run = job(tmp_path, **{"training": {"output_dir": str(tmp_path), "progress": False, "tensorboard": False,
                                        "batch_size": 5, "learning_rate": 0.01, "lr_scheduler": "constant",
                                        "max_steps": 24, "eval_steps": 24}})
    recipe = KTORecipe(run, model=make_tiny_model(tokenizer), tokenizer=tokenizer, train=data, validation=data)
    before = recipe.evaluate()
    assert before["reward_accuracy"] == 0.5 and before["loss"] == pytest.approx(0.5)  # policy = reference
    Engine(run.training, recipe, tmp_path).train()
    after = recipe.evaluate()
    assert after["reward_accuracy"] >= 0.9
    assert after["loss"] < 0.35
    assert after["logp_desirable"] > before["logp_desirable"] + 2
    assert after["logp_undesirable"] < before["logp_undesirable"] - 2


def test_weights_note_and_batch_size_check(tmp_path):
    assert weight_balance_note(100, 100, 1.0, 1.0) is None
    note = weight_balance_note(100, 400, 1.0, 1.0)
    assert "= 0.25" in note and "desirable_weight in [4.00, 5.33]" in note
    with pytest.raises(ConfigError, match="batch_size must be at least 2"):
        build_job("kto", {"training": {"batch_size": 1}})
