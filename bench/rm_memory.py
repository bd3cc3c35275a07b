"""Peak resident memory of the reward-model example job, with and without each memory lever.

    python examples/make_preference_data.py --limit 1800        # examples/data/hh_{train,valid}.jsonl
    python bench/rm_memory.py                                   # every variant, the 2 heaviest steps
    python bench/rm_memory.py --heaviest 4 --variants before,auto

The job is ``examples/rm_hh.yaml --set training.max_steps=100`` (LoRA r16 on the embedded
SmolLM2-135M-Instruct, batch 8 pairs, max_length 512), the run the issue measured at about 12 GB.
A step's memory is set by its micro-batch, so instead of all 100 steps (22 minutes on an idle
2-core CPU, README) each variant trains only the ``--heaviest`` steps of that 100-step schedule
whose micro-batches hold the most tokens, in their order, through the same engine and recipe
(``bench`` wraps the recipe's ``updates``; nothing else changes). Evaluation and checkpoints are off.
Each variant runs in its own fresh process; memory is that process's peak resident set size
(``wait4`` rusage ``ru_maxrss``): the model (0.5 GB of float32 weights), the tokenized data, Python
and the step. Time per step is printed for information only: on a shared CPU it measures the load.

Variants (``--variants``):

* ``before``: the job as it ran before the memory work: no gradient checkpointing, glibc's default
  allocator behaviour (``training.gradient_checkpointing=false training.release_memory=false``).
* ``checkpointing``: only ``gradient_checkpointing: true`` (each decoder layer's activations are
  recomputed in the backward pass instead of kept).
* ``release-memory``: only ``release_memory: true`` (freed large blocks go back to the system).
* ``auto``: the job as it is now, with the defaults (``gradient_checkpointing: auto`` decides;
  ``release_memory: true``).
* ``math-attention``: as ``before``, with SDPA forced to its math kernel, which stores every
  ``[heads, T, T]`` attention map in float32 (what the default flash kernel avoids; for reference).
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

OFF = ["training.gradient_checkpointing=false", "training.release_memory=false"]
VARIANTS = {
    "before": OFF,
    "checkpointing": ["training.gradient_checkpointing=true", "training.release_memory=false"],
    "release-memory": ["training.gradient_checkpointing=false", "training.release_memory=true"],
    "auto": [],
    "math-attention": OFF,
}

CHILD = """
import sys
if {math!r}:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    sdpa_kernel([SDPBackend.MATH]).__enter__()
from alignkit.engine import Engine
from alignkit.methods import get_method, load_job
from alignkit.seeding import seed_everything

job = load_job("rm", sys.argv[1], sys.argv[3:])
seed_everything(job.training.seed)
recipe = get_method("rm").recipe(job)
schedule = recipe.schedule.updates(0)
steps = [next(schedule) for _ in range(100)]
tokens = [sum(len(recipe.train_pairs[i].chosen_ids) + len(recipe.train_pairs[i].rejected_ids)
              for batch in chunk for i in batch) for chunk in steps]
heaviest = sorted(sorted(range(100), key=lambda s: -tokens[s])[:int(sys.argv[2])])
print("[bench] steps", [s + 1 for s in heaviest], "tokens", [tokens[s] for s in heaviest], flush=True)


class Heaviest:
    def __init__(self, inner):
        self.inner, self.model = inner, inner.model

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def updates(self, start_step):
        for step in heaviest[start_step:]:
            yield [self.inner.collate([self.inner.train_pairs[i] for i in batch]) for batch in steps[step]]


Engine(job.training, Heaviest(recipe), job.training.output_dir).train()
"""


def run_variant(name: str, heaviest: int, threads: int) -> dict:
    folder = OUT / name
    shutil.rmtree(folder, ignore_errors=True)
    overrides = [f"training.max_steps={heaviest}", "training.eval_steps=null", "training.save_steps=null",
                 "training.eval_at_start=false", "training.tensorboard=false", "training.progress=false",
                 f"training.output_dir={folder}", *VARIANTS[name]]
    command = [sys.executable, "-c", CHILD.format(math=name == "math-attention"), str(CONFIG), str(heaviest),
               *overrides]
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
    notes = [line for line in output.splitlines() if "gradient checkpointing" in line or line.startswith("[bench]")]
    return {"variant": name, "peak_rss_gib": usage.ru_maxrss / 2**20, "steps": len(train),
            "seconds_per_step": sum(m["step_seconds"] for m in train) / max(1, len(train)),
            "wall_seconds": seconds, "losses": [round(m["loss"], 6) for m in train], "notes": notes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heaviest", type=int, default=2, help="steps trained: the heaviest of the 100")
    parser.add_argument("--variants", default="before,checkpointing,release-memory,auto")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if not (ROOT / "examples" / "data" / "hh_train.jsonl").exists():
        raise SystemExit("no examples/data/hh_train.jsonl: run python examples/make_preference_data.py --limit 1800")
    OUT.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.variants.split(","):
        result = run_variant(name, args.heaviest, args.threads)
        results.append(result)
        print(f"{name}: peak {result['peak_rss_gib']:.2f} GiB, {result['seconds_per_step']:.1f} s/step", flush=True)
    base = next((r for r in results if r["variant"] == "before"), results[0])
    print(f"\nalignkit rm --config examples/rm_hh.yaml (100-step schedule), its {args.heaviest} heaviest steps, "
          f"{args.threads} thread(s)\n")
    print("| variant | peak RSS GiB | vs before | s/step (shared CPU) | same losses as before |")
    print("| --- | ---: | ---: | ---: | --- |")
    for result in results:
        same = "yes" if result["losses"] == base["losses"] else (
            "max diff %.1e" % max(abs(a - b) for a, b in zip(result["losses"], base["losses"])))
        print(f"| {result['variant']} | {result['peak_rss_gib']:.2f} | {result['peak_rss_gib'] / base['peak_rss_gib']:.2f}x "
              f"| {result['seconds_per_step']:.1f} | {same} |")
    for result in results:
        for note in result["notes"]:
            print(f"{result['variant']}: {note}")
    (OUT / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
