"""`alignkit best-of-n`: sample N completions per prompt, score them, keep the best (and the worst).

    alignkit best-of-n --data prompts.jsonl --n 4 --scorer reward:length_penalty \\
        --scorer-arg target_chars=400 --out runs/bon
    alignkit best-of-n --model runs/sft/final --data prompts.jsonl --scorer reward-model:runs/rm/final --out runs/bon
    alignkit best-of-n --data prompts.jsonl --scorer judge --judge-method logprobs --out runs/bon

Writes OUT/sft.jsonl (prompt + best reply as messages, for `alignkit sft`), OUT/pairs.jsonl
(prompt/chosen=best/rejected=worst, for `alignkit dpo` / `alignkit rm`), OUT/candidates.jsonl (every
sample with its score) and OUT/summary.json (mean best vs mean of all scores, what was skipped).

Scorers: ``reward-model:PATH`` (a folder saved by `alignkit rm`), ``reward:SPEC`` (a registered reward
function, ``module:function`` or ``file.py:function``; options with --scorer-arg), ``judge`` (a
pointwise LLM judge: the --judge-* options; the sampling model judges itself unless --judge-model or
--judge-base-url says otherwise).
"""
from __future__ import annotations

import argparse
import json

import yaml

from alignkit.best_of_n import (
    JudgeScorer,
    RewardFunctionScorer,
    RewardModelScorer,
    best_of_n,
    write_result,
)
from alignkit.commands.common import add_columns_argument, parse_columns
from alignkit.commands.judge import add_judge_arguments, judge_backend, pointwise_judge
from alignkit.data import load_examples
from alignkit.errors import UsageError
from alignkit.model import load_model_and_tokenizer


def register(subparsers) -> None:
    parser = subparsers.add_parser("best-of-n", help="sample N replies per prompt, keep the best: SFT data + pairs",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "-m", default="smollm2-135m-instruct",
                        help="the sampling model: embedded name, folder or hub id")
    parser.add_argument("--adapter", help="a LoRA adapter folder to apply")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--data", "-d", required=True, help="prompts (any row shape with a prompt; see docs/data.md)")
    add_columns_argument(parser)
    parser.add_argument("--limit", type=int, help="use at most this many prompts")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt (default 4)")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per generation batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scorer", required=True, help="reward-model:PATH | reward:SPEC | judge")
    parser.add_argument("--scorer-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="an option for a reward:SPEC scorer (value read as YAML), repeatable")
    parser.add_argument("--min-score", type=float, help="write an SFT row only when the best score reaches this")
    parser.add_argument("--output", "--out", "-o", dest="out", required=True, help="output folder")
    add_judge_arguments(parser)
    parser.set_defaults(handler=run)


def _scorer_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--scorer-arg must be KEY=VALUE, got {pair!r}")
        options[key.strip()] = yaml.safe_load(value) if value else ""
    return options


def make_scorer(args, loaded):
    kind, _, target = args.scorer.partition(":")
    if kind == "reward-model":
        if not target:
            raise UsageError("--scorer reward-model:PATH needs the reward model's folder")
        return RewardModelScorer(target, device=args.device, dtype=args.dtype)
    if kind == "reward":
        if not target:
            raise UsageError("--scorer reward:SPEC needs a reward function name, module:function or file.py:function")
        return RewardFunctionScorer(target, **_scorer_options(args.scorer_arg))
    if kind == "judge":
        if target:
            raise UsageError("--scorer judge takes its model from --judge-model / --judge-base-url, not judge:X")
        return JudgeScorer(pointwise_judge(args, judge_backend(args, loaded=loaded, loaded_name=args.model)))
    raise UsageError(f"--scorer must be reward-model:PATH, reward:SPEC or judge; got {args.scorer!r}")


def run(args) -> int:
    if args.scorer_arg and not args.scorer.startswith("reward:"):
        raise UsageError("--scorer-arg is for reward:SPEC scorers")
    examples, report = load_examples(args.data, kind="prompt", limit=args.limit, columns=parse_columns(args.columns))
    print(f"[alignkit] {report.summary()}")
    model, tokenizer = load_model_and_tokenizer(args.model, device=args.device, dtype=args.dtype, adapter=args.adapter)
    scorer = make_scorer(args, (model, tokenizer))
    result = best_of_n(model, tokenizer, examples, scorer, n=args.n, temperature=args.temperature, top_p=args.top_p,
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                       min_score=args.min_score)
    paths = write_result(result, args.out)
    print(json.dumps(result.summary, indent=2, default=str))
    print(f"[alignkit] wrote {paths['sft']} ({len(result.sft_rows)} rows) and {paths['pairs']} "
          f"({len(result.pairs)} pairs)")
    return 0
