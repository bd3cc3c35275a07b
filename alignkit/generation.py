"""Plain chat generation with `transformers.generate`: for the CLI, examples and evaluation.

Training-time sampling for GRPO/PPO (log-probs, groups, stop strings) lives in `alignkit.rollout`.
"""
from __future__ import annotations

import torch
from transformers import TextStreamer

from alignkit.data import tokenize_prompt
from alignkit.rollout.stops import stop_token_ids


def render_prompts(tokenizer, conversations: list[list[dict]]) -> list[list[int]]:
    """Token ids of each conversation followed by the assistant generation prompt."""

    return [tokenize_prompt(tokenizer, messages) for messages in conversations]


@torch.no_grad()
def generate_ids(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 batch_size: int = 16, streamer=None, finished: list | None = None) -> list[list[int]]:
    """Completion token ids for each prompt (batched, left-padded, KV cache), EOS and pad removed.

    ``finished`` (a list) receives, per prompt, whether the completion ended with a stop token (False:
    cut off at ``max_new_tokens``). ``streamer`` (transformers' streamer interface) sees the tokens
    as they come; it needs one prompt per call."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = stop_token_ids(tokenizer, model)
    was_training = model.training
    model.eval()
    outputs: list[list[int]] = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start:start + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(chunk):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention[row, width - len(ids):] = 1
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) if temperature > 0 \
            else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        if streamer is not None and len(chunk) != 1:
            raise ValueError("streaming generates one prompt at a time")
        generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                   max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                                   streamer=streamer, **sampling)
        for row in generated[:, width:].tolist():
            cut = next((i for i, token in enumerate(row) if token in eos), len(row))
            outputs.append(row[:cut])
            if finished is not None:
                finished.append(cut < len(row))
    if was_training:
        model.train()
    return outputs


def chat_generate(model, tokenizer, conversations: list[list[dict]], **settings) -> list[str]:
    """Generate one assistant reply per conversation; returns the decoded texts."""
    ids = generate_ids(model, tokenizer, render_prompts(tokenizer, conversations), **settings)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


def chat_generate_with_status(model, tokenizer, conversations: list[list[dict]],
                              **settings) -> list[tuple[str, bool]]:
    """Like `chat_generate`, with whether each reply finished (False: cut off at ``max_new_tokens``)."""
    finished: list[bool] = []
    ids = generate_ids(model, tokenizer, render_prompts(tokenizer, conversations), finished=finished, **settings)
    return [(tokenizer.decode(row, skip_special_tokens=True).strip(), done) for row, done in zip(ids, finished)]


def stream_chat(model, tokenizer, conversation: list[dict], write, **settings) -> tuple[str, bool]:
    """Generate one reply, handing each piece of decoded text to ``write`` as it is produced; returns
    ``(reply, finished)`` (finished False: cut off at ``max_new_tokens``)."""
    class _Writer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                write(text)

    finished: list[bool] = []
    streamer = _Writer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    ids = generate_ids(model, tokenizer, render_prompts(tokenizer, [conversation]), streamer=streamer,
                       finished=finished, batch_size=1, **settings)
    return tokenizer.decode(ids[0], skip_special_tokens=True).strip(), finished[0]
