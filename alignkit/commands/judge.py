"""`alignkit judge`: grade a file of replies (pointwise) or compare reply pairs (pairwise) with an LLM
judge; with a label column, report the judge's agreement with those labels.

    alignkit judge --mode pairwise --data pairs.jsonl --judge-model smollm2-135m-instruct --out judged.jsonl
    alignkit judge --mode pointwise --data replies.jsonl --judge-base-url http://localhost:8000/v1 \\
                   --judge-model served-name --labels-field human_score

Also home of the judge options shared by `best-of-n` and `constitution pairs`.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from alignkit.best_of_n import write_jsonl
from alignkit.commands.common import add_columns_argument, parse_columns
from alignkit.data import load_examples, read_rows, to_preference_examples
from alignkit.errors import UsageError
from alignkit.judges import PairwiseJudge, PointwiseJudge, agreement, make_backend
from alignkit.model import alignkit_home


def add_judge_arguments(parser, default_method: str = "generate") -> None:
    group = parser.add_argument_group("judge")
    group.add_argument("--judge-model", help="judge model: a local model (default: the --model being used) or, "
                                              "with --judge-base-url, the served model's name")
    group.add_argument("--judge-adapter", help="a LoRA adapter for a local judge model")
    group.add_argument("--judge-base-url", help="an OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    group.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                       help="environment variable holding the API key (default OPENAI_API_KEY; unset = no key)")
    group.add_argument("--judge-method", choices=["generate", "logprobs"], default=default_method,
                       help="generate: the judge writes 'Score: N' / 'Verdict: A|B|tie' (parsed strictly, retried); "
                            "logprobs: read the label probabilities (local models only; works with tiny models)")
    group.add_argument("--judge-template", help="a template file replacing the default judge prompt")
    group.add_argument("--judge-rubric", help="rubric text for pointwise grading (or @file)")
    group.add_argument("--judge-criteria", help="the standard for pairwise comparison (or @file)")
    group.add_argument("--judge-scale", default="1,10", help="pointwise scale LOW,HIGH (default 1,10)")
    group.add_argument("--judge-max-retries", type=int, default=2, help="re-asks after a malformed answer")
    group.add_argument("--judge-max-tokens", type=int, default=512)
    group.add_argument("--judge-temperature", type=float, default=0.0)
    group.add_argument("--cache-dir", help="judgment cache folder (default $ALIGNKIT_HOME/judge_cache)")
    group.add_argument("--no-cache", action="store_true", help="do not read or write the judgment cache")
    group.add_argument("--refresh-cache", action="store_true", help="re-ask every judgment and overwrite the cache")


def _text_option(value: str | None) -> str | None:
    if value and value.startswith("@"):
        path = Path(value[1:])
        if not path.is_file():
            raise FileNotFoundError(f"file not found: {path}")
        return path.read_text().strip()
    return value


def judge_backend(args, loaded=None, loaded_name: str | None = None):
    """The judge's backend: HTTP when --judge-base-url is given; else a local model, reusing ``loaded``
    (model, tokenizer) when --judge-model is unset or names the same model."""

    if args.judge_base_url:
        return make_backend(model=args.judge_model, base_url=args.judge_base_url, api_key_env=args.judge_api_key_env)
    same = args.judge_model in (None, loaded_name) and not args.judge_adapter
    if loaded is not None and same:
        return make_backend(model=loaded_name, loaded=loaded)
    return make_backend(model=args.judge_model or "smollm2-135m-instruct", adapter=args.judge_adapter,
                        device=getattr(args, "device", None), dtype=getattr(args, "dtype", None))


def judge_options(args) -> dict:
    cache = None if args.no_cache else (args.cache_dir or alignkit_home() / "judge_cache")
    return dict(template=args.judge_template, method=args.judge_method, max_retries=args.judge_max_retries,
                max_tokens=args.judge_max_tokens, temperature=args.judge_temperature, cache=cache,
                refresh=args.refresh_cache)


def parse_scale(text: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--judge-scale must be LOW,HIGH (e.g. 1,10), got {text!r}") from None
    return low, high


def pointwise_judge(args, backend):
    options = judge_options(args)
    return PointwiseJudge(backend, options.pop("template"), parse_scale(args.judge_scale),
                          rubric=_text_option(args.judge_rubric), **options)


def pairwise_judge(args, backend):
    options = judge_options(args)
    return PairwiseJudge(backend, options.pop("template"), criteria=_text_option(args.judge_criteria), **options)


def register(subparsers) -> None:
    parser = subparsers.add_parser("judge", help="grade or compare replies with an LLM judge (+ agreement)",
                                   description=__doc__.split("\n\nAlso home")[0],
                                   formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["pointwise", "pairwise"], required=True)
    parser.add_argument("--data", "-d", required=True,
                        help="pointwise: rows with prompt + completion (or messages ending in the reply); "
                             "pairwise: prompt/response_a/response_b rows, or prompt/chosen/rejected rows "
                             "(shown in a seeded random order; the label is then known)")
    add_columns_argument(parser)
    parser.add_argument("--labels-field", help="a column holding reference labels (scores, or A/B/tie) to "
                                               "measure agreement against")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", "--out", "-o", dest="out", help="write one JSON line per judged row here")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    add_judge_arguments(parser)
    parser.set_defaults(handler=run)


def _rows(args):
    rows = []
    for source, row in read_rows(args.data):
        rows.append((source, row))
        if args.limit and len(rows) >= args.limit:
            break
    if not rows:
        raise UsageError(f"{args.data}: no rows")
    return rows


def run(args) -> int:
    backend = judge_backend(args)
    results = []
    if args.mode == "pointwise":
        examples, report = load_examples(args.data, kind="chat", limit=args.limit, columns=parse_columns(args.columns))
        raw = {source: row for source, row in _rows(args)} if args.labels_field else {}
        prompts, replies, labels = [], [], []
        for example in examples:
            if example.messages[-1]["role"] != "assistant":
                raise UsageError(f"{example.source}: the conversation must end with the reply to grade")
            prompts.append(example.messages[:-1])
            replies.append(example.messages[-1]["content"])
            labels.append(raw.get(example.source, {}).get(args.labels_field) if args.labels_field else None)
        judge = pointwise_judge(args, backend)
        detailed = judge.score_detailed(prompts, replies)
        for example, reply, result, label in zip(examples, replies, detailed, labels):
            results.append({"source": example.source, "score": result.value, "label": label,
                            "reason": result.reason, "answers": result.answers, "cached": result.cached})
        compare_labels = [None if lab is None else float(lab) for lab in labels]
        judged = [r["score"] if r["score"] is None else round(r["score"]) for r in results]
    else:
        rng = random.Random(args.seed)
        prompts, first, second, labels, sources = [], [], [], [], []
        for source, row in _rows(args):
            if "response_a" in row and "response_b" in row:
                prompt, a, b = row.get("prompt"), row["response_a"], row["response_b"]
                label = row.get(args.labels_field) if args.labels_field else None
            else:
                pairs, _ = _preference(row, source)
                prompt, chosen, rejected = pairs
                if rng.random() < 0.5:
                    a, b, label = chosen, rejected, "A"
                else:
                    a, b, label = rejected, chosen, "B"
                if args.labels_field and row.get(args.labels_field) is not None:
                    label = row[args.labels_field]
            if prompt is None:
                raise UsageError(f"{source}: missing field 'prompt'")
            prompts.append(prompt)
            first.append(a)
            second.append(b)
            labels.append(None if label is None else _verdict_label(label, source))
            sources.append(source)
        judge = pairwise_judge(args, backend)
        detailed = judge.compare_detailed(prompts, first, second)
        for source, result, label in zip(sources, detailed, labels):
            results.append({"source": source, "verdict": result.value, "label": label, "reason": result.reason,
                            "answers": result.answers, "label_logprobs": result.label_logprobs,
                            "cached": result.cached})
        compare_labels, judged = labels, [r["verdict"] for r in results]
    if args.out:

        write_jsonl(args.out, results)
    summary = {"mode": args.mode, "items": len(results), "judge": judge.stats.as_dict(),
               "backend": backend.identity}
    if any(label is not None for label in compare_labels):
        summary["agreement"] = agreement(judged, compare_labels)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _preference(row, source):
    example = to_preference_examples(row, source)[0]
    return (example.prompt, example.chosen, example.rejected), example


def _verdict_label(value, source) -> str:
    text = str(value).strip()
    if text.upper() in ("A", "B"):
        return text.upper()
    if text.lower() == "tie":
        return "tie"
    print(f"alignkit judge: {source}: label {value!r} is not A, B or tie; left out", file=sys.stderr)
    return None  # type: ignore[return-value]
