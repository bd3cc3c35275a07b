"""`alignkit label serve` under load and under a crash, as a real server process on a loopback port.

* load: 20 simulated annotators, each in its own thread with its own keep-alive connection, submit 200
  labels each through the JSON API (cookie session + CSRF header, as the browser does); exactly 4,000
  labels end up stored, no (item, annotator) twice, no item labelled twice (each wants one label), and
  every acknowledged label id is distinct.
* crash: several annotators keep submitting while the server process is killed with SIGKILL; the
  database then opens cleanly (integrity check), and every label the server acknowledged is there.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from alignkit.label.store import LabelStore
from alignkit.label.tasks import write_tasks
from tests.label_helpers import free_port, make_tasks

REPOSITORY = Path(__file__).resolve().parents[1]
SERVE_ENTRY = ("import argparse, sys\n"
               "from alignkit.commands import label\n"
               "parser = argparse.ArgumentParser(prog='alignkit')\n"
               "label.register(parser.add_subparsers(dest='command'))\n"
               "args = parser.parse_args(sys.argv[1:])\n"
               "sys.exit(args.handler(args))\n")


class Annotator:
    """One simulated annotator: signs in with the personal link, then labels through the JSON API."""

    def __init__(self, base_url: str, token: str, timeout: float = 60.0):
        parts = urlsplit(base_url)
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        self.cookie = ""
        status, headers, _ = self.request("GET", f"/login?token={token}")
        assert status == 303, status
        self.cookie = headers["set-cookie"].split(";", 1)[0]
        status, _, body = self.request("GET", "/api/next")
        assert status == 200, body
        self.csrf = body["csrf"]
        self.current = body["assignment"]

    def request(self, method: str, path: str, payload: dict | None = None):
        headers = {"Cookie": self.cookie} if self.cookie else {}
        body = None
        if payload is not None:
            body = json.dumps(payload)
            headers.update({"Content-Type": "application/json", "X-CSRF-Token": self.csrf})
        self.connection.request(method, path, body=body, headers=headers)
        response = self.connection.getresponse()
        data = response.read()
        parsed = json.loads(data) if response.getheader("content-type", "").startswith("application/json") else data
        return response.status, {k.lower(): v for k, v in response.getheaders()}, parsed

    def label(self, choice: str) -> int:
        status, _, body = self.request("POST", "/api/labels", {"assignment_id": self.current["assignment_id"],
                                                                "choice": choice})
        assert status == 200, body
        self.current = body["next"]
        return body["label_id"]

    def close(self) -> None:
        self.connection.close()


def start_server(db: Path, tasks: Path, port: int, *extra: str) -> subprocess.Popen:
    """`alignkit label serve` in its own process (this checkout's code); returns once /healthz answers.

    The command's own parser and handler run, without the rest of the CLI (whose other commands import
    the training stack, seconds of start-up that this test does not need)."""
    command = [sys.executable, "-c", SERVE_ENTRY, "label", "serve", "--db", str(db), "--tasks", str(tasks),
               "--port", str(port), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}: {process.stdout.read()}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                connection.close()
                return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError("server did not answer /healthz within 120 s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    process.stdout.close()


def prepare(tmp_path: Path, items: int, annotators: int, overlap: float = 0.0):
    """A tasks file with ``items`` two-candidate tasks, and a database holding ``annotators`` tokens."""
    tasks = write_tasks(tmp_path / "tasks.jsonl", make_tasks(items))
    db = tmp_path / "feedback.sqlite"
    with LabelStore(db) as store:
        tokens = [store.add_annotator(f"annotator-{i}") for i in range(annotators)]
        store.add_annotator("admin", is_admin=True)
    return db, tasks, tokens


def test_twenty_concurrent_annotators_store_exactly_4000_labels(tmp_path):
    annotators, per_annotator = 20, 200
    # 10% more items than labels, so the fastest annotators never empty the pool for the slowest
    db, tasks, tokens = prepare(tmp_path, items=annotators * per_annotator * 11 // 10, annotators=annotators)
    port = free_port()
    server = start_server(db, tasks, port, "--synchronous", "NORMAL", "--overlap", "0")
    acknowledged: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            client = Annotator(f"http://127.0.0.1:{port}", tokens[index])
            acknowledged[index] = [client.label(("A", "B", "tie", "both_bad")[k % 4]) for k in range(per_annotator)]
            client.close()
        except BaseException as error:  # reported below, in the test's thread
            errors.append(error)

    try:
        started = time.time()
        threads = [threading.Thread(target=work, args=(i,)) for i in range(annotators)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=240)
        elapsed = time.time() - started
        assert not any(thread.is_alive() for thread in threads), "annotators still running after 240 s"
        assert not errors, errors[0]
    finally:
        stop(server)
    label_ids = [label for ids in acknowledged.values() for label in ids]
    assert len(label_ids) == 4000 and len(set(label_ids)) == 4000
    with sqlite3.connect(db) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert connection.execute("SELECT COUNT(*) FROM labels").fetchone()[0] == 4000
        assert connection.execute("SELECT COUNT(DISTINCT item_id || ':' || annotator_id) FROM labels").fetchone()[0] == 4000
        assert connection.execute("SELECT COUNT(DISTINCT item_id) FROM labels").fetchone()[0] == 4000  # target 1 each
        per_annotator_counts = [n for (n,) in connection.execute("SELECT COUNT(*) FROM labels GROUP BY annotator_id")]
        assert per_annotator_counts == [per_annotator] * annotators
        assert sorted(label_ids) == [i for (i,) in connection.execute("SELECT id FROM labels ORDER BY id")]
        assert connection.execute("SELECT COUNT(*) FROM items WHERE labels_done != "
                                  "(SELECT COUNT(*) FROM labels WHERE labels.item_id = items.id)").fetchone()[0] == 0
    print(f"\n[load] 4000 labels from 20 annotators in {elapsed:.1f} s ({4000 / elapsed:.0f} labels/s)")


def test_killing_the_server_mid_write_loses_no_acknowledged_label(tmp_path):
    db, tasks, tokens = prepare(tmp_path, items=1000, annotators=4)
    port = free_port()
    server = start_server(db, tasks, port)  # the default: synchronous=FULL
    acknowledged: list[int] = []
    lock = threading.Lock()
    stop_sending = threading.Event()

    def work(index: int) -> None:
        client = Annotator(f"http://127.0.0.1:{port}", tokens[index])
        try:
            while not stop_sending.is_set():
                label_id = client.label("A")
                with lock:
                    acknowledged.append(label_id)
        except (OSError, http.client.HTTPException):
            pass  # the server died under us: the request in flight was never acknowledged
        finally:
            client.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(tokens))]
    try:
        for thread in threads:
            thread.start()
        deadline = time.time() + 120
        while len(acknowledged) < 150 and time.time() < deadline:
            time.sleep(0.01)
        server.send_signal(signal.SIGKILL)  # while four annotators are writing
        server.wait(20)
    finally:
        stop_sending.set()
        for thread in threads:
            thread.join(timeout=30)
        if server.poll() is None:
            server.kill()
        server.stdout.close()
    assert server.returncode == -signal.SIGKILL
    assert len(acknowledged) >= 150
    assert (tmp_path / "feedback.sqlite-wal").exists()  # the kill left a write-ahead log behind to recover
    with LabelStore(db) as store:  # reopens, recovers the WAL
        assert store.integrity_check() == "ok"
        assert store.schema_version() == 1
        stored = {row["label_id"] for row in store.judgements()}
        assert set(acknowledged) <= stored
        assert len(stored) - len(acknowledged) <= len(tokens)  # at most one committed-but-unacknowledged each
        # and the database keeps working: a new label goes in after the crash
        annotator = store.annotator_for_token(tokens[0])
        assignment = store.next_assignment(annotator)
        assert not store.submit(annotator, assignment.id, "B").duplicate
        assert store.counts()["labels"] == len(stored) + 1
