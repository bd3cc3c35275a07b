"""Batches: padding, length-bucketed batch order, and sequence packing.

Packing and attention (checked against transformers 5.23, ``masking_utils``):
``create_causal_mask`` calls ``find_packed_sequence_indices(position_ids)`` — which starts a new
sequence wherever ``position_ids`` does not increase by exactly 1 — *only when* ``attention_mask is
None`` **and** ``past_key_values is None``. A Llama model in its default configuration
(``config.use_cache=True``) creates a ``DynamicCache`` in ``forward`` even for a training step, and then
the packed-sequence detection is skipped: the packed sequences silently attend to each other. So:

* ``model(input_ids, position_ids=packed["position_ids"], attention_mask=None, use_cache=False)`` gives
  block-diagonal causal attention (sdpa and eager alike; ``tests/test_collate_prepare.py`` checks the
  logits equal the separate forwards'). Batch size 1, or several packed rows padded by `pad_batch`
  (padding gets positions 0, which start one-token "sequences" of their own).
* Without relying on that detection (other architectures, older versions, ``use_cache`` left on), pass
  `block_diagonal_attention_mask` (a 4D additive mask, which transformers uses as is) as
  ``attention_mask``.

Either way the rotary positions restart at 0 per sequence because ``position_ids`` are passed.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch


def _field(row: Any, name: str, default=None):
    if isinstance(row, dict):
        return row.get(name, default)
    return getattr(row, name, default)


def pad_batch(rows: Sequence[Any], pad_token_id: int, side: str = "right",
              pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Pad rows (`TokenizedRow`s or dicts with ``input_ids``, optional ``loss_mask`` and ``position_ids``)
    to one length. Returns ``input_ids`` (long), ``attention_mask`` (long, 1 on real tokens),
    ``loss_mask`` (bool, False on padding) and, when the rows carry them, ``position_ids`` (0 on padding).
    ``side="left"`` puts the padding in front (for generation)."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if not rows:
        raise ValueError("pad_batch needs at least one row")
    lengths = [len(_field(row, "input_ids")) for row in rows]
    width = max(lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    loss_mask = torch.zeros((batch, width), dtype=torch.bool)
    with_positions = all(_field(row, "position_ids") is not None for row in rows)
    position_ids = torch.zeros((batch, width), dtype=torch.long) if with_positions else None
    for i, (row, length) in enumerate(zip(rows, lengths)):
        if length == 0:
            continue
        where = slice(0, length) if side == "right" else slice(width - length, width)
        input_ids[i, where] = torch.as_tensor(list(_field(row, "input_ids")), dtype=torch.long)
        attention_mask[i, where] = 1
        mask = _field(row, "loss_mask")
        if mask is not None:
            loss_mask[i, where] = torch.as_tensor(list(mask), dtype=torch.bool)
        if position_ids is not None:
            position_ids[i, where] = torch.as_tensor(list(_field(row, "position_ids")), dtype=torch.long)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
    if position_ids is not None:
        out["position_ids"] = position_ids
    return out


def length_bucketed_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator | None = None,
                            shuffle: bool = True, mega_batches: int = 50) -> list[list[int]]:
    """Batches of indices whose rows have similar lengths (less padding), every index exactly once.

    With ``shuffle``: a random permutation (from ``generator``) is cut into mega-chunks of
    ``mega_batches * batch_size`` indices; each chunk is sorted by length (longest first) and cut into
    batches; then the order of all batches is shuffled. Randomness stays (which rows meet, which batch
    comes when) while each batch is nearly uniform in length. Without ``shuffle``: all indices sorted by
    length, longest first (evaluation). The last batch may be smaller.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    n = len(lengths)
    if n == 0:
        return []
    if not shuffle:
        order = sorted(range(n), key=lambda i: -lengths[i])
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    permutation = torch.randperm(n, generator=generator).tolist()
    chunk = max(1, mega_batches) * batch_size
    batches: list[list[int]] = []
    for begin in range(0, n, chunk):
        part = sorted(permutation[begin:begin + chunk], key=lambda i: -lengths[i])
        batches.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
    batch_order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in batch_order]


def pack_rows(rows: Sequence[Any], max_length: int) -> list[dict]:
    """Pack rows into sequences of at most ``max_length`` tokens (greedy first-fit, longest rows first).

    Each packed row has ``input_ids``, ``loss_mask``, ``position_ids`` (restarting at 0 for each
    sequence), ``sequence_lengths`` and ``sources``. The loss mask is cleared on the first token of each
    packed sequence: a token there has no predecessor in its own sequence, so predicting it from the
    previous sequence's last token must not count (an unpacked row never predicts its first token).
    A row longer than ``max_length`` raises ``ValueError`` (tokenize with ``max_length`` first; rows are
    never split silently). Deterministic.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    lengths = [len(_field(row, "input_ids")) for row in rows]
    for row, length in zip(rows, lengths):
        if length > max_length:
            source = _field(row, "source", "") or "a row"
            raise ValueError(f"{source}: {length} tokens do not fit max_length={max_length}; "
                             "truncate when tokenizing (tokenize_chat(..., max_length)) before packing")
    order = sorted((i for i in range(len(rows)) if lengths[i] > 0), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    space: list[int] = []
    for index in order:
        for b, free in enumerate(space):
            if lengths[index] <= free:
                bins[b].append(index)
                space[b] -= lengths[index]
                break
        else:
            bins.append([index])
            space.append(max_length - lengths[index])
    packed = []
    for members in bins:
        input_ids: list[int] = []
        loss_mask: list[bool] = []
        position_ids: list[int] = []
        for index in members:
            row = rows[index]
            ids = list(_field(row, "input_ids"))
            mask = _field(row, "loss_mask")
            mask = [bool(m) for m in mask] if mask is not None else [True] * len(ids)
            mask[0] = False
            input_ids += ids
            loss_mask += mask
            position_ids += range(len(ids))
        packed.append({
            "input_ids": input_ids, "loss_mask": loss_mask, "position_ids": position_ids,
            "sequence_lengths": [lengths[i] for i in members],
            "sources": [_field(rows[i], "source", "") for i in members],
        })
    return packed


def block_diagonal_attention_mask(sequence_lengths: Sequence[Sequence[int]], length: int | None = None,
                                  dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """A ``[batch, 1, length, length]`` additive mask: 0 where a token may attend (same sequence, not in
    the future), the dtype's minimum elsewhere. ``sequence_lengths[b]`` lists the packed sequences of
    row ``b``; positions past their sum (padding) attend only to themselves."""
    width = length if length is not None else max(sum(lengths) for lengths in sequence_lengths)
    minimum = torch.finfo(dtype).min
    mask = torch.full((len(sequence_lengths), 1, width, width), minimum, dtype=dtype, device=device)
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool, device=device))
    for b, lengths in enumerate(sequence_lengths):
        begin = 0
        for size in lengths:
            block = causal[:size, :size]
            mask[b, 0, begin:begin + size, begin:begin + size].masked_fill_(block, 0.0)
            begin += size
        for position in range(begin, width):
            mask[b, 0, position, position] = 0.0
    return mask
