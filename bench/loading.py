"""Loading once under FSDP2: resident memory of each of two processes while the model is loaded, sharded
and trained, with the fsdp2.yaml preset as shipped (``fsdp_cpu_ram_efficient_loading: true``: only
the main process reads the weights, the other builds the model on the meta device) and with that
switch off (every process loads the whole model before FSDP2 shards it, as before).

    python bench/loading.py                       # the embedded SmolLM2-135M, full fine-tuning, fp32
    python bench/loading.py --lora                # the same with a LoRA adapter

Each configuration is a fresh ``accelerate launch --num_processes 2`` of the same SFT job (GSM8K
rows from ../shared/data/gsm8k when present, else generated arithmetic rows; global batch 4, max
length 128, ``--steps`` steps, no evaluation or checkpoints). Every process reports, from
/proc/self/status: resident memory (VmRSS) after ``import`` (the baseline), the peak (VmHWM) while the
recipe is built (the model loaded), the bytes of parameters it then holds (0 for a model on the meta
device), the peak while the engine prepares it (FSDP2 shards it) and VmRSS after, the peak over the
training steps, and the losses of both configurations (equal: the same training).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scaling import make_rows  # noqa: E402  (the same SFT rows as the scaling benchmark)

ROOT = Path(__file__).resolve().parent.parent
PRESET = ROOT / "examples" / "accelerate" / "fsdp2.yaml"


def status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def worker(job_path: str, out: str) -> None:
    """One of the two processes: load, prepare and train the job, measuring each phase's peak."""
    import torch

    from alignkit import distributed
    from alignkit.engine import Engine
    from alignkit.methods import get_method, load_job
    from alignkit.seeding import seed_everything

    torch.set_num_threads(1)
    job = load_job("sft", job_path, [f"training.output_dir={Path(out).with_suffix('')}-run"])
    distributed.barrier()
    memory = {"imported_mb": status_mb("VmRSS")}
    reset_peak()
    seed_everything(job.training.seed)
    recipe = get_method("sft").recipe(job)
    memory["load_peak_mb"] = status_mb("VmHWM")
    memory["held_after_load_mb"] = sum(p.numel() * p.element_size() for p in recipe.model.parameters()
                                       if not p.is_meta) / 2**20
    distributed.barrier()
    reset_peak()
    engine = Engine(job.training, recipe, job.output_dir())
    memory["prepare_peak_mb"] = status_mb("VmHWM")
    memory["after_prepare_mb"] = status_mb("VmRSS")
    distributed.barrier()
    reset_peak()
    started = time.perf_counter()
    history = engine.train()["history"]
    memory["train_peak_mb"] = status_mb("VmHWM")
    memory["train_seconds"] = time.perf_counter() - started
    reports = distributed.gather_objects(memory)
    if distributed.is_main_process():
        Path(out).write_text(json.dumps({"processes": reports, "losses": [h["loss"] for h in history],
                                         "data_parallel": engine.parallel.kind}))


def launch(preset: Path, job: Path, out: Path) -> dict:
    # MALLOC_MMAP_THRESHOLD_: allocations from 64 KiB up are mapped and unmapped by glibc, so resident memory
    # follows the live tensors (by default freed buffers of a few MB stay in the heap and a peak shows
    # what the allocator kept rather than what the process held)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "",
           "MALLOC_MMAP_THRESHOLD_": "65536",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(preset), "--num_processes",
               "2", "--main_process_port", str(29500 + os.getpid() % 1000), str(Path(__file__).resolve()),
               "--worker", str(job), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter (r16) instead of every weight")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    folder = Path(tempfile.mkdtemp(prefix="alignkit-loading-"))
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in make_rows(4 * args.steps)[0]))
    job = {"method": "sft", "model": {"name_or_path": args.model, "device": "cpu", "dtype": "float32"},
           "data": {"train": str(data), "validation_fraction": 0.0, "max_length": 128},
           "training": {"max_steps": args.steps, "batch_size": 4, "learning_rate": 1e-5, "lr_scheduler": "constant",
                        "precision": "fp32", "progress": False, "tensorboard": False, "eval_steps": None, "seed": 0}}
    if args.lora:
        job["lora"] = {"rank": 16, "alpha": 32, "dropout": 0.0}
    job_path = folder / "job.yaml"
    job_path.write_text(json.dumps(job))
    preset = yaml.safe_load(PRESET.read_text())
    results = {}
    for name, low_memory in (("every process loads (switch off)", False), ("main process loads (fsdp2.yaml)", True)):
        preset["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] = low_memory
        preset["fsdp_config"]["fsdp_sync_module_states"] = low_memory
        path = folder / f"fsdp2-{low_memory}.yaml"
        path.write_text(yaml.safe_dump(preset))
        print(f"{name} ...", flush=True)
        results[name] = launch(path, job_path, folder / f"result-{low_memory}.json")
    print(f"\nSFT {'LoRA r16' if args.lora else 'full'}, {args.model} fp32, FSDP2, 2 processes (gloo, 1 thread "
          f"each), global batch 4, max length 128, {args.steps} steps, {os.cpu_count()} CPUs\n")
    print("| loading | process | after import MB | peak while loading MB | parameters held after loading MB | "
          "peak while sharding MB | after sharding MB | peak while training MB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, result in results.items():
        for rank, memory in enumerate(result["processes"]):
            print(f"| {name} | {rank} | {memory['imported_mb']:.0f} | {memory['load_peak_mb']:.0f} | "
                  f"{memory['held_after_load_mb']:.0f} | {memory['prepare_peak_mb']:.0f} | "
                  f"{memory['after_prepare_mb']:.0f} | {memory['train_peak_mb']:.0f} |")
    print("\nlosses: " + "; ".join(f"{name}: {', '.join(f'{x:.6f}' for x in r['losses'])}"
                                   for name, r in results.items()))


if __name__ == "__main__":
    main()
