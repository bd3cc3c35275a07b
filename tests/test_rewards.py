"""Reward functions: extraction, built-ins, registry lookups and the combined reward's error policy."""
from __future__ import annotations

import json
import math
import sys
import textwrap

import pytest

from alignkit.rewards import (
    THINK_ANSWER_PATTERN,
    CombinedReward,
    RewardFunctionError,
    RewardResult,
    RewardSpec,
    RewardSpecError,
    available_reward_functions,
    extract_final_number,
    get_reward_function,
    numeric_match,
    register,
    unregister,
)


def score(name, completions, prompts=None, **fields_and_options):
    """Call a built-in through the registry; options and fields are told apart by the caller."""
    options = fields_and_options.pop("options", {})
    fn = get_reward_function(name, **options)
    prompts = prompts if prompts is not None else ["q"] * len(completions)
    return fn(prompts, completions, **fields_and_options)


# -- number extraction -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("#### 1,234", 1234),
        ("The answer is $1,234.50.", 1234.5),
        ("12 apples", 12),
        ("-3", -3),
        ("\\boxed{42}", 42),
        ("3/4", 0.75),
        ("1e3", 1000),
        ("+7", 7),
        ("It costs €1,000,000.", 1_000_000),
        ("about 12.0 km", 12),
        ("50%", 50),
        ("\\boxed{\\frac{3}{4}}", 0.75),
        ("\\boxed{1{,}234}", 1234),
        ("Answer: -2.5e-3", -0.0025),
        ("The answer is 2 + 3 = 5", 5),
        ("She had 5 apples, ate 2, so 3 are left.\n#### 3", 3),
        ("#### 12 apples and 3 pears", 12),
        ("pages 3-4", 4),  # a hyphen between numbers is not a sign
        ("\u22124 degrees", -4),  # unicode minus
    ],
)
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == pytest.approx(expected)


def test_extract_final_number_comma_is_never_a_decimal_point():
    # A comma joins digits only when exactly three follow: "1,5" is the numbers 1 and 5.
    assert extract_final_number("1,5") == 5
    assert extract_final_number("#### 1,5") == 1
    assert extract_final_number("1,500") == 1500


@pytest.mark.parametrize("text", ["no number here", "", "#### ", "1/0"])
def test_extract_final_number_none(text):
    assert extract_final_number(text) is None


# -- numeric_match ---------------------------------------------------------------------------------


def test_numeric_match_right_and_wrong():
    completions = [
        "#### 1,234",
        "The answer is $1,234.50.",
        "12 apples",
        "-3",
        "\\boxed{42}",
        "3/4",
        "1e3",
    ]
    references = [1234, 1234.5, 12, -3, 42, 0.75, 1000]
    assert score("numeric_match", completions, answer_value=references) == [1.0] * 7
    wrong = [r + 1 for r in references]
    assert score("numeric_match", completions, answer_value=wrong) == [0.0] * 7


def test_numeric_match_last_number_decides_and_no_number_scores_zero():
    completions = ["First 72, then I realise it is 70", "I don't know", "72"]
    assert score("gsm8k", completions, answer_value=[72, 72, 72]) == [0.0, 0.0, 1.0]


def test_numeric_match_reads_gsm8k_reference_after_hashes():
    reference = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n48+24 = <<48+24=72>>72\n#### 72"
    completions = ["So she sold 72 clips.", "So she sold 24 clips."]
    assert numeric_match(["p", "p"], completions, answer=[reference, reference]) == [1.0, 0.0]


def test_numeric_match_field_order_and_tolerance():
    # answer_value wins over answer; string values are parsed too.
    assert numeric_match(["p"], ["5"], answer_value=["5"], answer=["#### 6"]) == [1.0]
    assert numeric_match(["p"], ["\\boxed{0.5}"], solution=["so \\boxed{\\frac{1}{2}}"]) == [1.0]
    assert numeric_match(["p"], ["1000000.5"], answer_value=[1000000]) == [1.0]  # within rel 1e-6
    assert numeric_match(["p"], ["0.001"], answer_value=[0.002]) == [0.0]
    fn = get_reward_function("numeric_match", abs_tol=0.01)
    assert fn(["p"], ["3.14"], answer_value=[math.pi]) == [1.0]
    # A forced field is used even when others exist.
    assert numeric_match(["p"], ["7"], field="target", answer_value=[1], target=[7]) == [1.0]


def test_numeric_match_tolerates_unknown_fields_and_rejects_missing_reference():
    assert numeric_match(["p"], ["4"], answer_value=[4], difficulty=["easy"], id=[17]) == [1.0]
    with pytest.raises(KeyError, match="answer_value"):
        numeric_match(["p"], ["4"], question=["2+2?"])
    with pytest.raises(ValueError, match="row 0"):
        numeric_match(["p"], ["4"], answer=["four"])


# -- string matches, regex, formats ------------------------------------------------------------------


def test_exact_and_case_insensitive_match():
    completions = ["  Paris\n", "paris", "Lyon"]
    answers = ["Paris", "Paris", "Paris"]
    assert score("exact_match", completions, answer=answers) == [1.0, 0.0, 0.0]
    assert score("case_insensitive_match", completions, answer=answers) == [1.0, 1.0, 0.0]
    assert score("exact_match", ["b"], reference=[["a", "b"]]) == [1.0]  # a list means any of them
    assert score("exact_match", ["x"], options={"field": "gold"}, gold=["x"], answer=["y"]) == [1.0]
    with pytest.raises(KeyError, match="answer"):
        score("exact_match", ["x"], gold=["x"])


def test_regex_format():
    completions = ["Result: 42", "no digits", "42"]
    assert score("regex_format", completions, options={"pattern": r"\d+"}) == [1.0, 0.0, 1.0]
    assert score("regex_format", completions, options={"pattern": r"\d+", "full_match": True}) == [0.0, 0.0, 1.0]
    assert score("regex_format", ["ANSWER"], options={"pattern": "answer", "flags": "IGNORECASE"}) == [1.0]
    assert score("regex_format", ["ANSWER"], options={"pattern": "answer"}) == [0.0]
    with pytest.raises(RewardSpecError, match="pattern"):
        get_reward_function("regex_format")
    with pytest.raises(RewardSpecError, match="full_match"):
        get_reward_function("regex_format", pattern="x", ful_match=True)
    with pytest.raises(ValueError, match="invalid pattern"):
        get_reward_function("regex_format", pattern="(")


def test_think_format():
    good = [
        "<think>2+2 is 4</think><answer>4</answer>",
        "<think>\nlet me see\n</think>\n\n<answer>\n4\n</answer>\n",
    ]
    bad = [
        "<answer>4</answer>",  # no think
        "<answer>4</answer><think>x</think>",  # wrong order
        "<think>x</think><answer>4</answer> and more text",  # trailing text
        "Sure! <think>x</think><answer>4</answer>",  # leading text
        "<think>x</think><answer>   </answer>",  # empty answer
        "<think>x</think><answer>4</answer><answer>5</answer>",  # two answers
        "<think>x<think>y</think><answer>4</answer>",  # nested think
    ]
    assert score("think_format", good) == [1.0, 1.0]
    assert score("think_format", bad) == [0.0] * len(bad)
    # The exported pattern works with regex_format too.
    fn = get_reward_function("regex_format", pattern=THINK_ANSWER_PATTERN, flags="DOTALL", full_match=True)
    assert fn(["q"] * 3, [good[0], good[1], bad[0]]) == [1.0, 1.0, 0.0]


def test_contains():
    assert score("contains", ["Hello there", "hello", "bye"], options={"text": "Hello"}) == [1.0, 0.0, 0.0]
    assert score("contains", ["Hello there", "hello", "bye"], options={"text": "HELLO", "ignore_case": True}) == [1.0, 1.0, 0.0]
    # An option wins over a dataset field of the same name.
    fn = get_reward_function("contains", text="yes")
    assert fn(["q"], ["yes"], text=["a dataset column called text"]) == [1.0]


# -- JSON ------------------------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def test_valid_json_without_schema():
    completions = [
        '{"a": 1}',
        "[1, 2, 3]",
        'Here you go:\n```json\n{"a": 1}\n```\nAnything else?',
        "{'a': 1}",  # python, not JSON
        '{"a": 1',  # truncated
        "NaN",
        "",
    ]
    assert score("valid_json", completions) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_valid_json_with_schema(tmp_path):
    pytest.importorskip("jsonschema")
    completions = [
        '{"name": "Ada", "age": 36}',
        '{"name": "Ada", "age": "36"}',  # wrong type
        '{"name": "Ada"}',  # missing key
        '```json\n{"name": "Bo", "age": 3}\n```',
        "not json",
    ]
    expected = [1.0, 0.0, 0.0, 1.0, 0.0]
    assert score("valid_json", completions, options={"schema": SCHEMA}) == expected
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA))
    assert score("valid_json", completions, options={"schema": str(path)}) == expected
    with pytest.raises(FileNotFoundError, match="missing.json"):
        get_reward_function("valid_json", schema=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="schema itself is invalid"):
        get_reward_function("valid_json", schema={"type": "no-such-type"})


# -- length penalty --------------------------------------------------------------------------------


def test_length_penalty_chars():
    fn = get_reward_function("length_penalty", target_chars=10, scale=10)
    values = fn(["q"] * 5, ["x" * 5, "x" * 10, "x" * 11, "x" * 15, "x" * 100])
    assert values == pytest.approx([0.0, 0.0, -0.1, -0.5, -1.0])
    capped = get_reward_function("length_penalty", target_chars=10, max_chars=30)
    assert capped(["q"] * 3, ["x" * 20, "x" * 30, "x" * 1000]) == pytest.approx([-0.5, -1.0, -1.0])
    default_scale = get_reward_function("length_penalty", target_chars=10)  # -1 at twice the target
    assert default_scale(["q"] * 2, ["x" * 15, "x" * 20]) == pytest.approx([-0.5, -1.0])


def test_length_penalty_tokens():
    words = lambda text: len(text.split())  # a callable tokenizer that counts words
    fn = get_reward_function("length_penalty", target_tokens=4, max_tokens=8, tokenizer=words)
    assert fn(["q"] * 3, ["a b c d", "a b c d e f", "a " * 50]) == pytest.approx([0.0, -0.5, -1.0])
    estimated = get_reward_function("length_penalty", target_tokens=2, scale=2)  # ceil(chars / 4)
    assert estimated(["q"] * 2, ["x" * 8, "x" * 12]) == pytest.approx([0.0, -0.5])


def test_length_penalty_bad_options():
    with pytest.raises(ValueError, match="exactly one"):
        get_reward_function("length_penalty")
    with pytest.raises(ValueError, match="must exceed"):
        get_reward_function("length_penalty", target_chars=10, max_chars=5)


# -- registry --------------------------------------------------------------------------------------


def test_registry_builtin_names():
    names = available_reward_functions()
    for name in ["numeric_match", "gsm8k", "exact_match", "case_insensitive_match", "regex_format",
                 "think_format", "valid_json", "length_penalty", "contains"]:
        assert name in names
    assert get_reward_function("gsm8k") is get_reward_function("numeric_match") is numeric_match


def test_registry_unknown_name_suggests_closest():
    with pytest.raises(RewardSpecError) as caught:
        get_reward_function("numeric_mach")
    message = str(caught.value)
    assert "Did you mean 'numeric_match'" in message
    assert "exact_match" in message and "valid_json" in message  # the available names are listed


def test_registry_bad_option_for_plain_function():
    with pytest.raises(RewardSpecError, match="abs_tol"):
        get_reward_function("numeric_match", abs_tl=0.1)


MODULE_SOURCE = textwrap.dedent(
    """
    def shout_reward(prompts, completions, bonus=0.0, **fields):
        return [1.0 + bonus if c.isupper() else 0.0 for c in completions]

    NOT_CALLABLE = 3
    """
)


def test_registry_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(MODULE_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards_mod", raising=False)
    fn = get_reward_function("my_rewards_mod:shout_reward")
    assert fn(["q", "q"], ["HEY", "hey"]) == [1.0, 0.0]
    bonus = get_reward_function("my_rewards_mod:shout_reward", bonus=0.5)
    assert bonus(["q"], ["HEY"]) == [1.5]
    with pytest.raises(RewardSpecError, match="no attribute 'shout'.*shout_reward"):
        get_reward_function("my_rewards_mod:shout")
    with pytest.raises(RewardSpecError, match="not a callable"):
        get_reward_function("my_rewards_mod:NOT_CALLABLE")
    with pytest.raises(RewardSpecError, match="module 'no_such_module_xyz' not found"):
        get_reward_function("no_such_module_xyz:fn")


def test_registry_file_path(tmp_path, monkeypatch):
    folder = tmp_path / "rewards dir"
    folder.mkdir()
    (folder / "custom.py").write_text(MODULE_SOURCE)
    fn = get_reward_function(f"{folder / 'custom.py'}:shout_reward")
    assert fn(["q", "q"], ["OK", "ok"]) == [1.0, 0.0]
    monkeypatch.chdir(tmp_path)  # relative paths resolve from the working directory
    again = get_reward_function("rewards dir/custom.py:shout_reward")
    assert again is fn  # the file is loaded once
    with pytest.raises(RewardSpecError, match="file not found"):
        get_reward_function("rewards dir/nope.py:shout_reward")
    with pytest.raises(RewardSpecError, match="name the function"):
        get_reward_function("rewards dir/custom.py")


def test_register_and_factory():
    @register("test_only_always_half")
    def always_half(prompts, completions, **fields):
        return [0.5] * len(completions)

    try:
        assert get_reward_function("test_only_always_half")(["q"], ["c"]) == [0.5]
        with pytest.raises(ValueError, match="already registered"):
            register("test_only_always_half", lambda p, c, **f: [0.0] * len(c))
    finally:
        unregister("test_only_always_half")

    from alignkit.rewards import register_factory

    def make_constant(value):
        return lambda prompts, completions, **fields: [float(value)] * len(completions)

    register_factory("test_only_constant", make_constant)
    try:
        assert get_reward_function("test_only_constant", value=2)(["q"] * 2, ["a", "b"]) == [2.0, 2.0]
        with pytest.raises(RewardSpecError, match="value"):
            get_reward_function("test_only_constant")
    finally:
        unregister("test_only_constant")


# -- combined reward -------------------------------------------------------------------------------


def test_combined_reward_weights_and_per_function_values():
    combined = CombinedReward(
        [
            RewardSpec("numeric_match", weight=1.0),
            RewardSpec("think_format", weight=0.5),
            {"name": "length_penalty", "weight": 2.0, "kwargs": {"target_chars": 40, "scale": 40}},
        ]
    )
    completions = [
        "<think>6*7</think><answer>42</answer>",  # right, formatted, 37 chars
        "42",  # right, unformatted
        "<think>" + "hmm " * 6 + "</think><answer>41</answer>",  # wrong, formatted, 58 chars
    ]
    result = combined(["q"] * 3, completions, answer_value=[42, 42, 42], question=["?"] * 3)
    assert isinstance(result, RewardResult)
    assert result.per_function["numeric_match"] == [1.0, 1.0, 0.0]
    assert result.per_function["think_format"] == [1.0, 0.0, 1.0]
    excess = len(completions[2]) - 40
    assert 0 < excess < 40  # below the cap
    assert result.per_function["length_penalty"] == pytest.approx([0.0, 0.0, -excess / 40])
    assert result.total == pytest.approx([1.5, 1.0, 0.5 - 2.0 * excess / 40])
    assert result.errors == 0
    summary = result.summary()
    assert summary["rewards/numeric_match"] == pytest.approx(2 / 3)
    assert summary["reward"] == pytest.approx(sum(result.total) / 3)


def test_combined_reward_labels_must_be_distinct():
    with pytest.raises(ValueError, match="distinct labels"):
        CombinedReward([{"name": "contains", "kwargs": {"text": "a"}}, {"name": "contains", "kwargs": {"text": "b"}}])
    ok = CombinedReward([
        {"name": "contains", "kwargs": {"text": "a"}, "label": "has_a"},
        {"name": "contains", "kwargs": {"text": "b"}, "label": "has_b"},
    ])
    assert ok(["q"], ["ab"]).per_function == {"has_a": [1.0], "has_b": [1.0]}


def fails_on_boom(prompts, completions, **fields):
    values = []
    for completion in completions:
        if "boom" in completion:
            raise ValueError("cannot score this one")
        values.append(1.0)
    return values


def none_for_empty(prompts, completions, **fields):
    return [None if not c else 1.0 for c in completions]


def nan_for_question(prompts, completions, **fields):
    return [float("nan") if "?" in c else 1.0 for c in completions]


def wrong_length(prompts, completions, **fields):
    return [1.0]


def test_error_policy_raise_names_function_index_prompt_and_completion():
    combined = CombinedReward([fails_on_boom], on_error="raise")
    long_prompt = "Please answer: " + "x" * 1000
    with pytest.raises(RewardFunctionError) as caught:
        combined(["fine prompt", long_prompt], ["ok", "it went boom here"])
    error = caught.value
    message = str(error)
    assert "fails_on_boom" in message and "item 1" in message
    assert "Please answer: " in message and "more chars" in message  # the prompt, truncated
    assert "it went boom here" in message
    assert "cannot score this one" in message
    assert error.index == 1 and isinstance(error.cause, ValueError)
    assert len(message) < 1000


@pytest.mark.parametrize(
    "function, completions, bad_index, words",
    [
        (none_for_empty, ["a", ""], 1, "NoneType"),
        (nan_for_question, ["what?", "a"], 0, "nan"),
        (lambda p, c, **f: ["1.0" for _ in c], ["a"], 0, "str"),
    ],
)
def test_error_policy_raise_on_bad_values(function, completions, bad_index, words):
    with pytest.raises(RewardFunctionError, match=words) as caught:
        CombinedReward([function])(["q"] * len(completions), completions)
    assert caught.value.index == bad_index


def test_error_policy_zero_counts_and_keeps_good_items():
    combined = CombinedReward(
        [
            RewardSpec(fails_on_boom, weight=1.0),
            RewardSpec(none_for_empty, weight=10.0),
            RewardSpec(nan_for_question, weight=100.0),
        ],
        on_error="zero",
    )
    completions = ["fine", "boom", "", "why?"]
    result = combined(["q"] * 4, completions)
    assert result.per_function["fails_on_boom"] == [1.0, 0.0, 1.0, 1.0]  # batch raised; retried per item
    assert result.per_function["none_for_empty"] == [1.0, 1.0, 0.0, 1.0]
    assert result.per_function["nan_for_question"] == [1.0, 1.0, 1.0, 0.0]
    assert result.total == pytest.approx([111.0, 110.0, 101.0, 11.0])
    assert result.errors == 3
    assert len(result.error_messages) == 3
    assert any("fails_on_boom" in m and "'boom'" in m for m in result.error_messages)


def test_error_policy_wrong_length():
    with pytest.raises(RewardFunctionError, match="2 values|1 completion"):
        CombinedReward([lambda p, c, **f: [1.0, 1.0, 1.0]])(["q"] * 2, ["a", "b"])
    result = CombinedReward([wrong_length], on_error="zero")(["q"] * 3, ["a", "b", "c"])
    # Per item the function returns one value, so every item is fine; the batch failure is counted once.
    assert result.per_function["wrong_length"] == [1.0, 1.0, 1.0]
    assert result.errors == 1 and "batch" in result.error_messages[0]


def test_combined_reward_rejects_bad_inputs():
    with pytest.raises(ValueError, match="on_error"):
        CombinedReward(["think_format"], on_error="ignore")
    with pytest.raises(ValueError, match="field 'answer'"):
        CombinedReward(["exact_match"])(["q", "q"], ["a", "b"], answer=["a"])
    with pytest.raises(RewardSpecError, match="Did you mean 'exact_match'"):
        CombinedReward(["exact_mach"])
