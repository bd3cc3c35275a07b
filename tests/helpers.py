"""Builders for tiny models and tokenizers used across the test-suite.

The tokenizer is a real `tokenizers` BPE-less word-level tokenizer with a ChatML chat template, so
chat templating, masking and generation run the same code paths as with a hub tokenizer.
"""
from __future__ import annotations

import torch

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

WORDS = (
    "the a an is are was be to of and in on for with that this it as at by from or not yes no "
    "what who when where why how which answer question please thanks hello hi good bad great "
    "cat dog bird fish red green blue one two three four five six seven eight nine ten zero "
    "plus minus times equals sum total result final apple banana cherry grape lemon mango "
    "paris london rome berlin madrid capital city country france england italy germany spain "
    "acme support ticket refund order shipping policy days customer reply sorry help contact "
    "system user assistant tool json format ok done sure okay maybe never always"
).split()


def make_tiny_tokenizer(chat_template: str | None = CHATML, vocab_size: int = 400):
    """A byte-level BPE tokenizer trained in milliseconds on a small corpus.

    Byte-level, so any text round-trips exactly through encode/decode (decoded masked spans can be
    compared with the original strings), and unknown words still tokenize (as bytes).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    corpus = [" ".join(WORDS[i:i + 12]) for i in range(0, len(WORDS), 3)] * 4
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
        eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def make_tiny_model(tokenizer, hidden_size: int = 32, layers: int = 2, seed: int = 0,
                    tie_word_embeddings: bool = False):
    """A random Llama with a few layers whose vocabulary matches `tokenizer` (its output layer tied to the
    input embeddings when asked, as in SmolLM2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def save_tiny_model(folder, tie_word_embeddings: bool = False):
    """A tiny random model and its tokenizer saved as a model folder (what `from_pretrained` reads)."""
    tokenizer = make_tiny_tokenizer()
    make_tiny_model(tokenizer, tie_word_embeddings=tie_word_embeddings).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
