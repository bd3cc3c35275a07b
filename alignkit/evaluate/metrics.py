"""Named metrics for `alignkit eval`. Each takes a model, a tokenizer and data, returns a dict."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

METRICS: dict[str, Callable[..., dict[str, Any]]] = {}


def metric(name: str):
    def wrap(fn):
        METRICS[name] = fn
        return fn

    return wrap


@torch.no_grad()
def token_nll(model, tokenizer, rows, batch_size: int = 8) -> tuple[float, int, list[float]]:
    """Summed NLL over loss-masked tokens, their count, and the mean NLL of each row."""
    from alignkit.data import pad_batch
    from alignkit.logprobs import model_token_logprobs

    device = next(model.parameters()).device
    total, count, per_row = 0.0, 0, []
    model.eval()
    for start in range(0, len(rows), batch_size):
        batch = pad_batch(rows[start:start + batch_size], tokenizer.pad_token_id, side="right")
        batch = {k: v.to(device) for k, v in batch.items()}
        logps = model_token_logprobs(model, batch["input_ids"], batch["attention_mask"])
        mask = (batch["loss_mask"][:, 1:].bool() & batch["attention_mask"][:, 1:].bool()).float()
        row_nll = -(logps.float() * mask).sum(-1)
        row_count = mask.sum(-1)
        total += float(row_nll.sum())
        count += int(row_count.sum())
        per_row += (row_nll / row_count.clamp(min=1)).tolist()
    return total, count, per_row


@metric("perplexity")
def perplexity(model, tokenizer, data: str, max_length: int = 1024, batch_size: int = 8,
               limit: int | None = None, **_) -> dict[str, Any]:
    """Token-weighted perplexity exp(-1/N sum log p) over the assistant tokens of a chat data set."""
    from alignkit.data import load_examples, tokenize_dataset

    examples, report = load_examples(data, kind="chat", limit=limit)
    rows, treport = tokenize_dataset(tokenizer, examples, max_length, "assistant")
    total, count, per_row = token_nll(model, tokenizer, rows, batch_size)
    mean_nll = total / max(1, count)
    return {"perplexity": math.exp(min(mean_nll, 50.0)), "mean_log_likelihood": -mean_nll,
            "tokens": count, "rows": len(rows), "data": report.summary(), "tokenize": treport.summary()}


def run_metrics(model, tokenizer, names: list[str], **kwargs) -> dict[str, Any]:
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; available: {', '.join(sorted(METRICS))}")
    return {name: METRICS[name](model, tokenizer, **kwargs) for name in names}
