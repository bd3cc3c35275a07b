"""bench/gpu_suite.py: the dry run exercises every step on CPU and keeps going past a failing and a
hanging step; its pure parts (FLOPs, joined parts, wheels, comparisons, markdown) give hand-computed
values. The dry run is the CI stand-in for the GPU run, so a typo there fails here, not on a lent GPU."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
SUITE_PATH = ROOT / "bench" / "gpu_suite.py"


def load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite_under_test", SUITE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


suite = load_suite()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run with a failure injected at the end of `sft` and a hang at the end of `vllm`."""
    out = tmp_path_factory.mktemp("gpu-out")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("OUT", None)
    done = subprocess.run([sys.executable, str(SUITE_PATH), "--dry-run", "--out", str(out),
                           "--inject-failure", "sft", "--inject-hang", "vllm", "--timeout", "vllm=6"],
                          capture_output=True, text=True, env=env, cwd=out, timeout=300)
    results = json.loads((out / "gpu_results.json").read_text())
    return done, results, out


def steps_by_name(results):
    return {step["name"]: step for step in results["steps"]}


def test_dry_run_records_every_step_in_order_and_carries_on_after_failure_and_timeout(dry_run):
    done, results, out = dry_run
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    names = [step["name"] for step in results["steps"]]
    assert names == ["install", "model_parts", *suite.STEP_NAMES]
    steps = steps_by_name(results)
    assert steps["install"]["status"] == "skipped" and steps["model_parts"]["status"] == "skipped"
    for name in ("environment", "model", "rollout", "grpo_arithmetic"):
        assert steps[name]["status"] == "ok", (name, steps[name].get("error"))
    # the failure is recorded with its message, and what the step measured before it is kept
    assert steps["sft"]["status"] == "failed"
    assert "injected failure" in steps["sft"]["error"]
    assert [row["trainer"] for row in steps["sft"]["tables"]["sft"]] == ["plain", "alignkit"]
    # steps after the failure ran: with TRL installed the comparison is made, without it the peer is
    # reported unavailable and the alignkit side still measured
    for name in ("dpo_vs_trl", "grpo_vs_trl"):
        assert steps[name]["status"] in ("ok", "unavailable"), (name, steps[name].get("error"))
        assert any(row["trainer"] == "alignkit" for rows in steps[name]["tables"].values() for row in rows
                   if "trainer" in row)
    # the hanging step is stopped at its limit; its record made before the hang survives
    assert steps["vllm"]["status"] == "timeout"
    assert "time limit (6 s)" in steps["vllm"]["error"]
    if importlib.util.find_spec("vllm") is None:
        assert steps["vllm"]["tables"]["vllm"] == [{"status": "not available (vLLM is not importable)"}]
    # every step that ran states its CPU sizes
    for name in suite.STEP_NAMES:
        assert steps[name]["sizes"], name
    assert results["suite"]["finished"] is True


def test_dry_run_measurements_match_what_the_sizes_imply(dry_run):
    _, results, _ = dry_run
    steps = steps_by_name(results)
    sizes = {step.name: step.sizes["dry"] for step in suite.STEPS}
    # rollout: greedy decoding on CPU in float32 gives the same tokens from both backends
    agreement = steps["rollout"]["tables"]["greedy agreement"][0]
    assert agreement["identical_rows"] == agreement["prompts"] == sizes["rollout"]["agreement_prompts"]
    assert [row["batch"] for row in steps["rollout"]["tables"]["throughput"]] == sizes["rollout"]["batch_sizes"]
    # sft: both sides train on the same batches of exactly seq_len tokens, from the same weights
    plain, ours = steps["sft"]["tables"]["sft"]
    assert plain["tokens_per_step"] == ours["tokens_per_step"] == sizes["sft"]["batch_size"] * sizes["sft"]["seq_len"]
    assert ours["first_loss"] == pytest.approx(plain["first_loss"], abs=1e-4)
    assert ours["last_loss"] == pytest.approx(plain["last_loss"], abs=1e-3)
    ratio_row = steps["sft"]["tables"]["comparison"][-1]
    assert ratio_row["tokens/s"] == pytest.approx(ours["tokens_per_s"] / plain["tokens_per_s"])
    # grpo_arithmetic: held-out accuracy at the start and at the last step, read while it ran
    accuracy = steps["grpo_arithmetic"]["tables"]["held-out accuracy"]
    assert [row["step"] for row in accuracy] == [0, sizes["grpo_arithmetic"]["max_steps"]]
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in accuracy)
    # dpo: pairs and optimizer steps as sized
    dpo = next(row for row in steps["dpo_vs_trl"]["tables"]["dpo"] if row["trainer"] == "alignkit")
    assert dpo["pairs"] == sizes["dpo_vs_trl"]["pairs"]
    assert dpo["steps"] == sizes["dpo_vs_trl"]["pairs"] // sizes["dpo_vs_trl"]["batch_size"]
    # serve_static: on CPU in float32 the server's two engines give the same greedy tokens, adapters mixed
    served = steps["serve_static"]["tables"]
    assert served["greedy agreement"][0]["identical_requests"] == sizes["serve_static"]["requests"]
    assert [row["engine"] for row in served["engines"]] == ["dynamic", "static"]
    assert all(row["max_adapters_in_forward"] == 3 and row["finished_errors"] == 0 for row in served["engines"])
    swap = served["against swapping"][0]   # the baseline: one merge per request (2 of 3 use an adapter)
    assert swap["requests"] == sizes["serve_static"]["swap_requests"] and swap["merges"] == 2
    assert swap["mixed_over_swap"] == pytest.approx(swap["mixed_tokens_per_s"] / swap["tokens_per_s"])


def test_dry_run_writes_markdown_and_the_full_log(dry_run):
    _, results, out = dry_run
    markdown = (out / "gpu_results.md").read_text()
    assert "| sft | failed |" in markdown and "| vllm | timeout |" in markdown
    for name in suite.STEP_NAMES:
        assert f"\n## {name}: " in markdown
    log = (out / "gpu_suite.log").read_text()
    assert "===== rollout: ok" in log and "===== sft-alignkit: failed" in log
    assert "RuntimeError: injected failure at the end of step sft" in log  # the child's own traceback
    assert sorted(p.name for p in out.iterdir()) == ["gpu_results.json", "gpu_results.md", "gpu_suite.log"]


def test_training_flops_per_token_is_six_n_plus_attention():
    # 6 * 1000 + 12 * 2 layers * 8 wide * 16 tokens = 6000 + 3072
    assert suite.training_flops_per_token(1000, 2, 8, 16) == 9072


def test_datasheet_peak_matches_the_most_specific_name():
    assert suite.datasheet_bf16_tflops("NVIDIA H200") == 989.4
    assert suite.datasheet_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert suite.datasheet_bf16_tflops("NVIDIA H200 NVL") == 836.0
    assert suite.datasheet_bf16_tflops("Some Future GPU") is None
    assert suite.datasheet_bf16_tflops(None) is None


def test_assemble_parts_joins_in_order_and_checks_the_hash(tmp_path):
    first, second = tmp_path / "part_aa", tmp_path / "part_ab"
    first.write_bytes(b"gguf-head-")
    second.write_bytes(b"tail")
    expected = hashlib.sha256(b"gguf-head-tail").hexdigest()
    target = tmp_path / "out" / "model.gguf"
    assert suite.assemble_parts([first, second], target, expected) == expected
    assert target.read_bytes() == b"gguf-head-tail"
    with pytest.raises(ValueError, match="out of order"):
        suite.assemble_parts([second, first], tmp_path / "swapped.gguf", expected)
    assert not (tmp_path / "swapped.gguf").exists() and not (tmp_path / "swapped.gguf.partial").exists()
    with pytest.raises(FileNotFoundError, match="part_zz"):
        suite.assemble_parts([first, tmp_path / "part_zz"], tmp_path / "x.gguf", None)


def test_two_versions_of_one_wheel_are_refused(tmp_path):
    wheels = [tmp_path / "typing_extensions-4.16.0-py3-none-any.whl",
              tmp_path / "Typing.Extensions-4.12.0-py3-none-any.whl"]
    with pytest.raises(ValueError, match="two wheels of typing-extensions"):
        suite.check_wheels(wheels)
    suite.check_wheels([tmp_path / "trl-1.16.0-py3-none-any.whl", tmp_path / "dill-0.4.1-py3-none-any.whl"])


def make_wheel(folder: Path, name: str, requires: list[str]) -> Path:
    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}-1.0.dist-info/METADATA",
                         "Metadata-Version: 2.1\nName: " + name + "\n"
                         + "".join(f"Requires-Dist: {r}\n" for r in requires))
    return path


def test_unmet_requirements_names_what_neither_image_nor_wheels_provide(tmp_path):
    wheels = [make_wheel(tmp_path, "alpha", ["numpy>=1", "beta", "gamma; extra == 'test'",
                                             "old-backport; python_version < '3.9'", "needed_here"]),
              make_wheel(tmp_path, "beta", ["NumPy"])]
    unmet = suite.unmet_requirements(wheels, {"numpy"}, python_version="3.12")
    assert unmet == {wheels[0].name: ["needed_here"]}


def test_every_runtime_dependency_is_on_the_device_image_or_carried():
    """A dependency added to pyproject.toml must be staged for the lent GPU machine too."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["bench"]
    image = {suite.normalise(n) for n in suite.read_names(ROOT / "bench" / "gpu_device_image.txt")}
    carried = {suite.normalise(n) for n in suite.read_names(ROOT / "bench" / "gpu_wheels.txt")}
    missing = [r for r in wanted if suite.normalise(Requirement(r).name) not in image | carried]
    assert not missing, f"add these to bench/gpu_wheels.txt (and stage them): {missing}"


def test_combine_sft_computes_ratios_mfu_and_the_verdict():
    def side(tokens_per_s, peak_mb, loss):
        return {"status": "ok", "tables": {"sft": [{"tokens_per_s": tokens_per_s, "peak_mb": peak_mb,
                                                     "first_loss": loss, "model_flops_per_token": 6e8}]}}

    rows, summary = suite.combine_sft({"plain": side(1000.0, 2000.0, 2.5), "alignkit": side(1500.0, 1000.0, 2.5)},
                                      {"peak_tflops": 1000.0, "matmul_tflops": 500.0})
    plain, ours, ratios = rows
    assert ours["MFU (datasheet peak)"] == pytest.approx(1500 * 6e8 / 1e15)
    assert ours["MFU (measured matmul)"] == pytest.approx(1500 * 6e8 / 5e14)
    assert ratios["tokens/s"] == pytest.approx(1.5) and ratios["peak memory MB"] == pytest.approx(0.5)
    assert "1.50x" in summary and "0.50x" in summary and ": met" in summary
    _, summary = suite.combine_sft({"plain": side(1000.0, 2000.0, 2.5), "alignkit": side(1200.0, 1000.0, 2.5)}, {})
    assert "not met" in summary


def test_a_missing_peer_is_reported_not_compared():
    sides = {"trl": {"status": "unavailable", "unavailable": "TRL import fails: ModuleNotFoundError", "tables": {}},
             "alignkit": {"status": "ok", "tables": {"dpo": [{"seconds_per_step": 1.0}]}}}
    rows, summary = suite.combine_dpo(sides, {})
    assert rows == [] and summary.startswith("TRL not available (TRL import fails")


def test_size_overrides_are_checked():
    assert suite.parse_size_override("rollout.batch_sizes=[64,256]") == ("rollout", "batch_sizes", [64, 256])
    with pytest.raises(ValueError, match="no step named 'rolout'"):
        suite.parse_size_override("rolout.batch_sizes=[1]")
    with pytest.raises(ValueError, match="has no size 'batch'"):
        suite.parse_size_override("rollout.batch=4")
    with pytest.raises(ValueError, match="step.key=value"):
        suite.parse_size_override("rollout")


def test_markdown_keeps_tables_intact():
    results = {"suite": {"mode_label": "dry run", "started": "now", "budget_s": 10, "command": "x", "finished": True},
               "steps": [{"name": "rollout", "title": "t", "status": "failed", "seconds": 1.0, "timeout_s": 5,
                          "error": "ValueError: a|b\nsecond line",
                          "tables": {"throughput": [{"batch": 2, "speedup": 1.5}]},
                          "notes": []}]}
    markdown = suite.render_markdown(results)
    assert "| rollout | failed | 1.0 | 0.0 | ValueError: a/b second line |" in markdown
    assert "| batch | speedup |\n| --- | --- |\n| 2 | 1.500 |" in markdown
