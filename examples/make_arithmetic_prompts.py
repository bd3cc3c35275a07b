"""Write a small verifiable task for GRPO: single-digit addition answered with a number.

    python examples/make_arithmetic_prompts.py            # -> examples/data/arithmetic_{train,test}.jsonl

Every pair (a, b) of digits 0-9 is asked in a few phrasings. The test file holds pairs that never
appear in training (a seeded 30% of the 100 pairs), so held-out accuracy measures a skill, not
memorised prompts. Rows look like {"prompt": "What is 3 + 5?", "answer": "8"}; the reward
`numeric_match` reads the answer from `answer`.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

PHRASINGS = [
    "What is {a} + {b}? Reply with just the number.",
    "Add {a} and {b}. Give only the result as a number.",
    "Compute {a} plus {b}. Answer with a single number.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "data"))
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pairs = [(a, b) for a in range(10) for b in range(10)]
    random.Random(args.seed).shuffle(pairs)
    cut = int(len(pairs) * args.test_fraction)
    splits = {"test": pairs[:cut], "train": pairs[cut:]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, chosen in splits.items():
        rows = [{"prompt": p.format(a=a, b=b), "answer": str(a + b)} for a, b in chosen for p in PHRASINGS]
        random.Random(args.seed + 1).shuffle(rows)
        path = out / f"arithmetic_{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} prompts to {path}")


if __name__ == "__main__":
    main()
