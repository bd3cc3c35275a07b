"""Where a sampled completion ends: one rule for every sampler (``hf``, ``static``, plain chat).

A completion ends at its first *stop token* (EOS of the tokenizer or of the model's generation
config, or a chat end-of-turn marker the vocabulary knows), which is kept in the token mask, or at
the token that completes the first *stop string*, whichever comes first. Stop strings are matched on
the decoded text with special tokens visible; the text returned to reward functions is cut just
before the stop string, while the tokens that produced it stay in the mask (the model is trained on
having stopped). Sharing these functions is what makes switching rollout backends leave rewards and
masks unchanged.
"""
from __future__ import annotations

END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """EOS ids of the tokenizer and of ``model.generation_config``, plus known end-of-turn markers."""
    stops: set[int] = set()
    config = getattr(model, "generation_config", None) if model is not None else None
    for source in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
        if isinstance(source, int):
            stops.add(source)
        elif isinstance(source, (list, tuple)):
            stops.update(int(token) for token in source)
    vocabulary = tokenizer.get_vocab()
    for marker in END_OF_TURN_MARKERS:
        if marker in vocabulary:
            stops.add(vocabulary[marker])
    return sorted(stops)


def stop_string_end(tokenizer, tokens: list[int], stop_strings) -> int | None:
    """Smallest ``k`` such that the decoded ``tokens[:k]`` contains a stop string; None if none does.

    Containment only grows with ``k``, so a binary search needs O(log n) decodes.
    """
    if not stop_strings:
        return None

    def holds_stop(k: int) -> bool:
        text = tokenizer.decode(tokens[:k], skip_special_tokens=False)
        return any(stop in text for stop in stop_strings)

    if not tokens or not holds_stop(len(tokens)):
        return None
    low, high = 1, len(tokens)
    while low < high:
        middle = (low + high) // 2
        if holds_stop(middle):
            high = middle
        else:
            low = middle + 1
    return low


def cut_text_at_stop(text: str, stop_strings) -> str:
    """``text`` up to (not including) the earliest stop string in it."""
    cuts = [text.find(stop) for stop in stop_strings if stop in text]
    return text[:min(cuts)] if cuts else text


def cut_at_stop(tokenizer, tokens: list[int], eos_ids, stop_strings) -> tuple[list[int], bool, str]:
    """``(kept tokens, ended, text)`` for one sampled row.

    Kept tokens end with the first EOS (included) or with the token that completes the first stop
    string (included), whichever comes first; ``ended`` is False when neither happened (the row ran
    out of tokens). ``text`` is the decoded completion without special tokens, cut before the stop
    string.
    """
    eos = set(eos_ids)
    end = next((i for i, token in enumerate(tokens) if token in eos), None)
    body = list(tokens) if end is None else list(tokens[:end])      # the EOS token is not text
    stop_end = stop_string_end(tokenizer, body, stop_strings)
    if stop_end is not None:
        kept = body[:stop_end]
        return kept, True, cut_text_at_stop(tokenizer.decode(kept, skip_special_tokens=True), stop_strings)
    if end is None:
        return body, False, tokenizer.decode(body, skip_special_tokens=True)
    return list(tokens[:end + 1]), True, tokenizer.decode(body, skip_special_tokens=True)
