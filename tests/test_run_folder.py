"""A run folder holds one job: a second job is refused unless --resume (the same job) or --overwrite,
resume refuses a job that trains differently (naming the keys) unless forced, one live process per
folder (stale locks of dead processes are taken over), and user mistakes are one line."""
import json
import subprocess
import sys

import pytest
import yaml

from alignkit.cli import main
from alignkit.methods import load_job
from alignkit.methods.base import run_job
from alignkit.run_folder import (
    LOCK_NAME,
    RunFolderError,
    RunLock,
    training_path_differences,
)
from tests.helpers import save_tiny_model
from tests.test_sft import ROWS


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    save_tiny_model(root / "tiny")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in ROWS * 4))
    return root


def sft(assets, run, *overrides):
    base = [f"model.name_or_path={assets / 'tiny'}", f"data.train={assets / 'train.jsonl'}", "lora.rank=4",
            f"training.output_dir={run}", "training.progress=false", "training.tensorboard=false",
            "training.batch_size=4", "training.learning_rate=0.01", "training.save_steps=2",
            "training.eval_at_start=false", "data.validation_fraction=0", "training.max_steps=4"]
    return load_job("sft", None, base + list(overrides))


def train_steps(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_second_job_into_a_finished_run_folder_is_refused_and_changes_nothing(assets, tmp_path):
    run = tmp_path / "run"
    run_job(sft(assets, run))
    before = {p.name: p.stat().st_mtime_ns for p in run.rglob("*")}
    with pytest.raises(RunFolderError, match=r"already holds a previous run .*--resume.*--overwrite"):
        run_job(sft(assets, run, "training.max_steps=2", "training.learning_rate=0.02"))
    assert {p.name: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    assert not (run / LOCK_NAME).exists()


def test_overwrite_starts_afresh(assets, tmp_path):
    run = tmp_path / "run"
    run_job(sft(assets, run, "training.max_steps=6"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000004", "step-0000006"]
    summary = run_job(sft(assets, run, "training.max_steps=2", "training.learning_rate=0.02", "training.overwrite=true"))
    assert summary["steps"] == 2 and train_steps(run) == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002"]
    assert yaml.safe_load((run / "config.yaml").read_text())["training"]["learning_rate"] == 0.02
    assert any("overwrite: deleting the previous run" in note for note in summary["notes"])


def test_overwrite_never_deletes_files_alignkit_did_not_write(assets, tmp_path):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "thesis.tex").write_text("do not delete")
    with pytest.raises(RunFolderError, match=r"holds files alignkit did not write \(thesis.tex\)"):
        run_job(sft(assets, run, "training.overwrite=true"))
    assert (run / "thesis.tex").read_text() == "do not delete"


def test_resume_refuses_a_different_job_naming_the_keys_unless_forced(assets, tmp_path):
    run = tmp_path / "run"
    run_job(sft(assets, run, "training.max_steps=10", "training.save_steps=5"))
    changed = ("training.max_steps=4", "training.learning_rate=0.02", "training.resume=true")
    with pytest.raises(RunFolderError) as refused:
        run_job(sft(assets, run, *changed))
    message = str(refused.value)
    assert "training.learning_rate (0.01 -> 0.02)" in message and "training.max_steps (10 -> 4)" in message
    assert "--force-resume" in message and train_steps(run) == list(range(1, 11))
    # forced: continues from step 10 under the new settings, which end at step 4 -> refused by the engine
    with pytest.raises(ValueError, match="at step 10, past this job's last step 4"):
        run_job(sft(assets, run, *changed, "training.force_resume=true"))


def test_resume_of_the_same_job_continues_and_may_extend_a_constant_schedule(assets, tmp_path):
    run = tmp_path / "run"
    common = ("training.lr_scheduler=constant", "training.eval_steps=2")
    run_job(sft(assets, run, *common))
    summary = run_job(sft(assets, run, *common, "training.max_steps=6", "training.eval_steps=3",
                          "training.resume=true"))
    assert summary["steps"] == 6
    steps = [line["step"] for line in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in line]
    assert steps == [1, 2, 3, 4, 5, 6]
    # a cosine schedule's learning rates depend on the total: extending it changes the path
    previous = yaml.safe_load((run / "config.yaml").read_text())
    cosine = json.loads(json.dumps(previous))
    previous["training"]["lr_scheduler"] = cosine["training"]["lr_scheduler"] = "cosine"
    cosine["training"]["max_steps"] = 12
    assert training_path_differences(previous, cosine) == ["training.max_steps"]


def test_a_live_process_holding_the_folder_is_refused_and_a_dead_ones_lock_is_taken_over(assets, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = RunLock(run)
        (run / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": __import__("socket").gethostname(),
                                                 "started": "earlier"}))
        with pytest.raises(RunFolderError, match=rf"is in use by process {holder.pid}"):
            run_job(sft(assets, run, "training.max_steps=2"))
        assert lock.read_owner().pid == holder.pid  # the holder's lock is untouched
    finally:
        holder.kill()
        holder.wait()
    summary = run_job(sft(assets, run, "training.max_steps=2"))  # the lock is stale now
    assert summary["steps"] == 2
    assert any(f"stale lock of process {holder.pid}" in note for note in summary["notes"])
    assert not (run / LOCK_NAME).exists()


def test_two_locks_in_one_process_cannot_both_be_held(tmp_path):
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    assert first.acquire() is None
    with pytest.raises(RunFolderError, match="is in use by process"):
        second.acquire()
    first.release()
    assert second.acquire() is None
    second.release()


def test_folder_mistakes_are_one_line_errors(assets, tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    base = ["sft", "--set", f"model.name_or_path={assets / 'tiny'}", "--set", f"data.train={assets / 'train.jsonl'}"]
    assert main([*base, "--set", f"training.output_dir={a_file}"]) == 2
    error = capsys.readouterr().err
    assert error.strip() == f"alignkit: error: training.output_dir {a_file} is a file, not a folder; choose another output_dir"
    assert main([*base, "--set", "training.output_dir=runs/{time}", "--resume"]) == 2
    assert "holds {time}" in capsys.readouterr().err
    assert main([*base, "--set", f"training.output_dir={tmp_path / 'r'}", "--resume", "--overwrite"]) == 2
    assert "choose one" in capsys.readouterr().err
