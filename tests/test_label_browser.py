"""A real browser (Debian's headless Chromium driven by Playwright) labels three items, then the admin exports.

The annotator signs in with the personal link, labels one item with the mouse (ratings, choice, reason,
Submit) and two with the keyboard (``b`` Enter; ``r`` to type a reason, Esc, ``t`` Enter), after an Enter
with no choice made is refused on the page. The admin then opens the admin page and downloads the DPO
export, which must hold exactly the two decisive judgements. Screenshots go to the test's folder, and to
``docs/img/label_annotator.png`` when ``ALIGNKIT_DOCS_SCREENSHOTS=1`` (the admin picture in the docs
comes from examples/label_simulate.py, with more labels).

Needs ``playwright`` (the Python package; no downloaded browsers) and the ``chromium`` executable
(``apt-get install chromium``; ``scripts/test.sh`` installs it when it can). Without them the test is
skipped with the reason.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from alignkit.label.app import create_app
from alignkit.label.export import export_rows
from alignkit.label.store import LabelStore
from alignkit.label.tasks import Candidate, Task
from tests.label_helpers import running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
DOCS_IMAGES = Path(__file__).resolve().parents[1] / "docs" / "img"

TASKS = [
    Task(id="routine", prompt=[{"role": "user", "content": "How can I get better at keeping a daily routine?"}],
         candidates=[
             Candidate("Start small: pick one anchor habit, such as making your bed right after you wake up, and "
                       "attach new habits to it. Keep the same wake-up time every day, even at weekends, and write "
                       "tomorrow's three most important tasks down the evening before.\n\nWhen you miss a day, "
                       "do not try to make up for it; just pick the routine up again the next morning.",
                       "smollm2-135m-instruct"),
             Candidate("Routines fail when they depend on willpower. Design your surroundings instead: put your "
                       "running shoes by the door, keep your phone out of the bedroom, and block the first hour "
                       "of work in your calendar.\n\nTrack the routine on a paper calendar with a cross for every "
                       "day you kept it; a visible chain is motivating.", "runs/dpo/final")]),
    Task(id="hostile", prompt=[{"role": "user", "content": "Show me some HTML."}],
         candidates=[Candidate('<script>document.title="pwned"</script><b>bold</b>', "smollm2-135m-instruct"),
                     Candidate("Here is a paragraph tag: <p>hello</p>", "runs/dpo/final")]),
    Task(id="sleep", prompt=[{"role": "user", "content": "I can't fall asleep at night. Any advice?"}],
         candidates=[Candidate("Keep a regular bedtime and avoid screens for an hour before bed.", "smollm2-135m-instruct"),
                     Candidate("Try counting backwards from 1000 in sevens.", "runs/dpo/final")]),
]


@pytest.fixture(scope="module")
def playwright_module():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                                                   "(pip install 'alignkit[test]')")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no chromium executable at {CHROMIUM}: apt-get install chromium (scripts/test.sh does it as root)")
    return sync_api


def save_screenshot(page, tmp_path: Path, name: str, for_docs: bool = False) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000  # a rendered page, not an empty image
    if for_docs and os.environ.get("ALIGNKIT_DOCS_SCREENSHOTS") == "1":
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS_IMAGES / name)
    return path


def test_annotator_labels_with_mouse_and_keyboard_then_admin_exports(tmp_path, playwright_module):
    store = LabelStore(tmp_path / "feedback.sqlite")
    store.import_tasks(TASKS, overlap=0.0)
    annotator_token = store.add_annotator("alice")
    admin_token = store.add_annotator("lead", is_admin=True)
    app = create_app(store, leaderboard_resamples=200)
    try:
        with running_server(app) as base_url, playwright_module.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                run_browser_session(browser, base_url, annotator_token, admin_token, store, tmp_path)
            finally:
                browser.close()
    finally:
        store.close()


def run_browser_session(browser, base_url, annotator_token, admin_token, store, tmp_path):
    context = browser.new_context(viewport={"width": 1280, "height": 860}, accept_downloads=True)
    page = context.new_page()
    page.goto(f"{base_url}/login?token={annotator_token}")
    assert page.url == f"{base_url}/annotate"
    shown = []  # (task, response A) per item, to check what was stored against what was seen

    # item 1: the mouse
    page.wait_for_selector("#label-form")
    shown.append((page.locator(".task-id").inner_text(), page.locator("#response-a .text").inner_text()))
    assert "document.title" not in page.title()
    page.click("label[for=helpfulness_a-4]")
    page.click("label[for=harmlessness_a-5]")
    page.click("label[for=helpfulness_b-2]")
    assert page.inner_text("#rubric-helpfulness_a") == "4: Complete and accurate; the person could act on it."
    page.dispatch_event("label[for=helpfulness_b-5]", "mouseenter")  # hovering previews a score's rubric line
    assert page.inner_text("#rubric-helpfulness_b").startswith("5: Excellent")
    page.dispatch_event("label[for=helpfulness_b-5]", "mouseleave")  # leaving shows the chosen one again
    assert page.inner_text("#rubric-helpfulness_b").startswith("2: Addresses the request only in part")
    page.click("label[for=choice-A]")
    page.fill("#reason", "A is concrete and kind")
    save_screenshot(page, tmp_path, "label_annotator.png", for_docs=True)
    with page.expect_navigation():
        page.click("#submit-button")

    # item 2: the keyboard; Enter without a choice is refused on the page
    shown.append((page.locator(".task-id").inner_text(), page.locator("#response-a .text").inner_text()))
    page.keyboard.press("Enter")
    assert "Choose A, B, tie or both bad first" in page.locator("#hint").inner_text()
    assert store.counts()["labels"] == 1
    page.keyboard.press("b")
    assert page.is_checked("#choice-B")
    with page.expect_navigation():
        page.keyboard.press("Enter")

    # item 3: keyboard, with a reason typed after `r` (letters typed there are text, not shortcuts)
    shown.append((page.locator(".task-id").inner_text(), page.locator("#response-a .text").inner_text()))
    page.keyboard.press("r")
    page.keyboard.type("both fine, a tie")
    page.keyboard.press("Escape")
    assert not page.is_checked("#choice-B") and not page.is_checked("#choice-tie")  # typing chose nothing
    page.keyboard.press("t")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert "Nothing left for you" in page.content()
    assert page.evaluate("document.title") == "alignkit label"  # the <script> response never ran

    labels = {r["task_key"]: r for r in store.judgements()}
    assert [task for task, _ in shown] == [f"task {key}" for key in labels] and len(labels) == 3
    expected = dict(zip([task.removeprefix("task ") for task, _ in shown], ["A", "B", "tie"]))
    for key, record in labels.items():
        assert record["choice"] == expected[key] and record["annotator"] == "alice" and record["seconds"] > 0
    first_key = shown[0][0].removeprefix("task ")
    first = labels[first_key]
    a_side = "first" if first["first_shown_as"] == "A" else "second"
    b_side = "second" if a_side == "first" else "first"
    assert first["reason"] == "A is concrete and kind"
    assert (first[f"helpfulness_{a_side}"], first[f"harmlessness_{a_side}"], first[f"helpfulness_{b_side}"]) == (4, 5, 2)
    assert first[f"{a_side}_text"].strip() == shown[0][1].strip()
    assert labels[shown[2][0].removeprefix("task ")]["reason"] == "both fine, a tie"

    # the admin: statistics page and the DPO export through the browser's download
    admin = browser.new_context(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    admin_page = admin.new_page()
    admin_page.goto(f"{base_url}/login?token={admin_token}")
    admin_page.goto(f"{base_url}/admin")
    assert "alice" in admin_page.locator("table.data").first.inner_text()
    assert admin_page.locator("svg.chart").count() >= 2
    save_screenshot(admin_page, tmp_path, "label_admin.png")
    with admin_page.expect_download() as download_info:
        admin_page.click("#export-dpo")
    download = download_info.value
    assert download.suggested_filename == "feedback-dpo.jsonl"
    target = tmp_path / "downloaded.jsonl"
    download.save_as(str(target))
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert rows == export_rows(store.judgements(), "dpo")[0] and len(rows) == 2  # the tie makes no pair
    chosen_by_key = {row["task_id"]: row["chosen"] for row in rows}
    for task, response_a in shown[:2]:
        key = task.removeprefix("task ")
        side_a_won = expected[key] == "A"
        assert (chosen_by_key[key].strip() == response_a.strip()) == side_a_won
    admin.close()
    context.close()
