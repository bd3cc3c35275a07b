"""One seed covers everything a run draws, model surgery included: two identical LoRA runs, and two
identical reward-model runs, log identical losses and gradient norms from step 1."""
import json
import random

import pytest
import torch

from alignkit.methods import load_job
from alignkit.methods.base import run_job
from tests.helpers import save_tiny_model
from tests.test_sft import ROWS

PAIRS = [{"prompt": "what is the capital of france?", "chosen": "paris", "rejected": "rome"},
         {"prompt": "two plus two", "chosen": "four", "rejected": "five"},
         {"prompt": "a red fruit?", "chosen": "cherry", "rejected": "banana"},
         {"prompt": "a yellow one?", "chosen": "lemon", "rejected": "grape"}]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    save_tiny_model(root / "tiny")
    (root / "chat.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in ROWS * 4))
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS * 4))
    return root


def logged(run):
    return [(line["loss"], line["grad_norm"]) for line in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in line]


def run_twice(assets, tmp_path, method, data, *extra):
    results = []
    for name in ("a", "b"):
        # whatever ran before in this process must not matter: disturb every generator
        torch.manual_seed(len(name) * 7 + len(results))
        torch.rand(17 + 5 * len(results))
        random.random()
        job = load_job(method, None, [
            f"model.name_or_path={assets / 'tiny'}", f"data.train={assets / data}", "data.validation_fraction=0",
            f"training.output_dir={tmp_path / name}", "training.progress=false", "training.tensorboard=false",
            "training.batch_size=4", "training.max_steps=3", "training.learning_rate=0.01",
            "training.eval_at_start=false", "training.seed=11", *extra])
        run_job(job)
        results.append(logged(tmp_path / name))
    return results


def test_two_identical_lora_sft_runs_log_identical_losses(assets, tmp_path):
    first, second = run_twice(assets, tmp_path, "sft", "chat.jsonl", "lora.rank=4", "lora.dropout=0.1")
    assert len(first) == 3 and first == second


def test_two_identical_reward_model_runs_start_at_the_same_loss(assets, tmp_path):
    first, second = run_twice(assets, tmp_path, "rm", "pairs.jsonl", "lora.rank=4")
    assert len(first) == 3 and first == second
