"""Every route of the labelling app through FastAPI's test client: auth, CSRF, escaping, own work only, admin."""
from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient

from alignkit.label.app import create_app
from alignkit.label.export import export_rows
from alignkit.label.store import LabelStore
from alignkit.label.tasks import Candidate, Task
from tests.label_helpers import make_tasks

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)> & "quotes"'


@pytest.fixture
def store(tmp_path):
    with LabelStore(tmp_path / "feedback.sqlite") as opened:
        opened.import_tasks([Task(id="hostile", prompt=[{"role": "user", "content": "<b>bold?</b> " + HOSTILE}],
                                  candidates=[Candidate(HOSTILE, "model-x"), Candidate("plain answer", "model-y")])]
                            + make_tasks(6), overlap=0.0)
        yield opened


@pytest.fixture
def app(store):
    return create_app(store, guidelines="Be kind.\n\nProject rule: <em>never</em> guess.", leaderboard_resamples=50)


def signed_in(app, token):
    client = TestClient(app, follow_redirects=False)
    response = client.get(f"/login?token={token}")
    assert response.status_code == 303 and response.headers["location"] == "/annotate"
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict") and "Secure" not in cookie
    return client


def page_form(html):
    """(assignment id, csrf token) of an annotate page."""
    return (int(re.search(r'action="/annotate/(\d+)"', html).group(1)),
            re.search(r'name="csrf" value="([0-9a-f]{64})"', html).group(1))


def test_sign_in_pages_and_unknown_tokens(app, store):
    client = TestClient(app, follow_redirects=False)
    home = client.get("/")
    assert home.status_code == 200 and 'action="/login"' in home.text
    assert client.get("/annotate").headers["location"] == "/"  # no cookie: to the sign-in form
    refused = client.get("/login?token=not-a-token")
    assert refused.status_code == 403 and "unknown token" in refused.text and "Traceback" not in refused.text
    assert "set-cookie" not in refused.headers and "script-src 'self'" in refused.headers["content-security-policy"]
    client.cookies.set("alignkit_label", "forged")
    page = client.get("/annotate")
    assert page.status_code == 403 and "unknown or revoked token" in page.text
    api = TestClient(app).get("/api/next", headers={"Authorization": "Bearer wrong"})
    assert api.status_code == 403 and api.json() == {"error": "unknown token"}
    assert TestClient(app).get("/api/next").status_code == 401
    assert TestClient(app).get("/login?token=" + "x" * 500).status_code == 422  # over-long: validated, no lookup


def test_annotate_page_escapes_html_and_sends_security_headers(app, store):
    client = signed_in(app, store.add_annotator("ann"))
    hostile_seen = False
    for _ in range(7):
        page = client.get("/annotate")
        assert page.status_code == 200
        assert "<script>alert" not in page.text and "onerror=alert(1)>" not in page.text
        assert "<b>bold?</b>" not in page.text
        if "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page.text:
            hostile_seen = True
            assert "&lt;b&gt;bold?&lt;/b&gt;" in page.text and "&amp; &#34;quotes&#34;" in page.text
        assert page.text.count("<script") == 1 and '<script src="/static/label.js" defer></script>' in page.text
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert page.headers["x-content-type-options"] == "nosniff" and page.headers["referrer-policy"] == "no-referrer"
        assignment_id, csrf = page_form(page.text)
        client.post(f"/annotate/{assignment_id}", data={"csrf": csrf, "choice": "tie"})
    assert hostile_seen
    assert "Nothing left for you" in client.get("/annotate").text
    assert client.get("/static/label.js").status_code == 200 and client.get("/static/label.css").status_code == 200


def test_form_submission_needs_csrf_and_a_choice_and_stores_what_was_chosen(app, store):
    client = signed_in(app, store.add_annotator("ann"))
    assignment_id, csrf = page_form(client.get("/annotate").text)
    missing = client.post(f"/annotate/{assignment_id}", data={"choice": "A"})
    forged = client.post(f"/annotate/{assignment_id}", data={"choice": "A", "csrf": "0" * 64})
    assert missing.status_code == forged.status_code == 403 and "CSRF" in forged.text
    no_choice = client.post(f"/annotate/{assignment_id}", data={"csrf": csrf, "reason": "kept text"})
    assert no_choice.status_code == 400 and "Choose A, B, tie or both bad" in no_choice.text
    assert "kept text" in no_choice.text  # the form keeps what was typed
    bad_rating = client.post(f"/annotate/{assignment_id}", data={"csrf": csrf, "choice": "A", "helpfulness_a": "9"})
    assert bad_rating.status_code == 400 and "must be a whole number from 1 to 5, got &#39;9&#39;" in bad_rating.text
    assert store.counts()["labels"] == 0
    stored = client.post(f"/annotate/{assignment_id}", data={
        "csrf": csrf, "choice": "B", "helpfulness_a": "2", "harmlessness_a": "", "helpfulness_b": "5",
        "harmlessness_b": "4", "reason": "B answers the question", "seconds": "12.5"})
    assert stored.status_code == 303 and stored.headers["location"] == "/annotate"
    (record,) = store.judgements()
    assignment = store.assignment(record_annotator(store, "ann"), assignment_id)
    winner = "first" if assignment.shown_b == record["first_candidate"] else "second"
    loser = "second" if winner == "first" else "first"
    assert record["choice"] == "B" and record["outcome"] == winner and record["reason"] == "B answers the question"
    assert (record[f"helpfulness_{winner}"], record[f"harmlessness_{winner}"]) == (5, 4)
    assert (record[f"helpfulness_{loser}"], record[f"harmlessness_{loser}"]) == (2, None)
    assert record["seconds"] == 12.5
    # posting the same form again (a double click) stores nothing new
    client.post(f"/annotate/{assignment_id}", data={"csrf": csrf, "choice": "A"})
    assert store.counts()["labels"] == 1


def record_annotator(store, name):
    return next(a for a in store.annotators() if a.name == name)


def test_skip_history_and_only_own_work(app, store):
    ann = signed_in(app, store.add_annotator("ann"))
    bob = signed_in(app, store.add_annotator("bob"))
    first_id, ann_csrf = page_form(ann.get("/annotate").text)
    assert ann.post(f"/annotate/{first_id}/skip", data={"csrf": ann_csrf}).status_code == 303
    second_id, _ = page_form(ann.get("/annotate").text)
    assert second_id != first_id
    ann.post(f"/annotate/{second_id}", data={"csrf": ann_csrf, "choice": "A", "reason": "ann's private reason"})
    bob_id, bob_csrf = page_form(bob.get("/annotate").text)
    # bob cannot answer, skip or read ann's assignments (404 as for a missing one), even with his own CSRF token
    for path in (f"/annotate/{second_id}", f"/annotate/{first_id}/skip"):
        response = bob.post(path, data={"csrf": bob_csrf, "choice": "B"})
        assert response.status_code == 404 and "no assignment" in response.text
    api = bob.post("/api/labels", json={"assignment_id": second_id, "choice": "B"}, headers={"X-CSRF-Token": bob_csrf})
    assert api.status_code == 404
    assert "ann&#39;s private reason" in ann.get("/history").text
    assert "private reason" not in bob.get("/history").text
    assert bob.get("/admin").status_code == 403 and bob.get("/admin/export?format=dpo").status_code == 403
    assert bob.get("/api/admin/summary").status_code == 403
    assert [r["annotator"] for r in store.judgements()] == ["ann"]
    assert bob_id != second_id


def test_json_api_flow_duplicates_and_bearer_tokens(app, store):
    token = store.add_annotator("script")
    client = TestClient(app)
    headers = {"Authorization": f"Bearer {token}"}
    first = client.get("/api/next", headers=headers).json()
    assert set(first["assignment"]) == {"assignment_id", "task_id", "prompt", "response_a", "response_b"}
    assert first["progress"] == {"done": 0, "skipped": 0, "open": 1, "available": 6}
    payload = {"assignment_id": first["assignment"]["assignment_id"], "choice": "both_bad",
               "ratings": {"harmlessness_a": 1, "harmlessness_b": 2}, "reason": "both unsafe"}
    answer = client.post("/api/labels", json=payload, headers=headers).json()  # bearer: no CSRF needed
    assert answer["duplicate"] is False and answer["next"]["assignment_id"] != payload["assignment_id"]
    again = client.post("/api/labels", json=payload, headers=headers).json()
    assert again["duplicate"] is True and again["label_id"] == answer["label_id"]
    assert again["next"]["assignment_id"] == answer["next"]["assignment_id"]  # still the same open item
    bad = client.post("/api/labels", json={**payload, "choice": "C"}, headers=headers)
    assert bad.status_code == 400 and "choice must be one of" in bad.json()["error"]
    skipped = client.post("/api/skip", json={"assignment_id": answer["next"]["assignment_id"]}, headers=headers).json()
    assert skipped["next"]["assignment_id"] not in (answer["next"]["assignment_id"], payload["assignment_id"])
    cookie_client = signed_in(app, token)  # with the cookie, the same POST needs the CSRF header
    current = cookie_client.get("/api/next").json()
    refused = cookie_client.post("/api/labels", json={"assignment_id": current["assignment"]["assignment_id"],
                                                      "choice": "A"})
    assert refused.status_code == 403
    accepted = cookie_client.post("/api/labels", json={"assignment_id": current["assignment"]["assignment_id"],
                                                       "choice": "A"}, headers={"X-CSRF-Token": current["csrf"]})
    assert accepted.status_code == 200
    assert store.counts()["labels"] == 2
    assert client.get("/healthz").json() == {"ok": True, "schema_version": 1, "labels": 2}


def test_guidelines_logout_and_admin(app, store):
    guide = TestClient(app).get("/guidelines")
    assert guide.status_code == 200 and "Project rule: &lt;em&gt;never&lt;/em&gt; guess." in guide.text
    assert "Complete and accurate; the person could act on it." in guide.text  # the rubric
    admin = signed_in(app, store.add_annotator("lead", is_admin=True))
    page = admin.get("/admin")
    assert page.status_code == 200 and "No item has two labels yet" in page.text
    csrf = re.search(r'name="csrf" value="([0-9a-f]{64})"', page.text).group(1)
    assert admin.post("/admin/annotators", data={"name": "newcomer"}).status_code == 403  # no CSRF
    created = admin.post("/admin/annotators", data={"csrf": csrf, "name": "newcomer"})
    link = re.search(r"http://testserver/login\?token=([\w-]+)", created.text)
    assert created.status_code == 200 and link
    newcomer = signed_in(app, link.group(1))
    assert newcomer.get("/annotate").status_code == 200
    duplicate = admin.post("/admin/annotators", data={"csrf": csrf, "name": "newcomer"})
    assert duplicate.status_code == 400 and "already exists" in duplicate.text
    assert admin.post("/logout", data={"csrf": csrf}).status_code == 303
    assert admin.get("/admin").status_code == 303  # signed out: back to the sign-in form


def test_admin_statistics_and_export_match_the_labels(tmp_path):
    """Two annotators label the same 12 items (overlap 1.0); the page shows their kappa, and exports equal the module's."""
    with LabelStore(tmp_path / "f.sqlite") as store:
        store.import_tasks(make_tasks(12), overlap=1.0, raters_per_overlap=2)
        app = create_app(store, leaderboard_resamples=50)
        people = {name: store.annotator_for_token(store.add_annotator(name)) for name in ("ann", "bob")}
        outcome_plan = {}
        for name, person in people.items():
            while (assignment := store.next_assignment(person)) is not None:
                first = store.connection.execute("SELECT first_candidate FROM items WHERE id = ?",
                                                 (assignment.item_id,)).fetchone()[0]
                # ann always prefers the item's first candidate; bob agrees on even items only
                wants_first = name == "ann" or assignment.item_id % 2 == 0
                winner = first if wants_first else None
                choice = ("A" if assignment.shown_a == winner else "B") if winner else "tie"
                store.submit(person, assignment.id, choice, {"helpfulness_a": 3, "helpfulness_b": 4})
                outcome_plan[(name, assignment.item_id)] = "first" if wants_first else "tie"
        admin = signed_in(app, store.add_annotator("lead", is_admin=True))
        summary = admin.get("/api/admin/summary").json()
        agreement = summary["agreement"]
        even = sum(1 for (name, item) in outcome_plan if name == "bob" and item % 2 == 0)
        assert agreement["overlap_items"] == 12 and agreement["percent_agreement"] == pytest.approx(even / 12)
        ann_labels = ["first"] * 12
        bob_labels = [outcome_plan[("bob", item)] for item in sorted(i for (n, i) in outcome_plan if n == "bob")]
        from alignkit.evaluate.stats import cohen_kappa, krippendorff_alpha

        assert agreement["pairs"][0]["cohen_kappa"] == pytest.approx(cohen_kappa(ann_labels, bob_labels))
        assert agreement["krippendorff_alpha"] == pytest.approx(krippendorff_alpha(list(zip(ann_labels, bob_labels))))
        page = admin.get("/admin").text
        assert f"{100 * even / 12:.1f}%" in page and "model-x" in page and "<svg" in page
        assert "<span>12 / 12</span>items complete" in page and "<built-in" not in page
        assert re.search(r"ann · bob</td><td class=\"num\">12</td>", page)
        for format in ("dpo", "rm", "kto", "ratings"):
            response = admin.get(f"/admin/export?format={format}")
            assert response.status_code == 200 and 'filename="feedback-' in response.headers["content-disposition"]
            rows = [json.loads(line) for line in response.text.splitlines()]
            assert rows == export_rows(store.judgements(), format)[0]
        assert admin.get("/admin/export?format=csv").status_code == 400


def test_admin_leaderboard_bootstrap_is_recomputed_only_after_new_labels(store, monkeypatch):
    import alignkit.label.report as report

    calls = []
    real = report.leaderboard
    monkeypatch.setattr(report, "leaderboard", lambda judgements, **options: calls.append(len(judgements))
                        or real(judgements, **options))
    person = store.annotator_for_token(store.add_annotator("ann"))
    store.submit(person, store.next_assignment(person).id, "A")
    cache: dict = {}
    first = report.summary(store, n_resamples=20, cache=cache)
    second = report.summary(store, n_resamples=20, cache=cache)
    assert calls == [1] and first["leaderboard"] == second["leaderboard"] and len(first["leaderboard"]) == 2
    store.submit(person, store.next_assignment(person).id, "B")
    report.summary(store, n_resamples=20, cache=cache)
    assert calls == [1, 2]
