"""`alignkit eval`: score a model with named metrics; writes a JSON/Markdown/PNG report.

    alignkit eval --model runs/dpo/final --data prompts.jsonl \
        --metrics perplexity,accuracy,win_rate,drift --data perplexity=valid.jsonl \
        --model-b smollm2-135m-instruct --judge reward-model:runs/rm/final \
        --reference-model smollm2-135m-instruct --report-dir runs/eval-dpo

``--data PATH`` is the default data of every metric, ``--data METRIC=PATH`` overrides it for one.
The report folder gets ``report.json``, ``report.md`` and ``report.png`` (see
``alignkit.evaluate.report``); the headline table is printed too.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

import alignkit
from alignkit.commands.common import add_model_arguments, load_model_from_args
from alignkit.errors import UsageError
from alignkit.evaluate.metrics import METRICS, run_metrics
from alignkit.evaluate.report import _fmt, _fmt_interval, write_report


def register(commands) -> None:
    parser = commands.add_parser("eval", help="score a model with named metrics; writes a JSON/Markdown/PNG report")
    add_model_arguments(parser)
    add_arguments(parser)
    parser.set_defaults(handler=lambda args: run(args, load_model_from_args))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `alignkit eval` besides the model options."""
    parser.add_argument("--data", "-d", action="append", default=[], metavar="[METRIC=]PATH",
                        help="data file (jsonl/json/csv/parquet) for every metric, or METRIC=PATH for one "
                             "(repeatable)")
    parser.add_argument("--metrics", default="perplexity",
                        help="comma-separated: perplexity, accuracy, multiple_choice, text_overlap, win_rate, elo, "
                             "drift, reward_accuracy, factuality")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, help="use at most this many rows")
    parser.add_argument("--output", "-o", help="also write the JSON report here")
    parser.add_argument("--report-dir", help="folder for report.json / report.md / report.png "
                                             "(default: runs/eval-<time>)")
    parser.add_argument("--compare", metavar="REPORT", help="an earlier report.json (or its folder) to show beside")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--confidence", type=float, default=0.95, help="interval coverage (default 0.95)")
    sampling = parser.add_argument_group("generation (accuracy, text_overlap, win_rate, elo, drift)")
    sampling.add_argument("--max-new-tokens", type=int, default=256)
    sampling.add_argument("--temperature", type=float, default=None,
                          help="default: greedy, or 1.0 when --samples > 1")
    sampling.add_argument("--top-p", type=float, default=1.0)
    accuracy = parser.add_argument_group("accuracy")
    accuracy.add_argument("--reward", default="numeric_match",
                          help="reward function deciding correctness (registry name, module:function, file.py:function)")
    accuracy.add_argument("--reward-option", action="append", default=[], metavar="KEY=VALUE",
                          help="keyword argument for the reward function (YAML value; repeatable)")
    accuracy.add_argument("--threshold", type=float, default=0.5, help="a completion is correct if reward >= this")
    accuracy.add_argument("--samples", type=int, default=1, help="completions per prompt (pass@k)")
    accuracy.add_argument("--k", default=None, help="comma-separated k for pass@k (default: --samples; accuracy is pass@1)")
    pairwise = parser.add_argument_group("win_rate / elo")
    pairwise.add_argument("--model-b", help="the model to compare against (win_rate)")
    pairwise.add_argument("--models", action="append", default=[],
                          help="other models to rate (elo; comma-separated or repeatable)")
    pairwise.add_argument("--judge", help="reward-model:PATH, llm:MODEL (local) or llm:MODEL@URL")
    pairwise.add_argument("--tie-margin", type=float, default=0.0,
                          help="reward-model judge: |score difference| below this is a tie")
    pairwise.add_argument("--elo-method", choices=("bradley_terry", "elo"), default="bradley_terry")
    pairwise.add_argument("--k-factor", type=float, default=32.0, help="Elo K (with --elo-method elo)")
    pairwise.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for Elo intervals")
    choice = parser.add_argument_group("multiple_choice")
    choice.add_argument("--prompt-style", choices=("plain", "chat"), default="plain")
    preference = parser.add_argument_group("reward_accuracy")
    preference.add_argument("--beta", type=float, default=None,
                            help="a DPO policy's implicit-reward scale (default: the run's config.yaml, else 0.1)")
    factual = parser.add_argument_group("factuality")
    factual.add_argument("--candidates", help="the answer set for the rule check (one per line, or a JSON list); "
                                              "the check itself: --judge rule (default) | llm:MODEL[@URL]")
    drift = parser.add_argument_group("drift")
    drift.add_argument("--reference-model", help="reference for KL, drift and a DPO policy's implicit reward "
                                                 "(default for a LoRA policy: its base)")
    drift.add_argument("--drift-temperature", type=float, default=1.0)
    drift.add_argument("--refusal-pattern", action="append", default=[], metavar="REGEX",
                       help="refusal regular expression (repeatable; replaces the default list)")
    drift.add_argument("--drift-threshold", action="append", default=[], metavar="NAME=VALUE",
                       help="override an alarm threshold, e.g. kl=5 or length_ratio_high=1.5 (none disables)")


def _key_values(items: list[str], option: str) -> dict[str, Any]:
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{option} expects KEY=VALUE, got {item!r}")
        values[key.strip()] = _option_value(value)
    return values


def _option_value(text: str) -> Any:
    """A YAML scalar (numbers, booleans, quoted strings, [lists], {maps}); ``none`` is None; text that
    YAML would read as something else by accident (a regex like ``^Summary: .+``) stays text."""

    if text.strip().lower() == "none":
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, (dict, list)) and not text.strip().startswith(("{", "[")):
        return text
    return text if value is None else value


def _data_argument(items: list[str]) -> dict[str, str]:
    data: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if sep and name in METRICS:
            data[name] = path
        else:
            if "*" in data:
                raise UsageError(f"two default data files ({data['*']!r} and {item!r}); name the metric of one: "
                                 "--data METRIC=PATH")
            data["*"] = item
    return data


def _comma_list(items: list[str]) -> list[str]:
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def metric_options(args) -> dict[str, Any]:
    """The keyword arguments `run_metrics` passes to every metric."""
    thresholds = _key_values(args.drift_threshold, "--drift-threshold") or None
    return dict(
        data=_data_argument(args.data), max_length=args.max_length, batch_size=args.batch_size, limit=args.limit,
        seed=args.seed, confidence=args.confidence, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, reward=args.reward,
        reward_kwargs=_key_values(args.reward_option, "--reward-option"), threshold=args.threshold,
        samples=args.samples, k=[int(v) for v in args.k.split(",")] if args.k else None,
        model_b=args.model_b, models=_comma_list(args.models), judge=args.judge, tie_margin=args.tie_margin,
        elo_method=args.elo_method, k_factor=args.k_factor, n_resamples=args.bootstrap,
        prompt_style=args.prompt_style, reference_model=args.reference_model,
        drift_temperature=args.drift_temperature, refusal_patterns=args.refusal_pattern or None,
        drift_thresholds=thresholds, device=args.device, dtype=args.dtype, beta=args.beta,
        candidates=args.candidates,
        model_name=args.model + (f"+{args.adapter}" if args.adapter else ""),
    )


def headline_text(report: dict[str, Any]) -> str:
    lines = []
    for row in report["headline"]:
        name = row["metric"] if row["name"] == row["metric"] else f"{row['metric']} / {row['name']}"
        lines.append(f"  {name:<42} {_fmt(row['value']):>10}  {_fmt_interval(row['low'], row['high']):<24} "
                     f"n={_fmt(row['n'])}  {row.get('note', '')}".rstrip())
    lines += [f"  WARNING {w}" for w in report["warnings"]]
    return "\n".join(lines)


def run(args, load) -> int:
    """Load the model (``load(args)`` from the CLI), run the metrics, write the report folder."""


    names = [name.strip() for name in args.metrics.split(",") if name.strip()]
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise UsageError(f"unknown metric(s) {unknown}; available: {', '.join(sorted(METRICS))}")
    options = metric_options(args)

    torch.manual_seed(args.seed)
    started = time.time()
    model, tokenizer = load(args)
    results = run_metrics(model, tokenizer, names, **options)
    meta = {"model": options["model_name"], "adapter": args.adapter,
            "data": ", ".join(f"{k}={v}" if k != "*" else v for k, v in options["data"].items()),
            "metrics": ", ".join(names), "seed": args.seed, "confidence": args.confidence,
            "device": str(next(model.parameters()).device), "alignkit_version": alignkit.__version__,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(time.time() - started, 1),
            "command": "alignkit " + " ".join(sys.argv[1:]) if sys.argv and "alignkit" in sys.argv[0] else None}
    directory = Path(args.report_dir or f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}")
    paths = write_report(results, directory, meta, baseline=args.compare)
    report = json.loads(paths["json"].read_text())
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(paths["json"].read_text())
    print(headline_text(report))
    print(f"[alignkit] report: {paths['markdown']}" + (f", {paths['png']}" if "png" in paths else ""))
    return 0
