"""`alignkit pipeline` on a tiny model: references, content-hash skipping, selection, resume, clear errors."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from alignkit.pipeline import PipelineError, State, load_pipeline, plan, run_pipeline
from tests.helpers import save_tiny_model

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [("what is the capital of france?", "paris", "rome"), ("what is the capital of italy?", "rome", "paris"),
             ("two plus two", "four", "five"), ("a red fruit?", "cherry", "banana"),
             ("a yellow fruit?", "lemon", "cherry"), ("capital of spain?", "madrid", "london")]


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A tiny model folder, SFT rows and preference pairs, and the pipeline file writer."""
    monkeypatch.chdir(tmp_path)
    save_tiny_model(tmp_path / "tiny")
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n"
                                                for q, a, _ in QUESTIONS * 2))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"prompt": q, "chosen": a, "rejected": r}) + "\n"
                                                  for q, a, r in QUESTIONS * 2))
    return tmp_path


TRAINING = {"progress": False, "tensorboard": False, "batch_size": 4, "learning_rate": 0.01,
            "lr_scheduler": "constant", "eval_at_start": False}


def write_pipeline(folder: Path, dpo_extra: dict | None = None, dpo_steps: int = 2, name: str = "p.yaml") -> Path:
    config = {
        "output_dir": "out",
        "defaults": {"model": {"device": "cpu", "dtype": "float32"}, "lora": {"rank": 4, "alpha": 8},
                     "data": {"validation_fraction": 0, "max_length": 64}, "training": TRAINING},
        "stages": {
            "sft": {"method": "sft", "model": {"name_or_path": "tiny"}, "data": {"train": "sft.jsonl"},
                    "training": {"max_steps": 2}},
            "dpo": {"method": "dpo", "model": {"name_or_path": "${sft.final}"}, "data": {"train": "pairs.jsonl"},
                    "training": {"max_steps": dpo_steps, "save_steps": 2}, **(dpo_extra or {})},
        },
    }
    path = folder / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def actions(result):
    return {step["stage"]: step["action"] for step in result["steps"]}


def test_two_stages_pass_outputs_skip_when_unchanged_and_rerun_only_what_changed(workspace):
    path = write_pipeline(workspace)
    first = run_pipeline(load_pipeline(path), log=lambda _: None)
    assert actions(first) == {"sft": "run", "dpo": "run"}
    sft_final = workspace / "out" / "sft" / "final"
    assert (sft_final / "adapter_config.json").exists()
    # stage 2 trained on stage 1's output: its resolved job names that folder
    dpo_config = yaml.safe_load((workspace / "out" / "dpo" / "config.yaml").read_text())
    assert Path(dpo_config["model"]["name_or_path"]) == Path("out/sft/final")
    assert dpo_config["training"]["output_dir"] == "out/dpo"
    weights = workspace / "out" / "dpo" / "final" / "adapter_model.safetensors"
    stamp = weights.stat().st_mtime_ns

    again = run_pipeline(load_pipeline(path), log=lambda _: None)
    assert actions(again) == {"sft": "skip", "dpo": "skip"}
    assert weights.stat().st_mtime_ns == stamp            # nothing was retrained

    # the same config spelled differently (a default written out) keeps the key
    write_pipeline(workspace, dpo_extra={"loss_type": "sigmoid"})
    assert actions(run_pipeline(load_pipeline(path), log=lambda _: None)) == {"sft": "skip", "dpo": "skip"}

    write_pipeline(workspace, dpo_extra={"beta": 0.2})     # change stage 2 only
    changed = run_pipeline(load_pipeline(path), log=lambda _: None)
    assert actions(changed) == {"sft": "skip", "dpo": "run"}
    assert yaml.safe_load((workspace / "out" / "dpo" / "config.yaml").read_text())["beta"] == 0.2

    # editing a data file of stage 1 re-runs stage 1 and, through its key, stage 2
    with (workspace / "sft.jsonl").open("a") as handle:
        handle.write(json.dumps({"prompt": "hello", "completion": "hi"}) + "\n")
    steps = plan(load_pipeline(path), State(workspace / "out"))
    assert [(s.stage, s.action) for s in steps] == [("sft", "run"), ("dpo", "run")]
    assert steps[1].reason == "upstream changed (sft)"


def test_only_and_from_select_stages_and_need_upstream_outputs(workspace):
    path = write_pipeline(workspace)
    with pytest.raises(PipelineError, match="stage 'dpo' needs the outputs of stage 'sft'"):
        run_pipeline(load_pipeline(path), only=["dpo"], log=lambda _: None)
    run_pipeline(load_pipeline(path), log=lambda _: None)
    assert actions(run_pipeline(load_pipeline(path), only=["dpo"], log=lambda _: None)) == \
        {"sft": "not selected", "dpo": "run"}
    assert actions(run_pipeline(load_pipeline(path), start="sft", log=lambda _: None)) == {"sft": "run", "dpo": "run"}
    with pytest.raises(PipelineError, match="no stage 'dop'; did you mean 'dpo'"):
        run_pipeline(load_pipeline(path), only=["dop"], log=lambda _: None)


def test_a_failed_stage_resumes_from_its_checkpoint(workspace, monkeypatch, capsys):
    from alignkit.engine import Engine

    path = write_pipeline(workspace, dpo_steps=4)
    original = Engine._optimizer_step

    def crash_at_step_three(self, micro_batches):
        if self.step == 2 and self.config.output_dir.endswith("dpo"):
            raise RuntimeError("power cut")
        return original(self, micro_batches)

    monkeypatch.setattr(Engine, "_optimizer_step", crash_at_step_three)
    with pytest.raises(RuntimeError, match="power cut"):
        run_pipeline(load_pipeline(path), log=lambda _: None)
    state = json.loads((workspace / "out" / "pipeline.json").read_text())["stages"]
    assert (state["sft"]["status"], state["dpo"]["status"]) == ("done", "failed")
    monkeypatch.setattr(Engine, "_optimizer_step", original)
    capsys.readouterr()
    result = run_pipeline(load_pipeline(path), log=print)
    assert actions(result) == {"sft": "skip", "dpo": "resume"}
    assert "resumed from out/dpo/checkpoints/step-0000002 at step 2" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (workspace / "out/dpo/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]                            # steps 1-2 from before the crash, kept


def test_a_killed_pipeline_process_resumes_the_stage_it_was_in(workspace):
    path = write_pipeline(workspace, dpo_steps=60)
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "alignkit.cli", "pipeline", str(path)], cwd=workspace,
                               env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = workspace / "out" / "dpo" / "checkpoints"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and not any((p / "state.json").exists() for p in checkpoints.glob("step-*")):
            assert process.poll() is None, "the pipeline ended before it could be killed"
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    state = json.loads((workspace / "out" / "pipeline.json").read_text())["stages"]
    assert (state["sft"]["status"], state["dpo"]["status"]) == ("done", "running")   # what kill -9 leaves
    assert not (workspace / "out/dpo/final").exists()
    kept = max(int(p.name.split("-")[1]) for p in checkpoints.glob("step-*") if (p / "state.json").exists())
    logged = [json.loads(line)["step"] for line in (workspace / "out/dpo/metrics.jsonl").read_text().splitlines()]
    result = run_pipeline(load_pipeline(path), log=lambda _: None)
    assert actions(result) == {"sft": "skip", "dpo": "resume"}
    steps = [json.loads(line)["step"] for line in (workspace / "out/dpo/metrics.jsonl").read_text().splitlines()]
    # the lines logged before the kill are kept; the resumed run continues after the checkpoint
    assert steps[:len(logged)] == logged
    assert steps[len(logged):] == list(range(kept + 1, 61))
    assert (workspace / "out/dpo/final/adapter_model.safetensors").exists()


def _write(folder: Path, stages: dict) -> Path:
    path = folder / "bad.yaml"
    path.write_text(yaml.safe_dump({"output_dir": "out", "stages": stages}, sort_keys=False))
    return path


def test_a_cycle_fails_in_one_line_naming_it(tmp_path):
    path = _write(tmp_path, {
        "a": {"method": "sft", "model": {"name_or_path": "${c.final}"}},
        "b": {"method": "dpo", "model": {"name_or_path": "${a.final}"}},
        "c": {"method": "dpo", "model": {"name_or_path": "${b.final}"}},
    })
    with pytest.raises(PipelineError) as error:
        load_pipeline(path)
    message = str(error.value)
    assert "\n" not in message
    assert "the stages form a cycle: a -> c -> b -> a" in message


def test_unknown_references_fail_in_one_line_naming_them(tmp_path, capsys):
    path = _write(tmp_path, {"sft": {"method": "sft"}, "dpo": {"method": "dpo", "model": {"name_or_path": "${sfx.final}"}}})
    with pytest.raises(PipelineError, match=r"stage 'dpo' refers to \$\{sfx.final\}: there is no stage 'sfx'; "
                                            r"did you mean 'sft'\?"):
        load_pipeline(path)
    path = _write(tmp_path, {"sft": {"method": "sft"}, "dpo": {"method": "dpo", "model": {"name_or_path": "${sft.finl}"}}})
    with pytest.raises(PipelineError, match=r"stage 'sft' has no output 'finl'; did you mean 'final'\?"):
        load_pipeline(path)
    from alignkit.cli import main

    assert main(["pipeline", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "${sft.finl}" in err


def test_a_bad_key_in_a_later_stage_fails_before_anything_runs(tmp_path):
    path = _write(tmp_path, {"sft": {"method": "sft"},
                             "dpo": {"method": "dpo", "model": {"name_or_path": "${sft.final}"}, "bta": 0.1}})
    with pytest.raises(PipelineError, match="stage 'dpo'.*unknown key 'bta'; did you mean 'beta'"):
        load_pipeline(path)
    assert not (tmp_path / "out").exists()


def test_command_stage_outputs_feed_a_training_stage_and_eval_compares_models(workspace, monkeypatch):
    """A command stage writes data, SFT trains on it, the eval stage puts base and SFT side by side."""
    from alignkit.evaluate import side_by_side
    from alignkit.evaluate.metrics import METRICS
    from alignkit.model import load_model_and_tokenizer

    script = workspace / "make.py"
    script.write_text("import shutil, sys\nshutil.copy('sft.jsonl', sys.argv[1])\n")
    config = {
        "output_dir": "out",
        "defaults": {"model": {"device": "cpu", "dtype": "float32"}, "lora": {"rank": 4, "alpha": 8},
                     "data": {"validation_fraction": 0, "max_length": 64}, "training": TRAINING},
        "stages": {
            "data": {"run": "python make.py ${dir}/rows.jsonl", "outputs": {"rows": "rows.jsonl"}},
            "sft": {"method": "sft", "model": {"name_or_path": "tiny"}, "data": {"train": "${data.rows}"},
                    "training": {"max_steps": 6}},
            "eval": {"method": "eval", "models": {"base": "tiny", "sft": "${sft.final}"}, "data": "${data.rows}",
                     "metrics": ["perplexity"], "options": {"max_new_tokens": 4},
                     "judge": "scripted"},
        },
    }
    path = workspace / "p.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))

    class LongerWins:
        name = "longer-wins"

        def compare(self, prompts, a, b):
            return ["A" if len(x) > len(y) else "B" if len(y) > len(x) else "tie" for x, y in zip(a, b)]

    monkeypatch.setattr(side_by_side, "load_judge", lambda spec, **_: LongerWins())
    result = run_pipeline(load_pipeline(path), log=lambda _: None)
    assert actions(result) == {"data": "run", "sft": "run", "eval": "run"}
    report = json.loads((workspace / "out/eval/report.json").read_text())
    # each column equals the metric computed directly on that model
    for name, spec in (("base", "tiny"), ("sft", "out/sft/final")):
        model, tokenizer = load_model_and_tokenizer(spec, device="cpu", dtype="float32")
        direct = METRICS["perplexity"](model, tokenizer, data="out/data/rows.jsonl")
        assert report["results"][name]["perplexity"]["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-5)
    assert report["results"]["sft"]["perplexity"]["perplexity"] < report["results"]["base"]["perplexity"]["perplexity"]
    # default pairing: sft started from the model the 'base' column names
    [comparison] = report["comparisons"]
    assert (comparison["model"], comparison["against"], comparison["judge"]) == ("sft", "base", "longer-wins")
    assert comparison["wins"] + comparison["ties"] + comparison["losses"] == len(QUESTIONS) * 2
    markdown = (workspace / "out/pipeline.md").read_text()
    assert "| perplexity |" in markdown and "win rate" in markdown.lower()
    # the command's script is an input: editing it re-runs everything downstream
    script.write_text(script.read_text() + "# changed\n")
    steps = plan(load_pipeline(path), State(workspace / "out"))
    assert [s.action for s in steps] == ["run", "run", "run"]
