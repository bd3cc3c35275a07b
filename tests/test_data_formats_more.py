"""The newer row shapes (OpenAI DPO and weights, Gemini contents, tool calls, KTO labels, plain text), their
errors, weighted mixes of files, named chat templates, and `alignkit data check`."""
import json

import pytest

from alignkit.cli import main
from alignkit.data import DataError, FatalDataError, load_examples, parse_label, to_chat_example, to_unpaired_examples
from alignkit.data.mixing import largest_remainder, load_training_data, mix_by_weight
from alignkit.data.templates import TemplateError, apply_chat_template_setting, fallback_template_source, named_template
from alignkit.data.tokenize import render_chat, render_fallback_template, template_tool_support
from alignkit.methods import build_job
from tests.helpers import make_tiny_tokenizer


def jsonl(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def user(text):
    return {"role": "user", "content": text}


CALL = {"role": "assistant", "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]}
BAD_ROWS = [  # row, kind, field, message
    ({"messages": [user("a"), {"role": "assistant", "content": "b", "weight": 2}]}, "chat", "messages[1].weight",
     "weight must be 0 (no loss on this turn) or 1, got 2"),
    ({"messages": [{"role": "user", "content": "a", "weight": 0}, {"role": "assistant", "content": "b"}]}, "chat",
     "messages[0].weight", "weight applies to assistant messages only"),
    ({"messages": [user("a"), {"role": "assistant", "content": "b", "weight": 0}]}, "chat", "messages",
     "every assistant turn has weight 0"),
    ({"messages": [user("a"), {"role": "assistant", "content": None}]}, "chat", "messages[1].content",
     "content is null; null content is only valid beside tool_calls"),
    ({"messages": [user("a"), {**CALL, "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}]}, "chat",
     "messages[1].tool_calls[0].arguments", "arguments must be JSON"),
    ({"messages": [user("a"), {**CALL, "tool_calls": [{"function": {"arguments": "{}"}}]}]}, "chat",
     "messages[1].tool_calls[0].name", "a tool call needs a function name"),
    ({"messages": [{**user("a"), "tool_calls": CALL["tool_calls"]}]}, "chat", "messages[0].tool_calls",
     "tool_calls on a 'user' message"),
    ({"contents": [{"role": "user", "parts": [{"inlineData": {"data": "x"}}]}]}, "chat", "contents[0].parts[0]",
     "only text, functionCall and functionResponse parts are supported, got 'inlineData'"),
    ({"contents": [{"role": "user", "parts": []}]}, "chat", "contents[0].parts", "missing or empty 'parts' list"),
    ({"contents": [{"role": "user", "parts": [{"text": "x"}]}], "completions": [{"score": 1, "completion": {"role": "model", "parts": [{"text": "a"}]}},
                                               {"score": 1, "completion": {"role": "model", "parts": [{"text": "b"}]}}]},
     "preference", "completions", "completions need different scores"),
    ({"input": {"messages": [user("q")]}, "preferred_output": [{"role": "assistant", "content": "a"}],
      "non_preferred_output": [{"role": "assistant", "content": "a"}]}, "preference", "non_preferred_output",
     "chosen and rejected are identical"),
    ({"input": {"prompt": "q"}, "preferred_output": "a", "non_preferred_output": "b"}, "preference", "input",
     "missing field 'messages'"),
    ({"prompt": "p", "completion": "c", "label": "maybe"}, "unpaired", "label",
     "expected true (desirable) or false (undesirable), got string 'maybe'"),
    ({"prompt": "p", "completion": "c"}, "unpaired", "label", "has no feedback label"),
    ({"text": "plain words"}, "prompt", "text", "plain text has no prompt"),
]


@pytest.mark.parametrize("row,kind,field,message", BAD_ROWS)
def test_each_bad_row_of_the_new_shapes_has_its_specific_error(tmp_path, row, kind, field, message):
    path = jsonl(tmp_path, [row])
    with pytest.raises(DataError) as info:
        load_examples(path, kind=kind)
    assert str(info.value).startswith(f"{path}:1: field '{field}': "), str(info.value)
    assert message in str(info.value)


def test_feedback_rows_for_preference_methods_are_refused_even_when_skipping(tmp_path):
    path = jsonl(tmp_path, [{"prompt": "p", "completion": "c", "label": True}] * 2)
    with pytest.raises(FatalDataError, match="unpaired feedback .* 'alignkit kto'"):
        load_examples(path, kind="preference", on_error="skip")
    with pytest.raises(FatalDataError, match="this row is unpaired feedback"):
        load_examples(path, kind="chat", on_error="skip")


@pytest.mark.parametrize("value,expected", [(True, True), (0, False), ("TRUE", True), ("no", False),
                                            ("thumbs-up", True), ("down", False), ("2", None), (None, None)])
def test_labels(value, expected):
    assert parse_label(value) is expected


def test_pairs_become_two_unpaired_examples_and_messages_with_a_label_one():
    pair = to_unpaired_examples({"prompt": "p", "chosen": "good", "rejected": "bad"}, "s")
    assert [(e.completion, e.label) for e in pair] == [("good", True), ("bad", False)]
    ranked = to_unpaired_examples({"prompt": "p", "responses": ["best", "mid", "worst"]}, "s")
    assert [(e.completion, e.label) for e in ranked] == [("best", True), ("worst", False)]
    [single] = to_unpaired_examples({"messages": [user("q"), {"role": "assistant", "content": "a"}],
                                     "label": "false"}, "s")
    assert (single.prompt, single.completion, single.label) == ([user("q")], "a", False)
    # a non-boolean label beside messages is someone's category, not feedback: the row stays a conversation
    assert to_chat_example({"messages": [user("q"), {"role": "assistant", "content": "a"}], "label": "billing"},
                           "s").messages[-1]["content"] == "a"


def test_gemini_function_calls_and_responses_become_tool_messages():
    row = {"contents": [
        {"role": "user", "parts": [{"text": "weather?"}]},
        {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "rome"}}}]},
        {"role": "function", "parts": [{"functionResponse": {"name": "get_weather", "response": {"t": 25}}}]},
        {"role": "model", "parts": [{"text": "25"}]}],
        "tools": [{"functionDeclarations": [{"name": "get_weather", "parameters": {"type": "object"}}]}]}
    example = to_chat_example(row, "s")
    assert example.messages[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "rome"}}}]}
    assert example.messages[2] == {"role": "tool", "name": "get_weather", "content": "{\"t\": 25}"}
    assert example.tools == [{"type": "function", "function": {"name": "get_weather",
                                                               "parameters": {"type": "object"}}}]


# ---------------------------------------------------------------------------------------- mixing
def test_largest_remainder_and_mix_counts():
    assert largest_remainder(10, [1, 1, 1]) == [4, 3, 3]
    assert sum(largest_remainder(7, [0.2, 0.5, 0.3])) == 7
    assert largest_remainder(6, [3, 1]) == [5, 1]  # 4.5 : 1.5, the tie goes to the first
    mixed, counts = mix_by_weight([["a1", "a2"], ["b1", "b2", "b3", "b4"]], [1, 1], seed=0)
    assert counts == [3, 3]
    assert mixed[:2] == ["a1", "a2"] and mixed[2] in ("a1", "a2")  # the small file: whole, plus one drawn
    assert len(set(mixed[3:])) == 3 and set(mixed[3:]) <= {"b1", "b2", "b3", "b4"}  # the big one: 3 of 4
    assert mix_by_weight([["a1", "a2"], ["b1", "b2", "b3", "b4"]], [1, 1], seed=0)[0] == mixed  # deterministic


def test_training_mix_splits_validation_per_file_then_mixes(tmp_path):
    a = jsonl(tmp_path, [{"prompt": f"a{i}", "completion": "x"} for i in range(10)], "a.jsonl")
    b = jsonl(tmp_path, [{"question": f"b{i}", "answer": "y"} for i in range(10)], "b.jsonl")
    job = build_job("sft", {"data": {"train": [{"path": str(a), "weight": 3}, str(b)], "validation_fraction": 0.2}})
    train, validation, notes = load_training_data(job.data, "chat")
    assert len(validation) == 4 and {v.source.split(":")[0] for v in validation} == {str(a), str(b)}
    held_out = {v.source for v in validation}
    assert len(train) == 16 and not held_out & {t.source for t in train}  # held-out rows never trained on
    from_a = [t for t in train if t.source.startswith(str(a))]
    assert len(from_a) == 12  # 3/4 of 16
    assert any(note.startswith("mix by sampling proportion (16 examples per epoch") and "75.0%" in note
               for note in notes)


# ---------------------------------------------------------------------------------------- templates
def test_fallback_template_as_jinja_renders_what_the_python_fallback_renders():
    tokenizer = make_tiny_tokenizer(chat_template=None)
    messages = [{"role": "system", "content": "S"}, user("hi"), {"role": "assistant", "content": "yo"}]
    expected = render_fallback_template(messages, True, "<|im_end|>")
    assert apply_chat_template_setting(tokenizer, None).startswith("chat template: the tokenizer has none")
    assert tokenizer.chat_template == fallback_template_source(tokenizer)
    assert render_chat(tokenizer, messages, add_generation_prompt=True) == expected
    assert apply_chat_template_setting(tokenizer, None) is None  # it has one now: kept


def test_named_templates_render_turns_and_refuse_missing_end_tokens(tmp_path):
    tokenizer = make_tiny_tokenizer()
    messages = [user("hi"), {"role": "assistant", "content": "yo"}]
    tokenizer.chat_template = named_template("zephyr", tokenizer)
    assert render_chat(tokenizer, messages, True) == "<|user|>\nhi<|im_end|>\n<|assistant|>\nyo<|im_end|>\n<|assistant|>\n"
    tokenizer.chat_template = named_template("chatml", tokenizer)
    assert render_chat(tokenizer, messages) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    assert template_tool_support(tokenizer).calls and template_tool_support(tokenizer).definitions
    with pytest.raises(TemplateError, match="chat_template 'llama3' ends each turn with <\\|eot_id\\|>"):
        named_template("llama3", tokenizer)
    with pytest.raises(TemplateError, match="unknown chat_template 'chatm'"):
        named_template("chatm", tokenizer)
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}{{ m.content }}|{% endfor %}")
    assert "from" in apply_chat_template_setting(tokenizer, str(path))
    assert render_chat(tokenizer, messages) == "hi|yo|"


# ---------------------------------------------------------------------------------------- data check
@pytest.fixture
def tiny_folder(tmp_path):
    tokenizer = make_tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def test_data_check_prints_counts_and_a_histogram(tmp_path, tiny_folder, capsys):
    path = jsonl(tmp_path, [{"prompt": "p", "chosen": "good", "rejected": "bad"},
                            {"prompt": "q", "chosen": "x", "rejected": "x"},
                            {"prompt": "the capital of france " * 20, "chosen": "paris", "rejected": "rome"}])
    code = main(["data", "check", "--data", str(path), "--method", "dpo", "--model", str(tiny_folder),
                 "--on-error", "skip", "--max-length", "64", "--set", "data.validation_fraction=0"])
    out = capsys.readouterr().out
    assert code == 1  # a row was skipped
    assert f"train {path}: read 3 rows, kept 2, skipped 1; first error: {path}:2: field 'rejected': chosen and " \
           "rejected are identical" in out
    assert "train: tokenized 2 pairs: 1 truncated, 0 dropped" in out
    bars = [line for line in out.splitlines() if " | " in line]
    assert len(bars) == 10 and sum(int(line.rsplit(" ", 1)[1]) for line in bars) == 2


def test_data_check_refuses_with_one_line(tmp_path, tiny_folder, capsys):
    path = jsonl(tmp_path, [{"prompt": "p", "completion": "c", "label": True}])
    assert main(["data", "check", "--data", str(path), "--model", str(tiny_folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"alignkit: error: {path}:1: field 'label': this row is unpaired feedback")
    assert "\n" not in err
