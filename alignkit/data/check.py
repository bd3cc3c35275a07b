"""A job's data, read, validated and tokenized without the model: what ``alignkit data check`` prints
and what every training run does first (`prepare_job_data`), so that a bad row, a format the method
cannot use, or tool calls the chat template cannot render stop the run in seconds, before the model
is loaded and before a run folder exists.

``check_job_data(job, tokenizer)`` tokenizes exactly as the method's recipe will (same truncation,
same loss masks) and returns a `DataCheck`: rows read / kept / skipped with every error, examples per
split, truncated and dropped examples with their sources, loss tokens, and the token lengths for a
histogram. It needs only the tokenizer (`alignkit.model.load_tokenizer`), which loads in a second.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Sequence

from alignkit.data.mixing import load_training_data
from alignkit.data.pairs import tokenize_pairs
from alignkit.data.templates import apply_chat_template_setting
from alignkit.data.tokenize import check_tool_support, tokenize_dataset, tokenize_prompt
from alignkit.data.types import uses_tools
from alignkit.data.unpaired import tokenize_unpaired

KIND_NAMES = {"chat": "conversations (SFT)", "preference": "preference pairs", "unpaired": "unpaired feedback (KTO)",
              "prompt": "prompts (online RL)"}


@dataclass
class SplitCheck:
    """Tokenization of one split: examples in, kept, truncated, dropped (with sources), lengths."""

    examples: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_sources: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    loss_tokens: int = 0
    summary: str = ""


@dataclass
class DataCheck:
    kind: str
    notes: list[str]
    train: SplitCheck
    validation: SplitCheck
    template_note: str | None = None
    skipped: int = 0

    @property
    def problems(self) -> int:
        """Rows skipped while reading plus examples dropped by tokenization."""
        return self.skipped + self.train.dropped + self.validation.dropped


def data_kind(job) -> str:
    return getattr(type(job), "DATA_KIND", "chat")


def prepare_job_data(job, tokenizer=None, reports: list | None = None) -> tuple[list, list, list[str]]:
    """Read and validate a job's data (`load_training_data`) and, when a tokenizer is given, check that
    its chat template renders every tool call in it. Returns ``(train, validation, notes)``."""
    train, validation, notes = load_training_data(job.data, data_kind(job), getattr(job, "ranking_pairs", "all"),
                                                  reports=reports)
    if tokenizer is not None:
        for example in [*train, *validation]:
            messages = getattr(example, "messages", None) or getattr(example, "prompt", None)
            tools = getattr(example, "tools", None)
            if isinstance(messages, list) and uses_tools(messages, tools):
                check_tool_support(tokenizer, messages, tools, example.source)
    return train, validation, notes


def _split(kind: str, job, tokenizer, examples: Sequence, seed: int) -> SplitCheck:
    data = job.data
    result = SplitCheck(examples=len(examples))
    if not examples:
        return result
    if kind == "chat":
        train_on = "assistant" if getattr(job, "completion_only_loss", True) else "all"
        rows, report = tokenize_dataset(tokenizer, examples, data.max_length, train_on)
        result.kept, result.truncated = len(rows), report.truncated
        result.dropped, result.dropped_sources = report.dropped_no_loss_tokens, report.dropped_sources
        result.lengths = [len(row) for row in rows]
        result.loss_tokens = sum(row.num_loss_tokens for row in rows)
        result.summary = report.summary()
    elif kind in ("preference", "unpaired"):
        if kind == "preference":
            pairs, report = tokenize_pairs(tokenizer, examples, data.max_length, data.max_prompt_length)
            result.dropped = report.dropped
        else:
            if len(examples) < 2:
                return result
            pairs, _, report = tokenize_unpaired(tokenizer, examples, data.max_length, data.max_prompt_length,
                                                 seed=seed)
            result.dropped = report.dropped_empty_response
        result.kept, result.truncated, result.dropped_sources = len(pairs), report.truncated, report.dropped_sources
        result.lengths = [len(pair) for pair in pairs]
        result.loss_tokens = sum(len(p.chosen_ids) - p.chosen_start for p in pairs)
        result.summary = report.summary()
    else:  # prompts: the prompt is what is tokenized; completions are sampled later
        limit = job.prompt_token_limit() if hasattr(job, "prompt_token_limit") else data.max_prompt_length
        for example in examples:
            ids = tokenize_prompt(tokenizer, example.prompt)
            if limit and len(ids) > limit:
                result.truncated += 1
                ids = ids[-limit:]
            result.lengths.append(len(ids))
        result.kept = len(examples)
        result.summary = (f"tokenized {len(examples)} prompts: {result.truncated} cut from the left to {limit} "
                          "tokens" if limit else f"tokenized {len(examples)} prompts")
    return result


def check_job_data(job, tokenizer) -> DataCheck:
    """Everything about a job's data that can be known without the model (see the module docstring)."""
    template_note = apply_chat_template_setting(tokenizer, job.model.chat_template)
    reports: list = []
    train, validation, notes = prepare_job_data(job, tokenizer, reports)
    kind = data_kind(job)
    return DataCheck(kind=kind, notes=notes, template_note=template_note,
                     skipped=sum(report.skipped for report in reports),
                     train=_split(kind, job, tokenizer, train, job.data.seed),
                     validation=_split(kind, job, tokenizer, validation, job.data.seed + 1))


def histogram(lengths: Sequence[int], bins: int = 10, width: int = 40, upper: int | None = None) -> list[str]:
    """Text bars of a length histogram: ``bins`` equal-width bins from 0 to ``upper`` (default: the
    longest), each line ``"  lo-hi | ##### count"``."""
    if not lengths:
        return ["  (no examples)"]
    top = max(upper or 0, max(lengths))
    size = max(1, -(-(top + 1) // bins))
    counts = [0] * bins
    for length in lengths:
        counts[min(length // size, bins - 1)] += 1
    most = max(counts)
    digits = len(str(size * bins))
    lines = []
    for index, count in enumerate(counts):
        low, high = index * size, (index + 1) * size - 1
        bar = "#" * (round(width * count / most) if count else 0)
        lines.append(f"  {low:>{digits}}-{high:<{digits}} | {bar} {count}")
    return lines


def describe(check: DataCheck, job, tokenizer_name: str) -> list[str]:
    """The report `alignkit data check` prints."""
    lines = [f"data check: method {job.method}, {KIND_NAMES.get(check.kind, check.kind)}; "
             f"tokenizer of {tokenizer_name}; max_length {job.data.max_length}"]
    if check.template_note:
        lines.append(check.template_note)
    lines += check.notes
    for name, split in (("train", check.train), ("validation", check.validation)):
        if not split.examples:
            continue
        lines.append(f"{name}: {split.summary}")
        if split.lengths:
            ordered = sorted(split.lengths)
            p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
            lines.append(f"  tokens per example: min {ordered[0]}, median {statistics.median(ordered):g}, "
                         f"p95 {p95}, max {ordered[-1]}; trained tokens: {split.loss_tokens}")
    if check.train.lengths:
        lines.append("train length histogram (tokens):")
        lines += histogram(check.train.lengths, upper=job.data.max_length if check.kind != "prompt" else None)
    lines.append("ok: the data trains" if not check.problems else
                 f"{check.problems} rows or examples would be skipped or dropped (see above)")
    return lines
