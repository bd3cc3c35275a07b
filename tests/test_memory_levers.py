"""Memory levers (alignkit/memory.py): the activation estimate behind `gradient_checkpointing: auto`,
the engine switching checkpointing on from the recipe's largest micro-batch without changing the
losses, and freed memory returned to the system. Peak memory itself: bench/rm_memory.py."""
import sys

import pytest

import alignkit.memory as memory
from alignkit.engine import Engine
from alignkit.memory import activation_bytes, decide_gradient_checkpointing, layers_needing_activations
from alignkit.methods import build_job
from alignkit.methods.reward import RewardRecipe
from alignkit.model import add_lora
from alignkit.model.heads import ScalarHeadModel
from tests.helpers import make_tiny_model, make_tiny_tokenizer
from tests.test_seeding import PAIRS


def test_activation_estimate_is_tokens_x_layers_x_width(tiny_model):
    # hidden 32, MLP 64, 2 layers, float32: 4 bytes x (16 x 32 + 4 x 64) = 3072 bytes per token per layer
    assert layers_needing_activations(tiny_model) == 2
    assert activation_bytes(tiny_model, 100) == 100 * 2 * 3072
    last_only = add_lora(tiny_model, rank=4, alpha=8, dropout=0.0, layers=1)
    assert layers_needing_activations(last_only) == 1  # backward stops at the first adapted layer
    threshold_tokens = memory.AUTO_CHECKPOINTING_BYTES // 3072
    assert decide_gradient_checkpointing("auto", last_only, threshold_tokens + 1)[0] is True
    assert decide_gradient_checkpointing("auto", last_only, threshold_tokens - 1)[0] is False
    assert decide_gradient_checkpointing(False, last_only, 10**9)[0] is False
    on, why = decide_gradient_checkpointing("auto", last_only, None)
    assert not on and "does not report" in why


def reward_run(tmp_path, monkeypatch, threshold):
    from alignkit.data import PreferenceExample

    monkeypatch.setattr(memory, "AUTO_CHECKPOINTING_BYTES", threshold)
    tokenizer = make_tiny_tokenizer()
    model = ScalarHeadModel(add_lora(make_tiny_model(tokenizer), rank=4, alpha=8, dropout=0.0))
    job = build_job("rm", {"training": {"max_steps": 3, "batch_size": 4, "learning_rate": 0.01, "progress": False,
                                        "tensorboard": False, "eval_at_start": False, "seed": 5}})
    examples = [PreferenceExample(prompt=[{"role": "user", "content": p["prompt"]}], chosen=p["chosen"],
                                  rejected=p["rejected"], source=f"mem:{i}") for i, p in enumerate(PAIRS * 2)]
    recipe = RewardRecipe(job, model=model, tokenizer=tokenizer, train=examples, validation=[])
    engine = Engine(job.training, recipe, tmp_path)
    return memory.uses_gradient_checkpointing(model), [h["loss"] for h in engine.train()["history"]]


def test_auto_checkpointing_switches_on_above_the_threshold_and_keeps_the_losses(tmp_path, monkeypatch):
    off, losses_off = reward_run(tmp_path / "off", monkeypatch, threshold=1 << 40)
    on, losses_on = reward_run(tmp_path / "on", monkeypatch, threshold=0)
    assert (off, on) == (False, True)
    assert losses_on == pytest.approx(losses_off, rel=1e-5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_returned_on_linux():
    assert memory.release_freed_memory() is True
