"""Peak resident memory of the reward-model example job, with and without each memory lever.

    python examples/make_preference_data.py --limit 1800        # examples/data/hh_{train,valid}.jsonl
    python bench/rm_memory.py                                   # the first 12 steps, every variant
    python bench/rm_memory.py --steps 20 --variants before,checkpointing

Each variant runs ``alignkit rm --config examples/rm_hh.yaml`` (LoRA r16 on the embedded
SmolLM2-135M-Instruct, batch 8 pairs, max_length 512) in its own fresh process for ``--steps``
optimizer steps, with evaluation and checkpoints off so that only training is measured. The
batches are the job's own (seeded): every variant trains on the same pairs in the same order.
Memory is the child's peak resident set size (``wait4`` rusage ``ru_maxrss``), which includes the
model (0.5 GB of float32 weights), the tokenized data and Python. Time per step is printed for
information only: on a shared CPU it is not a measurement of anything.

Variants (``--variants``):

* ``before``: the settings the job had before memory work: no gradient checkpointing.
* ``checkpointing``: ``training.gradient_checkpointing: true`` (each decoder layer's activations
  are recomputed in the backward pass instead of kept).
* ``auto``: the job as it is now (``gradient_checkpointing: auto`` decides).
* ``math-attention``: no checkpointing and SDPA forced to its math kernel, which stores every
  ``[heads, T, T]`` attention map in float32 (what the flash kernel avoids; for reference).
* ``micro-batch-4``: no checkpointing; 4 pairs per micro-batch, 2 accumulated (same pairs per step).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "rm_hh.yaml"
OUT = ROOT / "bench" / "out" / "rm_memory"

VARIANTS = {
    "before": ["training.gradient_checkpointing=false"],
    "checkpointing": ["training.gradient_checkpointing=true"],
    "auto": [],
    "math-attention": ["training.gradient_checkpointing=false"],
    "micro-batch-4": ["training.gradient_checkpointing=false", "training.batch_size=4",
                      "training.gradient_accumulation_steps=2"],
}

CHILD = """
import sys
if {math!r}:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    sdpa_kernel([SDPBackend.MATH]).__enter__()
from alignkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_variant(name: str, steps: int, threads: int) -> dict:
    folder = OUT / name
    shutil.rmtree(folder, ignore_errors=True)
    overrides = [f"training.max_steps={steps}", "training.eval_steps=null", "training.save_steps=null",
                 "training.eval_at_start=false", "training.tensorboard=false", "training.progress=false",
                 f"training.output_dir={folder}", *VARIANTS[name]]
    command = [sys.executable, "-c", CHILD.format(math=name == "math-attention"), "rm", "--config", str(CONFIG)]
    for override in overrides:
        command += ["--set", override]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"variant {name} failed:\n{output[-3000:]}")
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "loss" in m]
    notes = [line for line in output.splitlines() if "gradient checkpointing" in line]
    return {"variant": name, "peak_rss_gib": usage.ru_maxrss / 2**20, "steps": len(train),
            "seconds_per_step": sum(m["step_seconds"] for m in train) / max(1, len(train)),
            "wall_seconds": seconds, "losses": [round(m["loss"], 6) for m in train], "notes": notes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--variants", default="before,checkpointing,auto,math-attention,micro-batch-4")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if not (ROOT / "examples" / "data" / "hh_train.jsonl").exists():
        raise SystemExit("no examples/data/hh_train.jsonl: run python examples/make_preference_data.py --limit 1800")
    OUT.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.variants.split(","):
        result = run_variant(name, args.steps, args.threads)
        results.append(result)
        print(f"{name}: peak {result['peak_rss_gib']:.2f} GiB, {result['seconds_per_step']:.1f} s/step", flush=True)
    base = next((r for r in results if r["variant"] == "before"), results[0])
    print(f"\nalignkit rm --config examples/rm_hh.yaml, first {args.steps} steps, {args.threads} thread(s)\n")
    print("| variant | peak RSS GiB | vs before | s/step (shared CPU) | same losses as before |")
    print("| --- | ---: | ---: | ---: | --- |")
    for result in results:
        same = "yes" if result["losses"] == base["losses"] else (
            "max diff %.1e" % max(abs(a - b) for a, b in zip(result["losses"], base["losses"])))
        print(f"| {result['variant']} | {result['peak_rss_gib']:.2f} | {result['peak_rss_gib'] / base['peak_rss_gib']:.2f}x "
              f"| {result['seconds_per_step']:.1f} | {same} |")
    (OUT / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
