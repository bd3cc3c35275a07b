"""Several models on the same held-out metrics, side by side, and each against the one before it.

The report of `alignkit pipeline`'s eval stage (usable alone too)::

    config = EvalStageConfig(models={"base": "smollm2-135m-instruct", "sft": "runs/p/sft/final"},
                             data="valid.jsonl", metrics=["perplexity", "accuracy"],
                             judge="reward-model:runs/p/rm/final", against={"sft": "base"})
    run_eval_stage(config, "runs/p/eval", cache_dir="runs/p/.cache/eval")

* Every model runs the same metrics (`alignkit.evaluate.metrics.run_metrics`) with the same options
  and seed; each gets its own full `alignkit eval` report folder (`report.write_report`).
* The side-by-side table has one row per headline number (`report.headline_rows`: every rate with
  its interval) and one column per model, written ``value [low, high]``.
* With a ``judge`` (``reward-model:PATH``, ``llm:MODEL[@URL]``), each model in ``against`` is compared
  with its predecessor on the same prompts: greedy answers of both, judged in both orders
  (`pairwise.judge_both_orders`: position bias cancels, ties count half), win rate with a Wilson
  interval and the sign-test p-value (`pairwise.summarize`).
* Results are cached per model under ``cache_dir`` by a key of the model's identity (for a model
  made by a pipeline stage: that stage's key), the metrics, the options and the data files' contents,
  so re-running the report after one branch changed evaluates only that branch's model.
"""
from __future__ import annotations

import difflib
import gc
import hashlib
import inspect
import json
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from alignkit.data import load_examples
from alignkit.errors import UsageError
from alignkit.evaluate.metrics import METRICS, run_metrics, sample_completions
from alignkit.evaluate.pairwise import (
    judge_both_orders,
    judge_name,
    load_judge,
    summarize,
)
from alignkit.evaluate.report import _fmt, _fmt_interval, headline_rows, write_report
from alignkit.judges import conversation_text
from alignkit.model import load_model_and_tokenizer
from alignkit.model.heads import is_scalar_model, load_scalar_model

CACHE_FORMAT = 1
RESERVED_OPTIONS = {"model", "tokenizer", "data", "_cache", "_", "model_name", "device", "dtype", "seed",
                    "confidence", "judge", "model_b", "models"}


class EvalStageConfig(BaseModel):
    """The eval stage of a pipeline: which models, on which data, with which metrics and judge."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    method: Literal["eval"] = "eval"
    models: dict[str, str] = Field(description="column name -> model (embedded name, folder, run's final/)")
    data: str | dict[str, str] = Field(description="data of every metric, or {metric: path} with an optional '*'")
    metrics: list[str] = Field(default_factory=lambda: ["perplexity"])
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the metrics")
    judge: str | None = Field(None, description="reward-model:PATH or llm:MODEL[@URL]: win rate vs the predecessor")
    judge_data: str | None = Field(None, description="prompts for the win rates (default: the data)")
    against: dict[str, str] | None = Field(None, description="model -> the model it is compared with")
    seed: int = 0
    confidence: float = Field(0.95, gt=0, lt=1)
    device: str | None = None
    dtype: str | None = None

    @field_validator("models")
    @classmethod
    def _some_models(cls, value):
        if not value:
            raise ValueError("name at least one model")
        return value

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, value):
        for name in value:
            if name not in METRICS:
                close = difflib.get_close_matches(name, list(METRICS), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ValueError(f"unknown metric '{name}'{hint} (known: {', '.join(sorted(METRICS))})")
        return value

    @model_validator(mode="after")
    def _check(self):
        allowed = set()
        for name in self.metrics:
            allowed |= set(inspect.signature(METRICS[name]).parameters)
        allowed -= RESERVED_OPTIONS
        if self.judge:   # the win rates' answers are generated with these
            allowed |= {"max_new_tokens", "batch_size", "limit"}
        for key in self.options:
            if key not in allowed:
                close = difflib.get_close_matches(key, sorted(allowed), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ValueError(f"options.{key} is not an option of {', '.join(self.metrics)}{hint} "
                                 f"(valid: {', '.join(sorted(allowed))})")
        for model, other in (self.against or {}).items():
            for name in (model, other):
                if name not in self.models:
                    raise ValueError(f"against: '{name}' is not one of the models ({', '.join(self.models)})")
        if self.against and not self.judge:
            raise ValueError("against is set but no judge is: add judge: reward-model:PATH or llm:MODEL")
        return self


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def load_any_model(spec: str, device=None, dtype=None):
    """A causal LM (embedded, folder, adapter folder) or a reward model folder (scalar head)."""
    if is_scalar_model(spec):
        return load_scalar_model(spec, device=device, dtype=dtype)
    return load_model_and_tokenizer(spec, device=device, dtype=dtype, is_trainable=False)


def _greedy_answers(model, tokenizer, prompts_path: str, options: dict, seed: int,
                    cache: dict | None = None) -> tuple[list[str], list[str]]:
    """Greedy answers to the judge's prompts; ``cache`` is the metrics' generation cache, so answers a
    metric already generated with the same settings (accuracy, win_rate) are not generated again."""
    examples, _ = load_examples(prompts_path, kind="prompt", limit=options.get("limit"))
    _, ids = sample_completions(model, tokenizer, examples, samples=1, temperature=0.0,
                                top_p=float(options.get("top_p", 1.0)),
                                max_new_tokens=int(options.get("max_new_tokens", 256)), seed=seed,
                                batch_size=int(options.get("batch_size", 8)), cache=cache)
    return ([conversation_text(e.prompt) for e in examples],
            [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids])


def run_eval_stage(config: EvalStageConfig, folder: str | Path, cache_dir: str | Path | None = None,
                   model_keys: dict[str, str] | None = None, data_digests: dict[str, str] | None = None,
                   log=print) -> dict[str, Any]:
    """Evaluate every model, compare each with its predecessor, write ``report.md`` / ``report.json``.

    ``cache_dir`` reuses earlier results of a model when its identity (``model_keys``, else its spec),
    the settings and ``data_digests`` (the data files' contents) are unchanged."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
    against = config.against or {}
    judge_prompts_file = config.judge_data or (config.data.get("*") if isinstance(config.data, dict) else config.data)
    needs_answers = {name for pair in against.items() for name in pair} if config.judge else set()
    data_digests = data_digests or {}
    results: dict[str, dict] = {}
    answers: dict[str, list[str]] = {}
    prompts: list[str] = []
    for name, spec in config.models.items():
        identity = (model_keys or {}).get(name, spec)
        key = _digest({"format": CACHE_FORMAT, "model": identity, "metrics": config.metrics, "data": config.data,
                       "data_digests": data_digests, "options": config.options, "seed": config.seed,
                       "confidence": config.confidence, "answers": name in needs_answers,
                       "judge_data": judge_prompts_file})
        cached = cache / f"{name}-{key[:20]}.json" if cache else None
        started = time.time()
        if cached is not None and cached.exists():
            entry = json.loads(cached.read_text())
            log(f"[eval] {name}: cached results ({cached.name})")
        else:
            log(f"[eval] {name}: {spec}")
            model, tokenizer = load_any_model(spec, config.device, config.dtype)
            scalar = is_scalar_model(spec)
            metrics = [m for m in config.metrics if not scalar or m == "reward_accuracy"]
            generations: dict = {}
            entry = {"spec": spec, "metrics": run_metrics(model, tokenizer, metrics, data=config.data,
                                                          seed=config.seed, confidence=config.confidence,
                                                          device=config.device, dtype=config.dtype,
                                                          model_name=spec, _cache=generations, **config.options)}
            if name in needs_answers and not scalar:
                entry["prompts"], entry["answers"] = _greedy_answers(model, tokenizer, judge_prompts_file,
                                                                     config.options, config.seed, generations)
            entry["seconds"] = round(time.time() - started, 1)
            del model, tokenizer
            gc.collect()
            if cached is not None:
                cached.write_text(json.dumps(entry, default=str))
        results[name] = entry["metrics"]
        if "answers" in entry:
            answers[name], prompts = entry["answers"], entry["prompts"]
        write_report(entry["metrics"], folder / name, {"model": spec, "metrics": ", ".join(config.metrics),
                                                       "seed": config.seed, "confidence": config.confidence,
                                                       "data": json.dumps(config.data)})
    comparisons = []
    if config.judge and against:
        judge = load_judge(config.judge, device=config.device, dtype=config.dtype)
        for model, previous in against.items():
            if model not in answers or previous not in answers:
                raise UsageError(f"win rate {model} vs {previous}: a reward model cannot answer prompts; "
                                 "compare policies only")
            outcome = judge_both_orders(judge, prompts, answers[model], answers[previous])
            comparisons.append({"model": model, "against": previous, **summarize(outcome, config.confidence)})
        comparisons = [dict(c, judge=judge_name(judge)) for c in comparisons]
        del judge
        gc.collect()
    report = {"models": config.models, "metrics": config.metrics, "options": config.options,
              "results": results, "comparisons": comparisons, "judge": config.judge,
              "table": side_by_side_rows(results)}
    (folder / "report.json").write_text(json.dumps(report, indent=1, default=str))
    markdown = render_side_by_side(report, config)
    (folder / "report.md").write_text(markdown)
    log(markdown)
    return {"report": str(folder / "report.md"), "json": str(folder / "report.json"),
            "comparisons": comparisons, "table": report["table"]}


def side_by_side_rows(results: dict[str, dict]) -> list[dict[str, Any]]:
    """``[{metric, name, cells: {model: {value, low, high, n}}}]`` in first-seen order."""
    rows: dict[tuple[str, str], dict] = {}
    for model, metrics in results.items():
        for row in headline_rows(metrics):
            entry = rows.setdefault((row["metric"], row["name"]), {"metric": row["metric"], "name": row["name"],
                                                                   "cells": {}})
            entry["cells"][model] = {"value": row["value"], "low": row["low"], "high": row["high"], "n": row["n"]}
    return list(rows.values())


def render_side_by_side(report: dict[str, Any], config: EvalStageConfig) -> str:
    models = list(report["models"])
    percent = config.confidence
    lines = ["# side-by-side evaluation", "",
             f"Every model on the same data and settings (seed {config.seed}); cells are value "
             f"[{percent:.0%} interval]; n is the number of items.", ""]
    lines.append("| metric | " + " | ".join(models) + " | n |")
    lines.append("| --- | " + " | ".join("---" for _ in models) + " | --- |")
    for row in report["table"]:
        label = row["metric"] if row["name"] == row["metric"] else f"{row['metric']} / {row['name']}"
        cells, n = [], None
        for model in models:
            cell = row["cells"].get(model)
            if cell is None:
                cells.append("—")
                continue
            n = n if n is not None else cell["n"]
            interval = _fmt_interval(cell["low"], cell["high"])
            cells.append(_fmt(cell["value"]) + ("" if interval == "—" else f" {interval}"))
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_fmt(n)} |")
    if report["comparisons"]:
        lines += ["", f"Win rate of each model against its predecessor, judged by {report['comparisons'][0]['judge']} "
                      "in both orders (ties count half):", "",
                  "| model | against | win rate | interval | wins / ties / losses | p (model beats predecessor) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for c in report["comparisons"]:
            lines.append(f"| {c['model']} | {c['against']} | {_fmt(c['win_rate'])} | "
                         f"{_fmt_interval(*c['win_rate_interval'])} | {c['wins']} / {c['ties']} / {c['losses']} | "
                         f"{_fmt(c['p_value'])} |")
    lines += ["", "Models: " + "; ".join(f"{name} = `{spec}`" for name, spec in report["models"].items()),
              f"Metrics: {', '.join(report['metrics'])}; options: `{json.dumps(report['options'])}`"]
    return "\n".join(lines) + "\n"
