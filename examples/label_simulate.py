"""Fill a feedback database with SIMULATED annotators, to try the admin page, `label stats` and exports.

No person is involved: each simulated annotator judges every pair by a hidden quality per candidate
(fixed by a hash of the candidate's text, plus ``--model-effect`` times the model's index, 0 by
default) and their own noise, rates what they see from that quality, and sometimes calls a tie or
"both bad". Nothing here measures a model: with the default the leaderboard can only find chance
differences; a non-zero ``--model-effect`` plants one, to see how many labels reveal it.

    python examples/label_simulate.py --tasks tasks.jsonl --db demo.sqlite --annotators 4 --overlap 0.5
    alignkit label serve --db demo.sqlite          # the admin link was printed by this script
    python examples/label_simulate.py --tasks tasks.jsonl --db demo.sqlite --screenshot docs/img/label_admin.png

``--screenshot`` serves the database on a free loopback port and saves the admin page with headless
Chromium (the `playwright` package and Debian's `chromium`, as in tests/test_label_browser.py).
"""
from __future__ import annotations

import argparse
import hashlib
import random
import sys
import threading
import time
from pathlib import Path

from alignkit.label.store import LabelStore
from alignkit.label.tasks import read_tasks


def hidden_quality(text: str, model: str, model_offsets: dict[str, float]) -> float:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") / 2 ** 32 + model_offsets.get(model, 0.0)


def simulate(store: LabelStore, annotators: int, noise: float, seed: int, model_effect: float = 0.0) -> int:
    rng = random.Random(seed)
    models = [row[0] for row in store.connection.execute("SELECT DISTINCT model FROM candidates ORDER BY model")]
    offsets = {model: model_effect * index for index, model in enumerate(models)}
    model_of = dict(store.connection.execute("SELECT text, model FROM candidates").fetchall())
    people = []
    for index in range(annotators):
        name = f"simulated-{index + 1}"
        existing = {a.name: a for a in store.annotators()}
        people.append(existing.get(name) or store.annotator_for_token(store.add_annotator(name)))
    labels = 0
    active = list(people)
    while active:
        for person in list(active):
            assignment = store.next_assignment(person)
            if assignment is None:
                active.remove(person)
                continue
            quality_a = hidden_quality(assignment.response_a, model_of[assignment.response_a], offsets)
            quality_b = hidden_quality(assignment.response_b, model_of[assignment.response_b], offsets)
            seen_a, seen_b = quality_a + rng.gauss(0, noise), quality_b + rng.gauss(0, noise)
            if max(seen_a, seen_b) < 0.2:
                choice = "both_bad"
            elif abs(seen_a - seen_b) < 0.05:
                choice = "tie"
            else:
                choice = "A" if seen_a > seen_b else "B"

            def score(seen: float) -> int:
                return max(1, min(5, round(1 + 4 * seen / (1 + model_effect * (len(models) - 1)))))

            ratings = {"helpfulness_a": score(seen_a), "helpfulness_b": score(seen_b)}
            if rng.random() < 0.5:
                ratings.update(harmlessness_a=min(5, score(seen_a) + 1), harmlessness_b=min(5, score(seen_b) + 1))
            store.submit(person, assignment.id, choice, ratings, reason="simulated", seconds=rng.uniform(5, 40))
            labels += 1
    return labels


def screenshot(store: LabelStore, path: Path) -> None:
    import uvicorn
    from playwright.sync_api import sync_playwright

    from alignkit.label.app import create_app

    admin_token = store.add_annotator("screenshot-admin", is_admin=True, rotate=True)
    server = uvicorn.Server(uvicorn.Config(create_app(store), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/login?token={admin_token}")
            page.goto(f"http://127.0.0.1:{port}/admin")
            path.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(path), full_page=True)
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", required=True, help="tasks file (from `alignkit label generate`)")
    parser.add_argument("--db", required=True)
    parser.add_argument("--annotators", type=int, default=4)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--noise", type=float, default=0.15, help="each judgement's noise on the hidden quality")
    parser.add_argument("--model-effect", type=float, default=0.0,
                        help="hidden quality added per model index (0: no model is better than another)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--screenshot", help="save the admin page here (PNG)")
    args = parser.parse_args()
    with LabelStore(args.db) as store:
        store.import_tasks(read_tasks(args.tasks), overlap=args.overlap)
        if not store.has_admin():
            print(f"admin link: http://127.0.0.1:8080/login?token={store.add_annotator('admin', is_admin=True)}")
        print(f"{simulate(store, args.annotators, args.noise, args.seed, args.model_effect)} simulated labels in {args.db}", file=sys.stderr)
        if args.screenshot:
            screenshot(store, Path(args.screenshot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
