"""Limits of SFT, measured: SFT on the chosen replies of preference pairs also makes the rejected
replies more likely; DPO on the same pairs separates them.

From the embedded SmolLM2-135M-Instruct, with the same LoRA adapter size, steps and training pairs:

* **SFT** trains on prompt + chosen reply (the pairs read as chat rows: `alignkit sft` does that with
  a preference file);
* **DPO** trains on (prompt, chosen, rejected).

On held-out pairs it measures, for the base model and each trained model, the log-probability of the
chosen and of the rejected reply (summed over the reply's tokens, also per token), how much each moved
from the base model, the share of pairs whose rejected reply became *more* likely, and the share of
pairs where the chosen reply gained more than the rejected one (the implicit-reward accuracy of DPO,
``[log pi(c) - log pi_0(c)] > [log pi(r) - log pi_0(r)]``). Intervals: bootstrap over pairs for means,
Wilson for shares (95%).

    python examples/make_preference_data.py --limit 1000     # HH-harmless: 900 train / 100 held-out pairs
    python examples/sft_limits_hh.py --steps 40              # about 10 minutes on a 2-core CPU
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


@torch.no_grad()
def pair_logprobs(spec: str, pairs_path: str, max_length: int, limit: int, batch_size: int = 8):
    """(chosen sums, rejected sums, chosen token counts, rejected token counts) for held-out pairs."""
    from alignkit.data import load_examples
    from alignkit.data.pairs import collate_pairs, split_pairs, tokenize_pairs
    from alignkit.model.forward import response_logprob_sums
    from alignkit.model import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(spec, device="cpu", dtype="float32")
    examples, _ = load_examples(pairs_path, kind="preference", on_error="skip", limit=limit)
    pairs, _ = tokenize_pairs(tokenizer, examples, max_length, max_length * 3 // 4)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = [[], [], [], []]
    for start in range(0, len(pairs), batch_size):
        batch = collate_pairs(pairs[start:start + batch_size], pad, "cpu", padding_free=True, share_prompt=True)
        sums, counts = response_logprob_sums(model, batch)
        for index, value in enumerate((*split_pairs(sums), *split_pairs(counts))):
            out[index].append(value.float())
    return [torch.cat(values).numpy() for values in out]


def train(method: str, overrides: list[str]) -> tuple[str, float]:
    from alignkit import load_job, run_job

    started = time.time()
    summary = run_job(load_job(method, None, overrides))
    return summary["final"], time.time() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", default=str(ROOT / "examples/data/hh_train.jsonl"))
    parser.add_argument("--valid", default=str(ROOT / "examples/data/hh_valid.jsonl"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--held-out", type=int, default=100, help="held-out pairs to measure")
    parser.add_argument("--lora-layers", type=int, default=12, help="adapt the last N decoder layers")
    parser.add_argument("--sft-learning-rate", type=float, default=2e-4)
    parser.add_argument("--dpo-learning-rate", type=float, default=2e-4)
    parser.add_argument("--out", default="runs/sft-limits")
    args = parser.parse_args()
    from alignkit.evaluate.stats import bootstrap_interval, wilson_interval

    rows = args.steps * args.batch_size
    common = ["model.name_or_path=smollm2-135m-instruct", "model.device=cpu", "model.dtype=float32",
              "lora.rank=16", "lora.alpha=32", "lora.dropout=0.0", f"lora.layers={args.lora_layers}", f"data.train={args.train}",
              "data.validation_fraction=0", f"data.limit={rows}", "data.on_error=skip",
              f"data.max_length={args.max_length}", f"training.max_steps={args.steps}",
              f"training.batch_size={args.batch_size}", "training.lr_scheduler=constant",
              "training.progress=false", "training.tensorboard=false", "training.seed=0"]
    sft_final, sft_seconds = train("sft", common + [f"training.learning_rate={args.sft_learning_rate}",
                                                    f"training.output_dir={args.out}/sft"])
    dpo_final, dpo_seconds = train("dpo", common + [f"training.learning_rate={args.dpo_learning_rate}",
                                                    f"data.max_prompt_length={args.max_length * 3 // 4}",
                                                    "beta=0.1", f"training.output_dir={args.out}/dpo"])
    measured = {name: pair_logprobs(spec, args.valid, args.max_length, args.held_out)
                for name, spec in (("base", "smollm2-135m-instruct"), ("sft", sft_final), ("dpo", dpo_final))}
    base_c, base_r, count_c, count_r = measured["base"]
    n = len(base_c)

    def mean_ci(values):
        low, high = bootstrap_interval(np.asarray(values), np.mean, n_resamples=2000, seed=0)
        return f"{np.mean(values):+.3f} [{low:+.3f}, {high:+.3f}]"

    def share(flags):
        k = int(np.sum(flags))
        low, high = wilson_interval(k, len(flags))
        return f"{k / len(flags):.0%} [{low:.0%}, {high:.0%}]"

    table = {"per-token log p(chosen)": {}, "per-token log p(rejected)": {},
             "change of log p(chosen) vs base, nats per reply": {},
             "change of log p(rejected) vs base, nats per reply": {},
             "pairs whose rejected reply became more likely": {},
             "pairs where chosen gained more than rejected (implicit-reward accuracy)": {}}
    results = {}
    for name, (chosen, rejected, _, _) in measured.items():
        table["per-token log p(chosen)"][name] = f"{np.sum(chosen) / np.sum(count_c):.3f}"
        table["per-token log p(rejected)"][name] = f"{np.sum(rejected) / np.sum(count_r):.3f}"
        if name == "base":
            continue
        delta_c, delta_r = chosen - base_c, rejected - base_r
        table["change of log p(chosen) vs base, nats per reply"][name] = mean_ci(delta_c)
        table["change of log p(rejected) vs base, nats per reply"][name] = mean_ci(delta_r)
        table["pairs whose rejected reply became more likely"][name] = share(delta_r > 0)
        table["pairs where chosen gained more than rejected (implicit-reward accuracy)"][name] = \
            share(delta_c > delta_r)
        results[name] = {"delta_chosen": float(np.mean(delta_c)), "delta_rejected": float(np.mean(delta_r)),
                         "rejected_up": float(np.mean(delta_r > 0)), "accuracy": float(np.mean(delta_c > delta_r))}
    print(f"\n{n} held-out pairs ({args.valid}); LoRA r16 on the last {args.lora_layers} layers, {args.steps} steps of batch "
          f"{args.batch_size} ({rows} training pairs), max length {args.max_length}; SFT {sft_seconds:.0f} s, "
          f"DPO {dpo_seconds:.0f} s\n")
    print("| held-out pairs | base model | after SFT on chosen | after DPO |")
    print("| --- | --- | --- | --- |")
    for label, cells in table.items():
        print(f"| {label} | {cells.get('base', '—')} | {cells.get('sft', '—')} | {cells.get('dpo', '—')} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps({"n": n, "table": table, "results": results,
                                                            "sft_seconds": sft_seconds, "dpo_seconds": dpo_seconds},
                                                           indent=1))
    return 0 if all(math.isfinite(v["delta_chosen"]) for v in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
