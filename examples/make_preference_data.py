"""Write the preference data of the reward-model and DPO examples (examples/rm_hh.yaml, dpo_hh.yaml).

    python examples/make_preference_data.py                 # HH-harmless when ../shared has it, else generated
    python examples/make_preference_data.py --generated     # always the generated set
    python examples/make_preference_data.py --hh path/to/hh-rlhf/train.jsonl --limit 800

Both outputs use Anthropic's HH dialogue shape, ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...",
"rejected": ...}`` (the prompt is the shared dialogue up to the last ``Assistant:``), and go to
``examples/data/hh_train.jsonl`` and ``examples/data/hh_valid.jsonl``.

* **HH-harmless** (``--hh FILE``; by default ``../shared/data/hh-harmless/train.jsonl`` when it
  exists): the first ``--limit`` pairs, the last 10% held out. The public data set is
  ``Anthropic/hh-rlhf`` (``harmless-base``) on the Hugging Face hub.
* **Generated** (no download needed): questions to "Acme Cloud" support (the topics and products of
  ``make_support_data.py``). The chosen reply is the house format (Summary / numbered Steps /
  "- Acme Support"); the rejected one is a curt brush-off, the same content run together without
  the format, or the right format for the *wrong product*, so a model must read the question to tell
  them apart. Some training rows are rankings (``prompt`` + ``responses``, best first) to show how
  rankings expand into pairs (``ranking_pairs: all | adjacent``). Held-out rows use (topic,
  product) combinations never seen in training.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED_HH = HERE.parent.parent / "shared" / "data" / "hh-harmless" / "train.jsonl"


def hh(question: str, answer: str) -> str:
    return f"\n\nHuman: {question}\n\nAssistant: {answer}"


def generated(seed: int = 0, held_out_combinations: int = 8) -> tuple[list[dict], list[dict]]:
    sys.path.insert(0, str(HERE))
    from make_support_data import PRODUCTS, TOPICS, answer_text

    rng = random.Random(seed)
    combos = [(topic, product) for topic in TOPICS for product in PRODUCTS]
    rng.shuffle(combos)
    held_out = set(combos[:held_out_combinations])
    train, validation = [], []
    for topic, product in sorted(combos):
        phrasings, summary, steps = TOPICS[topic]
        good = answer_text(summary.format(p=product), [s.format(p=product) for s in steps])
        other = rng.choice([p for p in PRODUCTS if p != product])
        wrong_product = answer_text(summary.format(p=other), [s.format(p=other) for s in steps])
        unformatted = " ".join([summary.format(p=product)] + [s.format(p=product) for s in steps])
        curt = rng.choice([f"Please check the {product} help pages.", "We cannot help with that here.",
                           f"Try again later with {product}.", "Contact your administrator."])
        for phrasing in phrasings:
            question = phrasing.format(p=product)
            bad = rng.choice([wrong_product, unformatted, curt])
            if (topic, product) in held_out:
                validation.append({"chosen": hh(question, good), "rejected": hh(question, bad)})
            elif rng.random() < 0.2:
                train.append({"prompt": question, "responses": [good, unformatted, curt]})
            else:
                train.append({"chosen": hh(question, good), "rejected": hh(question, bad)})
    rng.shuffle(train)
    return train, validation


def from_hh(path: Path, limit: int) -> tuple[list[dict], list[dict]]:
    rows = []
    with path.open() as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                rows.append({"chosen": row["chosen"], "rejected": row["rejected"]})
            if len(rows) == limit:
                break
    cut = max(1, len(rows) // 10)
    return rows[:-cut], rows[-cut:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(HERE / "data"))
    parser.add_argument("--generated", action="store_true", help="write the generated set even if HH is present")
    parser.add_argument("--hh", help=f"an HH-RLHF JSONL file (default: {SHARED_HH} when present)")
    parser.add_argument("--limit", type=int, default=800, help="HH pairs to take (train + held out)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    source = Path(args.hh) if args.hh else SHARED_HH
    if not args.generated and source.exists():
        train, validation = from_hh(source, args.limit)
        what = f"HH pairs from {source}"
    else:
        if args.hh:
            raise SystemExit(f"not found: {source}")
        train, validation = generated(args.seed)
        what = "generated support-reply preferences"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("hh_train.jsonl", train), ("hh_valid.jsonl", validation)):
        with (out / name).open("w") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(train)} training and {len(validation)} held-out rows ({what}) to {out}/")


if __name__ == "__main__":
    main()
