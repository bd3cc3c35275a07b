"""Multiple-choice evaluation by log-likelihood (the MMLU / ARC / HellaSwag / TruthfulQA-MC recipe).

For each question the model never generates: every choice is appended to the same context and
scored by the log-probability the model gives its tokens::

    ll(choice)       = sum_t log p(choice_t | context, choice_<t)
    accuracy         : argmax_choice ll(choice)                        == answer
    accuracy_norm    : argmax_choice ll(choice) / bytes(choice)        == answer   (lm-eval's acc_norm)
    accuracy_per_token: argmax_choice ll(choice) / tokens(choice)      == answer

Length normalisation matters when choices differ in length (HellaSwag endings): a raw sum favours
short choices. Each rate comes with a Wilson interval. Ties (equal scores) go to the first choice.

Prompt styles: ``"plain"`` (default) scores ``"Question: {question}\\nAnswer:"`` + ``" {choice}"``
(HellaSwag rows, whose ``ctx`` the endings continue, use it as is: ``"{ctx}"`` + ``" {ending}"``);
``"chat"`` puts the question (with the choices listed) in a user message and scores the choice
as the start of the assistant's reply.

Accepted rows (one question per row; the first matching name wins):

=============  =====================================================================================
field          accepted names and shapes
=============  =====================================================================================
question       ``question``, ``query``, ``ctx`` (HellaSwag), ``goal`` (PIQA), ``prompt``, ``stem``
choices        ``choices`` (a list of strings, or ARC's ``{"text": [...], "label": [...]}``),
               ``endings`` (HellaSwag), ``options``, ``mc1_targets`` / ``mc2_targets`` (TruthfulQA:
               ``{"choices": [...], "labels": [1, 0, ...]}``, the answer is the label 1)
answer         ``answer``, ``label``, ``answerKey`` (ARC), ``gold``, ``target``: an index (0-based),
               a digit string, a letter (A, B, ...; matched against ARC labels when present), or the
               text of the right choice
=============  =====================================================================================

``question.stem`` (OpenBookQA / ARC as nested JSON) is read too.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from alignkit.data import DataError, iter_records, pad_batch, render_chat
from alignkit.errors import UsageError
from alignkit.evaluate.stats import wilson_interval
from alignkit.model.forward import model_token_logprobs

QUESTION_FIELDS = ("question", "query", "ctx", "goal", "prompt", "stem")
CHOICE_FIELDS = ("choices", "endings", "options", "mc1_targets", "mc2_targets")
ANSWER_FIELDS = ("answer", "label", "answerKey", "gold", "target")
PROMPT_STYLES = ("plain", "chat")


@dataclass
class MultipleChoiceItem:
    question: str
    choices: list[str]
    answer: int
    source: str = ""
    continuation: bool = False   # HellaSwag-style: the choices continue the context (no "Question:")


def _choices(row: dict, source: str) -> tuple[list[str], list[str] | None, int | None]:
    """(choice texts, their labels if the file names them, the answer if the choice field carries it)."""
    for name in CHOICE_FIELDS:
        if name not in row:
            continue
        value = row[name]
        if isinstance(value, dict):
            texts = value.get("text", value.get("choices"))
            if not isinstance(texts, list):
                raise DataError("expected a list under 'text' or 'choices'", source, name)
            labels = value.get("label", value.get("labels"))
            if name.startswith("mc") and isinstance(labels, list):
                correct = [i for i, flag in enumerate(labels) if flag in (1, True, "1")]
                return [str(t) for t in texts], None, correct[0] if correct else None
            return [str(t) for t in texts], [str(label) for label in labels] if isinstance(labels, list) else None, None
        if isinstance(value, list):
            return [str(t) for t in value], None, None
        raise DataError(f"expected a list of choices, got {type(value).__name__}", source, name)
    raise DataError(f"no choices; expected one of {', '.join(CHOICE_FIELDS)}", source)


def _answer_index(value: Any, choices: list[str], labels: list[str] | None, source: str, name: str) -> int:
    if isinstance(value, bool):
        raise DataError("expected an index, a letter or the choice text, got a boolean", source, name)
    index = None
    if isinstance(value, int):
        index = value
    elif isinstance(value, float) and value.is_integer():
        index = int(value)
    elif isinstance(value, str):
        text = value.strip()
        if labels is not None and text in labels:
            index = labels.index(text)
        elif text.isdigit():
            index = int(text)
        elif len(text) == 1 and text.isalpha():
            index = ord(text.upper()) - ord("A")
        elif text in choices:
            index = choices.index(text)
    if index is None:
        raise DataError(f"cannot read answer {value!r}: expected an index, a letter or the choice text", source, name)
    if not 0 <= index < len(choices):
        raise DataError(f"answer {value!r} is out of range for {len(choices)} choices", source, name)
    return index


def to_multiple_choice_item(row: dict, source: str = "") -> MultipleChoiceItem:
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}", source)
    question_field = next((name for name in QUESTION_FIELDS if name in row), None)
    question = row[question_field] if question_field else None
    if isinstance(question, dict):  # OpenBookQA / nested ARC: {"stem": ..., "choices": [...]}
        row = {**question, **{k: v for k, v in row.items() if k != "question"}}
        question = question.get("stem")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"no question text; expected one of {', '.join(QUESTION_FIELDS)}", source)
    choices, labels, answer = _choices(row, source)
    if len(choices) < 2:
        raise DataError(f"need at least 2 choices, got {len(choices)}", source)
    if any(not c.strip() for c in choices):
        raise DataError("empty choice text", source)
    if answer is None:
        name = next((n for n in ANSWER_FIELDS if n in row), None)
        if name is None:
            raise DataError(f"no answer; expected one of {', '.join(ANSWER_FIELDS)}", source)
        answer = _answer_index(row[name], choices, labels, source, name)
    return MultipleChoiceItem(question.strip(), [c.strip() for c in choices], answer, source,
                              continuation=question_field == "ctx")


def load_multiple_choice(path: str | os.PathLike, limit: int | None = None,
                         on_error: str = "fail") -> tuple[list[MultipleChoiceItem], list[str]]:
    """Read question/choices/answer rows; returns (items, error messages of skipped rows)."""
    items, errors = [], []
    for source, record in iter_records(path):
        try:
            if isinstance(record, DataError):
                raise record
            items.append(to_multiple_choice_item(record, source))
        except DataError as error:
            if on_error == "fail":
                raise
            errors.append(str(error))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise DataError(f"no usable multiple-choice rows in {os.fspath(path)}"
                        + (f"; first error: {errors[0]}" if errors else ""))
    return items, errors


def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def context_and_continuations(tokenizer, item: MultipleChoiceItem, style: str = "plain") -> tuple[str, list[str]]:
    """The shared context text and each choice's continuation text."""
    if style == "plain":
        context = item.question if item.continuation else f"Question: {item.question}\nAnswer:"
        return context, [f" {c}" for c in item.choices]
    if style == "chat":

        listed = "\n".join(f"{letter}. {choice}" for letter, choice in zip(_letters(len(item.choices)), item.choices))
        messages = [{"role": "user", "content": f"{item.question}\n\n{listed}\n\nAnswer with the correct choice."}]
        return render_chat(tokenizer, messages, add_generation_prompt=True), list(item.choices)
    raise UsageError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids): the joint text is tokenized once and split where the context's
    own tokens end (as lm-eval does), so merges across the boundary are not scored twice."""
    context_ids = _encode(tokenizer, context)
    joint = _encode(tokenizer, context + continuation)
    if joint[:len(context_ids)] == context_ids and len(joint) > len(context_ids):
        return context_ids, joint[len(context_ids):]
    return context_ids, _encode(tokenizer, continuation)


@torch.no_grad()
def continuation_logprobs(model, tokenizer, pairs: Sequence[tuple[list[int], list[int]]],
                          batch_size: int = 8) -> list[float]:
    """Summed log-prob of each continuation given its context (batched, longest first)."""

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bos = getattr(tokenizer, "bos_token_id", None)
    rows = []
    for context, continuation in pairs:
        if not continuation:
            raise ValueError("a choice produced no tokens")
        if not context:  # the first continuation token needs something to be predicted from
            context = [bos if bos is not None else pad]
        ids = context + continuation
        rows.append({"input_ids": ids, "loss_mask": [0] * len(context) + [1] * len(continuation)})
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    totals = [0.0] * len(rows)
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = pad_batch([rows[i] for i in chunk], pad, side="right")
        batch = {k: v.to(device) for k, v in batch.items()}
        logps = model_token_logprobs(model, batch["input_ids"], batch["attention_mask"]).float()
        mask = batch["loss_mask"][:, 1:].bool() & batch["attention_mask"][:, 1:].bool()
        sums = torch.where(mask, logps, torch.zeros_like(logps)).sum(-1)
        for i, value in zip(chunk, sums.tolist()):
            totals[i] = value
    return totals


def _rate(correct: int, n: int, confidence: float) -> tuple[float, list[float]]:
    return (correct / n if n else math.nan), list(wilson_interval(correct, n, confidence))


def score_multiple_choice(model, tokenizer, items: Sequence[MultipleChoiceItem], style: str = "plain",
                          batch_size: int = 8, confidence: float = 0.95,
                          keep_predictions: int = 20) -> dict[str, Any]:
    """Accuracy, length-normalised accuracies, their Wilson intervals and the first predictions."""
    pairs, spans, token_counts, byte_counts = [], [], [], []
    for item in items:
        context, continuations = context_and_continuations(tokenizer, item, style)
        start = len(pairs)
        for text in continuations:
            context_ids, continuation_ids = encode_pair(tokenizer, context, text)
            pairs.append((context_ids, continuation_ids))
            token_counts.append(len(continuation_ids))
            byte_counts.append(len(text.encode("utf-8")))
        spans.append((start, len(pairs)))
    totals = continuation_logprobs(model, tokenizer, pairs, batch_size)

    def argmax(values: list[float]) -> int:
        return max(range(len(values)), key=lambda i: (values[i], -i))

    hits = {"accuracy": 0, "accuracy_norm": 0, "accuracy_per_token": 0}
    predictions = []
    for item, (start, end) in zip(items, spans):
        raw = totals[start:end]
        per_byte = [v / max(1, b) for v, b in zip(raw, byte_counts[start:end])]
        per_token = [v / max(1, t) for v, t in zip(raw, token_counts[start:end])]
        picks = {"accuracy": argmax(raw), "accuracy_norm": argmax(per_byte), "accuracy_per_token": argmax(per_token)}
        for key, pick in picks.items():
            hits[key] += pick == item.answer
        if len(predictions) < keep_predictions:
            predictions.append({"source": item.source, "question": item.question[:200], "answer": item.answer,
                                "predicted": picks["accuracy"], "predicted_norm": picks["accuracy_norm"],
                                "loglikelihoods": [round(v, 4) for v in raw]})
    n = len(items)
    result: dict[str, Any] = {}
    for key, count in hits.items():
        result[key], result[f"{key}_interval"] = _rate(count, n, confidence)
    chance = sum(1.0 / len(item.choices) for item in items) / n if n else math.nan
    result.update({"n": n, "correct": hits["accuracy"], "chance": chance, "prompt_style": style,
                   "confidence": confidence, "predictions": predictions})
    return result
