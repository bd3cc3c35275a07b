"""Judgements -> training data that `alignkit rm`, `alignkit dpo` and `alignkit kto` read as they are.

Formats (one JSON object per line):

* ``dpo``: ``{"prompt", "chosen", "rejected"}`` plus bookkeeping keys (``item_id``, ``task_id``,
  ``chosen_model``, ``rejected_model``, ``votes``) that the trainers ignore. ``prompt`` is a string for a
  single user message, else the message list.
* ``rm``: the same rows plus ``margin`` when annotators rated both responses: the mean, over the labels
  of the item that rated both and over the rating scales rated for both, of ``rating(chosen) -
  rating(rejected)``, floored at 0 and times ``margin_scale``. `alignkit rm` subtracts it inside the
  Bradley-Terry sigmoid (a clearly better response must win by more). Without ratings, no margin key.
* ``kto``: unpaired ``{"prompt", "completion", "label"}`` (`alignkit kto`): the winner ``true``, the
  loser ``false``; an item judged "both bad" gives both responses ``false``.
* ``ratings``: one row per label and rated response: ``{"prompt", "completion", "model", "annotator",
  "helpfulness", "harmlessness", "choice", "item_id", "task_id"}`` (rows of ``prompt``/``completion`` are
  also readable as SFT data).

How several labels of one item become one verdict (``aggregate="majority"``, the default): the outcome
chosen by the most annotators wins; if two outcomes tie for the most votes the item is left out as
"split". With ``aggregate="each"`` every label is its own verdict (an item labelled by three
annotators gives up to three rows, so agreement weighs in through repetition).

Ties and "both bad" (the stated rule): neither says which response is better, so neither makes a
``dpo``/``rm`` pair; a "both bad" verdict gives two ``false`` rows in ``kto``; a tie gives nothing in
``kto``. `export` reports how many items each rule left out.
"""
from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from alignkit.data.write import write_jsonl
from alignkit.errors import UsageError
from alignkit.label.store import RATING_NAMES
from alignkit.label.tasks import prompt_value

FORMATS = ("dpo", "rm", "kto", "ratings")
AGGREGATES = ("majority", "each")


@dataclass
class ExportReport:
    """What an export wrote and what it left out, by rule."""

    format: str
    rows: int = 0
    items: int = 0
    labels: int = 0
    left_out: Counter = field(default_factory=Counter)
    with_margin: int = 0

    def summary(self) -> str:
        text = f"{self.rows} {self.format} rows from {self.labels} labels on {self.items} items"
        if self.with_margin:
            text += f" ({self.with_margin} with a margin from ratings)"
        if self.left_out:
            text += "; left out: " + ", ".join(f"{count} {reason}" for reason, count in sorted(self.left_out.items()))
        return text


def verdicts(judgements: list[dict], aggregate: str = "majority") -> tuple[list[tuple[str, list[dict]]], Counter]:
    """``[(outcome, the item's labels)]`` one per verdict, and the count of items left out as split."""
    if aggregate not in AGGREGATES:
        raise UsageError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    if aggregate == "each":
        return [(record["outcome"], [record]) for record in judgements], Counter()
    items: dict[int, list[dict]] = defaultdict(list)
    for record in judgements:
        items[record["item_id"]].append(record)
    out, left_out = [], Counter()
    for _, records in sorted(items.items()):  # item order = the tasks files' order
        ranked = Counter(r["outcome"] for r in records).most_common()
        if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
            left_out["split votes"] += 1
            continue
        out.append((ranked[0][0], records))
    return out, left_out


def rating_margin(records: list[dict], winner: str, loser: str) -> float | None:
    """Mean rating advantage of the winner over the loser across labels that rated both; None without ratings."""
    differences = []
    for record in records:
        per_scale = [record[f"{name}_{winner}"] - record[f"{name}_{loser}"] for name in RATING_NAMES
                     if record.get(f"{name}_{winner}") is not None and record.get(f"{name}_{loser}") is not None]
        if per_scale:
            differences.append(sum(per_scale) / len(per_scale))
    if not differences:
        return None
    return max(0.0, sum(differences) / len(differences))


def _base(records: list[dict]) -> dict[str, Any]:
    first = records[0]
    return {"prompt": prompt_value(first["prompt"]), "item_id": first["item_id"], "task_id": first["task_key"]}


def export_rows(judgements: list[dict], format: str, aggregate: str = "majority",
                margin_scale: float = 1.0) -> tuple[list[dict], ExportReport]:
    """Rows of ``format`` from `LabelStore.judgements()`, and a report of what was left out and why."""
    if format not in FORMATS:
        raise UsageError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")
    if margin_scale < 0:
        raise UsageError(f"margin_scale must be >= 0, got {margin_scale}")
    report = ExportReport(format=format, labels=len(judgements), items=len({r["item_id"] for r in judgements}))
    rows: list[dict] = []
    if format == "ratings":
        for record in judgements:
            for which in ("first", "second"):
                scores = {name: record.get(f"{name}_{which}") for name in RATING_NAMES}
                if all(value is None for value in scores.values()):
                    continue
                rows.append({"prompt": prompt_value(record["prompt"]), "completion": record[f"{which}_text"],
                             "model": record[f"{which}_model"], "annotator": record["annotator"], **scores,
                             "choice": _choice_for(record, which), "item_id": record["item_id"],
                             "task_id": record["task_key"]})
        report.rows = len(rows)
        return rows, report
    chosen_verdicts, left_out = verdicts(judgements, aggregate)
    report.left_out.update(left_out)
    for outcome, records in chosen_verdicts:
        first = records[0]
        votes = dict(Counter(r["outcome"] for r in records))
        if outcome in ("first", "second"):
            winner, loser = ("first", "second") if outcome == "first" else ("second", "first")
            if format == "kto":
                for which, label in ((winner, True), (loser, False)):
                    rows.append({**_base(records), "completion": first[f"{which}_text"], "label": label,
                                 "model": first[f"{which}_model"]})
                continue
            row = {**_base(records), "chosen": first[f"{winner}_text"], "rejected": first[f"{loser}_text"],
                   "chosen_model": first[f"{winner}_model"], "rejected_model": first[f"{loser}_model"], "votes": votes}
            if format == "rm":
                margin = rating_margin(records, winner, loser)
                if margin is not None:
                    row["margin"] = margin * margin_scale
                    report.with_margin += 1
            rows.append(row)
        elif outcome == "both_bad" and format == "kto":
            for which in ("first", "second"):
                rows.append({**_base(records), "completion": first[f"{which}_text"], "label": False,
                             "model": first[f"{which}_model"]})
        else:
            report.left_out["tie" if outcome == "tie" else "both bad"] += 1
    report.rows = len(rows)
    return rows, report


def _choice_for(record: dict, which: str) -> str:
    """What the label said about this response: ``preferred``, ``not preferred``, ``tie`` or ``both_bad``."""
    if record["outcome"] in ("tie", "both_bad"):
        return record["outcome"]
    return "preferred" if record["outcome"] == which else "not preferred"


def export(store, format: str, path: str | os.PathLike, aggregate: str = "majority",
           margin_scale: float = 1.0) -> ExportReport:
    """Write ``format`` rows from the database to ``path``; returns the report."""
    rows, report = export_rows(store.judgements(), format, aggregate=aggregate, margin_scale=margin_scale)
    write_jsonl(path, rows)
    return report
