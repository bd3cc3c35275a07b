"""Preference pairs from typed examples to model-ready batches.

    PreferenceExample ──tokenize_pairs──▶ TokenizedPair (two token rows sharing one prompt, response start)
                      ──collate_pairs──▶ one batch of 2B sequences: [chosen_0 .. chosen_B-1, rejected_0 .. rejected_B-1]

Both rows of a pair always condition on the *same* prompt tokens: when a pair is too long, the prompt
is cut from the left (to ``max_prompt_length``, or to ``max_length // 2`` when unset and the prompt
alone leaves no room), identically for both responses, and then each response is cut from the right.
Pairs that truncation spoils (a response cut to nothing, or both responses cut to the same tokens) are
dropped and counted in the `PairReport`.

`collate_pairs` lays the 2B sequences of B pairs out for one forward pass: padded rows, or each pair as
one segment ``prompt | chosen | rejected`` whose prompt is computed once for both responses, segments
packed into rows without padding. ``source_index``/``target_index``/``target_sequence`` say which hidden
state predicts which response token of which sequence (`alignkit.model.forward.response_logprob_sums`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Sequence

import torch

from alignkit.data.tokenize import list_sources, tokenize_prompt_response


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
        return text + list_sources(self.dropped_sources)


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
    report = PairReport()
    pairs: list[TokenizedPair] = []
    for example in examples:
        report.total += 1
        tools = getattr(example, "tools", None)
        prompt_c, chosen, _ = tokenize_prompt_response(tokenizer, example.prompt, example.chosen, None, tools=tools)
        prompt_r, rejected, _ = tokenize_prompt_response(tokenizer, example.prompt, example.rejected, None,
                                                         tools=tools)
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

def _segments(pairs: Sequence[TokenizedPair], share_prompt: bool):
    """Per pair: (shared prefix, [(sequence id, branch tokens, response start in branch)] x 2).

    Sequence ids: chosen of pair i is ``i``, rejected is ``B + i``. With ``share_prompt`` (and both
    rows having the same prompt tokens) the prompt is the shared prefix and the branches are the two
    responses; otherwise the prefix is empty and each branch is a whole sequence.
    """
    count = len(pairs)
    out = []
    for i, p in enumerate(pairs):
        prompt = p.chosen_ids[:p.chosen_start]
        if share_prompt and prompt == p.rejected_ids[:p.rejected_start]:
            out.append((prompt, [(i, p.chosen_ids[p.chosen_start:], 0),
                                 (count + i, p.rejected_ids[p.rejected_start:], 0)]))
        else:
            out.append(([], [(i, p.chosen_ids, p.chosen_start), (count + i, p.rejected_ids, p.rejected_start)]))
    return out


def collate_pairs(pairs: Sequence[TokenizedPair], pad_token_id: int, device=None,
                  padding_free: bool = False, share_prompt: bool = False) -> dict[str, torch.Tensor]:
    """One batch holding the ``2B`` sequences of ``B`` pairs (chosen ``0..B-1``, rejected ``B..2B-1``),
    for one forward pass.

    Layouts:

    * default: one right-padded row per sequence; ``attention_mask`` is ``[2B, T]``;
    * ``share_prompt``: a pair is one segment ``prompt | chosen response | rejected response``; the
      prompt is computed once and both responses attend to it (and to themselves), not to each other;
      both responses' positions continue from the prompt's. Every prompt token is processed once
      instead of twice, with the same log-probabilities;
    * ``padding_free``: segments (or sequences) are packed first-fit, longest first, into as few rows
      as possible, none longer than the longest segment: no compute on padding.

    With either option ``attention_mask`` is a 4D additive ``[rows, 1, T, T]`` mask encoding exactly
    who may attend to whom, and ``position_ids`` are given.

    Returns ``input_ids``, ``attention_mask``, ``position_ids`` (4D layouts), ``margin`` (``[B]``, 0
    where a pair has none), and the response tokens as flat indices into ``rows x T``:
    ``target_index`` (the token), ``source_index`` (the position whose hidden state predicts it:
    the previous token of its sequence, the prompt's last token for a response's first token) and
    ``target_sequence`` (its sequence id), ordered sequence by sequence; ``last_index`` (``[2B]``) is
    each sequence's last token (where a reward model reads its score), ``response_mask`` marks the
    target tokens.
    """
    count = len(pairs)
    segments = _segments(pairs, share_prompt)
    padded = not share_prompt and not padding_free
    # Units placed in rows: a whole segment, or (padded layout) each of its two sequences alone.
    units = [(prefix, [branches[side]]) for side in (0, 1) for prefix, branches in segments] if padded \
        else segments  # padded: row r holds sequence r
    sizes = [len(prefix) + sum(len(b[1]) for b in branches) for prefix, branches in units]
    width = max(sizes)
    if padding_free:
        rows_of: list[list[int]] = []
        space: list[int] = []
        for unit in sorted(range(len(units)), key=lambda u: (-sizes[u], u)):
            row = next((r for r, free in enumerate(space) if sizes[unit] <= free), None)
            if row is None:
                rows_of.append([])
                space.append(width)
                row = len(rows_of) - 1
            rows_of[row].append(unit)
            space[row] -= sizes[unit]
    else:
        rows_of = [[unit] for unit in range(len(units))]
    rows = len(rows_of)
    input_ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((rows, width), dtype=torch.long)
    group = torch.full((rows, width), -1, dtype=torch.long)      # which unit a token belongs to
    branch_of = torch.zeros((rows, width), dtype=torch.long)     # 0: shared prefix, 1/2: a branch
    targets: dict[int, list[tuple[int, int]]] = {}               # sequence -> [(target, source)]
    last_index = torch.zeros(2 * count, dtype=torch.long)
    for row, members in enumerate(rows_of):
        offset = 0
        for unit in members:
            prefix, branches = units[unit]
            base = row * width
            if prefix:
                input_ids[row, offset:offset + len(prefix)] = torch.as_tensor(prefix)
                position_ids[row, offset:offset + len(prefix)] = torch.arange(len(prefix))
                group[row, offset:offset + len(prefix)] = unit
            prefix_last = offset + len(prefix) - 1 if prefix else None
            cursor = offset + len(prefix)
            for number, (sequence, tokens, response_start) in enumerate(branches, start=1):
                n = len(tokens)
                input_ids[row, cursor:cursor + n] = torch.as_tensor(tokens)
                position_ids[row, cursor:cursor + n] = torch.arange(len(prefix), len(prefix) + n)
                group[row, cursor:cursor + n] = unit
                branch_of[row, cursor:cursor + n] = number
                pairs_of_sequence = targets.setdefault(sequence, [])
                for j in range(response_start, n):
                    source = cursor + j - 1 if j > 0 else prefix_last
                    if source is not None:
                        pairs_of_sequence.append((base + cursor + j, base + source))
                last_index[sequence] = base + cursor + n - 1
                cursor += n
            offset = cursor
    flat = [(target, source, sequence) for sequence in sorted(targets) for target, source in targets[sequence]]
    target_index = torch.tensor([t for t, _, _ in flat], dtype=torch.long)
    response_mask = torch.zeros(rows * width, dtype=torch.bool)
    response_mask[target_index] = True
    batch = {"input_ids": input_ids, "margin": torch.tensor([p.margin or 0.0 for p in pairs], dtype=torch.float32),
             "target_index": target_index, "source_index": torch.tensor([s for _, s, _ in flat], dtype=torch.long),
             "target_sequence": torch.tensor([q for _, _, q in flat], dtype=torch.long),
             "last_index": last_index, "response_mask": response_mask.view(rows, width)}
    if padded:
        batch["attention_mask"] = (group >= 0).long()
    else:
        causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
        same_unit = (group[:, :, None] == group[:, None, :]) & (group[:, None, :] >= 0)
        visible_branch = (branch_of[:, None, :] == 0) | (branch_of[:, None, :] == branch_of[:, :, None])
        allowed = same_unit & visible_branch & causal
        allowed |= torch.eye(width, dtype=torch.bool)            # padding attends to itself (no empty rows)
        mask = torch.zeros((rows, 1, width, width), dtype=torch.float32)
        mask.masked_fill_(~allowed[:, None], torch.finfo(torch.float32).min)
        batch["attention_mask"] = mask
        batch["position_ids"] = position_ids
    if device is not None:
        batch = {key: value.to(device) for key, value in batch.items()}
    return batch


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[2B, ...]`` -> (chosen ``[B, ...]``, rejected ``[B, ...]``)."""
    half = values.shape[0] // 2
    return values[:half], values[half:]
