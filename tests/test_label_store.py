"""The tasks file and the feedback database: validation with file:line, assignment, overlap, leases, schema."""
from __future__ import annotations

import json
import sqlite3
from collections import Counter

import pytest

from alignkit.data import DataError
from alignkit.label.store import SCHEMA_VERSION, LabelStore, NotFound, StoreError
from alignkit.label.tasks import Candidate, Task, read_tasks, write_tasks
from tests.label_helpers import make_tasks


@pytest.fixture
def store(tmp_path):
    with LabelStore(tmp_path / "feedback.sqlite") as opened:
        yield opened


def annotator(store, name, admin=False):
    return store.annotator_for_token(store.add_annotator(name, is_admin=admin))


def label_everything(store, person, choice="A"):
    labelled = []
    while (assignment := store.next_assignment(person)) is not None:
        store.submit(person, assignment.id, choice)
        labelled.append(assignment)
    return labelled


# ------------------------------------------------------------------------------------------ tasks file
GOOD = {"id": "q1", "prompt": "Say hi", "candidates": ["hi", {"text": "hello", "model": "m2", "seed": 3}]}


@pytest.mark.parametrize("row,expected", [
    ({"id": "x", "prompt": "p", "candidates": ["only one"]},
     "field 'candidates': a task needs at least 2 candidates to compare, got 1"),
    ({"id": "x", "prompt": "p", "candidates": ["a", "   "]}, "field 'candidates[1]': empty text"),
    ({"id": "x", "prompt": "p", "candidates": ["a", {"model": "m"}]},
     "field 'candidates[1]': missing field 'text' (a string)"),
    ({"id": "x", "prompt": "p", "candidates": ["a", {"text": "b", "model": ""}]},
     "field 'candidates[1].model': 'model' must be a non-empty string"),
    ({"id": "x", "prompt": "p", "candidates": "a, b"},
     "field 'candidates': wrong type: expected a list of responses, got str"),
    ({"id": "x", "candidates": ["a", "b"]}, "field 'prompt': missing field (every task needs a prompt)"),
    ({"id": "x", "prompt": "", "candidates": ["a", "b"]}, "field 'prompt': empty text"),
    ({"id": "x", "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "candidates": ["a", "b"]}, "field 'prompt': the prompt must end with a user turn"),
    ({"id": "x", "prompt": "p", "candidates": ["a", "b"], "answer": 3},
     "unknown field(s) 'answer'; a task has candidates, id, metadata, prompt"),
    ({"id": True, "prompt": "p", "candidates": ["a", "b"]}, "field 'id': 'id' must be a non-empty string or a number"),
    ({"id": "q1", "prompt": "p", "candidates": ["a", "b"]}, "field 'id': duplicate task id 'q1' (first at {path}:1)"),
])
def test_a_bad_row_is_refused_with_file_and_line(tmp_path, row, expected):
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(row) + "\n")  # the bad row is on line 3
    with pytest.raises(DataError) as caught:
        read_tasks(path)
    assert str(caught.value) == f"{path}:3: " + expected.format(path=path)


def test_invalid_json_line_and_good_rows(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(DataError, match=rf"^{path}:2: invalid JSON"):
        read_tasks(path)
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({"prompt": [{"role": "system", "content": "be brief"},
                                                                      {"role": "user", "content": "hi"}],
                                                           "candidates": ["a", "b"], "metadata": {"k": 1}}) + "\n")
    first, second = read_tasks(path)
    assert first.id == "q1" and first.prompt == [{"role": "user", "content": "Say hi"}]
    assert [(c.text, c.model, c.metadata) for c in first.candidates] == [("hi", "unknown", {}), ("hello", "m2", {"seed": 3})]
    assert second.id == "sha256:" + second.fingerprint()[:16] and second.prompt[0]["role"] == "system"
    assert second.source == f"{path}:2"
    write_tasks(tmp_path / "again.jsonl", [first, second])  # round trip through the writer
    assert [(t.id, t.prompt, t.candidates, t.metadata) for t in read_tasks(tmp_path / "again.jsonl")] == \
        [(t.id, t.prompt, t.candidates, t.metadata) for t in (first, second)]


# ------------------------------------------------------------------------------------------ schema
def test_schema_version_is_recorded_and_newer_or_foreign_databases_are_refused(tmp_path, store):
    assert store.schema_version() == SCHEMA_VERSION == 1 and store.meta("schema_version") == "1"
    assert store.connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    newer = tmp_path / "newer.sqlite"
    LabelStore(newer).close()
    with sqlite3.connect(newer) as connection:
        connection.execute("PRAGMA user_version = 7")
    with pytest.raises(ValueError, match="schema version 7 was written by a newer alignkit"):
        LabelStore(newer)
    foreign = tmp_path / "other.sqlite"
    with sqlite3.connect(foreign) as connection:
        connection.execute("CREATE TABLE notes (text TEXT)")
    with pytest.raises(ValueError, match="not an alignkit label database"):
        LabelStore(foreign)
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(ValueError, match="not a usable SQLite database"):
        LabelStore(garbage)


# ------------------------------------------------------------------------------------------ import
def test_import_is_idempotent_and_refuses_a_changed_task_under_the_same_id(store):
    tasks = make_tasks(5, candidates=3)
    assert store.import_tasks(tasks, overlap=0.0) == {"tasks": 5, "items": 15, "existing_tasks": 0,
                                                      "identical_pairs_skipped": 0}
    assert store.import_tasks(tasks, overlap=0.0)["existing_tasks"] == 5
    assert store.counts()["items"] == 15
    changed = make_tasks(1, candidates=3)[0]
    changed.candidates[0].text = "edited"
    with pytest.raises(ValueError, match="task id 't0' is already in the database with a different prompt"):
        store.import_tasks([changed])
    assert store.counts()["items"] == 15  # the whole import rolled back


def test_identical_candidates_make_no_item_and_pair_cap_prefers_two_models(store):
    twins = Task(id="twins", prompt=[{"role": "user", "content": "p"}],
                 candidates=[Candidate("same", "m1"), Candidate(" same ", "m2"), Candidate("other", "m1")])
    four = make_tasks(1, candidates=4, models=("m1", "m1", "m2", "m2"), prefix="four")  # m1 m1 m2 m2
    added = store.import_tasks([twins] + four, max_pairs_per_task=4)
    assert added["identical_pairs_skipped"] == 1 and added["items"] == 2 + 4
    pairs = store.connection.execute(
        "SELECT c1.model, c2.model FROM items JOIN tasks t ON t.id = items.task_id JOIN candidates c1 ON "
        "c1.id = first_candidate JOIN candidates c2 ON c2.id = second_candidate WHERE t.task_key = 'four0'").fetchall()
    assert sorted(tuple(p) for p in pairs) == [("m1", "m2")] * 4  # the 4 cross-model pairs, not m1-m1 or m2-m2


def test_overlap_share_is_deterministic_and_close_to_the_setting(tmp_path):
    targets = []
    for name in ("one", "two"):
        with LabelStore(tmp_path / f"{name}.sqlite") as store:
            store.import_tasks(make_tasks(400), overlap=0.25, raters_per_overlap=3)
            targets.append([t for (t,) in store.connection.execute("SELECT target_labels FROM items ORDER BY id")])
    assert targets[0] == targets[1]
    assert set(targets[0]) == {1, 3}
    assert 0.19 < targets[0].count(3) / 400 < 0.31


# ------------------------------------------------------------------------------------------ assignment
def test_each_annotator_gets_unseen_items_and_overlap_items_get_two_different_annotators(store):
    store.import_tasks(make_tasks(40), overlap=0.3)
    targets = dict(store.connection.execute("SELECT id, target_labels FROM items").fetchall())
    people = [annotator(store, name) for name in ("ann", "bob", "cyd")]
    seen = {p.name: [] for p in people}
    active = list(people)
    while active:  # interleave annotators, as concurrent people would
        for person in list(active):
            assignment = store.next_assignment(person)
            if assignment is None:
                active.remove(person)
                continue
            assert store.next_assignment(person).id == assignment.id  # a reload shows the same item
            store.submit(person, assignment.id, "A")
            seen[person.name].append(assignment.item_id)
    for items in seen.values():
        assert len(items) == len(set(items))  # nobody sees an item twice
    counts = Counter(item for items in seen.values() for item in items)
    assert counts == Counter(targets)  # every item got exactly its target number of labels
    assert 1 in counts.values() and 2 in counts.values()
    assert store.counts()["items_complete"] == 40


def test_ab_order_is_random_recorded_and_mapped_back_to_candidates(store):
    store.import_tasks(make_tasks(60), overlap=0.0)
    person = annotator(store, "ann")
    flipped = 0
    for assignment in label_everything(store, person, choice="A"):
        first = store.connection.execute("SELECT first_candidate FROM items WHERE id = ?",
                                         (assignment.item_id,)).fetchone()[0]
        flipped += assignment.shown_a != first
        assert assignment.response_a == store.connection.execute(
            "SELECT text FROM candidates WHERE id = ?", (assignment.shown_a,)).fetchone()[0]
    assert 15 <= flipped <= 45  # both orders occur (binomial(60, 1/2): outside this range has p < 1e-4)
    judgements = store.judgements()
    for record in judgements:  # "A" always means the response shown first, whichever candidate that was
        assert record["outcome"] == ("first" if record["first_shown_as"] == "A" else "second")
        assert record[f"{record['outcome']}_text"] == store.connection.execute(
            "SELECT text FROM candidates WHERE id = ?", (record["winner"],)).fetchone()[0]


def test_duplicate_submissions_store_one_label_and_others_assignments_are_not_reachable(store):
    store.import_tasks(make_tasks(3), overlap=0.0)
    ann, bob = annotator(store, "ann"), annotator(store, "bob")
    assignment = store.next_assignment(ann)
    first = store.submit(ann, assignment.id, "B", {"helpfulness_a": 4, "harmlessness_b": "5"}, "  clear  ", 3.5)
    again = store.submit(ann, assignment.id, "A")
    assert not first.duplicate and again.duplicate and again.label_id == first.label_id
    row = store.connection.execute("SELECT choice, helpfulness_a, harmlessness_b, reason, seconds FROM labels").fetchall()
    assert [tuple(r) for r in row] == [("B", 4, 5, "clear", 3.5)]
    with pytest.raises(NotFound):
        store.submit(bob, assignment.id, "A")
    with pytest.raises(NotFound):
        store.assignment(bob, assignment.id)
    with pytest.raises(NotFound):
        store.skip(bob, assignment.id)
    assert [label["id"] for label in store.own_labels(ann)] == [first.label_id] and store.own_labels(bob) == []


@pytest.mark.parametrize("choice,ratings,message", [
    ("maybe", {}, "choice must be one of A, B, tie, both_bad"),
    ("A", {"helpfulness_a": 6}, "rating helpfulness_a must be a whole number from 1 to 5, got 6"),
    ("A", {"harmlessness_b": 2.5}, "rating harmlessness_b must be a whole number from 1 to 5, got 2.5"),
    ("A", {"harmlessness_b": "high"}, "rating harmlessness_b must be a whole number from 1 to 5, got 'high'"),
    ("A", {"honesty_a": 3}, "unknown rating(s) ['honesty_a']"),
])
def test_bad_judgements_are_refused_and_nothing_is_stored(store, choice, ratings, message):
    store.import_tasks(make_tasks(1), overlap=0.0)
    person = annotator(store, "ann")
    assignment = store.next_assignment(person)
    with pytest.raises(StoreError) as caught:
        store.submit(person, assignment.id, choice, ratings)
    assert message in str(caught.value)
    assert store.counts()["labels"] == 0
    with pytest.raises(StoreError, match="limit is 4000"):
        store.submit(person, assignment.id, "A", reason="x" * 4001)


def test_skipped_and_expired_items_go_to_someone_else(tmp_path):
    with LabelStore(tmp_path / "f.sqlite", lease_seconds=0.05) as store:
        store.import_tasks(make_tasks(2), overlap=0.0)
        ann, bob, cyd = (annotator(store, name) for name in ("ann", "bob", "cyd"))
        skipped = store.next_assignment(ann)
        store.skip(ann, skipped.id)
        taken = store.next_assignment(bob)
        assert taken.item_id == skipped.item_id  # the skipped item is free again, and first in the queue
        other = store.next_assignment(ann)
        assert other.item_id != skipped.item_id  # ann never gets the item she skipped
        import time
        time.sleep(0.1)  # ann's and bob's leases run out
        late = store.next_assignment(cyd)
        assert late.item_id in (skipped.item_id, other.item_id)
        # a late answer to an expired lease still counts, once
        assert not store.submit(bob, taken.id, "tie").duplicate
        assert store.progress(bob) == {"done": 1, "skipped": 0, "open": 0, "available": 1 if late.item_id == taken.item_id else 0}


def test_tokens_are_stored_hashed_and_can_be_rotated(store):
    token = store.add_annotator("ann")
    assert token not in json.dumps([list(r) for r in store.connection.execute("SELECT * FROM annotators")])
    assert store.annotator_for_token(token).name == "ann" and store.annotator_for_token("nope") is None
    with pytest.raises(ValueError, match="already exists; use --rotate"):
        store.add_annotator("ann")
    new = store.add_annotator("ann", rotate=True)
    assert store.annotator_for_token(token) is None and store.annotator_for_token(new).name == "ann"
    with pytest.raises(ValueError, match="1-100 characters on one line"):
        store.add_annotator("two\nlines")
    person = store.annotator_for_token(new)
    assert store.check_csrf(person, store.csrf_token(person)) and not store.check_csrf(person, "0" * 64)
