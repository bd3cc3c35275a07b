"""Best-of-N sampling and rejection-sampling fine-tuning data.

    for each prompt x:  y_1 .. y_N ~ pi(. | x)          (temperature sampling, one batched call)
                        s_i = score(x, y_i)              (reward model, reward function or LLM judge)
                        best = argmax_i s_i, worst = argmin_i s_i
    sft.jsonl   : x + best                  (rejection-sampling fine-tuning: train on what scored best)
    pairs.jsonl : x, chosen=best, rejected=worst   (for `alignkit dpo` / `alignkit rm`)

Choices, and why:

* Empty completions are not candidates (counted). A score the scorer could not give (a malformed
  judgment, a non-finite reward) is ``None``: that candidate is left out of the ranking and counted,
  never given a made-up value.
* Ties go to the earlier sample (sampling order is random, so this is a fair coin).
* A pair needs a real difference: prompts whose valid scores are all equal, or whose best and worst
  texts are the same after normalisation, give no pair (counted as ``ties_skipped`` /
  ``identical_skipped``). ``min_score`` drops SFT rows whose best is still below the bar.
* The summary compares ``mean_best`` with ``mean_all`` (the expected score of one sample): the gap is
  what best-of-N buys at N times the sampling cost.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from alignkit.data import PromptExample, normalize_text
from alignkit.data.write import write_jsonl  # re-exported: commands import it from here
from alignkit.errors import UsageError
from alignkit.generation import chat_generate
from alignkit.model.heads import load_scalar_model, score_responses
from alignkit.rewards import get_reward_function, reward_inputs

Scores = list["float | None"]


# ----------------------------------------------------------------------------------------- scorers


class RewardModelScorer:
    """Scores with a scalar reward model (`alignkit.model.heads.load_scalar_model`): the head's value at the
    last token of ``prompt + response`` rendered with the reward model's chat template."""

    def __init__(self, path_or_model, tokenizer=None, batch_size: int = 8, max_length: int | None = None,
                 device=None, dtype=None):
        if tokenizer is None:
            path_or_model, tokenizer = load_scalar_model(path_or_model, device=device, dtype=dtype)
        self.model, self.tokenizer = path_or_model, tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.name = "reward-model"

    def __call__(self, prompts: Sequence[list[dict]], completions: Sequence[str], fields: Sequence[dict]) -> Scores:
        values = score_responses(self.model, self.tokenizer, list(zip(prompts, completions)), self.batch_size,
                                 self.max_length)
        return [_finite_or_none(value) for value in values]


class RewardFunctionScorer:
    """Scores with a reward function from the registry (`alignkit.rewards.get_reward_function`); the
    prompt row's other columns are passed as fields (``answer``, ``answer_value``...)."""

    def __init__(self, spec, **options):
        self.fn = get_reward_function(spec, **options)
        self.name = f"reward:{spec}" if isinstance(spec, str) else "reward"

    def __call__(self, prompts, completions, fields) -> Scores:
        rows = [PromptExample(prompt=list(prompt), fields=dict(row), source="") for prompt, row in zip(prompts, fields)]
        texts, completions, columns = reward_inputs(rows, list(completions))
        values = self.fn(texts, completions, **columns)
        if len(values) != len(completions):
            raise ValueError(f"{self.name} returned {len(values)} values for {len(completions)} completions")
        return [_finite_or_none(v) for v in values]


class JudgeScorer:
    """Scores with a `PointwiseJudge` (its raw scale; None when malformed after retries)."""

    def __init__(self, judge):
        self.judge = judge
        self.name = f"judge:{judge.backend.identity}"

    def __call__(self, prompts, completions, fields) -> Scores:
        return self.judge.score(prompts, completions)


def _finite_or_none(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


# ------------------------------------------------------------------------------------- the method


@dataclass
class BestOfNResult:
    """Per prompt: the prompt, its candidates (``text``, ``score``), and the SFT row / pair (or why none)."""

    items: list[dict] = field(default_factory=list)
    sft_rows: list[dict] = field(default_factory=list)
    pairs: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def sample_completions(model, tokenizer, prompts: Sequence[list[dict]], n: int, temperature: float = 0.8,
                       top_p: float = 0.95, max_new_tokens: int = 256, batch_size: int = 8,
                       seed: int = 0) -> list[list[str]]:
    """``n`` sampled completions per prompt (all samples of a prompt in one batched call)."""
    if n < 1:
        raise UsageError(f"n must be at least 1, got {n}")
    torch.manual_seed(seed)
    repeated = [list(p) for p in prompts for _ in range(n)]
    texts = chat_generate(model, tokenizer, repeated, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p, batch_size=max(batch_size, 1))
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


def select_best_of_n(prompts: Sequence[list[dict]], candidates: Sequence[Sequence[str]],
                     scorer: Callable[[list, list, list], Scores], fields: Sequence[dict] | None = None,
                     min_score: float | None = None, sources: Sequence[str] | None = None) -> BestOfNResult:
    """Score every candidate and build the SFT rows, pairs and summary (no sampling here)."""
    fields = list(fields) if fields is not None else [{} for _ in prompts]
    flat_prompts, flat_texts, flat_fields, owner = [], [], [], []
    empty = 0
    for index, (prompt, texts) in enumerate(zip(prompts, candidates)):
        for text in texts:
            if not text.strip():
                empty += 1
                continue
            flat_prompts.append(list(prompt))
            flat_texts.append(text)
            flat_fields.append(fields[index])
            owner.append(index)
    flat_scores = list(scorer(flat_prompts, flat_texts, flat_fields)) if flat_texts else []
    if len(flat_scores) != len(flat_texts):
        raise ValueError(f"the scorer returned {len(flat_scores)} scores for {len(flat_texts)} completions")
    flat_scores = [_finite_or_none(score) for score in flat_scores]  # None, NaN, inf: not a score
    scored: list[list[tuple[str, float | None]]] = [[] for _ in prompts]
    for index, text, score in zip(owner, flat_texts, flat_scores):
        scored[index].append((text, score))

    result = BestOfNResult()
    counts = dict(no_valid_score=0, below_min_score=0, ties_skipped=0, identical_skipped=0)
    unscored = sum(score is None for score in flat_scores)
    best_scores, worst_scores, all_scores = [], [], []
    for index, prompt in enumerate(prompts):
        source = sources[index] if sources else str(index)
        valid = [(text, score) for text, score in scored[index] if score is not None]
        item = {"prompt": list(prompt), "source": source,
                "candidates": [{"text": t, "score": s} for t, s in scored[index]]}
        result.items.append(item)
        if not valid:
            counts["no_valid_score"] += 1
            item["outcome"] = "no candidate could be scored"
            continue
        best = max(valid, key=lambda pair: pair[1])  # max/min keep the first on ties
        worst = min(valid, key=lambda pair: pair[1])
        best_scores.append(best[1])
        worst_scores.append(worst[1])
        all_scores.extend(score for _, score in valid)
        outcome = []
        if min_score is not None and best[1] < min_score:
            counts["below_min_score"] += 1
            outcome.append(f"best score {best[1]:g} below min_score {min_score:g}")
        else:
            result.sft_rows.append({"messages": [*prompt, {"role": "assistant", "content": best[0]}],
                                    "score": best[1], "source": source})
        if best[1] == worst[1]:
            counts["ties_skipped"] += 1
            outcome.append("all scores tie: no pair")
        elif normalize_text(best[0]) == normalize_text(worst[0]):
            counts["identical_skipped"] += 1
            outcome.append("best and worst texts are the same: no pair")
        else:
            result.pairs.append({"prompt": list(prompt), "chosen": best[0], "rejected": worst[0],
                                 "chosen_score": best[1], "rejected_score": worst[1], "source": source})
        item["outcome"] = "; ".join(outcome) or "kept"

    def mean(values):
        return sum(values) / len(values) if values else None

    result.summary = {
        "prompts": len(prompts),
        "candidates": sum(len(c) for c in candidates),
        "empty_completions": empty,
        "unscored_completions": unscored,
        "mean_best": mean(best_scores),
        "mean_all": mean(all_scores),
        "mean_worst": mean(worst_scores),
        "sft_rows": len(result.sft_rows),
        "pairs": len(result.pairs),
        **counts,
    }
    return result


def best_of_n(model, tokenizer, examples: Sequence, scorer, n: int = 4, temperature: float = 0.8,
              top_p: float = 0.95, max_new_tokens: int = 256, batch_size: int = 8, seed: int = 0,
              min_score: float | None = None) -> BestOfNResult:
    """Sample ``n`` completions for each `PromptExample` and select (see the module docstring)."""
    started = time.time()
    prompts = [example.prompt for example in examples]
    candidates = sample_completions(model, tokenizer, prompts, n, temperature=temperature, top_p=top_p,
                                    max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    sampled = time.time()
    result = select_best_of_n(prompts, candidates, scorer, [example.fields for example in examples],
                              min_score=min_score, sources=[example.source for example in examples])
    result.summary.update(n=n, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
                          scorer=getattr(scorer, "name", type(scorer).__name__),
                          sampling_seconds=round(sampled - started, 1),
                          scoring_seconds=round(time.time() - sampled, 1))
    judge = getattr(scorer, "judge", None)
    if judge is not None:
        result.summary["judge"] = judge.stats.as_dict()
    return result


def write_result(result: BestOfNResult, out_dir: str | Path) -> dict[str, Path]:
    """``sft.jsonl``, ``pairs.jsonl``, ``candidates.jsonl`` (every sample and score) and ``summary.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"sft": write_jsonl(out / "sft.jsonl", result.sft_rows),
             "pairs": write_jsonl(out / "pairs.jsonl", result.pairs),
             "candidates": write_jsonl(out / "candidates.jsonl", result.items)}
    (out / "summary.json").write_text(json.dumps(result.summary, indent=2, default=str))
    paths["summary"] = out / "summary.json"
    return paths
