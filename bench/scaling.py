"""Data-parallel scaling: tokens/s for 1 and 2 processes, the gradient all-reduce's share of a step,
and peak memory per process for DDP vs FSDP2, on the same model, data, global batch and steps.

    python bench/scaling.py                         # full fine-tuning of the embedded SmolLM2-135M
    python bench/scaling.py --mode lora --steps 6   # LoRA r16 (a tiny all-reduce)

Each configuration is a fresh launch (`accelerate launch --config_file examples/accelerate/<preset>`
for two processes), training the same SFT job: GSM8K question/answer rows from
../shared/data/gsm8k/train.jsonl (generated arithmetic rows when absent), chat template, loss on
the answer, global batch ``--batch`` rows per step, fp32, AdamW, no evaluation or checkpoints.

    1 process, 1 thread        the baseline: what one process does with one core
    1 process, 2 threads       the same machine used by one process (the fair peer on a 2-core CPU)
    2 processes DDP            one thread each (examples/accelerate/ddp.yaml)
    2 processes DDP, no sync   the same with the gradient all-reduce switched off (every micro-batch
                               under no_sync): the difference is the all-reduce's share of a step
    2 processes FSDP2          one thread each (examples/accelerate/fsdp2.yaml)

Reported per configuration (median over ``--repeats``, interleaved): trained (loss) tokens per second
over steps 2..N (step 1 is warm-up), seconds per step, the peak resident memory of each process
while it trains (VmHWM reset after the model is loaded and prepared), and the losses (the same
global batch gives the same losses in every configuration). On a shared CPU the numbers are noisy:
read the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
PRESETS = ROOT / "examples" / "accelerate"
CONFIGURATIONS = [  # name, preset (None: one plain process), threads per process, gradient sync
    ("1 process, 1 thread", None, 1, True),
    ("1 process, 2 threads", None, 2, True),
    ("2 processes DDP", "ddp.yaml", 1, True),
    ("2 processes DDP, no sync", "ddp.yaml", 1, False),
    ("2 processes FSDP2", "fsdp2.yaml", 1, True),
]


def make_rows(count: int) -> tuple[list[dict], str]:
    rows = []
    if GSM8K.exists():
        with GSM8K.open() as handle:
            for line in handle:
                item = json.loads(line)
                rows.append({"question": item["question"], "answer": item["answer"]})
                if len(rows) == count:
                    return rows, f"{GSM8K} (first {count} rows)"
    for i in range(count - len(rows)):
        a, b = 10 + (7 * i) % 90, 10 + (13 * i) % 90
        rows.append({"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}.\n#### {a + b}"})
    return rows, f"{count} generated arithmetic rows (../shared/data/gsm8k not found)"


# ----------------------------------------------------------------------------- one launch

def vm_peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(job_path: str, out: str, sync: bool) -> None:
    """Train the job in this process (one of several under a launcher); the main one writes ``out``."""
    import torch

    from alignkit import distributed
    from alignkit.distributed import ParallelModel
    from alignkit.engine import Engine
    from alignkit.seeding import seed_everything
    from alignkit.methods import get_method, load_job

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if not sync:  # every micro-batch accumulates locally: no gradient all-reduce at all (timing only)
        micro_batch = ParallelModel.micro_batch
        ParallelModel.micro_batch = lambda self, last: micro_batch(self, last=False)
    job = load_job("sft", job_path, [f"training.output_dir={Path(out).with_suffix('')}-run"])
    seed_everything(job.training.seed)  # the same LoRA initialisation in every configuration
    recipe = get_method("sft").recipe(job)
    engine = Engine(job.training, recipe, job.output_dir())
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on: training only
    loaded = vm_peak_mb()
    history = engine.train()["history"]
    peaks = distributed.gather_objects((loaded, vm_peak_mb()))
    if distributed.is_main_process():
        timed = history[1:]
        seconds = sum(h["step_seconds"] for h in timed)
        Path(out).write_text(json.dumps({
            "processes": distributed.world_size(), "data_parallel": engine.parallel.kind,
            "tokens_per_second": sum(h["tokens"] for h in timed) / seconds,
            "step_seconds": seconds / len(timed), "losses": [h["loss"] for h in history],
            "loaded_mb": [p[0] for p in peaks], "peak_mb": [p[1] for p in peaks]}))


def run_configuration(preset: str | None, threads: int, sync: bool, job_path: Path, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    script = [str(Path(__file__).resolve()), "--worker", str(job_path), str(out), "sync" if sync else "nosync"]
    if preset is None:
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(PRESETS / preset),
                   "--num_processes", "2", "--main_process_port", str(29500 + os.getpid() % 1000), *script]
    started = time.time()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    result = json.loads(out.read_text())
    result["wall_seconds"] = time.time() - started
    return result


# ----------------------------------------------------------------------------- the driver

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["full", "lora"], default="full")
    parser.add_argument("--rows", type=int, default=96, help="training rows (batch * steps are used)")
    parser.add_argument("--batch", type=int, default=8, help="global batch: rows per optimizer step")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps (the first is warm-up)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", help="comma-separated configuration numbers (1-5) to run")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.worker[2] == "sync")
        return
    rows, source = make_rows(args.rows)
    folder = Path(tempfile.mkdtemp(prefix="alignkit-scaling-"))
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    job = {"method": "sft", "model": {"name_or_path": "smollm2-135m-instruct", "device": "cpu", "dtype": "float32"},
           "data": {"train": str(data), "validation_fraction": 0.0, "max_length": args.max_length},
           "training": {"max_steps": args.steps, "batch_size": args.batch, "learning_rate": 1e-5 if args.mode == "full"
                        else 2e-4, "lr_scheduler": "constant", "precision": "fp32", "output_dir": str(folder / "run"),
                        "progress": False, "tensorboard": False, "eval_steps": None, "seed": 0}}
    if args.mode == "lora":
        job["lora"] = {"rank": 16, "alpha": 32, "dropout": 0.0}
    job_path = folder / "job.yaml"
    job_path.write_text(json.dumps(job))
    chosen = [CONFIGURATIONS[int(i) - 1] for i in args.only.split(",")] if args.only else CONFIGURATIONS
    results: dict[str, list[dict]] = {name: [] for name, *_ in chosen}
    for repeat in range(args.repeats):
        for name, preset, threads, sync in chosen:
            print(f"[{repeat + 1}/{args.repeats}] {name} ...", flush=True)
            out = folder / f"result-{repeat}-{len(results[name])}-{chosen.index((name, preset, threads, sync))}.json"
            results[name].append(run_configuration(preset, threads, sync, job_path, out))
    print(f"\nSFT {args.mode}, SmolLM2-135M fp32, {source}, global batch {args.batch}, {args.steps} steps "
          f"(step 1 warm-up), max length {args.max_length}, {os.cpu_count()} CPUs, {args.repeats} repeat(s)\n")
    base = statistics.median(r["tokens_per_second"] for r in results[chosen[0][0]])
    print("| configuration | tokens/s | vs first | s/step | peak MB per process (training) | loss at last step |")
    print("| --- | --- | --- | --- | --- | --- |")
    medians = {}
    for name, *_ in chosen:
        runs = results[name]
        speed = statistics.median(r["tokens_per_second"] for r in runs)
        step = statistics.median(r["step_seconds"] for r in runs)
        peaks = [round(statistics.median(r["peak_mb"][i] for r in runs)) for i in range(len(runs[0]["peak_mb"]))]
        medians[name] = step
        print(f"| {name} | {speed:.0f} | {speed / base:.2f}x | {step:.2f} | {' / '.join(map(str, peaks))} | "
              f"{runs[0]['losses'][-1]:.4f} |")
    if "2 processes DDP" in medians and "2 processes DDP, no sync" in medians:
        share = 1 - medians["2 processes DDP, no sync"] / medians["2 processes DDP"]
        print(f"\ngradient all-reduce: {100 * share:.0f}% of a DDP step (1 - no-sync step / DDP step)")
    print("\nfirst-step losses: " + ", ".join(f"{name}: {results[name][0]['losses'][0]:.6f}" for name, *_ in chosen))


if __name__ == "__main__":
    main()
