"""`alignkit constitution`: training data from a written list of principles (Constitutional AI).

    alignkit constitution check  --constitution examples/constitution.yaml
    alignkit constitution revise --constitution examples/constitution.yaml \\
        --data examples/constitution_prompts.jsonl --out runs/cai
    alignkit constitution pairs  --constitution examples/constitution.yaml \\
        --data examples/constitution_prompts.jsonl --judge-method logprobs --out runs/cai

`revise` writes OUT/sft.jsonl (messages: prompt + final revision; the chain in "constitution") for
`alignkit sft`; `pairs` writes OUT/pairs.jsonl (prompt/chosen/rejected) for `alignkit dpo` or
`alignkit rm`. Both write OUT/summary.json. Generation runs on --model, or on an OpenAI-compatible
endpoint with --base-url (then --model is the served model's name).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from alignkit.best_of_n import write_jsonl
from alignkit.commands.common import add_columns_argument, parse_columns
from alignkit.commands.judge import add_judge_arguments, judge_backend, pairwise_judge
from alignkit.constitution import (
    critique_and_revise,
    load_constitution,
    preference_pairs,
)
from alignkit.data import load_examples
from alignkit.judges import LocalChatBackend, make_backend
from alignkit.model import load_model_and_tokenizer


def _common(parser) -> None:
    parser.add_argument("--constitution", "-c", required=True, help="constitution YAML file")
    parser.add_argument("--data", "-d", required=True, help="prompts (any row shape with a prompt)")
    add_columns_argument(parser)
    parser.add_argument("--model", "-m", default="smollm2-135m-instruct",
                        help="the generating model (embedded name, folder, hub id; or the served name with --base-url)")
    parser.add_argument("--adapter", help="a LoRA adapter folder for the generating model")
    parser.add_argument("--base-url", help="generate through an OpenAI-compatible endpoint instead of a local model")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--limit", type=int, help="use at most this many prompts")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per generation batch (local model)")
    parser.add_argument("--seed", type=int, default=0, help="principle sampling and generation seed")
    parser.add_argument("--output", "--out", "-o", dest="out", required=True, help="output folder")


def register(subparsers) -> None:
    parser = subparsers.add_parser("constitution", help="critique-and-revise SFT data and AI-feedback pairs",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="validate a constitution file and list its principles")
    check.add_argument("--constitution", "-c", required=True)
    check.set_defaults(handler=run_check)

    revise = actions.add_parser("revise", help="generate, critique against a principle, revise: SFT rows")
    _common(revise)
    revise.add_argument("--rounds", type=int, default=1, help="critique-revision rounds per prompt")
    revise.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    revise.set_defaults(handler=run_revise)

    pairs = actions.add_parser("pairs", help="diverse candidates judged against a principle: preference pairs")
    _common(pairs)
    pairs.add_argument("--num-candidates", type=int, default=2, help="candidates per prompt (>= 2)")
    pairs.add_argument("--max-overlap", type=float, default=0.8,
                       help="drop candidate pairs whose word overlap (Jaccard) reaches this (default 0.8)")
    pairs.add_argument("--one-order", action="store_true",
                       help="ask the judge once per pair (default: both orders, keeping consistent verdicts)")
    add_judge_arguments(pairs)
    pairs.set_defaults(handler=run_pairs)


def run_check(args) -> int:
    constitution = load_constitution(args.constitution)
    print(f"{args.constitution}: {len(constitution.principles)} principles, "
          f"{len(constitution.candidate_styles)} candidate styles")
    for principle in constitution.principles:
        print(f"  - {principle.name}: {principle.critique_request[:90]}")
    return 0


def _setup(args):
    constitution = load_constitution(args.constitution)
    examples, report = load_examples(args.data, kind="prompt", limit=args.limit,
                                    columns=parse_columns(args.columns))
    print(f"[alignkit] {report.summary()}")
    loaded = None
    if args.base_url:
        backend = make_backend(model=args.model, base_url=args.base_url, api_key_env=args.api_key_env)
    else:

        loaded = load_model_and_tokenizer(args.model, device=args.device, dtype=args.dtype, adapter=args.adapter)
        backend = LocalChatBackend(*loaded, name=f"{args.model}+{args.adapter}" if args.adapter else args.model,
                                   batch_size=args.batch_size)
    return constitution, examples, backend, loaded


def _write(out, name, rows, summary) -> None:


    path = write_jsonl(Path(out) / name, rows)
    (Path(out) / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=2, default=str))
    print(f"[alignkit] wrote {path} ({len(rows)} rows)")


def run_revise(args) -> int:
    constitution, examples, backend, _ = _setup(args)
    rows, summary = critique_and_revise(backend, constitution, [e.prompt for e in examples], rounds=args.rounds,
                                        seed=args.seed, temperature=args.temperature, max_tokens=args.max_new_tokens,
                                        sources=[e.source for e in examples])
    _write(args.out, "sft.jsonl", rows, summary)
    return 0


def run_pairs(args) -> int:
    constitution, examples, backend, loaded = _setup(args)
    if loaded is None and not args.judge_base_url and not args.judge_model:
        args.judge_base_url, args.judge_model = args.base_url, args.model  # judge on the same endpoint
    judge = pairwise_judge(args, judge_backend(args, loaded=loaded, loaded_name=args.model))
    rows, summary = preference_pairs(backend, judge, constitution, [e.prompt for e in examples],
                                     num_candidates=args.num_candidates, seed=args.seed,
                                     max_tokens=args.max_new_tokens, max_overlap=args.max_overlap,
                                     both_orders=not args.one_order, sources=[e.source for e in examples])
    _write(args.out, "pairs.jsonl", rows, summary)
    return 0
