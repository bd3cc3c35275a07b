"""Named metrics for `alignkit eval`. Each takes a model, a tokenizer and data, returns a dict."""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from alignkit.data import load_examples, pad_batch, tokenize_dataset, tokenize_prompt
from alignkit.data.pairs import collate_pairs, split_pairs, tokenize_pairs
from alignkit.errors import UsageError
from alignkit.evaluate.drift import (
    DEFAULT_REFUSAL_PATTERNS,
    distinct_n,
    drift_alarms,
    length_stats,
    mean_entropy,
    refusal_rate,
    repetition_rate,
    sample_kl,
)
from alignkit.evaluate.multiple_choice import (
    load_multiple_choice,
    score_multiple_choice,
)
from alignkit.evaluate.pairwise import (
    judge_both_orders,
    judge_name,
    load_judge,
    summarize,
)
from alignkit.evaluate.stats import (
    bootstrap_interval,
    bootstrap_ratings,
    pass_at_k,
    wilson_interval,
)
from alignkit.generation import generate_ids
from alignkit.judges import conversation_text
from alignkit.losses import preference_accuracy, tied_pairs
from alignkit.model import is_peft_model, load_model_and_tokenizer
from alignkit.model.forward import model_token_logprobs, response_logprob_sums
from alignkit.model.heads import (
    ScalarHeadModel,
    as_reward_model,
    is_scalar_model,
    score_examples,
)
from alignkit.reference import ReferencePolicy
from alignkit.rewards import get_reward_function, reward_inputs

METRICS: dict[str, Callable[..., dict[str, Any]]] = {}


def metric(name: str):
    def wrap(fn):
        METRICS[name] = fn
        return fn

    return wrap


@torch.no_grad()
def token_nll(model, tokenizer, rows, batch_size: int = 8) -> tuple[float, int, list[float]]:
    """Summed NLL over loss-masked tokens, their count, and the mean NLL of each row."""

    device = next(model.parameters()).device
    total, count, per_row = 0.0, 0, []
    model.eval()
    for start in range(0, len(rows), batch_size):
        batch = pad_batch(rows[start:start + batch_size], tokenizer.pad_token_id, side="right")
        batch = {k: v.to(device) for k, v in batch.items()}
        logps = model_token_logprobs(model, batch["input_ids"], batch["attention_mask"])
        mask = (batch["loss_mask"][:, 1:].bool() & batch["attention_mask"][:, 1:].bool()).float()
        row_nll = -(logps.float() * mask).sum(-1)
        row_count = mask.sum(-1)
        total += float(row_nll.sum())
        count += int(row_count.sum())
        per_row += (row_nll / row_count.clamp(min=1)).tolist()
    return total, count, per_row


@metric("perplexity")
def perplexity(model, tokenizer, data: str, max_length: int = 1024, batch_size: int = 8,
               limit: int | None = None, **kwargs) -> dict[str, Any]:
    """Token-weighted perplexity exp(-1/N sum log p) over the assistant tokens of a chat data set,
    with a percentile-bootstrap interval over rows (each replicate re-weights rows by their tokens)."""

    examples, report = load_examples(data, kind="chat", limit=limit)
    rows, treport = tokenize_dataset(tokenizer, examples, max_length, "assistant")
    total, count, per_row = token_nll(model, tokenizer, rows, batch_size)
    mean_nll = total / max(1, count)
    interval = _perplexity_interval(rows, per_row, kwargs.get("confidence", 0.95), kwargs.get("seed", 0))
    return {"perplexity": math.exp(min(mean_nll, 50.0)), "perplexity_interval": interval,
            "mean_log_likelihood": -mean_nll,
            "tokens": count, "rows": len(rows), "n": len(rows), "data": report.summary(),
            "tokenize": treport.summary()}


def _perplexity_interval(rows, per_row_mean_nll: list[float], confidence: float, seed: int) -> list[float]:


    counts = np.array([sum(bool(m) for m in row.loss_mask[1:]) for row in rows], dtype=float)
    sums = np.array(per_row_mean_nll, dtype=float) * counts
    if not len(rows) or counts.sum() == 0:
        return [math.nan, math.nan]

    def draw(rng):
        pick = rng.integers(0, len(rows), len(rows))
        return math.exp(min(sums[pick].sum() / max(1.0, counts[pick].sum()), 50.0))
    return list(bootstrap_interval(draw, n_resamples=1000, confidence=confidence, seed=seed))


# ------------------------------------------------------------------------------------------------
# Shared helpers of the generating metrics: prompts, seeded sampling (cached across metrics), other models.
#
# Result convention (the report relies on it): a metric returns a flat dict; a headline rate or score
# ``x`` comes with ``x_interval = [low, high]`` (95% unless ``confidence`` says otherwise) and ``n``.
# ------------------------------------------------------------------------------------------------

def _load_prompts(data: str, limit: int | None):
    if not data:
        raise UsageError("this metric needs a prompt file: --data PATH")
    return load_examples(data, kind="prompt", limit=limit)


def _temperature(temperature: float | None, samples: int) -> float:
    """Greedy for one sample; 1.0 by default when several samples are drawn (pass@k needs sampling)."""
    if temperature is None:
        return 1.0 if samples > 1 else 0.0
    if samples > 1 and temperature <= 0:
        raise UsageError(f"--samples {samples} with --temperature 0 draws the same greedy answer {samples} times; "
                         "pass@k needs sampling: set --temperature > 0 (e.g. 0.7 or 1.0)")
    return float(temperature)


def sample_completions(model, tokenizer, examples, *, samples: int = 1, temperature: float = 0.0,
                       top_p: float = 1.0, max_new_tokens: int = 256, seed: int = 0, batch_size: int = 8,
                       cache: dict | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, completion ids) for every example, ``samples`` consecutive completions per prompt.

    Seeded with ``torch.manual_seed(seed)`` right before generating, so a run is reproducible; the
    result is cached per (model, prompts, settings) so several metrics share one generation pass.
    """

    if samples < 1:
        raise UsageError(f"samples must be >= 1, got {samples}")
    key = (id(model), tuple(e.source for e in examples), samples, temperature, top_p, max_new_tokens, seed)
    if cache is not None and key in cache:
        return cache[key]
    prompt_ids = [tokenize_prompt(tokenizer, e.prompt) for e in examples for _ in range(samples)]
    torch.manual_seed(seed)
    completion_ids = generate_ids(model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p, batch_size=batch_size)
    if cache is not None:
        cache[key] = (prompt_ids, completion_ids)
    return prompt_ids, completion_ids


def _decode(tokenizer, rows: list[list[int]]) -> list[str]:
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]


def _load_other_model(spec, device=None, dtype=None):
    """(model, tokenizer, name) from a spec string, or from a ready ``(model, tokenizer)`` pair."""
    if isinstance(spec, (tuple, list)) and len(spec) in (2, 3):
        return spec[0], spec[1], (spec[2] if len(spec) == 3 else type(spec[0]).__name__)

    model, tokenizer = load_model_and_tokenizer(str(spec), device=device, dtype=dtype, is_trainable=False)
    return model, tokenizer, str(spec)


def _mean_interval(values, confidence: float, seed: int, n_resamples: int = 2000) -> list[float]:


    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return [math.nan, math.nan]
    return list(bootstrap_interval(values, np.mean, n_resamples=n_resamples, confidence=confidence, seed=seed))


def _rate_interval(values, confidence: float, seed: int) -> list[float]:
    """Interval of a mean of per-prompt rates in [0, 1]: percentile bootstrap over prompts; when every
    prompt has the same rate the bootstrap collapses to a point, so the Wilson interval of the prompt
    count is used instead (it is what one sample per prompt would give)."""

    values = [float(v) for v in values]
    if values and max(values) == min(values):
        return list(wilson_interval(sum(values), len(values), confidence))
    return _mean_interval(values, confidence, seed)


# ------------------------------------------------------------------------------------------------ accuracy

@metric("accuracy")
def accuracy(model, tokenizer, data: str, reward: str = "numeric_match", reward_kwargs: dict | None = None,
             samples: int = 1, k: int | list[int] | None = None, temperature: float | None = None,
             top_p: float = 1.0, max_new_tokens: int = 256, threshold: float = 0.5, limit: int | None = None,
             seed: int = 0, batch_size: int = 8, confidence: float = 0.95, _cache: dict | None = None,
             **_) -> dict[str, Any]:
    """Accuracy on verifiable prompts: generate, score with a reward function, count reward >= threshold.

    ``accuracy`` is the fraction of correct completions (= mean pass@1). With one sample per prompt
    its interval is Wilson's; with ``samples`` > 1 the samples of a prompt are correlated, so the
    intervals are percentile bootstraps over prompts. ``pass@k`` (Chen et al.'s unbiased estimator)
    is reported for every k > 1 in ``k`` (default: ``samples``); pass@1 is ``accuracy``.
    """


    examples, report = _load_prompts(data, limit)
    temperature = _temperature(temperature, samples)
    score = get_reward_function(reward, **(reward_kwargs or {}))
    prompt_ids, completion_ids = sample_completions(
        model, tokenizer, examples, samples=samples, temperature=temperature, top_p=top_p,
        max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, cache=_cache)
    completions = _decode(tokenizer, completion_ids)
    prompts, completions, fields = reward_inputs(examples, completions, samples)
    try:
        rewards = [float(r) for r in score(prompts, completions, **fields)]
    except KeyError as error:
        raise UsageError(f"accuracy: reward function {reward!r} cannot score {data}: {error.args[0]}") from None
    correct = np.array([r >= threshold for r in rewards], dtype=float).reshape(len(examples), samples)
    per_prompt = correct.sum(axis=1).astype(int)
    total = int(correct.sum())
    result: dict[str, Any] = {"accuracy": total / correct.size}
    if samples == 1:
        result["accuracy_interval"] = list(wilson_interval(total, correct.size, confidence))
    else:
        result["accuracy_interval"] = _rate_interval(correct.mean(axis=1), confidence, seed)
    ks = sorted({1, samples} if k is None else ({k} if isinstance(k, int) else set(k)))
    bad = [value for value in ks if not 1 <= value <= samples]
    if bad:
        raise UsageError(f"pass@k needs 1 <= k <= samples ({samples}); got k={bad}")
    if samples > 1:
        for value in ks:
            if value == 1:  # pass@1 is `accuracy` itself (the mean over prompts of c/n)
                continue
            per = [pass_at_k(samples, int(c), value) for c in per_prompt]
            result[f"pass@{value}"] = float(np.mean(per))
            result[f"pass@{value}_interval"] = _rate_interval(per, confidence, seed)
    lengths = [len(ids) for ids in completion_ids]
    result.update({
        "n": len(examples), "samples_per_prompt": samples, "completions": correct.size, "correct": total,
        "reward": reward, "threshold": threshold, "temperature": temperature, "max_new_tokens": max_new_tokens,
        "mean_completion_tokens": float(np.mean(lengths)) if lengths else math.nan,
        "truncated_completions": sum(length >= max_new_tokens for length in lengths),
        "seed": seed, "confidence": confidence, "data": report.summary(),
        "examples": [{"source": examples[i // samples].source, "prompt": prompts[i][:300],
                      "completion": completions[i][:500], "reward": rewards[i]}
                     for i in range(0, min(len(completions), 5 * samples), samples)],
    })
    return result


# ------------------------------------------------------------------------------------------------ pairwise

def _responses(model, tokenizer, examples, settings: dict, cache) -> list[str]:
    _, ids = sample_completions(model, tokenizer, examples, cache=cache, **settings)
    return _decode(tokenizer, ids)


def _pairwise_settings(temperature, top_p, max_new_tokens, seed, batch_size) -> dict:
    return dict(samples=1, temperature=0.0 if temperature is None else float(temperature), top_p=top_p,
                max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)


@metric("win_rate")
def win_rate(model, tokenizer, data: str, model_b=None, judge=None, tie_margin: float = 0.0,
             temperature: float | None = None, top_p: float = 1.0, max_new_tokens: int = 256,
             limit: int | None = None, seed: int = 0, batch_size: int = 8, confidence: float = 0.95,
             device=None, dtype=None, model_name: str | None = None, _cache: dict | None = None,
             **_) -> dict[str, Any]:
    """Win rate of this model (A) against ``model_b`` on a prompt set, judged in both orders.

    See ``alignkit.evaluate.pairwise`` for the combination rule: ties count half, the interval is
    Wilson's, the p-value is the one-sided sign test of "A beats B" (ties dropped).
    """

    if model_b is None:
        raise UsageError("win_rate needs a second model: --model-b NAME_OR_PATH")
    examples, report = _load_prompts(data, limit)
    settings = _pairwise_settings(temperature, top_p, max_new_tokens, seed, batch_size)
    responses_a = _responses(model, tokenizer, examples, settings, _cache)
    other, other_tokenizer, name_b = _load_other_model(model_b, device, dtype)
    responses_b = _responses(other, other_tokenizer, examples, settings, None)
    del other
    judge = load_judge(judge, device=device, dtype=dtype, tie_margin=tie_margin)
    prompts = [conversation_text(e.prompt) for e in examples]
    result = judge_both_orders(judge, prompts, responses_a, responses_b)
    summary = summarize(result, confidence)
    summary.update({
        "model_a": model_name or "model", "model_b": name_b, "judge": judge_name(judge),
        "temperature": settings["temperature"], "max_new_tokens": max_new_tokens, "seed": seed,
        "data": report.summary(),
        "examples": [{"prompt": p[:300], "response_a": a[:400], "response_b": b[:400], "forward": f,
                      "swapped": s, "outcome": o}
                     for p, a, b, f, s, o in list(zip(prompts, responses_a, responses_b, result.forward,
                                                      result.swapped, result.outcomes))[:5]],
    })
    return summary


@metric("elo")
def elo(model, tokenizer, data: str, models=None, judge=None, tie_margin: float = 0.0,
        elo_method: str = "bradley_terry", k_factor: float = 32.0, n_resamples: int = 1000,
        temperature: float | None = None, top_p: float = 1.0, max_new_tokens: int = 256,
        limit: int | None = None, seed: int = 0, batch_size: int = 8, confidence: float = 0.95,
        device=None, dtype=None, model_name: str | None = None, _cache: dict | None = None,
        **_) -> dict[str, Any]:
    """Ratings of this model and ``models`` from pairwise judgments (every pair, both orders).

    Each (prompt, pair) gives one comparison scored 1 / 0.5 / 0 after the position swap. Ratings are
    on the Elo scale (mean 1000): a Bradley-Terry fit (``elo_method="bradley_terry"``, default) or
    online Elo with K = ``k_factor`` (``"elo"``), with percentile-bootstrap intervals over comparisons.
    """

    others = [m for m in (models or []) if m]
    if not others:
        raise UsageError("elo needs at least one other model: --models NAME_OR_PATH[,NAME_OR_PATH...]")
    examples, report = _load_prompts(data, limit)
    settings = _pairwise_settings(temperature, top_p, max_new_tokens, seed, batch_size)
    names = [model_name or "model"]
    responses = [_responses(model, tokenizer, examples, settings, _cache)]
    for spec in others:
        other, other_tokenizer, name = _load_other_model(spec, device, dtype)
        responses.append(_responses(other, other_tokenizer, examples, settings, None))
        del other
        while name in names:
            name += "'"
        names.append(name)
    judge = load_judge(judge, device=device, dtype=dtype, tie_margin=tie_margin)
    prompts = [conversation_text(e.prompt) for e in examples]
    comparisons, pairs = [], []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            result = judge_both_orders(judge, prompts, responses[i], responses[j])
            comparisons += [(names[i], names[j], s) for s in result.scores]
            pairs.append({"a": names[i], "b": names[j], **summarize(result, confidence)})
    options = {"k": k_factor} if elo_method == "elo" else {}
    fitted = bootstrap_ratings(comparisons, method=elo_method, n_resamples=n_resamples, confidence=confidence,
                               seed=seed, players=names, **options)
    ratings = {name: {"rating": r, "interval": [low, high]} for name, (r, low, high) in fitted.items()}
    return {"ratings": ratings, "pairs": pairs, "method": elo_method,
            "k_factor": k_factor if elo_method == "elo" else None, "n": len(comparisons),
            "n_prompts": len(examples), "judge": judge_name(judge), "n_resamples": n_resamples,
            "confidence": confidence, "seed": seed, "data": report.summary()}


# ------------------------------------------------------------------------------------------------ multiple choice

@metric("multiple_choice")
def multiple_choice(model, tokenizer, data: str, prompt_style: str = "plain", limit: int | None = None,
                    batch_size: int = 8, confidence: float = 0.95, **_) -> dict[str, Any]:
    """Log-likelihood multiple choice (MMLU/ARC/HellaSwag/TruthfulQA-MC rows): accuracy and
    length-normalised accuracy with Wilson intervals. See ``alignkit.evaluate.multiple_choice``."""

    items, errors = load_multiple_choice(data, limit=limit)
    result = score_multiple_choice(model, tokenizer, items, style=prompt_style, batch_size=batch_size,
                                   confidence=confidence)
    result["data"] = f"{data}: {len(items)} questions"
    return result


# ------------------------------------------------------------------------------------------------ text overlap

REFERENCE_FIELDS = ("completion", "reference", "references", "output", "response", "answer", "chosen")


def _reference_text(value) -> str | None:
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, dict):
        return _reference_text(value.get("content"))
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return _reference_text(value[-1].get("content"))
    return None


@metric("text_overlap")
def text_overlap(model, tokenizer, data: str, temperature: float | None = None, top_p: float = 1.0,
                 max_new_tokens: int = 256, limit: int | None = None, seed: int = 0, batch_size: int = 8,
                 confidence: float = 0.95, n_resamples: int = 500, _cache: dict | None = None,
                 **_) -> dict[str, Any]:
    """BLEU and chrF (sacrebleu, corpus level, 0-100) and ROUGE-1/2/L F1 (rouge-score, mean over rows)
    of greedy generations against the reference completions; bootstrap intervals over rows."""


    try:
        import sacrebleu
        from rouge_score import rouge_scorer
    except ImportError as error:
        raise UsageError(f"text_overlap needs sacrebleu and rouge-score: pip install 'alignkit[eval]' ({error})") from None
    examples, report = _load_prompts(data, limit)
    references = []
    for e in examples:
        reference = next((_reference_text(e.fields[f]) for f in REFERENCE_FIELDS
                          if f in e.fields and _reference_text(e.fields[f])), None)
        if reference is None:
            raise UsageError(f"{e.source}: no reference text; text_overlap needs prompt/completion rows "
                             f"(or one of {', '.join(REFERENCE_FIELDS)})")
        references.append(reference)
    settings = _pairwise_settings(temperature, top_p, max_new_tokens, seed, batch_size)
    hypotheses = _responses(model, tokenizer, examples, settings, _cache)
    n = len(hypotheses)
    bleu = sacrebleu.corpus_bleu(hypotheses, [references])
    chrf = sacrebleu.corpus_chrf(hypotheses, [references])

    def corpus_replicate(fn):
        def draw(rng):
            pick = rng.integers(0, n, n)
            return fn([hypotheses[i] for i in pick], [[references[i] for i in pick]]).score
        return draw

    result: dict[str, Any] = {
        "bleu": bleu.score,
        "bleu_interval": list(bootstrap_interval(corpus_replicate(sacrebleu.corpus_bleu), n_resamples=n_resamples,
                                                 confidence=confidence, seed=seed)),
        "chrf": chrf.score,
        "chrf_interval": list(bootstrap_interval(corpus_replicate(sacrebleu.corpus_chrf), n_resamples=n_resamples,
                                                 confidence=confidence, seed=seed)),
    }
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, hyp) for ref, hyp in zip(references, hypotheses)]
    for name in ("rouge1", "rouge2", "rougeL"):
        values = np.array([s[name].fmeasure for s in scores])
        result[name] = float(values.mean())
        result[f"{name}_interval"] = _mean_interval(values, confidence, seed)
    result.update({"n": n, "bleu_signature": str(bleu.format(signature=True)).split(" = ")[0],
                   "temperature": settings["temperature"], "max_new_tokens": max_new_tokens, "seed": seed,
                   "confidence": confidence, "data": report.summary(),
                   "examples": [{"prompt": conversation_text(e.prompt)[:300], "reference": r[:300], "generated": h[:300]}
                                for e, r, h in list(zip(examples, references, hypotheses))[:5]]})
    return result


# ------------------------------------------------------------------------------------------------ drift

@torch.no_grad()
def completion_logprobs(model, tokenizer, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                        with_entropy: bool = False, batch_size: int = 8):
    """Per-sequence arrays of the completion tokens' log-probs (and entropies) under ``model``."""


    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    logps_out, entropy_out = [], []
    model.eval()
    for start in range(0, len(prompt_ids), batch_size):
        rows = [{"input_ids": p + c, "loss_mask": [0] * len(p) + [1] * len(c)}
                for p, c in zip(prompt_ids[start:start + batch_size], completion_ids[start:start + batch_size])]
        batch = {k: v.to(device) for k, v in pad_batch(rows, pad, side="right").items()}
        output = model_token_logprobs(model, batch["input_ids"], batch["attention_mask"], with_entropy=with_entropy)
        logps, entropy = output if with_entropy else (output, None)
        mask = batch["loss_mask"][:, 1:].bool().cpu()
        for i in range(len(rows)):
            logps_out.append(np.asarray(logps[i].float().cpu()[mask[i]]))
            if with_entropy:
                entropy_out.append(np.asarray(entropy[i].float().cpu()[mask[i]]))
    return (logps_out, entropy_out) if with_entropy else logps_out


def _text_stats(texts: list[str], ids: list[list[int]], patterns, confidence: float, seed: int,
                max_new_tokens: int) -> dict[str, Any]:
    lengths = [len(row) for row in ids]
    patterns = tuple(patterns) if patterns else DEFAULT_REFUSAL_PATTERNS
    refusals = refusal_rate(texts, patterns)
    count = round(refusals * len(texts))
    cut = sum(1 for length in lengths if length >= max_new_tokens)  # EOS is removed: a full-length row never ended
    return {"length": length_stats(lengths), "length_interval": _mean_interval(lengths, confidence, seed),
            "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
            "repetition": repetition_rate(ids, 3),
            "truncated_share": cut / len(lengths) if lengths else math.nan,
            "truncated_share_interval": list(wilson_interval(cut, len(lengths), confidence)) if lengths else [],
            "refusal_rate": refusals, "refusal_rate_interval": list(wilson_interval(count, len(texts), confidence))}


@metric("drift")
def drift(model, tokenizer, data: str, reference_model=None, drift_temperature: float = 1.0,
          max_new_tokens: int = 256, refusal_patterns: list[str] | None = None,
          drift_thresholds: dict | None = None, limit: int | None = None, seed: int = 0, batch_size: int = 8,
          confidence: float = 0.95, device=None, dtype=None, _cache: dict | None = None, **_) -> dict[str, Any]:
    """Reward-hacking alarms against a reference model, on completions sampled at ``drift_temperature``.

    * ``kl``: Monte-Carlo KL(policy || reference) on the policy's own samples (``drift.sample_kl``:
      k1 and k3 in nats per sequence, over completion tokens; the end-of-turn token is not counted);
      log-probs at temperature 1, so it is an estimate of the models' KL only when sampling at 1.0.
    * ``entropy``: mean token entropy of the policy on its samples; the reference's on its own.
    * ``length`` (tokens), ``truncated_share`` (cut at ``max_new_tokens``), ``repetition`` (repeated
      trigrams within a completion), ``distinct_1``/``distinct_2``, ``refusal_rate`` (``refusal_patterns``,
      default ``drift.DEFAULT_REFUSAL_PATTERNS``) for both models' samples.
    * ``warnings``: the sentences of ``drift.drift_alarms(policy, reference, drift_thresholds)``;
      ``alarms``: the hacking checks among them (a clean run should have none), ``collapse``: the
      entropy / distinct-2 checks (expected on tasks with one right answer).

    The reference is ``reference_model`` (a name/path) or, for a LoRA policy, the base model with the
    adapter disabled.
    """



    examples, report = _load_prompts(data, limit)
    if reference_model is not None:
        reference, reference_tokenizer, reference_name = _load_other_model(reference_model, device, dtype)
        if reference_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise UsageError(f"drift: the reference model {reference_name} has a different tokenizer; "
                             "sample KL needs the same vocabulary")
        reference_context = contextlib.nullcontext
    elif hasattr(model, "peft_config") and hasattr(model, "disable_adapter"):
        reference, reference_name, reference_context = model, "base model (adapter disabled)", model.disable_adapter
    else:
        raise UsageError("drift needs a reference model: --reference-model NAME_OR_PATH "
                         "(or a LoRA policy, whose base model is the reference)")
    settings = dict(samples=1, temperature=float(drift_temperature), top_p=1.0, max_new_tokens=max_new_tokens,
                    seed=seed, batch_size=batch_size)
    prompt_ids, policy_ids = sample_completions(model, tokenizer, examples, cache=_cache, **settings)
    policy_logps, policy_entropy = completion_logprobs(model, tokenizer, prompt_ids, policy_ids, True, batch_size)
    with reference_context():
        reference_logps = completion_logprobs(reference, tokenizer, prompt_ids, policy_ids, False, batch_size)
        _, reference_ids = sample_completions(reference, tokenizer, examples, cache=None, **settings)
        _, reference_entropy = completion_logprobs(reference, tokenizer, prompt_ids, reference_ids, True, batch_size)
    kl = sample_kl(policy_logps, reference_logps)
    per_sequence_kl = [float((p - q).sum()) for p, q in zip(policy_logps, reference_logps)]

    def entropy_interval(rows):
        rows = [r for r in rows if r.size]
        if not rows:
            return [math.nan, math.nan]

        def draw(rng):
            pick = rng.integers(0, len(rows), len(rows))
            return sum(rows[i].sum() for i in pick) / max(1, sum(rows[i].size for i in pick))
        return list(bootstrap_interval(draw, n_resamples=1000, confidence=confidence, seed=seed))

    policy_texts, reference_texts = _decode(tokenizer, policy_ids), _decode(tokenizer, reference_ids)
    current = {"kl": kl, "kl_interval": _mean_interval(per_sequence_kl, confidence, seed),
               "entropy": mean_entropy(policy_entropy), "entropy_interval": entropy_interval(policy_entropy),
               **_text_stats(policy_texts, policy_ids, refusal_patterns, confidence, seed,
                             max_new_tokens)}
    baseline = {"entropy": mean_entropy(reference_entropy), "entropy_interval": entropy_interval(reference_entropy),
                **_text_stats(reference_texts, reference_ids, refusal_patterns, confidence,
                              seed, max_new_tokens)}
    fired = drift_alarms(current, baseline, drift_thresholds)
    del reference
    return {"policy": current, "reference": baseline, "warnings": [alarm.message for alarm in fired],
            "warning_kinds": [alarm.kind for alarm in fired],
            "alarms": [alarm.check for alarm in fired if alarm.kind == "hacking"],
            "collapse": [alarm.check for alarm in fired if alarm.kind == "collapse"],
            "reference_model": reference_name,
            "n": len(examples), "temperature": float(drift_temperature), "max_new_tokens": max_new_tokens,
            "thresholds": drift_thresholds or {}, "seed": seed, "confidence": confidence,
            "mean_completion_tokens": float(np.mean([len(ids) for ids in policy_ids])) if policy_ids else math.nan,
            "data": report.summary(),
            "examples": [{"prompt": conversation_text(e.prompt)[:300], "policy": p[:300], "reference": r[:300]}
                         for e, p, r in list(zip(examples, policy_texts, reference_texts))[:3]]}


# ------------------------------------------------------------------------------------------------ running

def _data_for(name: str, data) -> Any:
    """``data`` is one path for every metric, or ``{metric name: path}`` with an optional ``"*"`` default."""
    if isinstance(data, dict):
        return data.get(name, data.get("*"))
    return data


def run_metrics(model, tokenizer, names: list[str], **kwargs) -> dict[str, Any]:
    """Run the named metrics; ``data`` may be a dict per metric (see `_data_for`). Generations are
    shared between metrics through one cache; each result gets its wall-clock ``seconds``."""

    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise UsageError(f"unknown metric(s) {unknown}; available: {', '.join(sorted(METRICS))}")
    data = kwargs.pop("data", None)
    kwargs.setdefault("_cache", {})
    results = {}
    for name in names:
        path = _data_for(name, data)
        if path is None:
            raise UsageError(f"metric {name!r} needs data: --data PATH or --data {name}=PATH")
        start = time.perf_counter()
        results[name] = METRICS[name](model, tokenizer, data=path, **kwargs)
        if isinstance(results[name], dict):
            results[name]["seconds"] = round(time.perf_counter() - start, 2)
    return results


@metric("reward_accuracy")
def reward_accuracy(model, tokenizer, data: str, max_length: int = 1024, batch_size: int = 8,
                    limit: int | None = None, confidence: float = 0.95, seed: int = 0,
                    model_name: str | None = None, reference_model=None, beta: float | None = None,
                    device=None, dtype=None, **_) -> dict[str, Any]:
    """Held-out preference pairs scored by a reward model or, for a policy, by its implicit reward.

    * A reward model (``alignkit rm``; its folder holds ``head.json``): ``r`` is the scalar head.
    * A DPO policy (any causal LM): ``r(x, y) = beta * [log pi(y|x) - log pi_ref(y|x)]``, the reward
      DPO optimises implicitly (Rafailov et al. 2023). ``pi_ref`` is ``reference_model``, or, for a
      LoRA policy, its base with the adapter disabled. ``beta`` defaults to the run's ``config.yaml``
      (beside the model folder) or 0.1; it scales the margins, not the accuracy.

    ``accuracy`` = share of pairs with r(chosen) > r(rejected), ties counting one half (an untrained
    policy's implicit rewards are all 0: 50%, not an artefact of rounding), with a Wilson interval;
    ``mean_margin`` = mean r(chosen) - r(rejected) (bootstrap interval); the mean/std of all rewards.
    Rows the data layer rejects are skipped and counted (``data`` summary).
    """

    examples, report = load_examples(data, kind="preference", limit=limit, on_error="skip")
    candidates = [model_name.split("+", 1)[0]] if model_name else []
    candidates += [getattr(model, "name_or_path", None), getattr(getattr(model, "config", None), "_name_or_path", None)]
    if isinstance(model, ScalarHeadModel) or any(isinstance(c, str) and c and is_scalar_model(c) for c in candidates):
        scorer = as_reward_model(model, [model_name] if model_name else [])
        chosen, rejected, _pairs, pair_report = score_examples(scorer, tokenizer, examples, max_length, batch_size)
        extra = {"scored_by": "reward model"}
    else:
        beta = beta if beta is not None else _run_beta(model_name)
        chosen, rejected, pair_report, reference_name = _implicit_rewards(
            model, tokenizer, examples, reference_model, beta, max_length, batch_size, device, dtype)
        extra = {"scored_by": "implicit reward", "beta": beta, "reference": reference_name}
    margins = (chosen - rejected).tolist()
    n = len(margins)
    rewards = torch.cat([chosen, rejected])
    accuracy = preference_accuracy(chosen, rejected) if n else 0.0
    return {"accuracy": accuracy,
            "accuracy_interval": list(wilson_interval(accuracy * n, n, confidence)) if n else None,
            "mean_margin": sum(margins) / max(1, n), "mean_margin_interval": _mean_interval(margins, confidence, seed),
            "reward_mean": float(rewards.mean()) if n else math.nan,
            "reward_std": float(rewards.std()) if n > 1 else math.nan,
            "ties": int(tied_pairs(chosen, rejected).sum()), **extra,
            "n": n, "data": report.summary(), "tokenize": pair_report.summary()}


def _run_beta(model_name: str | None) -> float:
    """``beta`` from the ``config.yaml`` of the run a model folder came from (``runs/x/final``), else 0.1."""


    for part in reversed((model_name or "").split("+")):
        for folder in ((Path(part), Path(part).parent) if part else ()):
            config = folder / "config.yaml"
            if config.is_file():
                value = (yaml.safe_load(config.read_text()) or {}).get("beta")
                if isinstance(value, (int, float)):
                    return float(value)
    return 0.1


@torch.no_grad()
def _implicit_rewards(model, tokenizer, examples, reference_model, beta: float, max_length, batch_size,
                      device=None, dtype=None):
    """``(chosen [P], rejected [P], PairReport, reference name)``: ``beta * (log pi - log pi_ref)`` sums."""
    if reference_model is not None:
        other, reference_tokenizer, reference_name = _load_other_model(reference_model, device, dtype)
        if reference_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise UsageError(f"reward_accuracy: the reference model {reference_name} has a different tokenizer")
        reference = ReferencePolicy(model, "separate_model", other)
    elif is_peft_model(model):
        reference, reference_name = ReferencePolicy(model, "adapters_off"), "base model (adapter disabled)"
    else:
        raise UsageError("reward_accuracy on a policy (no reward-model head found) scores the implicit DPO "
                         "reward and needs a reference: --reference-model NAME_OR_PATH (or a LoRA policy, "
                         "whose base model is the reference)")
    pairs, pair_report = tokenize_pairs(tokenizer, examples, max_length, None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    target = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chosen_all, rejected_all = [], []
    try:
        for start in range(0, len(pairs), batch_size):
            batch = collate_pairs(pairs[start:start + batch_size], pad, target, padding_free=True, share_prompt=True)
            policy = response_logprob_sums(model, batch)[0].float().cpu()
            with reference.model() as reference_module:
                base = response_logprob_sums(reference_module, batch)[0].float().cpu()
            chosen, rejected = split_pairs(beta * (policy - base))
            chosen_all.append(chosen)
            rejected_all.append(rejected)
    finally:
        model.train(was_training)
    empty = torch.zeros(0)
    return (torch.cat(chosen_all) if chosen_all else empty, torch.cat(rejected_all) if rejected_all else empty,
            pair_report, reference_name)


# metrics defined in their own modules register themselves on import
from alignkit.evaluate import factuality as _factuality  # noqa: E402,F401  ("factuality")
