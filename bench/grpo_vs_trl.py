"""alignkit GRPO against TRL's GRPOTrainer: same model, prompts, reward and settings; speed, memory, reward.

    python bench/grpo_vs_trl.py                        # 8 steps, 4 prompts x 8 completions, 24 tokens, LoRA, CPU
    python bench/grpo_vs_trl.py --steps 20 --repeats 2 --full
    python bench/grpo_vs_trl.py --device cuda --prompts 16 --generations 8 --completion-length 256

What is compared, and how it is kept fair:

* Model: the embedded SmolLM2-135M-Instruct loaded by ``alignkit.model.load_model_and_tokenizer()``
  in each worker; LoRA (rank 16, alpha 32, dropout 0, all linear layers) or full weights, the same
  for both.
* Prompts: single-digit additions (as in ``examples/make_arithmetic_prompts.py``) as chat messages;
  both apply the tokenizer's chat template. Reward: 1 when the completion's last number equals
  the sum (alignkit's ``numeric_match`` rule, called through each trainer's reward interface).
* Settings: ``--prompts`` prompts x ``--generations`` completions per step, all in one optimizer
  step (TRL: ``per_device_train_batch_size = prompts x generations``, one generation batch per
  step), the same ``max_completion_length``, temperature 1, top-p 1, top-k off, beta 0 (no
  reference model), one iteration per batch, token-level loss (TRL ``loss_type="dapo"``, alignkit
  ``loss_aggregation: token``), group std scaling, AdamW at a constant learning rate, no warm-up,
  clipping 1.0, float32, the same seed, gradient checkpointing off for both unless
  ``--gradient-checkpointing`` (TRL turns it on by default; it is set explicitly here).
* Each trainer runs in its own subprocess; runs are interleaved ``--repeats`` times and the median
  is reported.
* Time per step: wall time of each optimizer step (TRL: ``on_step_begin`` -> ``on_step_end``, which
  includes its generation; alignkit: the engine's ``step_seconds``). Generation: time spent inside
  ``transformers`` ``generate`` (the same wrapper around ``GenerationMixin.generate`` in both
  workers). Training = step - generation (loss, backward, optimizer, reward and bookkeeping). The
  first step (warm-up) is left out of the medians.
* Memory: peak RSS of the worker (``getrusage``; on CUDA the peak allocated memory);
  ``baseline`` is the RSS after imports and model loading.
* Reward: mean training reward of the last ``--reward-window`` steps (sampled completions).

CPU timings on a shared machine are noisy: compare ratios from the same invocation, and repeat.
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
PHRASINGS = ["What is {a} + {b}? Reply with just the number.", "Add {a} and {b}. Give only the result as a number.",
             "Compute {a} plus {b}. Answer with a single number."]


def make_rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randrange(10), rng.randrange(10)
        rows.append({"prompt": rng.choice(PHRASINGS).format(a=a, b=b), "answer": str(a + b)})
    return rows


def text_of(completion) -> str:
    if isinstance(completion, list):  # TRL conversational: [{"role": "assistant", "content": ...}]
        return "".join(m.get("content", "") for m in completion)
    return str(completion)


def addition_reward(prompts, completions, answer=None, **fields):
    from alignkit.rewards import numeric_match

    return numeric_match(prompts, [text_of(c) for c in completions], answer=list(answer))


# ----------------------------------------------------------------------------- timing

class GenerateTimer:
    """Accumulates seconds spent inside transformers' GenerationMixin.generate."""

    def __init__(self):
        from transformers.generation.utils import GenerationMixin

        self.seconds = 0.0
        original = GenerationMixin.generate
        timer = self

        def timed(model, *args, **kwargs):
            started = time.perf_counter()
            try:
                return original(model, *args, **kwargs)
            finally:
                timer.seconds += time.perf_counter() - started

        GenerationMixin.generate = timed

    def take(self) -> float:
        value, self.seconds = self.seconds, 0.0
        return value


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- workers

def load(args):
    import torch

    from alignkit.model import load_model_and_tokenizer

    torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model, device=args.device, dtype="float32")
    return model, tokenizer


def run_alignkit(args, rows, out: dict) -> None:
    from alignkit.methods import build_job
    from alignkit.data import PromptExample
    from alignkit.engine import Engine
    from alignkit.methods.grpo import GRPORecipe
    from alignkit.model import add_lora
    from alignkit.rewards import CombinedReward

    model, tokenizer = load(args)
    out["baseline_mb"] = peak_memory_mb(args.device) if not args.device.startswith("cuda") else 0.0
    timer = GenerateTimer()
    if not args.full:
        model = add_lora(model, rank=16, alpha=32, dropout=0.0)
    if args.gradient_checkpointing:  # as the engine's training.gradient_checkpointing does
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    examples = [PromptExample(prompt=[{"role": "user", "content": r["prompt"]}], fields={"answer": r["answer"]},
                              source=f"bench:{i}") for i, r in enumerate(rows)]
    job = build_job("grpo", {
        "num_generations": args.generations, "prompts_per_step": args.prompts,
        "max_completion_length": args.completion_length, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
        "beta": 0.0, "num_iterations": 1, "loss_aggregation": "token", "scale_rewards": True,
        "rollout_backend": "hf", "share_prompt_forward": not args.no_share_prompt,
        "training": {"learning_rate": args.learning_rate, "lr_scheduler": "constant", "max_steps": args.steps,
                     "batch_size": args.micro_batch or args.prompts * args.generations, "max_grad_norm": 1.0,
                     "weight_decay": 0.0, "seed": args.seed, "output_dir": tempfile.mkdtemp(),
                     "progress": False, "tensorboard": False, "precision": "fp32",
                     "gradient_checkpointing": args.gradient_checkpointing, "release_memory": False}})
    from alignkit.rollout.hf import HFGenerateBackend

    backend = HFGenerateBackend(compute_logprobs=False, share_prefix=not args.no_share_prompt)
    recipe = GRPORecipe(job, model=model, tokenizer=tokenizer, train=examples, validation=[],
                        reward=CombinedReward([addition_reward]), backend=backend)
    steps, generation = [], []

    class Timed:  # wraps the recipe to read the generate timer at each step's end
        def __getattr__(self, name):
            return getattr(recipe, name)

        def on_step_end(self, step):
            generation.append(timer.take())
            return recipe.on_step_end(step)

    engine = Engine(job.training, Timed(), job.training.output_dir)
    result = engine.train()
    steps = [h["step_seconds"] for h in result["history"]]
    out.update(step_seconds=steps, generation_seconds=generation,
               rewards=[h["rollout/reward"] for h in result["history"]],
               logged_generation=[h["time/generation"] for h in result["history"]],
               completion_length=[h["rollout/completion_length"] for h in result["history"]])


def run_trl(args, rows, out: dict) -> None:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer = load(args)
    out["baseline_mb"] = peak_memory_mb(args.device) if not args.device.startswith("cuda") else 0.0
    timer = GenerateTimer()
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                                 for r in rows])
    batch = args.prompts * args.generations
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        num_generations=args.generations, max_completion_length=args.completion_length, temperature=1.0,
        top_p=1.0, top_k=0, beta=0.0, num_iterations=1, loss_type="dapo", scale_rewards="group",
        learning_rate=args.learning_rate, lr_scheduler_type="constant", warmup_steps=0, max_steps=args.steps,
        max_grad_norm=1.0, weight_decay=0.0, seed=args.seed, logging_steps=1, report_to="none",
        save_strategy="no", bf16=False, fp16=False, use_cpu=not args.device.startswith("cuda"),
        disable_dropout=True, log_completions=False, dataloader_num_workers=0,
        gradient_checkpointing=args.gradient_checkpointing,  # TRL's default is True: set explicitly, same as ours
    )
    peft_config = None if args.full else LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                    target_modules="all-linear", task_type="CAUSAL_LM")
    steps, generation = [], []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.started = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            steps.append(time.perf_counter() - self.started)
            generation.append(timer.take())

    trainer = GRPOTrainer(model=model, reward_funcs=[addition_reward], args=config, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config, callbacks=[StepTimer()])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    out.update(step_seconds=steps, generation_seconds=generation, rewards=[h["reward"] for h in logs],
               completion_length=[h.get("completions/mean_length", float("nan")) for h in logs])


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    rows = make_rows(args.prompt_count, args.seed)
    out: dict = {"which": args.worker}
    started = time.perf_counter()
    (run_alignkit if args.worker == "alignkit" else run_trl)(args, rows, out)
    out["total_seconds"] = time.perf_counter() - started
    out["peak_mb"] = peak_memory_mb(args.device)
    Path(args.result).write_text(json.dumps(out))


# ----------------------------------------------------------------------------- driver

def summarise(run: dict, window: int) -> dict:
    steps = run["step_seconds"][1:] or run["step_seconds"]
    generation = run["generation_seconds"][1:] or run["generation_seconds"]
    rewards = run["rewards"]
    return {"step": statistics.median(steps), "generation": statistics.median(generation),
            "training": statistics.median([s - g for s, g in zip(steps, generation)]),
            "peak_mb": run["peak_mb"], "baseline_mb": run.get("baseline_mb", 0.0),
            "reward_start": statistics.mean(rewards[:window]), "reward_end": statistics.mean(rewards[-window:]),
            "length": statistics.mean(run["completion_length"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="anything load_model_and_tokenizer accepts (default: the embedded model)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt")
    parser.add_argument("--completion-length", type=int, default=24)
    parser.add_argument("--prompt-count", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--micro-batch", type=int, default=0, help="alignkit micro-batch (0: whole step)")
    parser.add_argument("--full", action="store_true", help="full weights instead of LoRA")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="both trainers recompute activations in backward (TRL's default; alignkit then "
                             "trains each completion's prompt separately)")
    parser.add_argument("--no-share-prompt", action="store_true",
                        help="alignkit ablation: prefill and train every completion's prompt separately, as TRL does")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--reward-window", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["alignkit", "trl"], help="run one side only")
    parser.add_argument("--worker", choices=["alignkit", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the summary here")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    sides = [args.only] if args.only else ["alignkit", "trl"]
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    passthrough, skip = [], False
    for item in sys.argv[1:]:  # the worker gets the same settings, less --json and --only
        if skip:
            skip = False
        elif item in ("--json", "--only"):
            skip = True
        elif not item.startswith(("--json=", "--only=")):
            passthrough.append(item)
    for repeat in range(args.repeats):
        for side in sides:
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
                result = handle.name
            command = [sys.executable, __file__, *passthrough, "--worker", side, "--result", result]
            env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
            started = time.perf_counter()
            subprocess.run(command, check=True, env=env, cwd=ROOT)
            run = json.loads(Path(result).read_text())
            runs[side].append(summarise(run, args.reward_window))
            print(f"[bench] {side} run {repeat + 1}: {time.perf_counter() - started:.1f} s wall", file=sys.stderr)
    summary = {side: {key: statistics.median(r[key] for r in results) for key in results[0]}
               for side, results in runs.items()}
    print(f"\nGRPO, {args.model}, {'full weights' if args.full else 'LoRA r16'}, {args.device}, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
          f"{'prompt sharing off, ' if args.no_share_prompt else ''}"
          f"{args.steps} steps x {args.prompts} prompts x {args.generations} completions, "
          f"{args.completion_length} new tokens, median of {args.repeats} run(s), first step excluded\n")
    header = "| | s/step | generation s | training s | steps/s | peak MB | reward first->last | mean length |"
    print(header + "\n|" + "---|" * 8)
    for side, s in summary.items():
        print(f"| {side} | {s['step']:.2f} | {s['generation']:.2f} | {s['training']:.2f} | {1 / s['step']:.3f} | "
              f"{s['peak_mb']:.0f} | {s['reward_start']:.2f} -> {s['reward_end']:.2f} | {s['length']:.1f} |")
    if len(summary) == 2:
        a, t = summary["alignkit"], summary["trl"]
        print(f"\nalignkit / TRL: steps/s x{t['step'] / a['step']:.2f}, generation time x{a['generation'] / t['generation']:.2f}, "
              f"training time x{a['training'] / t['training']:.2f}, peak memory x{a['peak_mb'] / t['peak_mb']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "summary": summary, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
