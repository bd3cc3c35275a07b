"""`alignkit factuality`: FLAME-style data that does not teach a model to invent facts.

    alignkit factuality sft-data --data questions.jsonl --output runs/factual/sft.jsonl \\
        --samples 4 --temperature 0.7 --candidates capitals.txt [--fallback skip|abstain|reference]
    alignkit factuality pairs --data questions.jsonl --output runs/factual/pairs.jsonl \\
        --n 4 --scorer reward-model:runs/rm/final --tolerance 0.5

``sft-data``: for every row with a reference answer (``answers``/``answer``/``reference``) sample the
model's own answers and keep one the fact check accepts; rows without a reference but with a response
are kept as demonstrations. ``pairs``: sample ``--n`` answers, score helpfulness with the scorer (as in
`alignkit best-of-n`: reward-model:PATH, reward:SPEC, judge) and factuality with the check, prefer the
more factual answer among those of similar helpfulness. The check is ``rule`` (short answers; give the
answer set with --candidates) or ``llm:MODEL`` / ``llm:MODEL@URL`` (claims graded by an LLM).
A JSON report goes beside the output (``OUT.report.json``). Measure with ``alignkit eval --metrics factuality``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from alignkit.commands.best_of_n import make_scorer
from alignkit.commands.judge import add_judge_arguments
from alignkit.data import load_examples
from alignkit.errors import UsageError
from alignkit.evaluate.factuality import make_checker
from alignkit.factuality import (
    DEFAULT_ABSTENTION,
    build_factual_pairs,
    factual_sft_rows,
    report_dict,
    write_jsonl,
)
from alignkit.model import load_model_and_tokenizer


def _common(parser) -> None:
    parser.add_argument("--model", "-m", default="smollm2-135m-instruct", help="the model whose answers are sampled")
    parser.add_argument("--adapter", help="a LoRA adapter folder to apply")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--data", "-d", required=True, help="prompts with reference answers (any prompt row shape)")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--output", "--out", "-o", dest="out", required=True, help="output JSONL file")
    parser.add_argument("--checker", default="rule", help="rule | llm:MODEL | llm:MODEL@URL")
    parser.add_argument("--candidates", help="the answer set for the rule check (one per line, or a JSON list)")
    parser.add_argument("--reference-field", help="the row field holding the reference (default: answers, answer, "
                                                  "reference, references)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)


def register(subparsers) -> None:
    parser = subparsers.add_parser("factuality", help="factuality-aware SFT data and preference pairs (FLAME)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="factuality_command", metavar="COMMAND", required=True)
    sft = commands.add_parser("sft-data", help="SFT rows from the model's own answers that pass the fact check")
    _common(sft)
    sft.add_argument("--samples", type=int, default=4, help="answers sampled per fact-seeking prompt")
    sft.add_argument("--fallback", choices=("skip", "abstain", "reference"), default="skip",
                     help="when no sample passes: drop the prompt, train an abstention, or the reference answer")
    sft.add_argument("--abstention", help="the abstention text (with --fallback abstain)")
    sft.set_defaults(handler=run_sft_data)
    pairs = commands.add_parser("pairs", help="preference pairs preferring the more factual of similar answers")
    _common(pairs)
    pairs.add_argument("--n", type=int, default=4, help="answers sampled per prompt")
    pairs.add_argument("--scorer", required=True, help="helpfulness: reward-model:PATH | reward:SPEC | judge")
    pairs.add_argument("--scorer-arg", action="append", default=[], metavar="KEY=VALUE")
    pairs.add_argument("--tolerance", type=float, default=0.5, help="helpfulness scores this close are 'similar'")
    pairs.add_argument("--min-factuality-gap", type=float, default=0.25)
    pairs.add_argument("--min-helpfulness-gap", type=float, default=0.0)
    add_judge_arguments(pairs)
    pairs.set_defaults(handler=run_pairs)


def _load(args):
    examples, report = load_examples(args.data, kind="prompt", limit=args.limit)
    print(f"[alignkit] {report.summary()}")
    model, tokenizer = load_model_and_tokenizer(args.model, device=args.device, dtype=args.dtype, adapter=args.adapter)
    checker = make_checker(args.checker, args.candidates, args.device, args.dtype)
    return examples, model, tokenizer, checker


def _write(rows, report, out: str) -> None:
    path = write_jsonl(rows, out)
    Path(f"{out}.report.json").write_text(json.dumps(report_dict(report), indent=1))
    print(f"[alignkit] {report.summary()}")
    print(f"[alignkit] wrote {len(rows)} rows to {path}")


def run_sft_data(args) -> int:
    examples, model, tokenizer, checker = _load(args)
    rows, report = factual_sft_rows(model, tokenizer, examples, checker, samples=args.samples,
                                    temperature=args.temperature, top_p=args.top_p,
                                    max_new_tokens=args.max_new_tokens, fallback=args.fallback,
                                    abstention=args.abstention or DEFAULT_ABSTENTION,
                                    reference_field=args.reference_field, seed=args.seed, batch_size=args.batch_size)
    _write(rows, report, args.out)
    return 0


def run_pairs(args) -> int:
    if args.scorer_arg and not args.scorer.startswith("reward:"):
        raise UsageError("--scorer-arg is for reward:SPEC scorers")
    examples, model, tokenizer, checker = _load(args)
    scorer = make_scorer(args, (model, tokenizer))
    rows, report = build_factual_pairs(model, tokenizer, examples, checker, scorer, n=args.n,
                                       temperature=args.temperature, top_p=args.top_p,
                                       max_new_tokens=args.max_new_tokens, seed=args.seed,
                                       batch_size=args.batch_size, reference_field=args.reference_field,
                                       tolerance=args.tolerance, min_factuality_gap=args.min_factuality_gap,
                                       min_helpfulness_gap=args.min_helpfulness_gap)
    _write(rows, report, args.out)
    return 0
