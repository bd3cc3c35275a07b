"""training.report_to: trackers receive exactly what metrics.jsonl records; missing ones say so and step aside."""
import json
import math
import sys
import textwrap
from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.config import ConfigError
from alignkit.methods import load_job
from alignkit.model import save_model
from alignkit.trackers import Trackers, finite_scalars, normalize_report_to
from tests.helpers import make_tiny_model, make_tiny_tokenizer

ROWS = [[{"role": "user", "content": f"what is {a} plus {b}?"}, {"role": "assistant", "content": f"{a + b}"}]
        for a, b in [(1, 2), (3, 4), (2, 2), (5, 1), (6, 3), (7, 1)]]


def run_sft(root: Path, report_to: str) -> Path:
    tokenizer = make_tiny_tokenizer()
    save_model(make_tiny_model(tokenizer), tokenizer, root / "base")
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps({"messages": row}) + "\n" for row in ROWS))
    config = root / "sft.yaml"
    config.write_text(textwrap.dedent(f"""\
        method: sft
        model: {{name_or_path: {root / 'base'}, dtype: float32, device: cpu}}
        data: {{train: {train}, validation_fraction: 0.34, max_length: 64}}
        training: {{output_dir: {root / 'run'}, max_steps: 4, batch_size: 2, learning_rate: 0.01,
                   eval_steps: 2, progress: false, report_to: {report_to}}}
        """))
    assert main(["sft", "--config", str(config)]) == 0
    return root / "run"


def jsonl_series(run_dir: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as {metric: {step: value}}, the plottable values only."""
    series: dict[str, dict[int, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        step = record.pop("step")
        record.pop("time")
        for key, value in finite_scalars(record).items():
            series.setdefault(key, {})[step] = value
    return series


def point_trackio_at(monkeypatch, folder: Path) -> None:
    """trackio reads TRACKIO_DIR once, at import: set the variable and the module constants."""
    monkeypatch.setenv("TRACKIO_DIR", str(folder))
    import trackio  # noqa: F401

    for name, module in list(sys.modules.items()):
        if name.startswith("trackio") and hasattr(module, "TRACKIO_DIR"):
            monkeypatch.setattr(module, "TRACKIO_DIR", folder)


def test_mlflow_and_trackio_receive_exactly_the_metrics_jsonl_values(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("trackio")
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "alignkit-test")
    monkeypatch.setenv("TRACKIO_PROJECT", "alignkit-test")
    point_trackio_at(monkeypatch, tmp_path / "trackio")
    run_dir = run_sft(tmp_path, "[mlflow, trackio]")
    expected = jsonl_series(run_dir)
    assert {"loss", "lr", "grad_norm", "eval/loss"} <= set(expected) and len(expected["loss"]) == 4
    assert sorted(expected["eval/loss"]) == [0, 2, 4]

    client = mlflow.tracking.MlflowClient(store.as_uri())
    experiment = client.get_experiment_by_name("alignkit-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["training.learning_rate"] == "0.01" and run.data.params["method"] == "sft"
    logged = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
              for key in run.data.metrics}
    assert set(logged) == set(expected)
    for key, values in expected.items():
        assert logged[key] == pytest.approx(values, rel=1e-12), key

    from trackio.sqlite_storage import SQLiteStorage

    tracked: dict[str, dict[int, float]] = {}
    for record in SQLiteStorage.get_logs("alignkit-test", "run"):
        for key, value in record.items():
            if key not in ("step", "timestamp"):
                tracked.setdefault(key, {})[record["step"]] = value
    assert set(tracked) == set(expected)
    for key, values in expected.items():
        assert tracked[key] == pytest.approx(values, rel=1e-12), key


def test_tensorboard_events_hold_the_jsonl_values(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = run_sft(tmp_path, "tensorboard")
    expected = jsonl_series(run_dir)
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(expected)
    for key, values in expected.items():
        got = {event.step: event.value for event in events.Scalars(key)}
        assert got == pytest.approx(values, rel=1e-6), key  # TensorBoard stores float32


def test_missing_tracker_says_one_line_and_training_goes_on(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    run_dir = run_sft(tmp_path, "wandb")
    err = capsys.readouterr().err
    assert "report_to: wandb is not installed (pip install wandb); not reporting to it" in err
    assert (run_dir / "final" / "README.md").is_file() and len(jsonl_series(run_dir)["loss"]) == 4
    assert not (run_dir / "tensorboard").exists()


def test_a_tracker_that_fails_is_dropped_and_the_others_keep_logging(tmp_path, capsys):
    class Broken:
        name = "broken"

        def log(self, step, metrics):
            raise RuntimeError("disk full")

        def close(self):
            self.closed = True

    class Recorder:
        name = "recorder"
        records: list = []

        def log(self, step, metrics):
            self.records.append((step, metrics))

        def close(self):
            pass

    trackers = Trackers([], tmp_path)
    broken, recorder = Broken(), Recorder()
    trackers.active = [broken, recorder]
    trackers.log(1, {"loss": 2.0, "note": "text", "nan": math.nan, "flag": True})
    trackers.log(2, {"loss": 1.5})
    assert trackers.names == ["recorder"] and broken.closed
    assert recorder.records == [(1, {"loss": 2.0}), (2, {"loss": 1.5})]
    assert capsys.readouterr().err.count("broken failed at step 1 (RuntimeError: disk full)") == 1


def test_report_to_accepts_trl_spellings_and_names_unknown_trackers():
    assert normalize_report_to("none") == [] and normalize_report_to(None) == []
    assert normalize_report_to("wandb,mlflow") == ["wandb", "mlflow"]
    assert normalize_report_to(["MLflow", "mlflow"]) == ["mlflow"]
    assert normalize_report_to("all") == ["tensorboard", "wandb", "trackio", "mlflow"]
    assert load_job("sft", None, []).training.report_to == ["tensorboard"]
    assert load_job("sft", None, ["training.report_to=trackio"]).training.report_to == ["trackio"]
    with pytest.raises(ConfigError, match="unknown tracker 'comet'"):
        load_job("sft", None, ["training.report_to=[tensorboard, comet]"])
    with pytest.raises(ValueError, match="'none' cannot be combined"):
        normalize_report_to(["none", "wandb"])
