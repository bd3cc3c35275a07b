"""alignkit DPO against TRL's DPOTrainer: same model, same pairs, same settings; speed, memory, accuracy.

    python bench/dpo_vs_trl.py                                 # 64 pairs, batch 8, max length 256, CPU
    python bench/dpo_vs_trl.py --repeats 2 --lora              # LoRA (rank 16) instead of full weights
    python bench/dpo_vs_trl.py --device cuda --pairs 512 --max-length 1024 --batch-size 8
    python bench/dpo_vs_trl.py --naive-logprobs --skip-trl    # what the chunked log-probs save

What is compared, and how it is kept fair:

* Model: the embedded SmolLM2-135M-Instruct, loaded by ``alignkit.model.load_model_and_tokenizer()``
  in each worker (the same safetensors weights); full fine-tuning or LoRA, identically for both.
* Data: the first ``--pairs`` HH-harmless pairs from ``../shared/data/hh-harmless/train.jsonl`` whose
  longest row fits ``--max-length`` (so neither trainer truncates), else generated pairs. Both get
  the same conversational rows (prompt messages, chosen, rejected) and apply the same chat template.
* Settings: sigmoid DPO, beta 0.1, AdamW, constant learning rate, no warm-up, no weight decay,
  gradient clipping 1.0, float32 (no autocast), no gradient checkpointing, no dropout, the same
  batch size, number of epochs and seed. The reference is precomputed once by both
  (``precompute_ref_log_probs=True`` in TRL); ``--trl-live-reference`` adds TRL's default (a
  reference copy run at every step).
* Both workers run one small forward and backward pass before timing (a warm-up, identical for both).
* Each trainer runs in its own fresh subprocess (so peak memory does not mix, and caches of one run
  do not help the next); runs are interleaved ``--repeats`` times, and the median is reported.
* Time: from building the trainer (tokenization and the reference pass included) to the end of
  training; model loading and the final accuracy evaluation are excluded. ``train loop`` is the
  training part alone. Pairs/s = pairs x epochs / time. ``pairs per CPU-s`` divides by the
  process's CPU time over the same span instead (less sensitive to other jobs on a shared machine).
* Memory: peak resident set size of the worker process (``getrusage`` maxrss; ``cuda`` peak
  allocated memory on a GPU); ``baseline`` is the RSS after imports and model loading.
* Accuracy: after training, each worker scores the same pairs with the same function (alignkit's
  ``response_logprob_sums`` against reference sums computed before training): the share of pairs
  whose implicit reward beta * (log pi - log pi_ref) is higher for the chosen response.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-harmless" / "train.jsonl"


# ----------------------------------------------------------------------------- data

def generated_pairs(count: int, seed: int = 0) -> list[dict]:
    """Pairs the benchmark makes itself when HH is absent: the chosen answer is polite and on topic."""
    rng = random.Random(seed)
    topics = ["a password reset", "a late parcel", "a refund", "a broken screen", "a billing error",
              "a lost key", "a slow laptop", "a cancelled flight"]
    rows = []
    for i in range(count):
        topic = rng.choice(topics)
        steps = rng.randint(2, 5)
        prompt = f"Hi, I need help with {topic}. What should I do? (ticket {i})"
        chosen = " ".join(f"Step {k + 1}: check the details of {topic} and write down what you see." for k in range(steps))
        rejected = " ".join(rng.choice(["No.", "Figure it out yourself.", "Not my problem.", "Whatever."])
                            for _ in range(steps))
        rows.append({"prompt": [{"role": "user", "content": prompt}], "chosen": chosen, "rejected": rejected})
    return rows


def bench_rows(count: int, max_length: int, model: str = "smollm2-135m-instruct") -> tuple[list[dict], str]:
    """Conversational rows (prompt messages, chosen text, rejected text) that fit max_length untruncated."""
    from alignkit.data.pairs import tokenize_pairs
    from alignkit.model import load_model_and_tokenizer

    _, tokenizer = load_model_and_tokenizer(model)
    if HH.exists():
        from alignkit.data import load_examples

        examples, _ = load_examples(HH, kind="preference", on_error="skip")
        source = f"{HH} (first {count} pairs whose rows fit {max_length} tokens)"
    else:
        from alignkit.data.types import PreferenceExample

        examples = [PreferenceExample(prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"], source=str(i))
                    for i, r in enumerate(generated_pairs(count * 2))]
        source = "generated pairs (../shared/data/hh-harmless not found)"
    rows = []
    for example in examples:
        pairs, _ = tokenize_pairs(tokenizer, [example], None)
        if pairs and len(pairs[0]) <= max_length - 4:  # a few tokens of slack for template differences
            rows.append({"prompt": example.prompt, "chosen": example.chosen, "rejected": example.rejected})
        if len(rows) == count:
            break
    return rows, source


# ----------------------------------------------------------------------------- workers

def peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_model(args):
    import torch

    from alignkit.model import add_lora, load_model_and_tokenizer

    torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model, device=args.device, dtype="float32")
    if args.lora:
        model = add_lora(model, rank=16, alpha=32, dropout=0.0)
    # Warm-up, identical for both trainers: one small forward and backward, so first-call costs
    # (kernel selection, allocator growth) are not timed.
    device = next(model.parameters()).device
    model(input_ids=torch.ones(1, 16, dtype=torch.long, device=device)).logits.float().mean().backward()
    model.zero_grad(set_to_none=True)
    return model, tokenizer


def reference_and_accuracy_tools(model, tokenizer, rows, args):
    """Tokenized pairs and a function computing (chosen, rejected) summed response log-probs."""
    import torch

    from alignkit.data.types import PreferenceExample
    from alignkit.data.pairs import collate_pairs, split_pairs, tokenize_pairs
    from alignkit.model.forward import response_logprob_sums

    examples = [PreferenceExample(prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"]) for r in rows]
    pairs, _ = tokenize_pairs(tokenizer, examples, args.max_length)

    @torch.no_grad()
    def sums(current):
        was_training = current.training
        current.eval()
        out = []
        for start in range(0, len(pairs), args.batch_size):
            batch = collate_pairs(pairs[start:start + args.batch_size], tokenizer.pad_token_id,
                                  next(current.parameters()).device)
            chosen, rejected = split_pairs(response_logprob_sums(current, batch)[0])
            out.append(torch.stack([chosen, rejected], 1).cpu())
        current.train(was_training)
        return torch.cat(out)

    return sums


def accuracy(after, before) -> float:
    margin = (after[:, 0] - before[:, 0]) - (after[:, 1] - before[:, 1])
    return float((margin > 0).float().mean())


def naive_response_logprob_sums(model, batch, chunk_size=1024, per_token=False):
    """For comparison only: the same sums through full ``[rows, tokens, vocab]`` float32 logits."""
    import torch

    attention = batch["attention_mask"]
    if attention.dim() == 4:
        attention = attention.to(next(model.parameters()).dtype)
    logits = model(input_ids=batch["input_ids"], attention_mask=attention, position_ids=batch.get("position_ids"),
                   use_cache=False).logits.float()
    logps = torch.log_softmax(logits, dim=-1).reshape(-1, logits.shape[-1])
    targets = batch["input_ids"].reshape(-1)[batch["target_index"]]
    token_logps = logps[batch["source_index"], targets]
    sequences = 2 * batch["margin"].shape[0]
    sums = torch.zeros(sequences, device=token_logps.device).index_add(0, batch["target_sequence"], token_logps)
    counts = torch.zeros(sequences, device=token_logps.device).index_add(
        0, batch["target_sequence"], torch.ones_like(token_logps))
    return (sums, counts, token_logps) if per_token else (sums, counts)


def worker_alignkit(args, rows, naive_logprobs: bool = False) -> dict:
    if naive_logprobs:
        import alignkit.methods.dpo as dpo

        dpo.response_logprob_sums = naive_response_logprob_sums

    from alignkit.methods import build_job
    from alignkit.engine import Engine
    from alignkit.methods.dpo import DPORecipe

    model, tokenizer = load_model(args)
    device = next(model.parameters()).device
    sums = reference_and_accuracy_tools(model, tokenizer, rows, args)
    before = sums(model)
    from alignkit.data.types import PreferenceExample

    examples = [PreferenceExample(prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"], source=str(i))
                for i, r in enumerate(rows)]
    workdir = Path(tempfile.mkdtemp(prefix="bench-alignkit-"))
    job = build_job("dpo", {
        "beta": 0.1, "loss_type": "sigmoid", "reference_cache_dir": str(workdir / "cache"),
        "data": {"max_length": args.max_length},
        "training": {"output_dir": str(workdir / "run"), "epochs": args.epochs, "batch_size": args.batch_size,
                     "learning_rate": args.learning_rate, "lr_scheduler": "constant", "max_grad_norm": 1.0,
                     "precision": "fp32", "progress": False, "tensorboard": False, "seed": args.seed,
                     # as measured in bench/RESULTS.md, like TRL's side: no checkpointing, default allocator
                     "gradient_checkpointing": False, "release_memory": False},
    })
    _, timing = timed_training(device, lambda: DPORecipe(job, model=model, tokenizer=tokenizer, train=examples,
                                                         validation=[]),
                               lambda recipe: Engine(job.training, recipe, workdir / "run").train())
    return {**timing, "accuracy": accuracy(sums(model), before)}


def worker_trl(args, rows, live_reference: bool) -> dict:
    import copy

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = load_model(args)
    device = next(model.parameters()).device
    sums = reference_and_accuracy_tools(model, tokenizer, rows, args)
    before = sums(model)
    reference = copy.deepcopy(model) if live_reference and not args.lora else None
    dataset = Dataset.from_list([{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                  "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    workdir = Path(tempfile.mkdtemp(prefix="bench-trl-"))
    config = DPOConfig(
        output_dir=str(workdir), per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        num_train_epochs=args.epochs, learning_rate=args.learning_rate, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=0.1, loss_type=["sigmoid"],
        max_length=args.max_length, precompute_ref_log_probs=not live_reference,
        gradient_checkpointing=False, bf16=False, fp16=False, logging_steps=1, save_strategy="no",
        report_to=[], seed=args.seed, data_seed=args.seed, use_cpu=device.type == "cpu",
        dataloader_num_workers=0, disable_tqdm=True, eval_strategy="no", optim="adamw_torch",
    )
    trainer, timing = timed_training(
        device, lambda: DPOTrainer(model=model, ref_model=reference, args=config, train_dataset=dataset,
                                   processing_class=tokenizer),
        lambda trainer: trainer.train())
    return {**timing, "accuracy": accuracy(sums(trainer.model), before)}


def timed_training(device, build, train):
    """``(trainer, timings)``: wall time of ``build()`` + ``train(trainer)``, of the training alone, CPU
    time, peak memory and the memory baseline before building; the same clocks for every worker."""
    import torch

    baseline = peak_now()
    cpu_started = time.process_time()
    started = time.perf_counter()
    trainer = build()
    train_started = time.perf_counter()
    train(trainer)
    if device.type == "cuda":
        torch.cuda.synchronize()
    finished = time.perf_counter()
    return trainer, {"seconds": finished - started, "train_seconds": finished - train_started,
                     "cpu_seconds": time.process_time() - cpu_started, "peak_mb": peak_memory_mb(device),
                     "baseline_mb": baseline}


def peak_now() -> float:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- driver

TRAINERS = {"alignkit": "alignkit", "trl": "TRL DPOTrainer (precompute_ref_log_probs)",
            "trl-live": "TRL DPOTrainer (default: live reference)",
            "alignkit-naive": "alignkit with full-vocabulary logits (comparison)"}


def run_worker(name: str, args, data_file: Path) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--data-file", str(data_file),
               "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
               "--epochs", str(args.epochs), "--learning-rate", str(args.learning_rate),
               "--seed", str(args.seed), "--threads", str(args.threads), "--model", args.model]
    if args.lora:
        command.append("--lora")
    if args.device:
        command += ["--device", args.device]
    env = dict(os.environ, HF_DATASETS_CACHE=tempfile.mkdtemp(prefix="bench-hf-"), TQDM_DISABLE="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{name} worker failed:\n{done.stderr[-4000:]}")
    line = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="anything load_model_and_tokenizer accepts (default: the embedded model)")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=5e-6)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--lora", action="store_true", help="LoRA rank 16 on all linear layers (both trainers)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs per trainer (median reported)")
    parser.add_argument("--trl-live-reference", action="store_true", help="also run TRL's default live reference")
    parser.add_argument("--naive-logprobs", action="store_true",
                        help="also run alignkit with full [rows, tokens, vocab] float32 logits instead of the "
                             "chunked head, to show what chunking saves")
    parser.add_argument("--skip-trl", action="store_true",
                        help="leave TRL out (with --naive-logprobs: only the chunked-vs-full-logits comparison)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    parser.add_argument("--output", help="also write the results as JSON here")
    parser.add_argument("--worker", choices=sorted(TRAINERS), help=argparse.SUPPRESS)
    parser.add_argument("--data-file", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        rows = json.loads(Path(args.data_file).read_text())
        if args.worker.startswith("alignkit"):
            result = worker_alignkit(args, rows, naive_logprobs=args.worker == "alignkit-naive")
        else:
            result = worker_trl(args, rows, live_reference=args.worker == "trl-live")
        result["pairs"] = len(rows) * args.epochs
        print("RESULT " + json.dumps(result), flush=True)
        return

    rows, source = bench_rows(args.pairs, args.max_length, args.model)
    data_file = Path(tempfile.mkdtemp(prefix="bench-data-")) / "pairs.json"
    data_file.write_text(json.dumps(rows))
    names = (["alignkit"] + ([] if args.skip_trl else ["trl"]) + (["trl-live"] if args.trl_live_reference else [])
             + (["alignkit-naive"] if args.naive_logprobs else []))
    results: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        order = names if repeat % 2 == 0 else names[::-1]
        for name in order:
            result = run_worker(name, args, data_file)
            results[name].append(result)
            print(f"[repeat {repeat + 1}] {name}: {json.dumps({k: round(v, 3) for k, v in result.items()})}",
                  flush=True)

    def median(name, key):
        return statistics.median(r[key] for r in results[name])

    import platform

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name() if device.startswith("cuda") else f"{platform.processor() or 'CPU'}, {os.cpu_count()} cores"
    print(f"\n{len(rows)} pairs from {source}; batch {args.batch_size}, max length {args.max_length}, "
          f"{args.epochs} epoch(s), {'LoRA r16' if args.lora else 'full weights'}, fp32, {device} ({where}), "
          f"median of {args.repeats} interleaved run(s)\n")
    memory = "peak GPU MB" if device.startswith("cuda") else "peak RSS MB"
    print(f"| trainer | pairs/s (end to end) | pairs/s (train loop) | pairs per CPU-s | {memory} | baseline MB "
          f"| final reward accuracy |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        pairs = results[name][0]["pairs"]
        print(f"| {TRAINERS[name]} | {pairs / median(name, 'seconds'):.3f} | {pairs / median(name, 'train_seconds'):.3f} "
              f"| {pairs / median(name, 'cpu_seconds'):.3f} | {median(name, 'peak_mb'):.0f} "
              f"| {median(name, 'baseline_mb'):.0f} | {median(name, 'accuracy'):.3f} |")
    for name in names[1:]:
        speed = median(name, "seconds") / median("alignkit", "seconds")
        loop = median(name, "train_seconds") / median("alignkit", "train_seconds")
        cpu = median(name, "cpu_seconds") / median("alignkit", "cpu_seconds")
        peak = median("alignkit", "peak_mb") / median(name, "peak_mb")
        extra = ((median("alignkit", "peak_mb") - median("alignkit", "baseline_mb"))
                 / max(1.0, median(name, "peak_mb") - median(name, "baseline_mb")))
        print(f"\nalignkit vs {TRAINERS[name]}: throughput x{speed:.2f} end to end (target >= 1.2), "
              f"x{loop:.2f} train loop, x{cpu:.2f} per CPU-second; peak memory x{peak:.2f} (target <= 0.8), "
              f"x{extra:.2f} above each one's baseline")
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "source": source, "results": results}, indent=2))


if __name__ == "__main__":
    main()
