"""Multiple choice by log-likelihood: row formats, and the picks of a model whose preferences are built in."""
from __future__ import annotations

import json
import math

import pytest
import torch

from alignkit.data import DataError
from alignkit.evaluate.multiple_choice import (
    MultipleChoiceItem,
    continuation_logprobs,
    encode_pair,
    load_multiple_choice,
    score_multiple_choice,
    to_multiple_choice_item,
)




@pytest.fixture(scope="module")
def word_tokenizer():
    """Big enough a vocabulary that every corpus word (with its leading space) is one token."""
    from tests.helpers import make_tiny_tokenizer

    return make_tiny_tokenizer(vocab_size=2000)


def unigram_model(tokenizer, preferences: dict[str, float]):
    """A tiny Llama whose next-token distribution ignores the context: lm_head weight 0, bias b.

    log p(token) = b[token] - logsumexp(b) at every position, so a choice's log-likelihood is the
    sum of known numbers. ``preferences`` maps words (scored with a leading space) to their bias.
    """
    from tests.helpers import make_tiny_model

    model = make_tiny_model(tokenizer)
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    head = torch.nn.Linear(hidden, vocab, bias=True)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    for word, bias in preferences.items():
        ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, f"' {word}' should be one token, got {ids}"
        head.bias.data[ids[0]] = bias
    model.lm_head = head
    return model, torch.log_softmax(head.bias.data.double(), dim=0)


PREFERENCES = {"cat": 8.0, "red": 6.0, "green": 7.0, "blue": 7.0}


def test_picks_highest_raw_and_normalised_loglikelihood(word_tokenizer):
    model, logp = unigram_model(word_tokenizer, PREFERENCES)
    word_logp = {w: float(logp[word_tokenizer(" " + w, add_special_tokens=False)["input_ids"][0]])
                 for w in ["cat", "dog", "red", "green", "blue"]}
    # Built so that raw and normalised scoring disagree on the second question.
    items = [
        MultipleChoiceItem("what is the pet", ["cat", "dog"], 0),
        MultipleChoiceItem("what is the color", ["red", "green blue green"], 1),
        MultipleChoiceItem("which one", ["dog", "cat"], 1),
        MultipleChoiceItem("which word", ["cat", "green blue green blue"], 0),
    ]
    raw_long = 2 * word_logp["green"] + word_logp["blue"]
    assert word_logp["red"] > raw_long                                      # the raw sum prefers "red"
    assert raw_long / len(" green blue green") > word_logp["red"] / len(" red")   # per byte: the long one
    result = score_multiple_choice(model, word_tokenizer, items)
    picks = [(p["predicted"], p["predicted_norm"]) for p in result["predictions"]]
    assert picks == [(0, 0), (0, 1), (1, 1), (0, 0)]
    assert result["accuracy"] == 0.75 and result["accuracy_norm"] == 1.0 and result["accuracy_per_token"] == 1.0
    assert result["correct"] == 3 and result["n"] == 4
    low, high = result["accuracy_interval"]
    assert low < 0.75 < high
    # the log-likelihoods are the constructed ones
    assert result["predictions"][1]["loglikelihoods"] == pytest.approx([word_logp["red"], raw_long], abs=1e-3)
    assert result["chance"] == 0.5


def test_batched_scores_match_one_forward_per_choice(word_tokenizer):
    from tests.helpers import make_tiny_model

    model = make_tiny_model(word_tokenizer, seed=4)
    pairs = [encode_pair(word_tokenizer, "Question: what is the capital of france\nAnswer:", text)
             for text in [" paris", " rome is a city", " london", " the capital city of france is paris"]]
    batched = continuation_logprobs(model, word_tokenizer, pairs, batch_size=3)
    for (context, continuation), value in zip(pairs, batched):
        ids = torch.tensor([context + continuation])
        with torch.no_grad():
            logits = model(ids).logits[0].double()
        logps = torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None]).squeeze(1)
        assert value == pytest.approx(float(logps[len(context) - 1:].sum()), abs=1e-4)


def test_row_formats_and_aliases():
    mmlu = to_multiple_choice_item({"question": "q", "choices": ["a", "b", "c", "d"], "answer": 2})
    assert (mmlu.choices, mmlu.answer, mmlu.continuation) == (["a", "b", "c", "d"], 2, False)
    letter = to_multiple_choice_item({"question": "q", "choices": ["a", "b"], "answer": "B"})
    assert letter.answer == 1
    arc = to_multiple_choice_item({"question": "q", "choices": {"text": ["x", "y", "z"], "label": ["1", "2", "3"]},
                                   "answerKey": "3"})
    assert arc.answer == 2                                          # ARC's numeric labels are labels, not indexes
    arc_letters = to_multiple_choice_item({"question": "q", "choices": {"text": ["x", "y"], "label": ["A", "B"]},
                                           "answerKey": "B"})
    assert arc_letters.answer == 1
    hellaswag = to_multiple_choice_item({"ctx": "a man sits", "endings": ["and", "or", "but"], "label": "1"})
    assert (hellaswag.answer, hellaswag.continuation) == (1, True)
    truthful = to_multiple_choice_item({"question": "q", "mc1_targets": {"choices": ["no", "yes"], "labels": [0, 1]}})
    assert truthful.answer == 1
    by_text = to_multiple_choice_item({"question": "q", "options": ["up", "down"], "answer": "down"})
    assert by_text.answer == 1
    nested = to_multiple_choice_item({"question": {"stem": "s", "choices": {"text": ["m", "n"], "label": ["A", "B"]}},
                                      "answerKey": "A"})
    assert (nested.question, nested.answer) == ("s", 0)


@pytest.mark.parametrize("row, message", [
    ({"choices": ["a", "b"], "answer": 0}, "no question"),
    ({"question": "q", "answer": 0}, "no choices"),
    ({"question": "q", "choices": ["a"], "answer": 0}, "at least 2"),
    ({"question": "q", "choices": ["a", "b"]}, "no answer"),
    ({"question": "q", "choices": ["a", "b"], "answer": 5}, "out of range"),
    ({"question": "q", "choices": ["a", "b"], "answer": "maybe"}, "cannot read answer"),
])
def test_bad_rows_name_the_problem(row, message):
    with pytest.raises(DataError, match=message):
        to_multiple_choice_item(row, "f.jsonl:3")


def test_metric_reads_a_file(word_tokenizer, tmp_path):
    from alignkit.evaluate.metrics import run_metrics

    model, _ = unigram_model(word_tokenizer, PREFERENCES)
    path = tmp_path / "mc.jsonl"
    rows = [{"question": "what is the pet", "choices": ["dog", "cat"], "answer": "B"},
            {"ctx": "the cat is", "endings": ["red", "dog"], "label": "0"},
            {"question": "bad", "choices": ["x"], "answer": 0}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match="at least 2"):
        run_metrics(model, word_tokenizer, ["multiple_choice"], data=str(path))
    result = run_metrics(model, word_tokenizer, ["multiple_choice"], data=str(path), limit=2)["multiple_choice"]
    assert result["accuracy"] == 1.0 and result["n"] == 2
    items, errors = load_multiple_choice(path, on_error="skip")
    assert len(items) == 2 and len(errors) == 1 and "mc.jsonl:3" in errors[0]
    chat = run_metrics(model, word_tokenizer, ["multiple_choice"], data=str(path), limit=2,
                       prompt_style="chat")["multiple_choice"]
    assert chat["prompt_style"] == "chat" and math.isfinite(chat["predictions"][0]["loglikelihoods"][0])
