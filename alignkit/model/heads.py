"""Scalar heads on a causal-LM backbone: reward models and PPO critics.

    h_t = decoder(x)_t            (last hidden state, no lm_head, no vocabulary logits)
    v_t = w^T h_t + b             (one number per position)

A reward model reads ``v`` at the last non-padding token of each sequence (left or right padding
both handled); a critic reads it at every response position. The backbone may carry LoRA
adapters; the head is always trained. Saved as ``head.safetensors`` + ``head.json`` beside the
backbone (full weights or adapter), so ``load_scalar_model(path)`` restores either kind.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from alignkit.data.pairs import collate_pairs, split_pairs, tokenize_pairs
from alignkit.data.tokenize import tokenize_prompt_response
from alignkit.model.forward import decoder_hidden_states
from alignkit.model.load import load_model_and_tokenizer
from alignkit.model.peft import save_model, unwrap

HEAD_FILE = "head.safetensors"
HEAD_CONFIG = "head.json"
SCORING_KEYS = ("max_length", "max_prompt_length")  # the training cut, kept in head.json
DEFAULT_SCORING_LENGTH = 1024


class ScalarHeadModel(torch.nn.Module):
    def __init__(self, backbone, hidden_size: int | None = None, kind: str = "reward"):
        super().__init__()
        self.backbone = backbone
        config = getattr(backbone, "config", None)
        hidden_size = hidden_size or getattr(config, "hidden_size", None)
        if hidden_size is None:
            raise ValueError("cannot tell the backbone's hidden size; pass hidden_size=")
        parameter = next(backbone.parameters())
        self.head = torch.nn.Linear(hidden_size, 1, device=parameter.device, dtype=torch.float32)
        torch.nn.init.normal_(self.head.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        torch.nn.init.zeros_(self.head.bias)
        self.kind = kind
        # How texts were cut when this model was trained ({"max_length": ..., "max_prompt_length": ...});
        # saved in head.json so that scoring cuts them the same way (`score_responses`).
        self.scoring: dict = {}
        freeze_unused_output_layer(backbone)

    @property
    def config(self):
        return self.backbone.config

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One scalar per position, ``[B, T]`` float32."""
        hidden = decoder_hidden_states(self.backbone, input_ids, attention_mask, position_ids)
        return self.head(hidden.float()).squeeze(-1)

    def forward(self, input_ids, attention_mask=None):
        return self.sequence_scores(input_ids, attention_mask)

    def sequence_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The value at the last non-padding token of each row, ``[B]``."""
        values = self.values(input_ids, attention_mask)
        return values.gather(1, last_token_index(attention_mask, input_ids.shape[1], values.device)[:, None]).squeeze(1)

    def save(self, directory: str | Path, tokenizer=None) -> Path:
        directory = Path(directory)
        save_model(self.backbone, tokenizer, directory)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()},
                  str(directory / HEAD_FILE))
        meta = {"kind": self.kind, "hidden_size": self.head.in_features}
        meta.update({k: v for k, v in getattr(self, "scoring", {}).items() if v is not None})
        (directory / HEAD_CONFIG).write_text(json.dumps(meta))
        return directory


def freeze_unused_output_layer(backbone) -> None:
    """A scalar model never applies the backbone's output layer (``lm_head``): stop training it, unless it
    is tied to the input embeddings (then it is the embedding and trains as one). A weight that gets no
    gradient would otherwise make data-parallel training (DDP) wait for it, and checkpoints carry it."""
    base = unwrap(backbone)
    output = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    embeddings = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    if output is None or (embeddings is not None and output.weight is embeddings.weight):
        return
    for parameter in output.parameters():
        parameter.requires_grad_(False)


def last_token_index(attention_mask: torch.Tensor | None, length: int, device) -> torch.Tensor:
    """Index of the last real token per row: right padding -> sum(mask) - 1; left padding -> T - 1."""
    if attention_mask is None:
        return torch.full((1,), length - 1, device=device, dtype=torch.long)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(dim=1).to(device)


def is_scalar_model(path: str | Path) -> bool:
    return (Path(path) / HEAD_CONFIG).exists()


def load_scalar_model(path: str | Path, device=None, dtype=None, is_trainable: bool = False):
    """Load a saved reward model or critic: returns (ScalarHeadModel, tokenizer)."""
    path = Path(path)
    if not is_scalar_model(path):
        raise FileNotFoundError(f"{path} is not a reward model folder (no {HEAD_CONFIG}); train one with `alignkit rm`")
    meta = json.loads((path / HEAD_CONFIG).read_text())
    backbone, tokenizer = load_model_and_tokenizer(str(path), device=device, dtype=dtype, is_trainable=is_trainable)
    model = ScalarHeadModel(backbone, hidden_size=meta["hidden_size"], kind=meta.get("kind", "reward"))
    state = load_file(str(path / HEAD_FILE))
    model.head.load_state_dict({k: v.to(model.head.weight.device) for k, v in state.items()})
    model.scoring = {k: int(meta[k]) for k in SCORING_KEYS if meta.get(k) is not None}
    if not is_trainable:
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
    return model, tokenizer


# ----------------------------------------------------------------------------- scoring pairs

def pair_scores(model, batch) -> torch.Tensor:
    """The reward of each of the 2B sequences of a `collate_pairs` batch, read at its last token."""
    attention = batch["attention_mask"]
    if attention.dim() == 2:
        return model.sequence_scores(batch["input_ids"], attention)
    values = model.values(batch["input_ids"], attention.to(next(model.parameters()).dtype), batch["position_ids"])
    return values.reshape(-1)[batch["last_index"]]


def as_reward_model(model, candidates=()):
    """A `ScalarHeadModel` from ``model`` itself, or loaded from the first of ``candidates`` (paths or
    names, e.g. the folder the CLI loaded ``model`` from) that is a reward-model folder.

    `alignkit eval` loads ``--model`` as a causal LM; a reward model's folder also holds
    ``head.json`` + ``head.safetensors``, so the head is found through the model's path.
    """
    if isinstance(model, ScalarHeadModel):
        return model
    seen = []
    for candidate in [*candidates, getattr(model, "name_or_path", None),
                      getattr(getattr(model, "config", None), "_name_or_path", None)]:
        if not candidate or not isinstance(candidate, str):
            continue
        path = candidate.split("+", 1)[0]
        seen.append(path)
        if is_scalar_model(path):
            device = next(model.parameters()).device
            dtype = next(model.parameters()).dtype
            return load_scalar_model(path, device=device, dtype=dtype)[0]
    raise ValueError(f"this metric needs a reward model (a folder written by `alignkit rm`, with head.json); "
                     f"none found at {', '.join(dict.fromkeys(seen)) or 'the given model'}")


@torch.no_grad()
def score_examples(model, tokenizer, examples, max_length: int | None = 1024, batch_size: int = 8,
                   max_prompt_length: int | None = None):
    """Rewards of preference examples: ``(chosen [P], rejected [P], pairs kept, PairReport)``."""
    pairs, report = tokenize_pairs(tokenizer, examples, max_length, max_prompt_length)
    device = next(model.parameters()).device
    chosen_all, rejected_all = [], []
    model.eval()
    for start in range(0, len(pairs), max(1, batch_size)):
        batch = collate_pairs(pairs[start:start + batch_size], tokenizer.pad_token_id, device,
                              padding_free=True, share_prompt=True)
        chosen, rejected = split_pairs(pair_scores(model, batch))
        chosen_all.append(chosen.float().cpu())
        rejected_all.append(rejected.float().cpu())
    if not pairs:
        return torch.zeros(0), torch.zeros(0), pairs, report
    return torch.cat(chosen_all), torch.cat(rejected_all), pairs, report


@torch.no_grad()
def score_responses(model, tokenizer, items: Sequence[tuple[list[dict], str]], batch_size: int = 8,
                    max_length: int | None = None, max_prompt_length: int | None = None) -> list[float]:
    """The reward of each ``(prompt messages, response)``: the head's value at the last token of the
    conversation ``prompt + [assistant: response]`` in the reward model's chat template.

    The one way alignkit scores text with a reward model (`alignkit score`, the ``reward_model`` reward,
    best-of-N, the reward-model judge, ``/v1/score``). Too-long conversations lose prompt tokens from the
    left first (to ``max_prompt_length``, default ``max_length // 2``), so the response is always
    scored; an empty response is scored as one space. Rows are batched by length, right-padded.
    A length left ``None`` is the one the model was trained with (``head.json``, written by
    `alignkit rm`), else 1024 and half of it: a reward model trained on pairs cut to 256 tokens then
    scores conversations cut the same way, not ones it never saw.
    """
    trained = getattr(model, "scoring", {}) or {}
    if max_length is None:
        max_length = trained.get("max_length", DEFAULT_SCORING_LENGTH)
    if max_prompt_length is None:
        max_prompt_length = trained.get("max_prompt_length")
    limit = max_prompt_length if max_prompt_length is not None else max(1, max_length // 2)
    rows = []
    for prompt, response in items:
        prompt_ids, response_ids, _ = tokenize_prompt_response(tokenizer, list(prompt), str(response or "") or " ",
                                                               max_length, limit)
        rows.append(prompt_ids + response_ids)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    scores = [0.0] * len(rows)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(order), max(1, batch_size)):
        chunk = order[start:start + batch_size]
        width = max(len(rows[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, i in enumerate(chunk):
            ids[j, :len(rows[i])] = torch.tensor(rows[i])
            mask[j, :len(rows[i])] = 1
        values = model.sequence_scores(ids.to(device), mask.to(device)).float().cpu().tolist()
        for i, value in zip(chunk, values):
            scores[i] = value
    return scores
