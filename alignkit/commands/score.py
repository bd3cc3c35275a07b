"""`alignkit score`: a reward for every (prompt, response) of a file, from a trained reward model.

    alignkit score --model runs/rm/final --data replies.jsonl --output scored.jsonl

Each input row is written back with its reward(s) added, in the input order:

* a row with one response (``prompt``/``completion``, ``messages`` ending with an assistant turn,
  an HH ``text`` dialogue, question/answer, instruction/output): ``reward``;
* a pair (``prompt``/``chosen``/``rejected`` or HH ``chosen``/``rejected``): ``chosen_reward``,
  ``rejected_reward`` and ``reward_margin``;
* a ranking (``prompt``/``responses``): ``rewards``, one per response.

The response is scored as the conversation ``prompt + [assistant: response]`` at its last token,
exactly as in training; too-long rows lose prompt tokens from the left first (``--max-prompt-length``),
then response tokens from the right. Both lengths default to the cut the model was trained with
(``head.json``), else 1024 and half of it. A bad row stops the command
with its file and line (``--on-error skip`` writes it with an ``error`` field instead).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from alignkit.commands.common import add_columns_argument, parse_columns
from alignkit.data import (
    DataError,
    detect_format,
    iter_records,
    to_chat_example,
    to_preference_examples,
)
from alignkit.data.formats import PAIR_SHAPES
from alignkit.model.heads import load_scalar_model, score_responses


def register(subparsers) -> None:
    parser = subparsers.add_parser("score", help="write a reward-model score for every (prompt, response) row",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", "-m", required=True, help="a reward model folder written by `alignkit rm`")
    parser.add_argument("--data", "-d", required=True, help="data file (jsonl/json/csv/parquet) or hf://name")
    parser.add_argument("--output", "-o", help="output JSONL (default: <data name>.scored.jsonl here; '-' = stdout)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=None,
                        help="default: the reward model's training data.max_length (head.json), else 1024")
    parser.add_argument("--max-prompt-length", type=int, default=None)
    add_columns_argument(parser)
    parser.add_argument("--system-prompt", help="system message for rows without one")
    parser.add_argument("--on-error", choices=["fail", "skip"], default="fail")
    parser.add_argument("--limit", type=int, help="score at most this many rows")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.set_defaults(handler=run)


def responses_of(row: dict, source: str, columns=None, system_prompt=None):
    """``(kind, prompt messages, [responses])`` of a raw row; kind is single, pair or ranking."""

    mapped = {ours: row[theirs] for ours, theirs in (columns or {}).items() if theirs in row}
    shape = detect_format({**row, **mapped})
    if shape in PAIR_SHAPES:
        pairs = to_preference_examples(row, source, columns, "adjacent", system_prompt=system_prompt)
        responses = [pair.chosen for pair in pairs] + [pairs[-1].rejected]
        return ("ranking" if shape == "ranked" else "pair"), pairs[0].prompt, responses
    example = to_chat_example(row, source, columns, system_prompt=system_prompt)
    messages = example.messages
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return "single", messages[:last], [messages[last]["content"]]


def run(args) -> int:
    columns = parse_columns(args.columns) or {}
    model, tokenizer = load_scalar_model(args.model, device=args.device, dtype=args.dtype)
    records, items, errors = [], [], 0
    for source, row in iter_records(args.data):
        if args.limit is not None and len(records) >= args.limit:
            break
        try:
            if isinstance(row, DataError):
                raise row
            kind, prompt, responses = responses_of(row, source, columns, args.system_prompt)
        except DataError as error:
            if args.on_error == "fail":
                raise
            errors += 1
            records.append(({"error": str(error)} if not isinstance(row, dict) else {**row, "error": str(error)},
                            None, []))
            continue
        positions = list(range(len(items), len(items) + len(responses)))
        items += [(prompt, response) for response in responses]
        records.append((row, kind, positions))
    scores = score_responses(model, tokenizer, items, args.batch_size, args.max_length, args.max_prompt_length)

    output = args.output or f"{Path(args.data.split('://')[-1]).name.split('.')[0]}.scored.jsonl"
    stream = sys.stdout if output == "-" else open(output, "w")
    chosen_wins, pairs = 0, 0
    try:
        for row, kind, positions in records:
            out = dict(row)
            values = [scores[p] for p in positions]
            if kind == "single":
                out["reward"] = values[0]
            elif kind == "pair":
                out["chosen_reward"], out["rejected_reward"] = values
                out["reward_margin"] = values[0] - values[1]
                pairs += 1
                chosen_wins += values[0] > values[1]
            elif kind == "ranking":
                out["rewards"] = values
            stream.write(json.dumps(out, ensure_ascii=False) + "\n")
    finally:
        if stream is not sys.stdout:
            stream.close()
    mean = sum(scores) / len(scores) if scores else float("nan")
    summary = f"[alignkit] scored {len(scores)} responses in {len(records) - errors} rows (mean reward {mean:.4g})"
    if pairs:
        summary += f"; chosen beats rejected in {chosen_wins}/{pairs} pairs"
    if errors:
        summary += f"; {errors} bad rows written with an 'error' field"
    print(summary + ("" if output == "-" else f"; wrote {output}"), file=sys.stderr)
    return 0
