"""The feedback database: one SQLite file in WAL mode, every judgement one transaction.

Tables (schema version `SCHEMA_VERSION`, kept in ``PRAGMA user_version`` and in ``meta``):

* ``tasks`` / ``candidates``: the imported prompts and their responses (with the model that wrote each);
* ``items``: the pairs of candidates to compare, each with ``target_labels`` (1, or more for the share
  of items that goes to several annotators so agreement can be measured), ``claimed`` (open + done
  assignments) and ``labels_done``;
* ``annotators``: a name, the SHA-256 of the personal token (the token itself is never stored), admin flag;
* ``assignments``: which annotator was shown which item, in which order (``shown_a``/``shown_b`` are
  candidate ids, the A/B order drawn at random), with a lease: an open assignment not answered within
  ``lease_seconds`` goes back to the pool;
* ``labels``: the judgement (``A``/``B``/``tie``/``both_bad``, the winning candidate, optional 1-5
  helpfulness and harmlessness ratings of each response, a free-text reason, seconds spent).

Guarantees, each enforced by the database rather than by the web code: one label per assignment and
one per (item, annotator) (``UNIQUE``), so a retried or doubled submission stores nothing twice; every
label is written in one ``BEGIN IMMEDIATE`` transaction, and with ``synchronous=FULL`` (the default) a
label the server acknowledged survives a killed process and a power cut; WAL lets the admin page read
while annotators write. A database written by a newer alignkit (a higher schema version) is refused
with a message instead of being misread.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import secrets
import sqlite3
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Iterator, Sequence

from alignkit.errors import UsageError
from alignkit.label.tasks import Task

SCHEMA_VERSION = 1
CHOICES = ("A", "B", "tie", "both_bad")
RATING_NAMES = ("helpfulness", "harmlessness")
RATING_RANGE = (1, 5)
MAX_REASON_CHARS = 4000
SYNCHRONOUS_MODES = ("FULL", "NORMAL")

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE tasks (
    id INTEGER PRIMARY KEY,
    task_key TEXT NOT NULL UNIQUE,
    prompt TEXT NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}',
    source TEXT NOT NULL DEFAULT '',
    fingerprint TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE candidates (
    id INTEGER PRIMARY KEY,
    task_id INTEGER NOT NULL REFERENCES tasks(id),
    position INTEGER NOT NULL,
    text TEXT NOT NULL,
    model TEXT NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}',
    UNIQUE (task_id, position)
);
CREATE TABLE items (
    id INTEGER PRIMARY KEY,
    task_id INTEGER NOT NULL REFERENCES tasks(id),
    first_candidate INTEGER NOT NULL REFERENCES candidates(id),
    second_candidate INTEGER NOT NULL REFERENCES candidates(id),
    target_labels INTEGER NOT NULL CHECK (target_labels >= 1),
    claimed INTEGER NOT NULL DEFAULT 0,
    labels_done INTEGER NOT NULL DEFAULT 0,
    queue_position INTEGER NOT NULL,
    UNIQUE (first_candidate, second_candidate)
);
CREATE INDEX items_open ON items (queue_position) WHERE claimed < target_labels;
CREATE TABLE annotators (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_hash TEXT NOT NULL UNIQUE,
    is_admin INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE TABLE assignments (
    id INTEGER PRIMARY KEY,
    item_id INTEGER NOT NULL REFERENCES items(id),
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    shown_a INTEGER NOT NULL REFERENCES candidates(id),
    shown_b INTEGER NOT NULL REFERENCES candidates(id),
    status TEXT NOT NULL CHECK (status IN ('open', 'done', 'skipped', 'expired')),
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    UNIQUE (item_id, annotator_id)
);
CREATE INDEX assignments_open ON assignments (expires_at) WHERE status = 'open';
CREATE INDEX assignments_by_annotator ON assignments (annotator_id, status);
CREATE TABLE labels (
    id INTEGER PRIMARY KEY,
    assignment_id INTEGER NOT NULL UNIQUE REFERENCES assignments(id),
    item_id INTEGER NOT NULL REFERENCES items(id),
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    choice TEXT NOT NULL CHECK (choice IN ('A', 'B', 'tie', 'both_bad')),
    winner INTEGER REFERENCES candidates(id),
    shown_a INTEGER NOT NULL REFERENCES candidates(id),
    shown_b INTEGER NOT NULL REFERENCES candidates(id),
    helpfulness_a INTEGER CHECK (helpfulness_a BETWEEN 1 AND 5),
    harmlessness_a INTEGER CHECK (harmlessness_a BETWEEN 1 AND 5),
    helpfulness_b INTEGER CHECK (helpfulness_b BETWEEN 1 AND 5),
    harmlessness_b INTEGER CHECK (harmlessness_b BETWEEN 1 AND 5),
    reason TEXT NOT NULL DEFAULT '',
    seconds REAL,
    created_at REAL NOT NULL,
    UNIQUE (item_id, annotator_id)
);
CREATE INDEX labels_by_annotator ON labels (annotator_id, id);
"""

# Migrations from version v to v + 1, applied in order when an older database is opened.
_MIGRATIONS: dict[int, str] = {}


class StoreError(UsageError):
    """A request the store refuses (bad choice or rating, someone else's assignment, ...)."""


class NotFound(StoreError):
    """No such assignment for this annotator (someone else's assignments look exactly like missing ones)."""


@dataclass(frozen=True)
class Annotator:
    id: int
    name: str
    is_admin: bool


@dataclass(frozen=True)
class Assignment:
    """An item shown to an annotator: the prompt and the two responses in the order shown."""

    id: int
    item_id: int
    task_key: str
    prompt: list[dict]
    response_a: str
    response_b: str
    shown_a: int
    shown_b: int


@dataclass(frozen=True)
class SubmitResult:
    label_id: int
    duplicate: bool


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _unit_interval(*parts: Any) -> float:
    """A number in [0, 1) fixed by ``parts``: deterministic, independent of import order."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


class LabelStore:
    """The feedback database (see the module docstring). Safe to share between threads: each thread
    gets its own SQLite connection; writers queue on SQLite's lock (``busy_timeout``)."""

    def __init__(self, path: str | os.PathLike, synchronous: str = "FULL", lease_seconds: float = 1800.0,
                 busy_timeout_s: float = 30.0):
        synchronous = synchronous.upper()
        if synchronous not in SYNCHRONOUS_MODES:
            raise UsageError(f"synchronous must be one of {SYNCHRONOUS_MODES}, got {synchronous!r}")
        self.path = Path(path)
        if self.path.is_dir():
            raise UsageError(f"{self.path} is a directory; --db takes a database file, e.g. feedback.sqlite")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.synchronous = synchronous
        self.lease_seconds = float(lease_seconds)
        self.busy_timeout_s = float(busy_timeout_s)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._initialise()

    # ------------------------------------------------------------------ connections and transactions
    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None,
                                     check_same_thread=False)
        connection.row_factory = sqlite3.Row
        mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            connection.close()
            raise UsageError(f"{self.path}: cannot switch the database to WAL mode (got {mode!r}); "
                             "is it on a network file system?")
        connection.execute(f"PRAGMA synchronous={self.synchronous}")
        connection.execute("PRAGMA foreign_keys=ON")
        connection.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
        return connection

    @property
    def connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._connect()
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any error): one atomic write."""
        connection = self.connection
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            for connection in self._connections:
                try:
                    connection.close()
                except sqlite3.ProgrammingError:
                    pass
            self._connections.clear()
        self._local = threading.local()

    def __enter__(self) -> "LabelStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _initialise(self) -> None:
        try:
            with self.transaction() as db:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                has_tables = db.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
                if version == 0 and has_tables:
                    raise UsageError(f"{self.path} is an SQLite database but not an alignkit label database")
                if version > SCHEMA_VERSION:
                    raise UsageError(f"{self.path}: schema version {version} was written by a newer alignkit "
                                     f"(this one reads up to {SCHEMA_VERSION}); upgrade alignkit")
                if version == 0:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            db.execute(statement)
                    db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", [
                        ("schema_version", str(SCHEMA_VERSION)), ("secret", secrets.token_hex(32)),
                        ("created_at", str(time.time()))])
                while 0 < version < SCHEMA_VERSION:
                    for statement in _MIGRATIONS[version].split(";"):
                        if statement.strip():
                            db.execute(statement)
                    version += 1
                    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as error:
            raise UsageError(f"{self.path}: not a usable SQLite database ({error})") from None
        self.secret = self.meta("secret")

    def meta(self, key: str) -> str | None:
        row = self.connection.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row["value"]

    def schema_version(self) -> int:
        return int(self.connection.execute("PRAGMA user_version").fetchone()[0])

    # ------------------------------------------------------------------ tasks and items
    def import_tasks(self, tasks: Sequence[Task], overlap: float = 0.2, raters_per_overlap: int = 2,
                     max_pairs_per_task: int | None = None) -> dict[str, int]:
        """Add tasks and their comparison items (all in one transaction); tasks already present are kept.

        Every pair of a task's distinct candidates becomes an item, or at most ``max_pairs_per_task``
        of them (pairs of different models first, then a fixed pseudo-random choice). A share
        ``overlap`` of the items (chosen by a hash of the item, so re-imports agree) wants
        ``raters_per_overlap`` labels from different annotators; the rest want one. A task id that is
        already stored with different content is refused (rename it, or use a new database).
        """
        if not 0.0 <= overlap <= 1.0:
            raise UsageError(f"overlap must be between 0 and 1, got {overlap}")
        if raters_per_overlap < 2:
            raise UsageError(f"raters_per_overlap must be at least 2, got {raters_per_overlap}")
        if max_pairs_per_task is not None and max_pairs_per_task < 1:
            raise UsageError(f"max_pairs_per_task must be at least 1, got {max_pairs_per_task}")
        added = {"tasks": 0, "items": 0, "existing_tasks": 0, "identical_pairs_skipped": 0}
        now = time.time()
        with self.transaction() as db:
            for task in tasks:
                fingerprint = task.fingerprint()
                row = db.execute("SELECT fingerprint FROM tasks WHERE task_key = ?", (task.id,)).fetchone()
                if row is not None:
                    if row["fingerprint"] != fingerprint:
                        raise UsageError(f"{task.source or 'task'}: task id {task.id!r} is already in the database "
                                         "with a different prompt or candidates; give the changed task a new id")
                    added["existing_tasks"] += 1
                    continue
                task_id = db.execute(
                    "INSERT INTO tasks (task_key, prompt, metadata, source, fingerprint, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (task.id, json.dumps(task.prompt, ensure_ascii=False),
                     json.dumps(task.metadata, ensure_ascii=False), task.source, fingerprint, now)).lastrowid
                candidate_ids = [db.execute(
                    "INSERT INTO candidates (task_id, position, text, model, metadata) VALUES (?, ?, ?, ?, ?)",
                    (task_id, position, c.text, c.model, json.dumps(c.metadata, ensure_ascii=False))).lastrowid
                    for position, c in enumerate(task.candidates)]
                pairs = []
                for i, j in combinations(range(len(task.candidates)), 2):
                    if task.candidates[i].text.strip() == task.candidates[j].text.strip():
                        added["identical_pairs_skipped"] += 1
                    else:
                        pairs.append((i, j))
                if max_pairs_per_task is not None and len(pairs) > max_pairs_per_task:
                    pairs.sort(key=lambda p: (task.candidates[p[0]].model == task.candidates[p[1]].model,
                                              _unit_interval("pair", task.id, *p)))
                    pairs = sorted(pairs[:max_pairs_per_task])
                for i, j in pairs:
                    key = (task.id, i, j)
                    target = raters_per_overlap if _unit_interval("overlap", *key) < overlap else 1
                    db.execute(
                        "INSERT INTO items (task_id, first_candidate, second_candidate, target_labels, queue_position)"
                        " VALUES (?, ?, ?, ?, ?)",
                        (task_id, candidate_ids[i], candidate_ids[j], target,
                         int(_unit_interval("queue", *key) * 2 ** 62)))
                    added["items"] += 1
                added["tasks"] += 1
        return added

    # ------------------------------------------------------------------ annotators and tokens
    def add_annotator(self, name: str, is_admin: bool = False, rotate: bool = False) -> str:
        """Create an annotator (or, with ``rotate``, issue a new token to an existing one); returns the token.

        Only the token's SHA-256 is stored, so the token is shown this once.
        """
        name = name.strip()
        if not name or len(name) > 100 or any(ch in name for ch in "\r\n\t"):
            raise UsageError(f"annotator name must be 1-100 characters on one line, got {name!r}")
        token = secrets.token_urlsafe(24)
        with self.transaction() as db:
            existing = db.execute("SELECT id FROM annotators WHERE name = ?", (name,)).fetchone()
            if existing is not None and not rotate:
                raise UsageError(f"annotator {name!r} already exists; use --rotate to issue a new token "
                                 "(the old one stops working)")
            if existing is None:
                db.execute("INSERT INTO annotators (name, token_hash, is_admin, created_at) VALUES (?, ?, ?, ?)",
                           (name, hash_token(token), int(is_admin), time.time()))
            else:
                db.execute("UPDATE annotators SET token_hash = ?, is_admin = MAX(is_admin, ?) WHERE id = ?",
                           (hash_token(token), int(is_admin), existing["id"]))
        return token

    def annotator_for_token(self, token: str | None) -> Annotator | None:
        if not token or len(token) > 200:
            return None
        row = self.connection.execute("SELECT id, name, is_admin FROM annotators WHERE token_hash = ?",
                                      (hash_token(token),)).fetchone()
        return None if row is None else Annotator(row["id"], row["name"], bool(row["is_admin"]))

    def annotators(self) -> list[Annotator]:
        rows = self.connection.execute("SELECT id, name, is_admin FROM annotators ORDER BY id").fetchall()
        return [Annotator(r["id"], r["name"], bool(r["is_admin"])) for r in rows]

    def has_admin(self) -> bool:
        return self.connection.execute("SELECT 1 FROM annotators WHERE is_admin = 1").fetchone() is not None

    def csrf_token(self, annotator: Annotator) -> str:
        """A per-annotator CSRF token: HMAC-SHA-256 of the annotator under the database's secret."""
        return hmac.new(self.secret.encode(), f"csrf:{annotator.id}:{annotator.name}".encode(),
                        hashlib.sha256).hexdigest()

    def check_csrf(self, annotator: Annotator, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf_token(annotator), str(token))

    # ------------------------------------------------------------------ assignment
    def _expire_leases(self, db: sqlite3.Connection, now: float) -> None:
        expired = db.execute("SELECT id, item_id FROM assignments WHERE status = 'open' AND expires_at < ?",
                             (now,)).fetchall()
        for row in expired:
            db.execute("UPDATE assignments SET status = 'expired' WHERE id = ?", (row["id"],))
            db.execute("UPDATE items SET claimed = claimed - 1 WHERE id = ?", (row["item_id"],))

    def _claim_next(self, db: sqlite3.Connection, annotator: Annotator, now: float) -> int | None:
        """Inside a write transaction: the id of the annotator's open assignment (lease renewed), or of a new
        one on an item they have never been shown, or None when nothing is left for them."""
        self._expire_leases(db, now)
        row = db.execute("SELECT id FROM assignments WHERE annotator_id = ? AND status = 'open' "
                         "ORDER BY id LIMIT 1", (annotator.id,)).fetchone()
        if row is not None:
            db.execute("UPDATE assignments SET expires_at = ? WHERE id = ?", (now + self.lease_seconds, row["id"]))
            return row["id"]
        pick = ("SELECT id, first_candidate, second_candidate FROM items WHERE claimed < target_labels {extra}"
                " AND NOT EXISTS (SELECT 1 FROM assignments a WHERE a.item_id = items.id AND a.annotator_id = ?)"
                " ORDER BY queue_position LIMIT 1")
        item = db.execute(pick.format(extra="AND labels_done > 0"), (annotator.id,)).fetchone() \
            or db.execute(pick.format(extra=""), (annotator.id,)).fetchone()
        if item is None:
            return None
        first, second = item["first_candidate"], item["second_candidate"]
        shown_a, shown_b = (first, second) if secrets.randbelow(2) == 0 else (second, first)
        assignment_id = db.execute(
            "INSERT INTO assignments (item_id, annotator_id, shown_a, shown_b, status, created_at, expires_at)"
            " VALUES (?, ?, ?, ?, 'open', ?, ?)",
            (item["id"], annotator.id, shown_a, shown_b, now, now + self.lease_seconds)).lastrowid
        db.execute("UPDATE items SET claimed = claimed + 1 WHERE id = ?", (item["id"],))
        return assignment_id

    def next_assignment(self, annotator: Annotator) -> Assignment | None:
        """The annotator's open assignment, or a new one on an item they have never been shown; None when
        nothing is left for them. Items that others have started labelling (overlap items still short of
        their target) come first, so agreement data accumulates early. The A/B order is drawn at random
        (`secrets`) and recorded."""
        with self.transaction() as db:
            assignment_id = self._claim_next(db, annotator, time.time())
        return None if assignment_id is None else self.assignment(annotator, assignment_id)

    def assignment(self, annotator: Annotator, assignment_id: int) -> Assignment:
        """One of the annotator's own assignments; `NotFound` for anyone else's."""
        row = self.connection.execute(
            "SELECT a.id, a.item_id, a.shown_a, a.shown_b, t.task_key, t.prompt, ca.text AS text_a, cb.text AS text_b"
            " FROM assignments a JOIN items i ON i.id = a.item_id JOIN tasks t ON t.id = i.task_id"
            " JOIN candidates ca ON ca.id = a.shown_a JOIN candidates cb ON cb.id = a.shown_b"
            " WHERE a.id = ? AND a.annotator_id = ?", (assignment_id, annotator.id)).fetchone()
        if row is None:
            raise NotFound(f"no assignment {assignment_id} for annotator {annotator.name!r}")
        return Assignment(id=row["id"], item_id=row["item_id"], task_key=row["task_key"],
                          prompt=json.loads(row["prompt"]), response_a=row["text_a"], response_b=row["text_b"],
                          shown_a=row["shown_a"], shown_b=row["shown_b"])

    # ------------------------------------------------------------------ judgements
    @staticmethod
    def validate_ratings(ratings: dict[str, Any] | None) -> dict[str, int | None]:
        """``{"helpfulness_a": 4, ...}`` -> the four rating columns, each an int in 1..5 or None."""
        ratings = dict(ratings or {})
        columns = [f"{name}_{side}" for name in RATING_NAMES for side in ("a", "b")]
        unknown = sorted(set(ratings) - set(columns))
        if unknown:
            raise StoreError(f"unknown rating(s) {unknown}; ratings are {columns}")
        out: dict[str, int | None] = {}
        low, high = RATING_RANGE
        for column in columns:
            value = ratings.get(column)
            if value is None or value == "":
                out[column] = None
                continue
            try:
                number = int(value)
            except (TypeError, ValueError):
                raise StoreError(f"rating {column} must be a whole number from {low} to {high}, got {value!r}") from None
            if isinstance(value, bool) or number != float(value) or not low <= number <= high:
                raise StoreError(f"rating {column} must be a whole number from {low} to {high}, got {value!r}")
            out[column] = number
        return out

    def submit(self, annotator: Annotator, assignment_id: int, choice: str, ratings: dict[str, Any] | None = None,
               reason: str = "", seconds: float | None = None) -> SubmitResult:
        """Store a judgement in one transaction. Submitting the same assignment again stores nothing and
        returns the first label (``duplicate=True``), so a retried request cannot double-count."""
        return self.submit_and_next(annotator, assignment_id, choice, ratings, reason, seconds, claim_next=False)[0]

    def submit_and_next(self, annotator: Annotator, assignment_id: int, choice: str,
                        ratings: dict[str, Any] | None = None, reason: str = "", seconds: float | None = None,
                        claim_next: bool = True) -> tuple[SubmitResult, Assignment | None]:
        """`submit`, and (``claim_next``) the annotator's next assignment claimed in the same transaction:
        one commit, so one disk sync, per label."""
        if choice not in CHOICES:
            raise StoreError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        rating_values = self.validate_ratings(ratings)
        reason = (reason or "").strip()
        if len(reason) > MAX_REASON_CHARS:
            raise StoreError(f"reason is {len(reason)} characters; the limit is {MAX_REASON_CHARS}")
        if seconds is not None:
            seconds = float(seconds)
            if not math.isfinite(seconds) or seconds < 0:
                seconds = None
        now = time.time()
        next_id = None
        with self.transaction() as db:
            row = db.execute("SELECT id, item_id, shown_a, shown_b, status FROM assignments WHERE id = ? "
                             "AND annotator_id = ?", (assignment_id, annotator.id)).fetchone()
            if row is None:
                raise NotFound(f"no assignment {assignment_id} for annotator {annotator.name!r}")
            existing = db.execute("SELECT id FROM labels WHERE assignment_id = ?", (assignment_id,)).fetchone()
            if existing is not None:
                result = SubmitResult(existing["id"], True)
            else:
                winner = {"A": row["shown_a"], "B": row["shown_b"]}.get(choice)
                label_id = db.execute(
                    "INSERT INTO labels (assignment_id, item_id, annotator_id, choice, winner, shown_a, shown_b,"
                    " helpfulness_a, harmlessness_a, helpfulness_b, harmlessness_b, reason, seconds, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (assignment_id, row["item_id"], annotator.id, choice, winner, row["shown_a"], row["shown_b"],
                     rating_values["helpfulness_a"], rating_values["harmlessness_a"],
                     rating_values["helpfulness_b"], rating_values["harmlessness_b"], reason, seconds, now)).lastrowid
                db.execute("UPDATE assignments SET status = 'done' WHERE id = ?", (assignment_id,))
                claim = 0 if row["status"] == "open" else 1  # a skipped or expired lease had released its claim
                db.execute("UPDATE items SET labels_done = labels_done + 1, claimed = claimed + ? WHERE id = ?",
                           (claim, row["item_id"]))
                result = SubmitResult(label_id, False)
            if claim_next:
                next_id = self._claim_next(db, annotator, now)
        return result, (None if next_id is None else self.assignment(annotator, next_id))

    def skip(self, annotator: Annotator, assignment_id: int) -> None:
        """Give an open assignment back: the annotator will not see the item again; others may."""
        with self.transaction() as db:
            row = db.execute("SELECT item_id, status FROM assignments WHERE id = ? AND annotator_id = ?",
                             (assignment_id, annotator.id)).fetchone()
            if row is None:
                raise NotFound(f"no assignment {assignment_id} for annotator {annotator.name!r}")
            if row["status"] == "open":
                db.execute("UPDATE assignments SET status = 'skipped' WHERE id = ?", (assignment_id,))
                db.execute("UPDATE items SET claimed = claimed - 1 WHERE id = ?", (row["item_id"],))

    # ------------------------------------------------------------------ reading back
    def progress(self, annotator: Annotator) -> dict[str, int]:
        """The annotator's own counts: labelled, skipped, and items still available to them."""
        db = self.connection
        counts = dict(db.execute(
            "SELECT status, COUNT(*) FROM assignments WHERE annotator_id = ? GROUP BY status",
            (annotator.id,)).fetchall())
        available = db.execute(
            "SELECT COUNT(*) FROM items WHERE claimed < target_labels AND NOT EXISTS "
            "(SELECT 1 FROM assignments a WHERE a.item_id = items.id AND a.annotator_id = ?)",
            (annotator.id,)).fetchone()[0]
        return {"done": counts.get("done", 0), "skipped": counts.get("skipped", 0),
                "open": counts.get("open", 0), "available": available}

    def own_labels(self, annotator: Annotator, limit: int = 200) -> list[dict]:
        """The annotator's own latest labels (never anyone else's), newest first."""
        rows = self.connection.execute(
            "SELECT l.id, l.choice, l.reason, l.created_at, l.helpfulness_a, l.harmlessness_a, l.helpfulness_b,"
            " l.harmlessness_b, t.prompt, ca.text AS text_a, cb.text AS text_b FROM labels l"
            " JOIN items i ON i.id = l.item_id JOIN tasks t ON t.id = i.task_id"
            " JOIN candidates ca ON ca.id = l.shown_a JOIN candidates cb ON cb.id = l.shown_b"
            " WHERE l.annotator_id = ? ORDER BY l.id DESC LIMIT ?", (annotator.id, limit)).fetchall()
        return [{**dict(r), "prompt": json.loads(r["prompt"])} for r in rows]

    def counts(self) -> dict[str, int]:
        db = self.connection
        items, complete, wanted = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(labels_done >= target_labels), 0), COALESCE(SUM(target_labels), 0)"
            " FROM items").fetchone()
        return {"tasks": db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0], "items": items,
                "items_complete": complete, "labels_wanted": wanted,
                "labels": db.execute("SELECT COUNT(*) FROM labels").fetchone()[0],
                "annotators": db.execute("SELECT COUNT(*) FROM annotators").fetchone()[0]}

    def annotator_progress(self) -> list[dict]:
        """Per annotator: labels, skips, open items, last activity and the median seconds per label."""
        db = self.connection
        out = []
        for annotator in self.annotators():
            counts = dict(db.execute("SELECT status, COUNT(*) FROM assignments WHERE annotator_id = ? GROUP BY status",
                                     (annotator.id,)).fetchall())
            seconds = [r[0] for r in db.execute("SELECT seconds FROM labels WHERE annotator_id = ? AND seconds "
                                                "IS NOT NULL", (annotator.id,))]
            last = db.execute("SELECT MAX(created_at) FROM labels WHERE annotator_id = ?", (annotator.id,)).fetchone()[0]
            out.append({"name": annotator.name, "is_admin": annotator.is_admin, "labels": counts.get("done", 0),
                        "skipped": counts.get("skipped", 0), "open": counts.get("open", 0),
                        "median_seconds": statistics.median(seconds) if seconds else None, "last_label_at": last})
        return out

    def judgements(self) -> list[dict]:
        """Every label with its item, prompt, both candidates (in the item's fixed order, not the order shown),
        the annotator and the outcome relative to that order: ``first``, ``second``, ``tie`` or ``both_bad``.
        Ratings are given per candidate: ``helpfulness_first``, ``harmlessness_second``, ..."""
        rows = self.connection.execute(
            "SELECT l.id AS label_id, l.item_id, l.choice, l.winner, l.shown_a, l.shown_b, l.reason, l.seconds,"
            " l.created_at, l.helpfulness_a, l.harmlessness_a, l.helpfulness_b, l.harmlessness_b,"
            " n.name AS annotator, t.task_key, t.prompt, i.first_candidate, i.second_candidate,"
            " c1.text AS first_text, c1.model AS first_model, c1.position AS first_position,"
            " c2.text AS second_text, c2.model AS second_model, c2.position AS second_position"
            " FROM labels l JOIN annotators n ON n.id = l.annotator_id JOIN items i ON i.id = l.item_id"
            " JOIN tasks t ON t.id = i.task_id JOIN candidates c1 ON c1.id = i.first_candidate"
            " JOIN candidates c2 ON c2.id = i.second_candidate ORDER BY l.id").fetchall()
        out = []
        for r in rows:
            record = dict(r)
            record["prompt"] = json.loads(r["prompt"])
            if r["winner"] is None:
                record["outcome"] = r["choice"]
            else:
                record["outcome"] = "first" if r["winner"] == r["first_candidate"] else "second"
            side_of = {r["shown_a"]: "a", r["shown_b"]: "b"}
            for which in ("first", "second"):
                side = side_of[r[f"{which}_candidate"]]
                for name in RATING_NAMES:
                    record[f"{name}_{which}"] = r[f"{name}_{side}"]
            record["first_shown_as"] = "A" if r["shown_a"] == r["first_candidate"] else "B"
            for column in [f"{n}_{s}" for n in RATING_NAMES for s in ("a", "b")]:
                del record[column]
            out.append(record)
        return out

    def integrity_check(self) -> str:
        return self.connection.execute("PRAGMA integrity_check").fetchone()[0]
