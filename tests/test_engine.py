"""The shared engine on a toy recipe: schedule, accumulation, checkpoints, resume, NaN, Ctrl-C."""
import json
import math
import os
import signal

import pytest
import torch

from alignkit.config import TrainingConfig
from alignkit.engine import Engine, TrainingDiverged, learning_rate_factor


class ToyRecipe:
    """Noisy linear regression with dropout, so RNG state matters for exact resume."""

    def __init__(self, seed=0, n=64, batch=8, accumulation=1, nan_at_step=None, interrupt_at_step=None):
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=generator)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(n, generator=generator)
        self.model = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(4, 1))
        torch.nn.init.zeros_(self.model[1].weight)
        torch.nn.init.zeros_(self.model[1].bias)
        self.batch, self.accumulation, self.n = batch, accumulation, n
        self.nan_at_step, self.interrupt_at_step = nan_at_step, interrupt_at_step
        self.calls = 0

    def steps_per_epoch(self):
        return math.ceil(self.n / self.batch / self.accumulation)

    def updates(self, start_step):
        step = start_step
        while True:
            epoch, within = divmod(step, self.steps_per_epoch())
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(100 + epoch)).tolist()
            first = within * self.accumulation * self.batch
            yield [order[first + k * self.batch: first + (k + 1) * self.batch] for k in range(self.accumulation)]
            step += 1

    def loss(self, indices):
        self.calls += 1
        prediction = self.model(self.x[indices]).squeeze(-1)
        loss = ((prediction - self.y[indices]) ** 2).mean()
        if self.nan_at_step is not None and self.calls == self.nan_at_step:
            loss = loss * float("nan")
        if self.interrupt_at_step is not None and self.calls == self.interrupt_at_step:
            os.kill(os.getpid(), signal.SIGINT)
        return loss, {}

    def evaluate(self):
        training = self.model.training
        self.model.eval()
        with torch.no_grad():
            loss = float(((self.model(self.x).squeeze(-1) - self.y) ** 2).mean())
        self.model.train(training)
        return {"loss": loss}


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=12, learning_rate=0.05, lr_scheduler="constant",
                progress=False, tensorboard=False, eval_at_start=False, seed=3)
    base.update(kw)
    return TrainingConfig(**base)


def test_learning_rate_schedules_hand_values():
    assert learning_rate_factor(0, 10, 2, "cosine") == pytest.approx(0.5)
    assert learning_rate_factor(1, 10, 2, "cosine") == pytest.approx(1.0)
    assert learning_rate_factor(2, 10, 2, "cosine") == pytest.approx(1.0)
    assert learning_rate_factor(6, 10, 2, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    assert learning_rate_factor(9, 10, 0, "constant") == 1.0
    with pytest.raises(ValueError, match="unknown lr_scheduler"):
        learning_rate_factor(0, 10, 0, "step")


def test_training_reduces_loss_and_logs_jsonl(tmp_path):
    recipe = ToyRecipe()
    before = recipe.evaluate()["loss"]
    result = Engine(config(tmp_path, max_steps=40, eval_steps=20, learning_rate=0.2), recipe, tmp_path).train()
    after = recipe.evaluate()["loss"]
    assert after < 0.2 * before
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_steps = [line["step"] for line in lines if "loss" in line]
    assert train_steps == list(range(1, 41))
    assert [e["step"] for e in result["eval_history"]] == [20, 40]


def test_gradient_accumulation_matches_large_batch(tmp_path):
    """Two micro-batches of 8 with accumulation = one batch of 16 (equal-size means)."""
    small = ToyRecipe(batch=8, accumulation=2)
    big = ToyRecipe(batch=16, accumulation=1)
    small.model[0].p = big.model[0].p = 0.0  # no dropout: compare exactly
    Engine(config(tmp_path / "a", max_steps=5), small, tmp_path / "a").train()
    Engine(config(tmp_path / "b", max_steps=5), big, tmp_path / "b").train()
    torch.testing.assert_close(small.model[1].weight, big.model[1].weight, atol=1e-6, rtol=1e-5)


def test_resume_reproduces_uninterrupted_run(tmp_path):
    full = ToyRecipe()
    full_result = Engine(config(tmp_path / "full", lr_scheduler="cosine", warmup_steps=2), full, tmp_path / "full").train()

    first = ToyRecipe()
    Engine(config(tmp_path / "cut", max_steps=12, save_steps=5, save_total_limit=5, lr_scheduler="cosine", warmup_steps=2),
           first, tmp_path / "cut").train()
    # drop later checkpoints: pretend the run died right after step 5
    import shutil

    for path in (tmp_path / "cut" / "checkpoints").glob("step-*"):
        if path.name != "step-0000005":
            shutil.rmtree(path)
    assert (tmp_path / "cut" / "checkpoints" / "step-0000005").exists()
    resumed = ToyRecipe()
    result = Engine(config(tmp_path / "cut", lr_scheduler="cosine", warmup_steps=2, resume=True),
                    resumed, tmp_path / "cut").train()
    assert result["history"][0]["step"] == 6
    assert result["history"][0]["loss"] == pytest.approx(full_result["history"][5]["loss"], rel=1e-6)
    torch.testing.assert_close(resumed.model[1].weight, full.model[1].weight)


def test_checkpoint_limit_and_atomic_layout(tmp_path):
    Engine(config(tmp_path, max_steps=9, save_steps=3, save_total_limit=2), ToyRecipe(), tmp_path).train()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-0000006", "step-0000009"]
    for name in names:
        assert {p.name for p in (tmp_path / "checkpoints" / name).iterdir()} == \
            {"trainable.safetensors", "state.json", "state.safetensors", "checkpoint.json"}


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    recipe = ToyRecipe(nan_at_step=7)
    with pytest.raises(TrainingDiverged, match=r"step 7: loss is nan.*step-0000005"):
        Engine(config(tmp_path, save_steps=5), recipe, tmp_path).train()
    assert [p.name for p in (tmp_path / "checkpoints").glob("step-*")] == ["step-0000005"]


def test_ctrl_c_saves_a_checkpoint_then_stops(tmp_path):
    recipe = ToyRecipe(interrupt_at_step=4)
    with pytest.raises(KeyboardInterrupt):
        Engine(config(tmp_path), recipe, tmp_path).train()
    saved = [p.name for p in (tmp_path / "checkpoints").glob("step-*")]
    assert saved == ["step-0000004"]
    resumed = ToyRecipe()
    result = Engine(config(tmp_path, resume=True), resumed, tmp_path).train()
    assert result["history"][0]["step"] == 5 and result["steps"] == 12


def test_early_stopping_on_a_metric_that_stops_improving(tmp_path):
    class Flat(ToyRecipe):
        def evaluate(self):
            return {"score": 1.0}

    result = Engine(config(tmp_path, max_steps=50, eval_steps=2, early_stopping_metric="eval/score",
                           early_stopping_patience=2), Flat(), tmp_path).train()
    assert result["stopped_early"] and result["steps"] == 6


def test_no_trainable_parameters_is_an_error(tmp_path):
    recipe = ToyRecipe()
    for p in recipe.model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Engine(config(tmp_path), recipe, tmp_path)
