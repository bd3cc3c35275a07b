"""SFT throughput and memory: alignkit vs TRL's SFTTrainer, same model, data, batch, length, steps.

    python bench/sft_vs_trl.py                    # LoRA r16, 64 rows, batch 8, 8 steps, max_length 384
    python bench/sft_vs_trl.py --mode full --rows 32 --steps 4

Each trainer runs in its own subprocess (so peak memory is its own), on the embedded
SmolLM2-135M-Instruct, over the same rows: 64 GSM8K question/answer pairs from
../shared/data/gsm8k/train.jsonl when present, otherwise generated arithmetic rows. Both use the
model's chat template, loss on the answer only, AdamW at a constant learning rate, no warm-up,
fp32 on CPU (bf16 on GPU), no gradient checkpointing, no packing. Steps x batch = rows, so each
trainer sees every row exactly once and both process the same number of tokens.

Reported: training tokens per second over steps 2..N (step 1 is warm-up for both), and the peak
resident memory of the process (ru_maxrss) and its increase over the loaded model's baseline.
Needs the bench extra: pip install 'alignkit[bench]' (trl).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def make_rows(count: int) -> tuple[list[dict], str]:
    if GSM8K.exists():
        rows = []
        with GSM8K.open() as handle:
            for line in handle:
                item = json.loads(line)
                rows.append({"question": item["question"], "answer": item["answer"]})
                if len(rows) == count:
                    break
        return rows, f"{GSM8K} (first {count} rows)"
    import random

    rng = random.Random(0)
    rows = []
    for _ in range(count):
        a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(2, 9)
        rows.append({"question": f"A shop has {a} apples and buys {b} more, then packs them in bags of {c}. "
                                 "How many full bags?",
                     "answer": f"It has {a} + {b} = {a + b} apples. {a + b} // {c} = {(a + b) // c} bags.\n"
                               f"#### {(a + b) // c}"})
    return rows, f"{count} generated arithmetic rows (../shared/data/gsm8k not found)"


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_model(mode: str):
    import torch

    from alignkit.model import add_lora, load_model_and_tokenizer

    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer()
    if mode == "lora":
        model = add_lora(model, rank=16, alpha=32, dropout=0.0)
    model.train()
    return model, tokenizer


def worker_alignkit(args, rows) -> dict:
    from alignkit.methods import load_job
    from alignkit.data import ChatExample
    from alignkit.engine import Engine
    from alignkit.methods.sft import SFTRecipe

    model, tokenizer = load_model(args.mode)
    baseline = rss_mb()
    examples = [ChatExample(messages=[{"role": "user", "content": r["question"]},
                                      {"role": "assistant", "content": r["answer"]}], source=f"bench:{i}")
                for i, r in enumerate(rows)]
    with tempfile.TemporaryDirectory() as out:
        job = load_job("sft", None, [
            f"training.output_dir={out}", f"training.max_steps={args.steps}", f"training.batch_size={args.batch_size}",
            "training.learning_rate=1e-4", "training.lr_scheduler=constant", "training.progress=false",
            "training.tensorboard=false", "training.max_grad_norm=1.0", f"data.max_length={args.max_length}",
            "group_by_length=false", "data.validation_fraction=0",
            # as measured in bench/RESULTS.md, like TRL's side: no checkpointing, default allocator
            "training.gradient_checkpointing=false", "training.release_memory=false"])
        recipe = SFTRecipe(job, model=model, tokenizer=tokenizer, train=examples, validation=[])
        tokens = sum(len(row.input_ids) for row in recipe.train_rows)
        result = Engine(job.training, recipe, out).train()
    seconds = [h["step_seconds"] for h in result["history"]]
    return {"trainer": "alignkit", "tokens": tokens, "timed_seconds": sum(seconds[1:]),
            "timed_tokens": tokens * (len(seconds) - 1) / len(seconds), "final_loss": result["history"][-1]["loss"],
            "baseline_rss_mb": baseline}


def worker_trl(args, rows) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = load_model(args.mode)
    baseline = rss_mb()
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}],
                                  "completion": [{"role": "assistant", "content": r["answer"]}]} for r in rows])
    step_ends: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, *_, **__):
            step_ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
            learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
            logging_steps=1, save_strategy="no", report_to=[], max_length=args.max_length,
            completion_only_loss=True, packing=False, gradient_checkpointing=False,
            bf16=torch.cuda.is_available(), dataloader_num_workers=0, seed=0, disable_tqdm=True,
        )
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[Timer()])
        tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
        start = time.perf_counter()
        trainer.train()
    intervals = [b - a for a, b in zip([start] + step_ends[:-1], step_ends)]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"trainer": "trl", "tokens": tokens, "timed_seconds": sum(intervals[1:]),
            "timed_tokens": tokens * (len(intervals) - 1) / len(intervals), "final_loss": losses[-1] if losses else None,
            "baseline_rss_mb": baseline}


def run_worker(name: str, args) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--mode", args.mode, "--rows", str(args.rows),
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["lora", "full"], default="lora")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=1, help="run each trainer this many times, alternating")
    parser.add_argument("--worker", choices=["alignkit", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    rows, source = make_rows(args.rows)
    if args.worker:
        result = (worker_alignkit if args.worker == "alignkit" else worker_trl)(args, rows)
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return 0

    import torch

    device = "GPU " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    results: dict[str, list[dict]] = {"alignkit": [], "trl": []}
    for _ in range(args.repeats):
        for name in ("trl", "alignkit"):
            results[name].append(run_worker(name, args))
    best = {name: min(runs, key=lambda r: r["timed_seconds"] / r["timed_tokens"]) for name, runs in results.items()}
    speed = {name: r["timed_tokens"] / r["timed_seconds"] for name, r in best.items()}
    print(f"SFT benchmark: SmolLM2-135M-Instruct ({args.mode}), {source}, batch {args.batch_size}, "
          f"{args.steps} steps, max_length {args.max_length}, device {device}, repeats {args.repeats}")
    print(f"command: python bench/sft_vs_trl.py --mode {args.mode} --rows {args.rows} --steps {args.steps} "
          f"--batch-size {args.batch_size} --max-length {args.max_length} --repeats {args.repeats}\n")
    print("| trainer | tokens trained | tokens/s (steps 2..N) | peak RSS MB | peak over loaded model MB | final loss |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in ("alignkit", "trl"):
        r = best[name]
        print(f"| {name} | {r['tokens']} | {speed[name]:.1f} | {r['peak_rss_mb']:.0f} | "
              f"{r['peak_rss_mb'] - r['baseline_rss_mb']:.0f} | {r['final_loss']:.4f} |")
    a, t = best["alignkit"], best["trl"]
    print(f"\nratios alignkit/TRL: throughput {speed['alignkit'] / speed['trl']:.2f}x, "
          f"peak RSS {a['peak_rss_mb'] / t['peak_rss_mb']:.2f}x, "
          f"peak over model {(a['peak_rss_mb'] - a['baseline_rss_mb']) / (t['peak_rss_mb'] - t['baseline_rss_mb']):.2f}x")
    if a["tokens"] != t["tokens"]:
        print(f"note: token counts differ ({a['tokens']} vs {t['tokens']}): the two chat renderings differ slightly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
