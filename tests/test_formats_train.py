"""Files users already have (tests/data/formats/, 3 rows each) train one step through `run_job`, or are
refused with the stated line before any model loads; what they train on is checked token by token."""
import json
from pathlib import Path

import pytest

from alignkit.data import (
    ChatExample,
    FatalDataError,
    TextExample,
    load_examples,
    tokenize_chat,
)
from alignkit.data.templates import named_template
from alignkit.methods import build_job
from alignkit.methods.base import run_job
from tests.helpers import make_tiny_tokenizer, save_tiny_model

FORMATS = Path(__file__).parent / "data" / "formats"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny Llama and its ChatML tokenizer (whose template has no tool format), saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny-model")
    save_tiny_model(folder)
    return folder


def job(method, tmp_path, model_folder, file, **sections):
    raw = {"model": {"name_or_path": str(model_folder), **sections.pop("model", {})},
           "data": {"train": str(FORMATS / file), "validation_fraction": 0, "max_length": 256,
                    **sections.pop("data", {})},
           "training": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "batch_size": 3, "progress": False,
                        "tensorboard": False, "learning_rate": 1e-3},
           "reference_cache_dir": str(tmp_path / "cache"), **sections}
    if method not in ("dpo", "kto"):
        raw.pop("reference_cache_dir")
    return build_job(method, raw)


def trained_text(tokenizer, example) -> str:
    row = tokenize_chat(tokenizer, example)
    return tokenizer.decode([t for t, m in zip(row.input_ids, row.loss_mask) if m])


def loss_tokens(tokenizer, examples) -> int:
    return sum(tokenize_chat(tokenizer, e).num_loss_tokens for e in examples)


def test_openai_weight_zero_turn_is_context_not_target(tmp_path, model_folder):
    examples, _ = load_examples(FORMATS / "openai_chat_weight.jsonl")
    tokenizer = make_tiny_tokenizer()
    assert [trained_text(tokenizer, e) for e in examples] == ["paris<|im_end|>", "rome<|im_end|>", "madrid<|im_end|>"]
    assert "london" in tokenizer.decode(tokenize_chat(tokenizer, examples[0]).input_ids)  # still seen as context
    summary = run_job(job("sft", tmp_path, model_folder, "openai_chat_weight.jsonl"))
    assert summary["steps"] == 1
    assert summary["last_train"]["tokens"] == loss_tokens(tokenizer, examples)


def test_feedback_rows_are_refused_for_sft_before_the_model_loads(tmp_path, model_folder, monkeypatch):
    import alignkit.methods.base as base

    monkeypatch.setattr(base, "build_policy", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(FatalDataError) as error:
        run_job(job("sft", tmp_path, model_folder, "kto_feedback.jsonl"))
    assert str(error.value).startswith(f"{FORMATS / 'kto_feedback.jsonl'}:1: field 'label': this row is unpaired "
                                       "feedback")
    assert "alignkit kto" in str(error.value) and "data.desirable_only: true" in str(error.value)
    assert not (tmp_path / "run").exists()  # no empty run folder


def test_feedback_rows_sft_on_desirable_only_and_kto(tmp_path, model_folder):
    tokenizer = make_tiny_tokenizer()
    summary = run_job(job("sft", tmp_path / "sft", model_folder, "kto_feedback.jsonl", data={"desirable_only": True}))
    assert any("dropped 1 label-false rows" in note for note in summary["notes"])
    kept = [ChatExample([{"role": "user", "content": p}, {"role": "assistant", "content": c}])
            for p, c in (("capital of france?", "paris"), ("capital of spain?", "madrid"))]
    assert summary["last_train"]["tokens"] == loss_tokens(tokenizer, kept)
    summary = run_job(job("kto", tmp_path / "kto", model_folder, "kto_feedback.jsonl"))
    assert summary["steps"] == 1 and 0 < summary["last_train"]["loss"] < 1
    assert any("2 desirable, 1 undesirable" in note for note in summary["notes"])


def test_openai_dpo_rows(tmp_path, model_folder):
    examples, _ = load_examples(FORMATS / "openai_dpo.jsonl", kind="preference")
    assert [(e.prompt, e.chosen, e.rejected) for e in examples[:2]] == [
        ([{"role": "user", "content": "capital of france?"}], "paris", "rome"),
        ([{"role": "system", "content": "be brief"}, {"role": "user", "content": "capital of italy?"}], "rome",
         "the capital of italy is berlin")]
    summary = run_job(job("dpo", tmp_path, model_folder, "openai_dpo.jsonl"))
    assert summary["steps"] == 1
    assert summary["last_train"]["loss"] == pytest.approx(0.6931, abs=1e-3)  # step 1: policy = reference


def test_trl_text_rows_are_language_modelling_not_hh(tmp_path, model_folder):
    examples, _ = load_examples(FORMATS / "trl_text.jsonl")
    assert all(isinstance(e, TextExample) for e in examples)
    tokenizer = make_tiny_tokenizer()
    row = tokenize_chat(tokenizer, examples[0])
    assert all(row.loss_mask) and row.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(row.input_ids) == "the cat is red and the dog is blue.<|im_end|>"
    summary = run_job(job("sft", tmp_path, model_folder, "trl_text.jsonl"))
    # every token but the first is a target
    assert summary["last_train"]["tokens"] == sum(len(tokenize_chat(tokenizer, e)) - 1 for e in examples)


def test_gemini_contents_with_parts(tmp_path, model_folder):
    examples, _ = load_examples(FORMATS / "gemini_sft.jsonl")
    assert examples[0].messages == [{"role": "system", "content": "answer with one word"},
                                    {"role": "user", "content": "capital of france?"},
                                    {"role": "assistant", "content": "paris"}]
    assert examples[1].messages[-1] == {"role": "assistant", "content": "madrid"}
    summary = run_job(job("sft", tmp_path / "sft", model_folder, "gemini_sft.jsonl"))
    assert summary["last_train"]["tokens"] == loss_tokens(make_tiny_tokenizer(), examples)
    pairs, _ = load_examples(FORMATS / "gemini_preference.jsonl", kind="preference")
    assert [(p.chosen, p.rejected) for p in pairs] == [("paris", "rome"), ("rome", "berlin"), ("madrid", "lemon")]
    assert pairs[0].prompt[0] == {"role": "system", "content": "be brief"}
    assert run_job(job("dpo", tmp_path / "dpo", model_folder, "gemini_preference.jsonl"))["steps"] == 1


@pytest.mark.parametrize("data", ["openai_tools.jsonl", "sharegpt_tools.jsonl"])
def test_tool_calls_are_refused_by_a_template_without_a_tool_format(tmp_path, model_folder, data):
    with pytest.raises(FatalDataError) as error:
        run_job(job("sft", tmp_path, model_folder, data))
    assert str(error.value) == (
        f"{FORMATS / data}:1: field 'messages': the conversation has tool calls ('tool_calls') and tool "
        "definitions ('tools') but the tokenizer's chat template has no format for "
        "them, so they would be dropped from training; use a model whose chat template renders tools, or set "
        "model.chat_template: chatml (alignkit's ChatML with tool calls)")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("data", ["openai_tools.jsonl", "sharegpt_tools.jsonl"])
def test_tool_calls_train_through_the_template_tool_format(tmp_path, model_folder, data):
    examples, _ = load_examples(FORMATS / data)
    assert examples[0].messages[1]["tool_calls"] == [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "paris"}},
         **({"id": "call_1"} if data.startswith("openai") else {})}]
    assert examples[0].tools[0]["function"]["name"] == "get_weather"
    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = named_template("chatml", tokenizer)
    # the call and the final answer are trained; the tool's result and the user are not
    assert trained_text(tokenizer, examples[0]) == (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "paris"}}</tool_call><|im_end|>'
        "it is 20 in paris.<|im_end|>")
    summary = run_job(job("sft", tmp_path, model_folder, data, model={"chat_template": "chatml"},
                          data={"max_length": 1024}))
    assert summary["last_train"]["tokens"] == loss_tokens(tokenizer, examples)
    saved = json.loads((Path(summary["final"]) / "tokenizer_config.json").read_text()).get("chat_template") or \
        (Path(summary["final"]) / "chat_template.jinja").read_text()
    assert saved == tokenizer.chat_template  # outside tools format prompts the same way


def test_an_openai_dpo_job_file_trains_as_it_is(tmp_path, model_folder):
    from alignkit.methods import load_job

    body = {"model": "gpt-4o-mini-2024-07-18", "training_file": str(FORMATS / "openai_dpo.jsonl"),
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "batch_size": 3}}}}
    path = tmp_path / "job.json"
    path.write_text(json.dumps(body))
    job = load_job(None, path, [f"model.name_or_path={model_folder}", f"training.output_dir={tmp_path / 'run'}",
                                "training.max_steps=1", "training.progress=false", "training.tensorboard=false",
                                "data.validation_fraction=0", f"reference_cache_dir={tmp_path / 'cache'}"])
    summary = run_job(job)
    assert summary["steps"] == 1 and job.beta == 0.2
    report = Path(summary["run_dir"], "report.md").read_text()
    assert "read as an OpenAI fine-tuning job (method dpo)" in report
    assert "'gpt-4o-mini-2024-07-18' is hosted" in report
