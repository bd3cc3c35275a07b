"""Checkpoints that cannot run code, SIGTERM handled like Ctrl-C, and a run folder that tells one story
after kill -9 (debris of dead writers removed, metrics cut back to the checkpoint, pruning by step)."""
import json
import os
import pickle
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from alignkit.engine import Engine
from tests.test_engine import ToyRecipe, config


class Payload:
    """Unpickling this runs a shell command: what a crafted state.pt can do with weights_only=False."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def metric_steps(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_a_crafted_state_pt_is_refused_and_runs_nothing(tmp_path):
    Engine(config(tmp_path, max_steps=3, save_steps=3), ToyRecipe(), tmp_path).train()
    checkpoint = tmp_path / "checkpoints" / "step-0000003"
    for name in ("state.json", "state.safetensors"):
        (checkpoint / name).unlink(missing_ok=True)
    marker = tmp_path / "owned"
    with open(checkpoint / "state.pt", "wb") as handle:
        pickle.dump({"step": Payload(marker)}, handle, protocol=2)
    with pytest.raises(ValueError, match="refusing to load"):
        Engine(config(tmp_path, max_steps=6, resume=True), ToyRecipe(), tmp_path).train()
    assert not marker.exists()


def test_checkpoint_state_is_json_and_safetensors(tmp_path):
    """(test_engine's resume test checks that resuming from this format stays exact.)"""
    Engine(config(tmp_path, max_steps=12, save_steps=5, save_total_limit=1), ToyRecipe(), tmp_path).train()
    checkpoint = tmp_path / "checkpoints" / "step-0000012"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "checkpoint.json", "state.json", "state.safetensors", "trainable.safetensors"]
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["step"] == 12 and state["optimizer"]["param_groups"][0]["lr"] == 0.05


def test_a_legacy_state_pt_of_tensors_and_plain_values_still_resumes(tmp_path):
    """Checkpoints written by earlier versions (torch.save of the same dict) load with weights_only=True."""
    from alignkit.seeding import rng_state

    engine = Engine(config(tmp_path, max_steps=4, save_steps=4), ToyRecipe(), tmp_path)
    engine.train()
    checkpoint = tmp_path / "checkpoints" / "step-0000004"
    legacy = {"optimizer": engine.optimizer.state_dict(), "scheduler": engine.scheduler.state_dict(),
              "rng": rng_state(), "step": 4, "best_metric": None, "bad_evals": 0, "recipe": None}
    assert isinstance(legacy["rng"]["numpy"][1], np.ndarray)
    for name in ("state.json", "state.safetensors"):
        (checkpoint / name).unlink()
    torch.save(legacy, checkpoint / "state.pt")
    result = Engine(config(tmp_path, max_steps=6, resume=True), ToyRecipe(), tmp_path).train()
    assert [h["step"] for h in result["history"]] == [5, 6]


def test_sigterm_finishes_the_step_saves_and_raises_with_the_signal(tmp_path):
    class Terminated(ToyRecipe):
        def loss(self, indices):
            if self.calls == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().loss(indices)

    def unhandled(signum, frame):  # without the engine's handler SIGTERM would end pytest itself
        raise RuntimeError("SIGTERM reached the default handler")

    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        with pytest.raises(KeyboardInterrupt) as stopped:
            Engine(config(tmp_path), Terminated(), tmp_path).train()
        assert signal.getsignal(signal.SIGTERM) is unhandled  # the engine put the old handler back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert getattr(stopped.value, "signal_number", None) == signal.SIGTERM
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000004"]
    result = Engine(config(tmp_path, resume=True), ToyRecipe(), tmp_path).train()
    assert result["history"][0]["step"] == 5 and result["steps"] == 12


def test_after_kill_minus_9_resume_removes_debris_and_repeats_no_metric_line(tmp_path):
    full = Engine(config(tmp_path / "full"), ToyRecipe(), tmp_path / "full").train()
    run = tmp_path / "run"
    Engine(config(run, max_steps=8, save_steps=5), ToyRecipe(), run).train()
    # what kill -9 at step 8 leaves: the checkpoint of step 5, metrics up to 8 with a half-written
    # line, and a dead writer's half-written checkpoint folder
    for path in (run / "checkpoints").glob("step-*"):
        if path.name != "step-0000005":
            import shutil

            shutil.rmtree(path)
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 9, "lo')
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    debris = run / "checkpoints" / f".tmp-step-0000010-{dead.pid}"
    debris.mkdir()
    (debris / "trainable.safetensors").write_bytes(b"\0" * 1024)
    result = Engine(config(run, resume=True), ToyRecipe(), run).train()
    assert not debris.exists()
    assert metric_steps(run) == list(range(1, 13))
    losses = {json.loads(line)["step"]: json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()}
    assert losses[12] == pytest.approx(full["history"][-1]["loss"], rel=1e-6)
    assert result["steps"] == 12


def test_resuming_an_earlier_checkpoint_drops_the_later_ones_and_pruning_goes_by_step(tmp_path):
    Engine(config(tmp_path, max_steps=10, save_steps=5, save_total_limit=3), ToyRecipe(), tmp_path).train()
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000005", "step-0000010"]
    Engine(config(tmp_path, max_steps=12, save_steps=6, save_total_limit=2,
                  resume=str(checkpoints / "step-0000005")), ToyRecipe(), tmp_path).train()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000006", "step-0000012"]
    assert metric_steps(tmp_path) == list(range(1, 13))
    # names do not sort like numbers past 9,999,999 steps; pruning reads the number
    engine = Engine(config(tmp_path, save_total_limit=1), ToyRecipe(), tmp_path)
    engine.step = 9_999_999
    engine.save_checkpoint()
    engine.step = 10_000_000
    newest = engine.save_checkpoint()
    assert sorted(p.name for p in checkpoints.iterdir()) == [newest.name] == ["step-10000000"]


def test_resuming_a_checkpoint_past_the_jobs_last_step_is_an_error(tmp_path):
    Engine(config(tmp_path, max_steps=10, save_steps=10), ToyRecipe(), tmp_path).train()
    with pytest.raises(ValueError, match="at step 10, past this job's last step 4"):
        Engine(config(tmp_path, max_steps=4, resume=True), ToyRecipe(), tmp_path).train()


def test_sigterm_to_the_cli_saves_a_checkpoint_and_exits_143(tmp_path, capsys):
    """What a scheduler (SLURM, Kubernetes) does to a job: SIGTERM while it trains, then wait for it."""
    import threading
    import time

    from alignkit.cli import main
    from tests.helpers import save_tiny_model
    from tests.test_sft import ROWS

    save_tiny_model(tmp_path / "tiny")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in ROWS * 4))
    run = tmp_path / "run"

    def scheduler():  # another thread, like another process: signal once training has begun
        deadline = time.time() + 60
        while time.time() < deadline:
            if (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 2:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    def unhandled(signum, frame):  # without alignkit's handler SIGTERM would end pytest itself
        raise SystemExit("SIGTERM reached the default handler")

    previous = signal.signal(signal.SIGTERM, unhandled)
    watcher = threading.Thread(target=scheduler, daemon=True)
    watcher.start()
    try:
        code = main(["sft", "--set", f"model.name_or_path={tmp_path / 'tiny'}", "--set",
                     f"data.train={tmp_path / 'train.jsonl'}", "--set", f"training.output_dir={run}",
                     "--set", "training.max_steps=100000", "--set", "lora.rank=4", "--set", "training.progress=false",
                     "--set", "training.tensorboard=false", "--set", "data.validation_fraction=0"])
    finally:
        watcher.join()
        signal.signal(signal.SIGTERM, previous)
    output = capsys.readouterr()
    assert code == 143
    assert "SIGTERM: finishing this step and saving a checkpoint" in output.out
    assert "[alignkit] stopped: SIGTERM at step" in output.err
    saved = [p.name for p in (run / "checkpoints").iterdir()]
    assert len(saved) == 1 and saved[0].startswith("step-")
    assert metric_steps(run) == list(range(1, int(saved[0].split("-")[1]) + 1))
    assert not (run / ".alignkit.lock").exists()
