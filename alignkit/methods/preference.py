"""What the reward-model and DPO recipes share: preference pairs from files to padded batches.

    rows ──load_preference_data──▶ PreferenceExample (prompt messages, chosen, rejected, margin)
         ──tokenize_pairs──▶ TokenizedPair (two token rows sharing one prompt, response start)
         ──collate_pairs──▶ one batch of 2B rows: [chosen_0 .. chosen_B-1, rejected_0 .. rejected_B-1]

Chosen and rejected rows go through the model together, in one forward pass. Both rows of a pair
always condition on the *same* prompt tokens: when a pair is too long, the prompt is cut from the
left (to ``max_prompt_length``, or to ``max_length // 2`` when unset and the prompt alone leaves no
room), identically for both responses, and then each response is cut from the right.

Bad rows never pass silently. Rows the data layer rejects (chosen identical to rejected, an empty
response, no prompt, ...) raise their `DataError` or, with ``data.on_error: skip``, are skipped and
counted in the run notes. Pairs that truncation spoils (a response cut to nothing, or both responses
cut to the same tokens) are dropped and counted the same way.

`response_logprob_sums` runs the decoder once and applies the output layer only at the response
positions (never at prompt or padding tokens), chunk by chunk, so ``[rows, tokens, vocab]`` logits
never exist.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from pydantic import Field

from alignkit.config import Job


class PreferenceJob(Job):
    """Keys shared by the preference methods (``rm``, ``dpo``); not a method itself."""

    ALIASES = {"max_prompt_length": "data.max_prompt_length", "max_length": "data.max_length"}

    ranking_pairs: Literal["all", "adjacent"] = Field(
        "all", description="ranked rows (prompt + responses best first): every (better, worse) pair or adjacent ones")
    group_by_length: bool = Field(True, description="batch pairs of similar length together (less padding)")


# ----------------------------------------------------------------------------- model

def build_preference_policy(job: Job):
    """`build_policy`, except that a ``model.name_or_path`` that is itself a LoRA adapter folder (an SFT
    run's ``final``) has *that* adapter trained further instead of a second adapter stacked on top,
    the same as ``model.adapter: FOLDER``."""
    from alignkit.methods.base import build_policy
    from alignkit.models import resolve_model

    if (job.lora is not None and job.lora.enabled and job.model.adapter is None
            and resolve_model(job.model.name_or_path).kind == "adapter"):
        job = job.model_copy(update={"lora": None})
    return build_policy(job)


# ----------------------------------------------------------------------------- data

def load_preference_data(job: Job, ranking_pairs: str = "all"):
    """Training and validation `PreferenceExample`s and notes saying where every row went.

    Validation comes from ``data.validation`` or a seeded split of the training rows. The split is by
    *row*, so the pairs expanded from one ranking never end up on both sides.
    """
    from alignkit.data import deduplicate, load_examples, train_validation_split

    data = job.data
    if not data.train:
        raise ValueError("data.train is not set: give a file (jsonl/json/csv/parquet) or hf://name")
    common = dict(kind="preference", columns=data.columns or None, on_error=data.on_error,
                  system_prompt=data.system_prompt, format=None if data.format == "auto" else data.format,
                  ranking_pairs=ranking_pairs)
    train, report = load_examples(data.train, limit=data.limit, **common)
    notes = [f"train {report.summary()}"]
    if data.deduplicate != "none":
        train, removed = deduplicate(train, mode=data.deduplicate)
        notes.append(f"de-duplication ({data.deduplicate}): removed {removed} pairs")
    if data.validation:
        validation, vreport = load_examples(data.validation, **common)
        notes.append(f"validation {vreport.summary()}")
    elif data.validation_fraction > 0:
        sources = list(dict.fromkeys(example.source for example in train))
        if len(sources) >= 2:
            _, held_out = train_validation_split(sources, validation_fraction=data.validation_fraction,
                                                 seed=data.seed)
            held_out = set(held_out)
            validation = [example for example in train if example.source in held_out]
            train = [example for example in train if example.source not in held_out]
            notes.append(f"validation: {len(held_out)} rows ({len(validation)} pairs) split from train "
                         f"(seed {data.seed})")
        else:
            validation = []
    else:
        validation = []
    if not train:
        raise ValueError(f"{data.train}: no training pairs left after validation and filtering")
    return train, validation, notes


# ----------------------------------------------------------------------------- tokenization

@dataclass
class TokenizedPair:
    """Token rows of a pair. ``*_start`` is the index of the first response token in its row."""

    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_start: int
    rejected_start: int
    margin: float | None = None
    source: str = ""
    truncated: bool = False

    def __len__(self) -> int:
        return max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass
class PairReport:
    """What `tokenize_pairs` did; ``dropped`` pairs are listed by source."""

    total: int = 0
    truncated: int = 0
    dropped_empty_response: int = 0
    dropped_identical: int = 0
    dropped_sources: list[str] = field(default_factory=list)

    @property
    def dropped(self) -> int:
        return self.dropped_empty_response + self.dropped_identical

    def summary(self) -> str:
        text = (f"tokenized {self.total} pairs: {self.truncated} truncated, {self.dropped} dropped "
                f"({self.dropped_empty_response} with a response truncated away, "
                f"{self.dropped_identical} identical after truncation)")
        if self.dropped_sources:
            shown = ", ".join(self.dropped_sources[:5])
            more = f" and {len(self.dropped_sources) - 5} more" if len(self.dropped_sources) > 5 else ""
            text += f": {shown}{more}"
        return text


def truncate_pair(prompt_ids: list[int], responses: Sequence[list[int]], max_length: int | None,
                  max_prompt_length: int | None) -> tuple[list[int], list[list[int]], bool]:
    """Cut a prompt and its responses so every ``prompt + response`` fits ``max_length``.

    The prompt is cut from the left (the most recent turns stay) to ``max_prompt_length``; with
    ``max_prompt_length=None`` only when the prompt alone leaves no room, to ``max_length // 2``.
    Then each response is cut from the right. The prompt is cut the same way for every response.
    """
    longest = max(len(response) for response in responses)
    if max_length is None or len(prompt_ids) + longest <= max_length:
        return prompt_ids, [list(r) for r in responses], False
    limit = max_prompt_length
    if limit is None and len(prompt_ids) >= max_length:
        limit = max_length // 2
    if limit is not None and len(prompt_ids) > limit:
        prompt_ids = prompt_ids[len(prompt_ids) - limit:] if limit > 0 else []
    room = max(0, max_length - len(prompt_ids))
    return prompt_ids, [list(r[:room]) for r in responses], True


def tokenize_pairs(tokenizer, examples, max_length: int | None,
                   max_prompt_length: int | None = None) -> tuple[list[TokenizedPair], PairReport]:
    """`PreferenceExample`s -> `TokenizedPair`s (both responses with the end-of-turn marker)."""
    from alignkit.data import tokenize_prompt_response

    report = PairReport()
    pairs: list[TokenizedPair] = []
    for example in examples:
        report.total += 1
        prompt_c, chosen, _ = tokenize_prompt_response(tokenizer, example.prompt, example.chosen, None)
        prompt_r, rejected, _ = tokenize_prompt_response(tokenizer, example.prompt, example.rejected, None)
        prompt_ids = prompt_c if prompt_c == prompt_r else None
        if prompt_ids is not None:
            prompt_ids, (chosen, rejected), truncated = truncate_pair(
                prompt_c, [chosen, rejected], max_length, max_prompt_length)
            prompt_c = prompt_r = prompt_ids
        else:  # the template tokenized the shared prompt differently (rare): cut each side alone
            prompt_c, (chosen,), cut_c = truncate_pair(prompt_c, [chosen], max_length, max_prompt_length)
            prompt_r, (rejected,), cut_r = truncate_pair(prompt_r, [rejected], max_length, max_prompt_length)
            truncated = cut_c or cut_r
        report.truncated += truncated
        if not chosen or not rejected:
            report.dropped_empty_response += 1
            report.dropped_sources.append(example.source)
            continue
        if prompt_c + chosen == prompt_r + rejected:
            report.dropped_identical += 1
            report.dropped_sources.append(example.source)
            continue
        pairs.append(TokenizedPair(chosen_ids=prompt_c + chosen, rejected_ids=prompt_r + rejected,
                                   chosen_start=len(prompt_c), rejected_start=len(prompt_r),
                                   margin=example.margin, source=example.source, truncated=truncated))
    return pairs, report


def pairs_digest(pairs: Sequence[TokenizedPair]) -> str:
    """A hash of the token ids of every pair (covers data, template, tokenizer and max lengths)."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(json.dumps([pair.chosen_ids, pair.chosen_start, pair.rejected_ids,
                                  pair.rejected_start]).encode())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- batches

def collate_pairs(pairs: Sequence[TokenizedPair], pad_token_id: int, device=None,
                  padding_free: bool = False) -> dict[str, torch.Tensor]:
    """One batch of the ``2B`` sequences of ``B`` pairs: chosen ``0..B-1``, then rejected ``B..2B-1``.

    Returns ``input_ids``, ``attention_mask``, ``response_mask`` (bool: the response tokens, end-of-turn
    marker included), ``sequence_index`` (``[rows, T]``: which of the 2B sequences each token belongs
    to, -1 on padding) and ``margin`` (``[B]``, 0 where a pair has none).

    Padded (default): one right-padded row per sequence, ``attention_mask`` ``[2B, T]``.
    ``padding_free``: the sequences are packed first-fit (longest first) into as few rows as possible,
    each row no longer than the longest sequence; ``position_ids`` restart at 0 for every sequence and
    ``attention_mask`` is a 4D block-diagonal causal mask (``[rows, 1, T, T]``, additive), so packed
    sequences never see each other. Same results, no compute spent on padding.
    """
    sequences = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    starts = [p.chosen_start for p in pairs] + [p.rejected_start for p in pairs]
    width = max(len(row) for row in sequences)
    if padding_free:
        bins: list[list[int]] = []
        space: list[int] = []
        for index in sorted(range(len(sequences)), key=lambda i: (-len(sequences[i]), i)):
            size = len(sequences[index])
            target = next((b for b, free in enumerate(space) if size <= free), None)
            if target is None:
                bins.append([])
                space.append(width)
                target = len(bins) - 1
            bins[target].append(index)
            space[target] -= size
    else:
        bins = [[index] for index in range(len(sequences))]
    input_ids = torch.full((len(bins), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(bins), width), dtype=torch.long)
    response_mask = torch.zeros((len(bins), width), dtype=torch.bool)
    sequence_index = torch.full((len(bins), width), -1, dtype=torch.long)
    for row, members in enumerate(bins):
        offset = 0
        for index in members:
            tokens, size = sequences[index], len(sequences[index])
            where = slice(offset, offset + size)
            input_ids[row, where] = torch.as_tensor(tokens, dtype=torch.long)
            position_ids[row, where] = torch.arange(size)
            response_mask[row, offset + starts[index]:offset + size] = True
            sequence_index[row, where] = index
            offset += size
    batch = {"input_ids": input_ids, "response_mask": response_mask, "sequence_index": sequence_index,
             "margin": torch.tensor([p.margin or 0.0 for p in pairs], dtype=torch.float32)}
    if padding_free:
        from alignkit.data import block_diagonal_attention_mask

        lengths = [[len(sequences[i]) for i in members] for members in bins]
        batch["attention_mask"] = block_diagonal_attention_mask(lengths, width)
        batch["position_ids"] = position_ids
    else:
        batch["attention_mask"] = (sequence_index >= 0).long()
    if device is not None:
        batch = {key: value.to(device) for key, value in batch.items()}
    return batch


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[2B, ...]`` -> (chosen ``[B, ...]``, rejected ``[B, ...]``)."""
    half = values.shape[0] // 2
    return values[:half], values[half:]


def response_logprob_sums(model, batch: dict[str, torch.Tensor], chunk_size: int = 1024,
                          per_token: bool = False):
    """Sum of the response tokens' log-probabilities per sequence, and their count: ``([S], [S])``
    for the ``S`` sequences of a `collate_pairs` batch (padded or padding-free).

    The decoder runs once over all rows; the output layer is applied only at positions whose next
    token is a response token of the same sequence (``token_logprobs`` on the gathered hidden states,
    chunk by chunk), so prompt and padding positions cost no vocabulary projection at all. With
    ``per_token=True`` also returns the flat ``[N]`` log-probs, sequence by sequence (drift metrics).
    """
    from alignkit.logprobs import _logit_transform, _output_layer, decoder_hidden_states, token_logprobs

    input_ids, sequence_index = batch["input_ids"], batch["sequence_index"]
    mask_2d = batch["attention_mask"] if batch["attention_mask"].dim() == 2 else None
    attention = batch["attention_mask"]
    if attention.dim() == 4:  # additive float mask: in the model's dtype, as attention expects
        attention = attention.to(next(model.parameters()).dtype)
    hidden = decoder_hidden_states(model, input_ids, attention, batch.get("position_ids"))
    owner = sequence_index[:, 1:]
    targets_mask = batch["response_mask"][:, 1:] & (owner == sequence_index[:, :-1]) & (owner >= 0)
    if mask_2d is not None:
        targets_mask &= mask_2d[:, 1:].bool()
    owner = owner[targets_mask]                                  # [N] sequence of each target
    if per_token:  # sequence by sequence (a stable sort keeps each sequence's tokens in order)
        order = torch.sort(owner, stable=True).indices
    selected = hidden[:, :-1][targets_mask]                      # [N, H]
    targets = input_ids[:, 1:][targets_mask]                     # [N]
    head = _output_layer(model)
    scale, softcap = _logit_transform(model)
    logps = token_logprobs(selected, head.weight, targets, chunk_size=chunk_size, temperature=1.0 / scale,
                           bias=getattr(head, "bias", None), softcap=softcap)
    sequences = int(sequence_index.max()) + 1
    sums = torch.zeros(sequences, dtype=torch.float32, device=logps.device).index_add(0, owner, logps)
    counts = torch.zeros(sequences, dtype=torch.float32, device=logps.device).index_add(
        0, owner, torch.ones_like(logps))
    if per_token:
        return sums, counts, logps[order]
    return sums, counts
