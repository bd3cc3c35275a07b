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

`collate_pairs` lays the 2B sequences of B pairs out for one forward pass: padded rows, or (DPO's
default) each pair as one segment ``prompt | chosen | rejected`` whose prompt is computed once for
both responses, segments packed into rows without padding. `response_logprob_sums` runs the decoder
once and applies the output layer only at the positions that predict a response token (never at
prompt or padding tokens), chunk by chunk, so ``[rows, tokens, vocab]`` logits never exist.
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
    from alignkit.model import resolve_model

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


def tied_pairs(chosen: torch.Tensor, rejected: torch.Tensor, relative_tie: float = 1e-6) -> torch.Tensor:
    """Pairs whose rewards are equal up to rounding: ``|r_c - r_r| <= relative_tie * max(1, max |r|)``."""
    if chosen.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    scale = max(1.0, float(torch.cat([chosen, rejected]).detach().abs().max()))
    return (chosen - rejected).detach().float().abs() <= relative_tie * scale


def preference_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Share of pairs whose reward favours the chosen response, a tie (`tied_pairs`) counting one half.

    At the start of DPO every implicit reward is 0 up to float rounding: this reads 50% (chance)
    instead of whatever the rounding gives.
    """
    if chosen.numel() == 0:
        return float("nan")
    tied = tied_pairs(chosen, rejected)
    wins = (chosen - rejected).detach() > 0
    return float((wins & ~tied).float().mean() + 0.5 * tied.float().mean())


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[2B, ...]`` -> (chosen ``[B, ...]``, rejected ``[B, ...]``)."""
    half = values.shape[0] // 2
    return values[:half], values[half:]


def response_logprob_sums(model, batch: dict[str, torch.Tensor], chunk_size: int = 1024,
                          per_token: bool = False):
    """Sum of the response tokens' log-probabilities per sequence, and their count: ``([2B], [2B])``
    for a `collate_pairs` batch (any layout).

    The decoder runs once over all rows; the output layer is applied only at the hidden states that
    predict a response token (``source_index``), chunk by chunk (``token_logprobs``), so prompt and
    padding positions cost no vocabulary projection at all. With ``per_token=True`` also returns the
    flat ``[N]`` log-probs, sequence by sequence (for drift metrics).
    """
    from alignkit.model.forward import decoder_hidden_states, head_logprobs

    input_ids = batch["input_ids"]
    hidden = decoder_hidden_states(model, input_ids, batch["attention_mask"], batch.get("position_ids"))
    selected = hidden.reshape(-1, hidden.shape[-1])[batch["source_index"]]   # [N, H]
    targets = input_ids.reshape(-1)[batch["target_index"]]                   # [N]
    owner = batch["target_sequence"]
    logps, _, _ = head_logprobs(model, selected, targets, chunk_size=chunk_size)
    sequences = 2 * batch["margin"].shape[0]
    sums = torch.zeros(sequences, dtype=torch.float32, device=logps.device).index_add(0, owner, logps)
    counts = torch.zeros(sequences, dtype=torch.float32, device=logps.device).index_add(
        0, owner, torch.ones_like(logps))
    if per_token:
        return sums, counts, logps
    return sums, counts
