"""Unpaired feedback (KTO) from typed examples to model-ready batches.

    UnpairedExample ──tokenize_unpaired──▶ TokenizedPair(prompt | completion, prompt | mismatched completion)
                    ──alignkit.data.pairs.collate_pairs──▶ batches (the KL rows in the "rejected" half)

KTO needs, besides each example's own response, the log-prob of *another* example's response under
this example's prompt: the mismatched pairs estimate the reference point z_0 (see
`alignkit.losses.kto_loss`). Each example is therefore laid out as a pair sharing its prompt: the
"chosen" row is ``prompt | completion`` and the "rejected" row ``prompt | mismatched completion``, so
the pair batches of DPO (one forward, the prompt computed once for both rows, packed without
padding) and DPO's cache of reference log-probs serve KTO unchanged.

The mismatch is fixed per data set, not drawn per batch: example ``order[k]`` gets the completion of
example ``order[k + 1]`` (cyclically) for a permutation ``order`` seeded by ``seed``, so every
response is used once as a mismatched completion and the reference log-probs of the mismatched
pairs can be computed once and cached (TRL rotates the completions of each batch by one instead).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

from alignkit.data.errors import DataError
from alignkit.data.pairs import TokenizedPair, truncate_pair
from alignkit.data.tokenize import tokenize_prompt_response
from alignkit.data.types import UnpairedExample


@dataclass
class UnpairedReport:
    """What `tokenize_unpaired` did: examples seen, desirable/undesirable counts, truncations, drops."""

    total: int = 0
    desirable: int = 0
    undesirable: int = 0
    truncated: int = 0
    dropped_empty_response: int = 0
    dropped_sources: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (f"tokenized {self.total} examples ({self.desirable} desirable, {self.undesirable} undesirable): "
                f"{self.truncated} truncated, {self.dropped_empty_response} dropped with the response truncated away")
        if self.dropped_sources:
            shown = ", ".join(self.dropped_sources[:5])
            more = f" and {len(self.dropped_sources) - 5} more" if len(self.dropped_sources) > 5 else ""
            text += f": {shown}{more}"
        return text


def mismatch_order(count: int, seed: int) -> list[int]:
    """``partner[i]``: the example whose completion is paired with example ``i``'s prompt; a
    derangement for ``count >= 2`` (nobody gets their own completion), a pure function of ``seed``."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    partner = [0] * count
    for k, index in enumerate(order):
        partner[index] = order[(k + 1) % count]
    return partner


def tokenize_unpaired(tokenizer, examples: Sequence[UnpairedExample], max_length: int | None,
                      max_prompt_length: int | None = None,
                      seed: int = 0) -> tuple[list[TokenizedPair], list[bool], UnpairedReport]:
    """`UnpairedExample`s -> ``(pairs, labels, report)``: one `TokenizedPair` per kept example (its
    completion as ``chosen``, the mismatched completion as ``rejected``) and its label. Both rows are
    truncated like a preference pair (the prompt from the left first, then each response)."""
    examples = list(examples)
    if len(examples) == 1:
        raise DataError("KTO needs at least 2 examples: the reference point is estimated from one example's "
                         "prompt with another example's response")
    partner = mismatch_order(len(examples), seed)
    report = UnpairedReport()
    pairs: list[TokenizedPair] = []
    labels: list[bool] = []
    for index, example in enumerate(examples):
        report.total += 1
        other = examples[partner[index]]
        tools = example.tools
        prompt, completion, _ = tokenize_prompt_response(tokenizer, example.prompt, example.completion, None,
                                                         tools=tools)
        prompt_kl, mismatched, _ = tokenize_prompt_response(tokenizer, example.prompt, other.completion, None,
                                                            tools=tools)
        if prompt_kl != prompt:  # the template tokenized the shared prompt differently (rare): cut each alone
            prompt, (completion,), cut = truncate_pair(prompt, [completion], max_length, max_prompt_length)
            prompt_kl, (mismatched,), cut_kl = truncate_pair(prompt_kl, [mismatched], max_length, max_prompt_length)
            truncated = cut or cut_kl
        else:
            prompt, (completion, mismatched), truncated = truncate_pair(prompt, [completion, mismatched],
                                                                        max_length, max_prompt_length)
            prompt_kl = prompt
        report.truncated += truncated
        if not completion or not mismatched:
            report.dropped_empty_response += 1
            report.dropped_sources.append(example.source)
            continue
        pairs.append(TokenizedPair(chosen_ids=prompt + completion, rejected_ids=prompt_kl + mismatched,
                                   chosen_start=len(prompt), rejected_start=len(prompt_kl),
                                   source=example.source, truncated=truncated))
        labels.append(bool(example.label))
        report.desirable += bool(example.label)
        report.undesirable += not example.label
    return pairs, labels, report
