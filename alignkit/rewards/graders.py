"""OpenAI reinforcement fine-tuning graders as alignkit reward functions.

An OpenAI job's ``method.reinforcement.grader`` is translated (`alignkit.managed_jobs.grader_terms`)
into reward terms that name these functions (registered rewards), with the grader's own settings as
options; they can also be used by name in any job's ``rewards:``:

    openai_string_check      input, reference, operation (eq | ne | like | ilike)       -> 1.0 or 0.0
    openai_text_similarity   input, reference, evaluation_metric                       -> a score in [0, 1]
    openai_python_grader     source (defines grade(sample, item) -> float)            -> its return value
    openai_score_model       model, input (messages), range, temperature, max_tokens  -> the model's number

Templates in ``input``/``reference`` are filled per completion: ``{{ sample.output_text }}`` is the
completion, ``{{ sample.output_json.key }}`` a key of the completion parsed as JSON, ``{{ item.name }}``
the data row's column ``name`` (nested keys with dots). An unknown variable is an error naming it.

``text_similarity`` metrics: ``fuzzy_match`` (Python's difflib ratio; OpenAI's own fuzzy score may
differ slightly), ``bleu`` (sacrebleu sentence BLEU / 100), ``rouge_1`` ... ``rouge_5`` and ``rouge_l``
(rouge-score F1); ``gleu``, ``meteor`` and ``cosine`` (embeddings) are refused by name.
"""
from __future__ import annotations

import difflib
import json
import re
from typing import Any

from alignkit.judges import OpenAICompatibleBackend
from alignkit.rewards.registry import RewardSpecError, register, register_factory

_VARIABLE = re.compile(r"\{\{\s*(sample|item)\.([\w.]+)\s*\}\}")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
SIMILARITY_METRICS = ("fuzzy_match", "bleu", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l")
UNSUPPORTED_METRICS = {"gleu": "GLEU", "meteor": "METEOR", "cosine": "embedding cosine similarity"}


def _lookup(value: Any, path: list[str], name: str) -> Any:
    for part in path:
        if isinstance(value, dict) and part in value:
            value = value[part]
        else:
            raise KeyError(name)
    return value


def render(template: str, completion: str, item: dict[str, Any]) -> str:
    """Fill ``{{ sample.* }}`` and ``{{ item.* }}`` in ``template`` for one completion and its row."""

    def fill(match: re.Match) -> str:
        namespace, path = match.group(1), match.group(2).split(".")
        name = f"{namespace}.{match.group(2)}"
        if namespace == "sample":
            if path[0] == "output_text" and len(path) == 1:
                return completion
            if path[0] == "output_json":
                try:
                    parsed = json.loads(completion)
                except json.JSONDecodeError:
                    return ""  # not JSON: nothing to compare (the check then fails, it does not crash)
                try:
                    value = _lookup(parsed, path[1:], name)
                except KeyError:
                    return ""
                return value if isinstance(value, str) else json.dumps(value)
            raise RewardSpecError(f"grader template: unknown variable '{name}' (sample.output_text, "
                                  "sample.output_json.KEY)")
        try:
            value = _lookup(item, path, name)
        except KeyError:
            raise RewardSpecError(f"grader template: the data has no column for '{name}' "
                                  f"(columns: {', '.join(sorted(item)) or 'none'})") from None
        return value if isinstance(value, str) else json.dumps(value)

    return _VARIABLE.sub(fill, template)


def _items(fields: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """Per completion, the row's columns (``fields`` holds one list per column)."""
    return [{key: values[i] for key, values in fields.items() if isinstance(values, list) and len(values) == count}
            for i in range(count)]


def string_check(prompts: list[str], completions: list[str], *, input: str = "{{ sample.output_text }}",
                 reference: str = "", operation: str = "eq", **fields: Any) -> list[float]:
    """1.0 when the rendered ``input`` and ``reference`` pass ``operation``: ``eq`` / ``ne`` (exact),
    ``like`` (reference contained in input), ``ilike`` (the same, ignoring case)."""
    if operation not in ("eq", "ne", "like", "ilike"):
        raise RewardSpecError(f"string_check operation '{operation}': expected eq, ne, like or ilike")
    scores = []
    for completion, item in zip(completions, _items(fields, len(completions))):
        left, right = render(input, completion, item), render(reference, completion, item)
        passed = {"eq": left == right, "ne": left != right, "like": right in left,
                  "ilike": right.lower() in left.lower()}[operation]
        scores.append(1.0 if passed else 0.0)
    return scores


def _similarity(metric: str, text: str, reference: str) -> float:
    if metric == "fuzzy_match":
        return difflib.SequenceMatcher(None, text, reference).ratio()
    if metric == "bleu":
        import sacrebleu

        return sacrebleu.sentence_bleu(text, [reference]).score / 100.0
    from rouge_score import rouge_scorer

    name = "rougeL" if metric == "rouge_l" else "rouge" + metric.split("_")[1]
    return rouge_scorer.RougeScorer([name]).score(reference, text)[name].fmeasure


def text_similarity(prompts: list[str], completions: list[str], *, input: str = "{{ sample.output_text }}",
                    reference: str = "", evaluation_metric: str = "fuzzy_match", **fields: Any) -> list[float]:
    """Similarity of the rendered ``input`` to the rendered ``reference`` in [0, 1] (see the module docstring)."""
    if evaluation_metric in UNSUPPORTED_METRICS:
        raise RewardSpecError(f"text_similarity metric '{evaluation_metric}' ({UNSUPPORTED_METRICS[evaluation_metric]}) "
                              f"is not available; use one of {', '.join(SIMILARITY_METRICS)}")
    if evaluation_metric not in SIMILARITY_METRICS:
        raise RewardSpecError(f"text_similarity metric '{evaluation_metric}': use one of {', '.join(SIMILARITY_METRICS)}")
    return [_similarity(evaluation_metric, render(input, completion, item), render(reference, completion, item))
            for completion, item in zip(completions, _items(fields, len(completions)))]


def python_grader(prompts: list[str], completions: list[str], *, source: str, **fields: Any) -> list[float]:
    """OpenAI's python grader: ``source`` defines ``grade(sample, item) -> float``; it is called with
    ``sample = {"output_text": completion, "output_json": parsed or None}`` and the row as ``item``.
    The code runs in this process: it comes from your own job file."""
    namespace: dict[str, Any] = {}
    try:
        exec(compile(source, "<python grader>", "exec"), namespace)  # noqa: S102 - the user's own grader code
    except SyntaxError as error:
        raise RewardSpecError(f"python grader: the source does not compile: {error}") from None
    grade = namespace.get("grade")
    if not callable(grade):
        raise RewardSpecError("python grader: the source defines no grade(sample, item) function")
    scores = []
    for completion, item in zip(completions, _items(fields, len(completions))):
        try:
            parsed = json.loads(completion)
        except json.JSONDecodeError:
            parsed = None
        scores.append(float(grade({"output_text": completion, "output_json": parsed}, item)))
    return scores


def score_model(model: str, input: list[dict], range: tuple[float, float] | list[float] = (0, 1),  # noqa: A002
                base_url: str = "https://api.openai.com/v1", api_key_env: str = "OPENAI_API_KEY",
                temperature: float = 0.0, max_tokens: int = 256, backend=None):
    """OpenAI's score_model grader (a reward factory): ``input`` is a message list whose templates are
    filled per completion; the model's reply must hold a number, clamped to ``range``. ``model`` is
    served at ``base_url`` (any OpenAI-compatible server), or ``backend`` is a `ChatBackend`."""
    if backend is None:
        backend = OpenAICompatibleBackend(base_url=base_url, model=model, api_key_env=api_key_env)
    low, high = float(range[0]), float(range[1])

    def reward(prompts: list[str], completions: list[str], **fields: Any) -> list[float | None]:
        conversations = [[{"role": m["role"], "content": render(m["content"], completion, item)} for m in input]
                         for completion, item in zip(completions, _items(fields, len(completions)))]
        replies = backend.complete(conversations, temperature=temperature, max_tokens=max_tokens)
        scores: list[float | None] = []
        for reply in replies:
            numbers = _NUMBER.findall(reply or "")
            scores.append(min(high, max(low, float(numbers[-1]))) if numbers else None)  # None: counted failure
        return scores

    return reward


register("openai_string_check", string_check)
register("openai_text_similarity", text_similarity)
register("openai_python_grader", python_grader)
register_factory("openai_score_model", score_model)
