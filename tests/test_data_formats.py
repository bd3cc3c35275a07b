"""Row shapes -> typed examples; one specific error per problem, located by file:line and field."""
import json

import pytest

from alignkit.data import (
    ChatExample,
    DataError,
    PreferenceExample,
    answer_value,
    detect_format,
    load_examples,
    to_chat_example,
    to_preference_examples,
    to_prompt_example,
)


def jsonl(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((json.dumps(r) if not isinstance(r, str) else r) + "\n" for r in rows), encoding="utf-8")
    return path


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------------------------------- shapes
def test_detection_order():
    assert detect_format({"messages": [], "prompt": "x", "completion": "y"}) == "messages"
    assert detect_format({"conversations": []}) == "messages"
    assert detect_format({"prompt": "p", "chosen": "a", "rejected": "b", "completion": "c"}) == "preference"
    assert detect_format({"prompt": "p", "responses": []}) == "ranked"
    assert detect_format({"chosen": "a", "rejected": "b"}) == "hh_pair"
    assert detect_format({"text": "\n\nHuman: hi\n\nAssistant: yo"}) == "hh"
    assert detect_format({"text": "Once upon a time"}) == "text"  # TRL language modelling, not HH
    assert detect_format({"prompt": "p", "completion": "c"}) == "prompt_completion"
    assert detect_format({"question": "q", "answer": "a"}) == "question_answer"
    assert detect_format({"instruction": "i", "output": "o"}) == "alpaca"
    assert detect_format({"prompt": "p"}) == "prompt"
    assert detect_format({"foo": 1}) is None


def test_chat_shapes():
    assert to_chat_example({"prompt": "hi", "completion": "hello"}, "s").messages == [user("hi"), assistant("hello")]
    conversation = [user("a"), assistant("b"), user("c"), assistant("d")]
    assert to_chat_example({"messages": conversation}, "s").messages == conversation
    sharegpt = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    assert to_chat_example(sharegpt, "s").messages == [user("a"), assistant("b")]
    conversational_prompt = {"prompt": [{"role": "system", "content": "S"}, user("q")], "completion": [assistant("r")]}
    assert to_chat_example(conversational_prompt, "s").messages == [
        {"role": "system", "content": "S"}, user("q"), assistant("r")]
    alpaca = {"instruction": "Add", "input": "1 and 2", "output": "3"}
    assert to_chat_example(alpaca, "s").messages == [user("Add\n\n1 and 2"), assistant("3")]
    preference = {"prompt": "p", "chosen": "good", "rejected": "bad"}
    assert to_chat_example(preference, "s").messages == [user("p"), assistant("good")]
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                          assistant("c")]}
    assert to_chat_example(parts, "s").messages[0] == user("ab")


def test_system_column_and_default_system_prompt():
    row = {"prompt": "hi", "completion": "yo", "system": "Be brief."}
    assert to_chat_example(row, "s").messages[0] == {"role": "system", "content": "Be brief."}
    plain = {"prompt": "hi", "completion": "yo"}
    assert to_chat_example(plain, "s", system_prompt="Default.").messages[0]["content"] == "Default."
    assert to_chat_example(row, "s", system_prompt="Default.").messages[0]["content"] == "Be brief."
    own = {"messages": [{"role": "system", "content": "Own."}, user("a"), assistant("b")]}
    assert to_chat_example(own, "s", system_prompt="Default.").messages[0]["content"] == "Own."
    with pytest.raises(DataError, match="both a 'system' column and a system message"):
        to_chat_example({**own, "system": "Two."}, "s")
    preference = to_preference_examples({"prompt": "p", "chosen": "a", "rejected": "b", "system": "S"}, "s")
    assert preference[0].prompt == [{"role": "system", "content": "S"}, user("p")]


def test_hh_two_turn_dialogue_pair():
    shared = "\n\nHuman: What is the capital of France?\n\nAssistant: Paris.\n\nHuman: And of Italy?\n\nAssistant:"
    row = {"chosen": shared + " Rome is the capital.", "rejected": shared + " I do not know. "}
    [example] = to_preference_examples(row, "hh.jsonl:1")
    assert example.prompt == [user("What is the capital of France?"), assistant("Paris."), user("And of Italy?")]
    assert example.chosen == "Rome is the capital."
    assert example.rejected == "I do not know."
    assert example.source == "hh.jsonl:1"
    chat = to_chat_example(row, "s")
    assert chat.messages[-1] == assistant("Rome is the capital.")
    text_row = {"text": shared + " Rome."}
    assert to_chat_example(text_row, "s").messages == example.prompt + [assistant("Rome.")]
    prompt = to_prompt_example({"text": shared}, "s")
    assert prompt.prompt == example.prompt


def test_hh_pair_must_share_the_prefix():
    row = {"chosen": "\n\nHuman: A?\n\nAssistant: yes", "rejected": "\n\nHuman: B?\n\nAssistant: no"}
    with pytest.raises(DataError, match=r"field 'rejected': chosen and rejected do not share the dialogue"):
        to_preference_examples(row, "f:1")


def test_message_list_pairs_without_prompt():
    row = {"chosen": [user("q"), assistant("good")], "rejected": [user("q"), assistant("bad")]}
    [example] = to_preference_examples(row, "s")
    assert (example.prompt, example.chosen, example.rejected) == ([user("q")], "good", "bad")
    row["rejected"] = [user("other"), assistant("bad")]
    with pytest.raises(DataError, match="differ before their last assistant reply"):
        to_preference_examples(row, "s")


def test_gsm8k_answer_value_and_examples():
    answer = "She sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18.\n#### 1,018 "
    row = {"question": "How much does she make?", "answer": answer}
    assert answer_value(answer) == "1018"
    assert answer_value("42") == "42"
    chat = to_chat_example(row, "g:1")
    assert chat.messages == [user("How much does she make?"), assistant(answer)]
    prompt = to_prompt_example(row, "g:1")
    assert prompt.prompt == [user("How much does she make?")]
    assert prompt.fields == {"answer": answer, "answer_value": "1018"}


def test_prompt_examples_keep_other_columns_as_fields():
    example = to_prompt_example({"prompt": "p", "completion": "ref", "id": 7}, "s")
    assert example.prompt == [user("p")] and example.fields == {"completion": "ref", "id": 7}
    example = to_prompt_example({"messages": [user("a"), assistant("b"), user("c"), assistant("d")]}, "s")
    assert example.prompt == [user("a"), assistant("b"), user("c")] and example.fields == {"completion": "d"}


def test_column_mapping(tmp_path):
    path = jsonl(tmp_path, [{"instruction": "hi", "output": "hello", "sys": "S"}, {"instruction": "x", "output": ""}])
    columns = {"prompt": "instruction", "completion": "output", "system": "sys"}
    examples, report = load_examples(path, columns=columns, on_error="skip")
    assert examples[0].messages == [{"role": "system", "content": "S"}, user("hi"), assistant("hello")]
    assert report.errors == [f"{path}:2: field 'output': empty text"]  # errors name the file's column
    with pytest.raises(DataError, match=r"field 'instruction': missing \(mapped to 'prompt'"):
        to_chat_example({"input": "x", "output": "y"}, "s", columns=columns)


def test_ranked_responses_all_and_adjacent_pairs():
    row = {"prompt": "p", "responses": ["best", "middle", "worst"]}
    pairs = [(e.chosen, e.rejected) for e in to_preference_examples(row, "s", ranking_pairs="all")]
    assert pairs == [("best", "middle"), ("best", "worst"), ("middle", "worst")]
    pairs = [(e.chosen, e.rejected) for e in to_preference_examples(row, "s", ranking_pairs="adjacent")]
    assert pairs == [("best", "middle"), ("middle", "worst")]


def test_ranked_in_load_examples_counts_examples(tmp_path):
    path = jsonl(tmp_path, [{"prompt": "p", "responses": ["a", "b", "c"]}, {"prompt": "q", "chosen": "x",
                                                                             "rejected": "y", "margin": 2}])
    examples, report = load_examples(path, kind="preference", ranking_pairs="all")
    assert len(examples) == 4 and report.kept == 2 and report.examples == 4
    assert all(isinstance(e, PreferenceExample) for e in examples) and examples[-1].margin == 2.0
    assert "4 examples" in report.summary()


def test_csv_preference_and_messages_as_json_strings(tmp_path):
    path = tmp_path / "d.csv"
    messages = json.dumps([user("a"), assistant("b")]).replace('"', '""')
    path.write_text(f'messages\n"{messages}"\n', encoding="utf-8")
    examples, _ = load_examples(path)
    assert examples[0].messages == [user("a"), assistant("b")]
    path = tmp_path / "p.csv"
    path.write_text("prompt,chosen,rejected,margin\nq,good,bad,\n", encoding="utf-8")
    [example], _ = load_examples(path, kind="preference")
    assert (example.chosen, example.rejected, example.margin) == ("good", "bad", None)


# ---------------------------------------------------------------------------------------- errors
BAD_ROWS = [
    ({"prompt": "hi"}, "chat", None, "completion", "no response"),
    ({"prompt": "hi", "completion": 3}, "chat", None, "completion", "expected a string, got number"),
    ({"prompt": "   ", "completion": "x"}, "chat", None, "prompt", "empty text"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "chat", None, "messages[0].role",
     "unknown role 'bot'; valid roles: system, user, assistant"),
    ({"messages": [user("a"), {"role": "assistant"}]}, "chat", None, "messages[1]", "missing field 'content'"),
    ({"messages": [user("a"), user("b")]}, "chat", None, "messages", "no assistant turn"),
    ({"messages": "hello"}, "chat", None, "messages", "expected a list of messages, got string"),
    ({"prompt": "p", "chosen": "Same ", "rejected": "same"[0].upper() + "ame"}, "preference", None, "rejected",
     "chosen and rejected are identical"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, "preference", None, "chosen", "empty text"),
    ({"chosen": "a", "rejected": "b"}, "preference", "preference", "prompt", "missing field"),
    ({"chosen": "plain a", "rejected": "plain b"}, "preference", None, "prompt", "missing field"),
    ({"prompt": "p", "responses": ["only one"]}, "preference", None, "responses", "at least 2 responses, got 1"),
    ({"prompt": "p", "responses": ["a", "b", "a"]}, "preference", None, "responses",
     "responses[0] and responses[2] are identical"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "preference", None, "margin",
     "expected a number, got string 'big'"),
    ({"prompt": "p", "completion": "c"}, "preference", None, None, "has no ranked responses"),
    ({"foo": "bar"}, "chat", None, None, "cannot tell the row's shape from its keys 'foo'"),
    ({"question": "q", "answer": None}, "prompt", None, "answer", "expected a string, got null"),
]


@pytest.mark.parametrize("row,kind,format,field,message", BAD_ROWS)
def test_each_bad_row_has_its_specific_error(tmp_path, row, kind, format, field, message):
    good = {"chat": {"prompt": "a", "completion": "b"}, "preference": {"prompt": "a", "chosen": "b", "rejected": "c"},
            "prompt": {"prompt": "a"}}[kind]
    path = jsonl(tmp_path, [good, "", row])
    with pytest.raises(DataError) as info:
        load_examples(path, kind=kind, format=format)
    text = str(info.value)
    prefix = f"{path}:3: " + (f"field '{field}': " if field else "")
    assert text.startswith(prefix), text
    assert message in text, text


def test_skip_policy_counts_and_keeps_every_message(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, "{broken", {"prompt": "c", "completion": ""}, [1],
            {"prompt": "d", "completion": "e"}]
    path = jsonl(tmp_path, rows)
    examples, report = load_examples(path, on_error="skip")
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:5"]
    assert all(isinstance(e, ChatExample) for e in examples)
    assert (report.read, report.kept, report.skipped) == (5, 2, 3)
    assert [e.split(":")[1] for e in (err.replace(str(path), "") for err in report.errors)] == ["2", "3", "4"]
    assert report.errors[1] == f"{path}:3: field 'completion': empty text"
    summary = report.summary()
    assert "read 5 rows, kept 2, skipped 3" in summary and "first error" in summary
    with pytest.raises(DataError, match=r":2: invalid JSON"):
        load_examples(path, on_error="fail")


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path):
    path = jsonl(tmp_path, [{"prompt": "a"}, {"prompt": "b"}])
    with pytest.raises(DataError, match="no usable rows: all 2 rows had errors"):
        load_examples(path, on_error="skip")


def test_limit_and_argument_checks(tmp_path):
    path = jsonl(tmp_path, [{"prompt": str(i), "completion": "x"} for i in range(10)])
    examples, report = load_examples(path, limit=3)
    assert len(examples) == 3 and report.read == 3
    with pytest.raises(ValueError, match="kind"):
        load_examples(path, kind="sft")
    with pytest.raises(ValueError, match="on_error"):
        load_examples(path, on_error="ignore")
    with pytest.raises(ValueError, match="unknown format"):
        load_examples(path, format="jsonl")
    prompts, _ = load_examples(path, kind="prompt")
    assert prompts[0].prompt == [user("0")] and prompts[0].fields == {"completion": "x"}
