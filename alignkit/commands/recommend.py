"""`alignkit recommend`: which method fits the data you have, why, and a starter job or pipeline file.

    alignkit recommend --data my_pairs.jsonl
    alignkit recommend --data demos.jsonl --data pairs.jsonl --output pipeline.yaml
    alignkit recommend --data prompts.jsonl --data rubric.txt
    alignkit recommend --data prompts.jsonl --data runs/rm/final

Inputs: data files (any row shape alignkit reads), a rubric (.txt/.md), a reward-model folder, a
model folder to start from. The decision tree is in docs/choosing.md (and `alignkit.recommend`).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from alignkit.recommend import recommend


def register(subparsers) -> None:
    parser = subparsers.add_parser("recommend", help="which method fits your data, why, and a starter job",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", "-d", action="append", required=True, metavar="PATH",
                        help="a data file, rubric file, model or reward-model folder (repeatable)")
    parser.add_argument("--output", "--write", "-o", dest="write", metavar="FILE",
                        help="also write the starter job / pipeline file here")
    parser.set_defaults(handler=run)


def run(args) -> int:
    answer = recommend(args.data)
    print(answer.render(), end="")
    if args.write and answer.starter:
        Path(args.write).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write).write_text(answer.starter)
        print(f"[alignkit] wrote {args.write}")
    return 0
