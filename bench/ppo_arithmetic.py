"""PPO against GRPO on single-digit addition, and the PPO ablations behind alignkit's PPO defaults.

    python examples/make_arithmetic_prompts.py
    python bench/ppo_arithmetic.py --rows ablations              # PPO variants at 8 rollouts (256 completions)
    python bench/ppo_arithmetic.py --rows compare                # GRPO vs PPO (both critics) at 448 completions
    python bench/ppo_arithmetic.py --rows old,zeros --rollouts 4 # any rows, any budget

Every row is one training run of the embedded SmolLM2-135M-Instruct + LoRA r16 from
``examples/ppo_arithmetic.yaml`` (or ``grpo_arithmetic.yaml``) with the row's overrides, on the same
prompts, reward (``numeric_match``) and seed. What is held equal across rows is the number of
*sampled completions* (rollouts x prompts_per_step x num_generations, 32 per rollout for every
row); optimizer steps per rollout differ by method (GRPO 1, PPO ppo_epochs x num_mini_batches).

The score is held-out greedy accuracy on the 90 test additions (digit pairs never seen in
training) after the last rollout, with its 95% Wilson interval; the starting model's accuracy is
measured once (the first row's step-0 evaluation). Also: the share of held-out answers cut at
the length limit, the training reward of the first and last rollouts, and the critic's explained
variance on the last rollout (PPO).

Rows are written as they finish, to ``--out`` (Markdown table) and ``--out`` with ``.jsonl``
(one JSON object per row), so a partial table is usable. One seed per row: read differences
smaller than the intervals as noise.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignkit.evaluate.stats import wilson_interval  # noqa: E402
from alignkit import load_job, run_job  # noqa: E402

COMPLETIONS_PER_ROLLOUT = 32
# name -> (method, overrides, what the row changes). PPO rows start from examples/ppo_arithmetic.yaml,
# whose keys are the new defaults; "old" puts back what the example shipped with before issue 19.
OLD = ["value_head_init=normal", "cliprange_value=0.2", "ppo_epochs=2", "num_mini_batches=2",
       "training.learning_rate=3.0e-4", "kl_coef=0.05", "whiten_advantages=true", "missing_eos_penalty=null"]
ROWS: dict[str, tuple[str, list[str], str]] = {
    "old": ("ppo", OLD, "as shipped before: random value head, value clip 0.2"),
    "old_warmup": ("ppo", OLD + ["critic_warmup_rollouts=2"], "as shipped + 2 critic-only warm-up rollouts"),
    "old_noclip": ("ppo", OLD + ["cliprange_value=null"], "as shipped, value clipping off"),
    "zeros": ("ppo", OLD[1:] + ["value_head_init=zeros"], "zero-initialised value head (values start at 0)"),
    "zeros_noclip": ("ppo", OLD[1:] + ["value_head_init=zeros", "cliprange_value=null"],
                     "zero value head, value clipping off"),
    "zeros_kl0": ("ppo", OLD[1:] + ["value_head_init=zeros", "kl_coef=0"], "zero value head, no KL penalty"),
    "zeros_nowhiten": ("ppo", OLD[1:] + ["value_head_init=zeros", "whiten_advantages=false"],
                       "zero value head, advantages not whitened"),
    "zeros_1epoch": ("ppo", OLD[1:] + ["value_head_init=zeros", "ppo_epochs=1", "num_mini_batches=1"],
                     "zero value head, one optimizer step per rollout"),
    "zeros_lr5": ("ppo", OLD[1:] + ["value_head_init=zeros", "training.learning_rate=5.0e-4"],
                  "zero value head, learning rate 5e-4"),
    "zeros_eos": ("ppo", OLD[1:] + ["value_head_init=zeros", "missing_eos_penalty=0.5"],
                  "zero value head, 0.5 off the score of a truncated completion"),
    "grpo": ("grpo", [], "GRPO example (4 prompts x 8 completions, one step per rollout)"),
    "ppo_shared": ("ppo", ["critic=shared"],
                   "PPO example, shared critic (value head on the actor's backbone)"),
    "ppo_separate": ("ppo", ["critic=separate"],
                     "PPO example, separate critic (a copy of the backbone with its own LoRA)"),
}
GROUPS = {
    "ablations": ["old", "zeros", "zeros_noclip", "zeros_kl0", "zeros_1epoch", "zeros_nowhiten", "zeros_lr5",
                  "old_warmup", "zeros_eos"],
    "compare": ["grpo", "ppo_shared", "ppo_separate"],
}


def steps_per_rollout(job) -> int:
    return job.ppo_epochs * job.num_mini_batches if job.method == "ppo" else job.num_iterations


def run_row(name: str, rollouts: int, output_root: Path, eval_at_start: bool, extra: list[str]) -> dict:
    method, overrides, what = ROWS[name]
    config = ROOT / "examples" / f"{method}_arithmetic.yaml"
    probe = load_job(method, str(config), overrides + extra)
    per = steps_per_rollout(probe)
    completions = probe.prompts_per_step * probe.num_generations
    if completions != COMPLETIONS_PER_ROLLOUT:
        raise SystemExit(f"row {name}: {completions} completions per rollout, expected {COMPLETIONS_PER_ROLLOUT}")
    steps = rollouts * per
    settings = [f"training.max_steps={steps}", f"training.eval_steps={steps}",
                f"training.eval_at_start={'true' if eval_at_start else 'false'}", "training.save_steps=null",
                "training.progress=false", "training.tensorboard=false", f"training.output_dir={output_root / name}",
                "training.overwrite=true"]  # a row run again replaces its earlier run
    job = load_job(method, str(config), overrides + extra + settings)
    started = time.time()
    summary = run_job(job)
    seconds = time.time() - started
    history = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    train = [h for h in history if "rollout/reward" in h]
    evals = [h for h in history if "eval/reward" in h]
    first_rollout, last_rollout = train[0], train[-1]
    final = evals[-1]
    n = min(job.eval_max_prompts or 90, 90)
    correct = round(final["eval/reward"] * n)
    low, high = wilson_interval(correct, n)
    row = {
        "row": name, "method": method, "what": what, "overrides": overrides + extra,
        "critic": getattr(job, "critic", "-") if method == "ppo" else "-",
        "rollouts": rollouts, "completions": rollouts * completions, "optimizer_steps": steps,
        "accuracy": final["eval/reward"], "accuracy_interval": [low, high], "n": n,
        "eval_truncated_share": final.get("eval/truncated_share"),
        "start_accuracy": evals[0]["eval/reward"] if eval_at_start and len(evals) > 1 else None,
        "start_truncated_share": evals[0].get("eval/truncated_share") if eval_at_start and len(evals) > 1 else None,
        "first_rollout_reward": first_rollout["rollout/reward"], "last_rollout_reward": last_rollout["rollout/reward"],
        "first_rollout_truncated": first_rollout["rollout/truncated_share"],
        "last_rollout_truncated": last_rollout["rollout/truncated_share"],
        "explained_variance": last_rollout.get("rollout/explained_variance"),
        "first_explained_variance": first_rollout.get("rollout/explained_variance"),
        "seconds": round(seconds, 1),
    }
    return row


def format_row(row: dict) -> str:
    if "error" in row:
        return f"| {row['row']} | {row.get('what', '')} | error: {row['error']} | | | | | |"
    low, high = row["accuracy_interval"]
    ev = row.get("explained_variance")
    ev_text = "-" if ev is None else f"{row['first_explained_variance']:.2f} -> {ev:.2f}"
    return (f"| {row['row']} | {row['what']} | {row['completions']} ({row['optimizer_steps']} steps) | "
            f"**{row['accuracy']:.1%}** [{low:.1%}, {high:.1%}] | {row['eval_truncated_share']:.0%} | "
            f"{row['first_rollout_reward']:.2f} -> {row['last_rollout_reward']:.2f} | "
            f"{row['first_rollout_truncated']:.0%} -> {row['last_rollout_truncated']:.0%} | {ev_text} | "
            f"{row['seconds']:.0f} |")


HEADER = ("| row | what changes | completions sampled (optimizer steps) | held-out greedy accuracy [95% Wilson] | "
          "held-out answers cut at the limit | training reward, first -> last rollout | "
          "training completions cut, first -> last | critic explained variance, first -> last | seconds |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="ablations", help=f"comma-separated rows or groups ({', '.join(GROUPS)}); "
                                                            f"rows: {', '.join(ROWS)}")
    parser.add_argument("--rollouts", type=int, default=None, help="rollouts per row (default: 8 for ablations, "
                                                                   "14 for compare; 32 completions each)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "ppo_arithmetic.md"))
    parser.add_argument("--runs", default=str(ROOT / "runs" / "bench_ppo_arithmetic"))
    parser.add_argument("--set", action="append", default=[], dest="extra", help="extra override for every row")
    parser.add_argument("--no-start-eval", action="store_true", help="skip the step-0 evaluation of the first row")
    args = parser.parse_args()
    names = []
    for item in args.rows.split(","):
        names += GROUPS.get(item.strip(), [item.strip()])
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    rollouts = args.rollouts or (14 if args.rows == "compare" else 8)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = out.with_suffix(".jsonl")
    started = time.strftime("%Y-%m-%d %H:%M")
    with out.open("a") as table:
        table.write(f"\n## {started}: rows {','.join(names)}, {rollouts} rollouts x {COMPLETIONS_PER_ROLLOUT} "
                    f"completions, load average {os.getloadavg()[0]:.1f}\n\n{HEADER}\n")
    for index, name in enumerate(names):
        try:
            row = run_row(name, rollouts, Path(args.runs), index == 0 and not args.no_start_eval, args.extra)
        except Exception as error:  # one failed row must not lose the others
            traceback.print_exc()
            row = {"row": name, "what": ROWS[name][2], "error": f"{type(error).__name__}: {error}"[:300]}
        with records.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        with out.open("a") as table:
            if row.get("start_accuracy") is not None:
                n = row["n"]
                low, high = wilson_interval(round(row["start_accuracy"] * n), n)
                table.write(f"| start | the embedded model, before training | 0 | **{row['start_accuracy']:.1%}** "
                            f"[{low:.1%}, {high:.1%}] | {row['start_truncated_share']:.0%} | | | | |\n")
            table.write(format_row(row) + "\n")
        print(format_row(row), flush=True)
    print(f"table: {out}")


if __name__ == "__main__":
    main()
