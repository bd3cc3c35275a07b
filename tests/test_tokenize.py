"""Chat templates, loss masks (exactly each assistant turn + its end-of-turn marker), truncation."""
import pytest

from alignkit.data import (
    ChatExample,
    render_chat,
    render_fallback_template,
    tokenize_chat,
    tokenize_dataset,
    tokenize_prompt,
    tokenize_prompt_response,
)
from tests.helpers import CHATML, make_tiny_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy, please?"},
    {"role": "assistant", "content": "Rome, the city of seven hills!\n  Ok?"},
]


def masked_spans(tokenizer, row):
    """Decoded runs of consecutive loss tokens."""
    spans, current = [], []
    for token, in_loss in zip(row.input_ids, row.loss_mask):
        if in_loss:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    return spans


def word_level_tokenizer_without_im_end():
    """A tokenizer with no chat template and no <|im_end|> token: its EOS ends the fallback turns."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<pad>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the capital of france is paris"] * 5, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def test_mask_covers_exactly_each_assistant_turn_and_its_end_marker(tiny_tokenizer):
    row = tokenize_chat(tiny_tokenizer, CONVERSATION, max_length=None)
    assert masked_spans(tiny_tokenizer, row) == [
        "The capital of France is Paris.<|im_end|>", "Rome, the city of seven hills!\n  Ok?<|im_end|>"]
    assert tiny_tokenizer.decode(row.input_ids) == render_chat(tiny_tokenizer, CONVERSATION)
    assert not row.truncated and not row.completion_lost and len(row.loss_mask) == len(row.input_ids)


def test_train_on_all_and_last_assistant(tiny_tokenizer):
    row = tokenize_chat(tiny_tokenizer, CONVERSATION, None, train_on="all")
    assert all(row.loss_mask)
    row = tokenize_chat(tiny_tokenizer, CONVERSATION, None, train_on="last_assistant")
    assert masked_spans(tiny_tokenizer, row) == ["Rome, the city of seven hills!\n  Ok?<|im_end|>"]
    with pytest.raises(ValueError, match="train_on"):
        tokenize_chat(tiny_tokenizer, CONVERSATION, None, train_on="completion")


def test_fallback_template_for_tokenizer_without_chat_template():
    tokenizer = make_tiny_tokenizer(chat_template=None)
    assert tokenizer.chat_template is None
    messages = CONVERSATION[:3]
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                "<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>\n")
    assert render_chat(tokenizer, messages) == expected == render_fallback_template(messages)
    assert render_chat(tokenizer, messages[:2], add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    row = tokenize_chat(tokenizer, CONVERSATION, None)
    assert masked_spans(tokenizer, row) == [
        "The capital of France is Paris.<|im_end|>", "Rome, the city of seven hills!\n  Ok?<|im_end|>"]


def test_fallback_uses_eos_when_there_is_no_im_end_token():
    tokenizer = word_level_tokenizer_without_im_end()
    text = render_chat(tokenizer, CONVERSATION[1:3])
    assert text == ("<|im_start|>user\nWhat is the capital of France?</s>\n"
                    "<|im_start|>assistant\nThe capital of France is Paris.</s>\n")
    row = tokenize_chat(tokenizer, CONVERSATION[1:3], None)
    assert masked_spans(tokenizer, row) == ["The capital of France is Paris.</s>"]


def test_template_that_trims_content_still_masks_the_content():
    template = CHATML.replace("message['content']", "(message['content'] | trim)")
    tokenizer = make_tiny_tokenizer(chat_template=template)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  padded answer \n"}]
    row = tokenize_chat(tokenizer, messages, None)
    assert masked_spans(tokenizer, row) == ["padded answer<|im_end|>"]


def test_bos_is_added_once(tiny_tokenizer):
    from tokenizers import processors

    for template in (CHATML, "<s>" + CHATML):  # template without and with its own BOS
        tokenizer = make_tiny_tokenizer(chat_template=template)
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)])
        row = tokenize_chat(tokenizer, CONVERSATION, None)
        assert row.input_ids[0] == tokenizer.bos_token_id and row.input_ids[1] != tokenizer.bos_token_id
        assert row.input_ids.count(tokenizer.bos_token_id) == 1
        assert masked_spans(tokenizer, row)[0] == "The capital of France is Paris.<|im_end|>"
        prompt = tokenize_prompt(tokenizer, CONVERSATION[:2])
        assert prompt.count(tokenizer.bos_token_id) == 1


def test_truncation_keeps_the_start_and_flags_lost_completions(tiny_tokenizer):
    full = tokenize_chat(tiny_tokenizer, CONVERSATION, None)
    cut = tokenize_chat(tiny_tokenizer, CONVERSATION, max_length=len(full) - 5)
    assert cut.truncated and cut.input_ids == full.input_ids[:len(full) - 5]
    assert cut.loss_mask == full.loss_mask[:len(full) - 5] and not cut.completion_lost
    lost = tokenize_chat(tiny_tokenizer, CONVERSATION, max_length=10)
    assert lost.truncated and lost.completion_lost and len(lost.input_ids) == 10


def test_tokenize_dataset_report(tiny_tokenizer):
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    examples = [ChatExample(short, "d.jsonl:1"), ChatExample(CONVERSATION, "d.jsonl:2"),
                ChatExample(CONVERSATION[:3], "d.jsonl:3"), ChatExample(CONVERSATION, "d.jsonl:4")]
    length_first_answer = len(tokenize_chat(tiny_tokenizer, CONVERSATION[:3], None))
    rows, report = tokenize_dataset(tiny_tokenizer, examples, max_length=length_first_answer)
    assert (report.total, report.truncated, report.dropped_no_loss_tokens) == (4, 2, 0)
    rows, report = tokenize_dataset(tiny_tokenizer, examples, max_length=20)
    assert [row.source for row in rows] == ["d.jsonl:1"]
    assert (report.total, report.truncated, report.dropped_no_loss_tokens) == (4, 3, 3)
    assert report.dropped_sources == ["d.jsonl:2", "d.jsonl:3", "d.jsonl:4"]
    assert "3 dropped" in report.summary() and "d.jsonl:2" in report.summary()


def test_tokenize_prompt_ends_with_generation_prompt(tiny_tokenizer):
    ids = tokenize_prompt(tiny_tokenizer, CONVERSATION[:2])
    assert tiny_tokenizer.decode(ids) == render_chat(tiny_tokenizer, CONVERSATION[:2], add_generation_prompt=True)
    assert tiny_tokenizer.decode(ids).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_tokenize_prompt_response_and_its_truncation(tiny_tokenizer):
    prompt = CONVERSATION[:4]
    prompt_ids, response_ids, truncated = tokenize_prompt_response(tiny_tokenizer, prompt, "Rome.", max_length=None)
    assert not truncated
    assert prompt_ids == tokenize_prompt(tiny_tokenizer, prompt)
    assert tiny_tokenizer.decode(response_ids) == "Rome.<|im_end|>"

    long_response = "the cat " * 20
    _, full_response, _ = tokenize_prompt_response(tiny_tokenizer, prompt, long_response, None)
    p, r, truncated = tokenize_prompt_response(tiny_tokenizer, prompt, long_response, max_length=30,
                                               max_prompt_length=12)
    assert truncated and p == prompt_ids[-12:] and r == full_response[:18]
    p, r, truncated = tokenize_prompt_response(tiny_tokenizer, prompt, long_response,
                                               max_length=len(prompt_ids) + 5)
    assert truncated and p == prompt_ids and r == full_response[:5]  # prompt fits: only the response is cut
    p, r, truncated = tokenize_prompt_response(tiny_tokenizer, prompt, long_response, max_length=20)
    assert truncated and p == prompt_ids[-10:] and len(r) == 10  # prompt alone too long: cut to max_length // 2
