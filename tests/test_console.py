"""A quieter, clearer console: streamed replies equal batched ones, cut-off replies are marked, library
noise users cannot act on is hidden (and only that), the step-0 evaluation says what it does, and
the flags that mean the same thing are named the same way."""
import warnings

import pytest
import torch

from alignkit.cli import build_parser, main
from alignkit.console import quiet_libraries
from alignkit.generation import chat_generate_with_status, stream_chat
from tests.helpers import make_tiny_model, make_tiny_tokenizer, save_tiny_model

CONVERSATION = [{"role": "user", "content": "what is the capital of france?"}]
# a token of the tiny vocabulary that is a whole word with its leading space (so streaming flushes per word)
WORD_ID = next(i for i in range(400) if (lambda text: text.startswith(" ") and text.strip().isalpha()
                                         and len(text) > 2)(make_tiny_tokenizer().decode([i])))
WORD = make_tiny_tokenizer().decode([WORD_ID]).strip()


def _scripted(model, tokenizer, end_after: int | None):
    """Make the tiny model say one word each step, and end its turn after ``end_after`` tokens."""
    word = WORD_ID
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    calls = {"n": 0}

    def hook(module, inputs, logits):
        calls["n"] += 1
        logits = logits.clone()
        logits[..., end if end_after is not None and calls["n"] > end_after else word] = 1e4
        return logits

    return model.lm_head.register_forward_hook(hook)


def test_streamed_reply_equals_the_batched_reply_and_comes_in_pieces():
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(tokenizer)
    pieces = []
    with torch.no_grad():
        handle = _scripted(model, tokenizer, end_after=None)
        try:
            streamed, done = stream_chat(model, tokenizer, CONVERSATION, pieces.append, max_new_tokens=6)
            [(batched, batched_done)] = chat_generate_with_status(model, tokenizer, [CONVERSATION], max_new_tokens=6)
        finally:
            handle.remove()
    assert streamed == batched == " ".join([WORD] * 6) and done is batched_done is False
    assert "".join(pieces).strip() == streamed and len(pieces) >= 5  # written word by word


def test_finished_and_cut_off_replies():
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(tokenizer)
    handle = _scripted(model, tokenizer, end_after=2)
    try:
        assert stream_chat(model, tokenizer, CONVERSATION, lambda piece: None, max_new_tokens=10) == (f"{WORD} {WORD}", True)
    finally:
        handle.remove()
    handle = _scripted(model, tokenizer, end_after=2)
    try:
        assert stream_chat(model, tokenizer, CONVERSATION, lambda piece: None, max_new_tokens=2) == (f"{WORD} {WORD}", False)
    finally:
        handle.remove()


def test_generate_command_streams_and_marks_a_cut_off_reply(tmp_path, capsys):
    save_tiny_model(tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hello", "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("> hello\n")
    assert captured.out.rstrip().endswith("[cut off: --max-new-tokens 3 reached]")
    assert "Loading weights" not in captured.err  # transformers' progress bar is hidden


def test_only_the_listed_library_warnings_are_hidden():
    quiet_libraries(verbose=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("something a user should read", FutureWarning)
    assert [str(w.message) for w in seen] == ["something a user should read"]


def test_step_zero_evaluation_says_what_it_does(tmp_path, capsys):
    from alignkit.data import ChatExample
    from alignkit.engine import Engine
    from alignkit.methods import build_job
    from alignkit.methods.sft import SFTRecipe

    rows = [ChatExample([{"role": "user", "content": q}, {"role": "assistant", "content": a}], f"m:{i}")
            for i, (q, a) in enumerate([("one", "two"), ("three", "four"), ("five", "six")])]
    job = build_job("sft", {"training": {"output_dir": str(tmp_path), "max_steps": 1, "eval_steps": 1,
                                         "progress": False, "tensorboard": False}})
    tokenizer = make_tiny_tokenizer()
    recipe = SFTRecipe(job, model=make_tiny_model(tokenizer), tokenizer=tokenizer, train=rows, validation=rows[:2])
    Engine(job.training, recipe, tmp_path).train()
    assert "[alignkit] step 0: evaluating the starting model on 2 validation examples" in capsys.readouterr().out


@pytest.mark.parametrize("command", [["best-of-n", "--data", "d", "--scorer", "judge"],
                                     ["constitution", "revise", "--data", "d", "--constitution", "c"],
                                     ["judge", "--mode", "pointwise", "--data", "d", "--judge-model", "m"]])
def test_output_flag_is_named_one_way(command):
    parser = build_parser()
    for flag in ("--output", "--out", "-o"):
        args, _ = parser.parse_known_args([*command, flag, "x.jsonl"])
        assert args.out == "x.jsonl"
    args, _ = parser.parse_known_args([*command, "-o", "x", "--columns", "prompt=question"])
    assert args.columns == ["prompt=question"]


def test_columns_flag_is_checked_the_same_way_everywhere(capsys):
    assert main(["data", "check", "--data", "x.jsonl", "--columns", "prompt"]) == 2
    assert "--columns 'prompt': expected OURS=THEIRS" in capsys.readouterr().err
