"""Export rules (majority, ties, both bad, margins) by hand, the CLI, and the round trip into `alignkit rm` / `dpo`."""
from __future__ import annotations

import json

import pytest

from alignkit.data import load_examples
from alignkit.label.export import export_rows
from alignkit.label.store import LabelStore
from alignkit.label.tasks import Candidate, Task, write_tasks


def pair_task(key, first, second, prompt=None):
    return Task(id=key, prompt=[{"role": "user", "content": prompt or f"prompt {key}"}],
                candidates=[Candidate(first, "model-x"), Candidate(second, "model-y")])


def judge(store, person, plan):
    """``plan[task id] = (outcome for the first candidate's side, ratings of (first, second))``: label every item."""
    while (assignment := store.next_assignment(person)) is not None:
        outcome, ratings = plan[assignment.task_key]
        first_is_a = assignment.response_a == store.connection.execute(
            "SELECT c.text FROM items i JOIN candidates c ON c.id = i.first_candidate WHERE i.id = ?",
            (assignment.item_id,)).fetchone()[0]
        choice = {"first": "A" if first_is_a else "B", "second": "B" if first_is_a else "A"}.get(outcome, outcome)
        scores = {}
        if ratings:
            (help_first, harm_first), (help_second, harm_second) = ratings
            side_first, side_second = ("a", "b") if first_is_a else ("b", "a")
            scores = {f"helpfulness_{side_first}": help_first, f"harmlessness_{side_first}": harm_first,
                      f"helpfulness_{side_second}": help_second, f"harmlessness_{side_second}": harm_second}
        store.submit(person, assignment.id, choice, scores)


@pytest.fixture
def labelled(tmp_path):
    """Five items, each labelled by three annotators, covering every aggregation rule."""
    store = LabelStore(tmp_path / "feedback.sqlite")
    store.import_tasks([pair_task(k, f"{k} first", f"{k} second") for k in ("win", "lose", "split", "tie", "bad")],
                       overlap=1.0, raters_per_overlap=3)
    plans = {
        "ann": {"win": ("first", ((5, 5), (2, 4))), "lose": ("second", None), "split": ("first", None),
                "tie": ("tie", None), "bad": ("both_bad", ((1, 1), (1, 2)))},
        "bob": {"win": ("first", ((4, None), (3, None))), "lose": ("second", ((2, 2), (4, 5))), "split": ("second", None),
                "tie": ("tie", None), "bad": ("both_bad", None)},
        "cyd": {"win": ("second", ((2, 2), (3, 3))), "lose": ("tie", None), "split": ("tie", None),
                "tie": ("first", None), "bad": ("first", None)},
    }
    for name, plan in plans.items():
        judge(store, store.annotator_for_token(store.add_annotator(name)), plan)
    yield store
    store.close()


def test_majority_verdicts_ties_both_bad_and_margins(labelled):
    judgements = labelled.judgements()
    assert len(judgements) == 15
    dpo, report = export_rows(judgements, "dpo")
    assert [(r["task_id"], r["chosen"], r["rejected"], r["votes"]) for r in dpo] == [
        ("win", "win first", "win second", {"first": 2, "second": 1}),
        ("lose", "lose second", "lose first", {"second": 2, "tie": 1}),
    ]
    assert all("margin" not in r for r in dpo) and dpo[0]["prompt"] == "prompt win"
    assert dpo[0]["chosen_model"] == "model-x" and dpo[0]["rejected_model"] == "model-y"
    assert report.left_out == {"split votes": 1, "tie": 1, "both bad": 1}
    assert report.summary() == "2 dpo rows from 15 labels on 5 items; left out: 1 both bad, 1 split votes, 1 tie"

    rm, report = export_rows(judgements, "rm", margin_scale=0.5)
    # win: ann (5-2 + 5-4)/2 = 2, bob (4-3)/1 = 1 (harmlessness unrated), cyd (2-3 + 2-3)/2 = -1 -> mean 2/3
    # lose (chosen = second): bob (4-2 + 5-2)/2 = 2.5 -> 2.5; both times 0.5
    assert [r["margin"] for r in rm] == [pytest.approx(0.5 * 2 / 3), pytest.approx(0.5 * 2.5)]
    assert report.with_margin == 2

    kto, report = export_rows(judgements, "kto")
    assert sorted((r["task_id"], r["completion"], r["label"]) for r in kto) == [
        ("bad", "bad first", False), ("bad", "bad second", False),
        ("lose", "lose first", False), ("lose", "lose second", True),
        ("win", "win first", True), ("win", "win second", False)]
    assert report.left_out == {"split votes": 1, "tie": 1}

    each, report = export_rows(judgements, "dpo", aggregate="each")
    assert len(each) == 9  # every decisive label on its own: win 3, lose 2, split 2, tie 1, bad 1
    assert sum(r["task_id"] == "win" and r["chosen"] == "win second" for r in each) == 1  # cyd's dissent kept

    ratings, _ = export_rows(judgements, "ratings")
    by_key = {(r["annotator"], r["task_id"], r["completion"]): r for r in ratings}
    assert len(ratings) == 10  # ann: win x2, bad x2; bob: win x2, lose x2; cyd: win x2
    assert by_key[("bob", "win", "win first")]["helpfulness"] == 4 and by_key[("bob", "win", "win first")]["harmlessness"] is None
    assert by_key[("ann", "bad", "bad second")] | {} == {**by_key[("ann", "bad", "bad second")], "choice": "both_bad",
                                                         "helpfulness": 1, "harmlessness": 2, "model": "model-y"}
    assert by_key[("cyd", "win", "win second")]["choice"] == "preferred"


def test_exported_rows_load_as_preference_examples_as_they_are(labelled, tmp_path):
    rows, _ = export_rows(labelled.judgements(), "rm")
    path = tmp_path / "rm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, report = load_examples(path, kind="preference")
    assert report.skipped == 0 and len(examples) == 2
    assert examples[0].prompt == [{"role": "user", "content": "prompt win"}]
    assert (examples[0].chosen, examples[0].rejected, examples[0].margin) == ("win first", "win second", pytest.approx(2 / 3))
    system = Task(id="sys", prompt=[{"role": "system", "content": "be terse"}, {"role": "user", "content": "q"}],
                  candidates=[Candidate("short", "m1"), Candidate("long", "m2")])
    labelled.import_tasks([system])
    person = labelled.annotator_for_token(labelled.add_annotator("dee"))
    assignment = labelled.next_assignment(person)
    labelled.submit(person, assignment.id, "A")
    rows, _ = export_rows([r for r in labelled.judgements() if r["task_key"] == "sys"], "dpo")
    assert rows[0]["prompt"] == [{"role": "system", "content": "be terse"}, {"role": "user", "content": "q"}]
    path.write_text(json.dumps(rows[0]) + "\n")
    (example,), _ = load_examples(path, kind="preference")
    assert example.prompt[0] == {"role": "system", "content": "be terse"} and example.chosen == assignment.response_a


def test_cli_add_annotator_stats_and_export(labelled, tmp_path, capsys):
    from alignkit.cli import main

    db = str(labelled.path)
    assert main(["label", "add-annotator", "eve", "--db", db, "--url", "http://127.0.0.1:9999/"]) == 0
    link = capsys.readouterr().out.strip()
    assert link.startswith("http://127.0.0.1:9999/login?token=")
    assert labelled.annotator_for_token(link.split("token=")[1]).name == "eve"
    assert main(["label", "add-annotator", "eve", "--db", db]) == 2
    assert "already exists; use --rotate" in capsys.readouterr().err
    assert main(["label", "stats", "--db", db]) == 0
    out = capsys.readouterr().out
    assert "15 labels; 5/5 items complete" in out and "agreement on 5 items with 2+ labels" in out
    assert "| model-x |" in out and "| model-y |" in out
    out_file = tmp_path / "pairs.jsonl"
    assert main(["label", "export", "--db", db, "--format", "dpo", "--out", str(out_file)]) == 0
    assert "2 dpo rows from 15 labels on 5 items" in capsys.readouterr().err
    assert [json.loads(line)["task_id"] for line in out_file.read_text().splitlines()] == ["win", "lose"]
    assert main(["label", "export", "--db", str(tmp_path / "missing.sqlite"), "--format", "dpo",
                 "--out", str(out_file)]) == 2
    assert "database not found" in capsys.readouterr().err


def test_serve_refuses_a_bad_tasks_file_with_file_and_line_and_binds_loopback_by_default(tmp_path, capsys):
    from alignkit.cli import build_parser, main

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"prompt": "p", "candidates": ["a", "b"]}) + "\n"
                     + json.dumps({"prompt": "p", "candidates": ["a"]}) + "\n")
    assert main(["label", "serve", "--db", str(tmp_path / "f.sqlite"), "--tasks", str(tasks)]) == 2
    assert capsys.readouterr().err.strip() == (f"alignkit: error: {tasks}:2: field 'candidates': a task needs at least "
                                               "2 candidates to compare, got 1")
    assert not (tmp_path / "f.sqlite").exists()  # nothing imported, no database made
    args = build_parser().parse_args(["label", "serve", "--tasks", str(tasks)])
    assert args.host == "127.0.0.1" and args.port == 8080 and args.db == "feedback.sqlite"


def test_round_trip_export_then_train_rm_and_dpo_two_steps(tmp_path, tiny_model, tiny_tokenizer, monkeypatch):
    """Labels -> `alignkit label export` -> `alignkit rm`, `alignkit dpo` and `alignkit kto` read the files as they are."""
    from alignkit.cli import main

    monkeypatch.setenv("ALIGNKIT_HOME", str(tmp_path / "home"))
    tiny_model.save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    words = "cat dog bird fish red green blue one two three apple banana".split()
    tasks = [pair_task(f"q{i}", f"{words[i]} {words[i + 1]} yes", f"{words[i]} {words[i + 1]} no",
                       prompt=f"{words[i]} or {words[-1 - i]}") for i in range(10)]
    db = tmp_path / "feedback.sqlite"
    with LabelStore(db) as store:
        store.import_tasks(tasks, overlap=0.0)
        judge(store, store.annotator_for_token(store.add_annotator("ann")),
              {t.id: ("first", ((4, 5), (2, 5))) for t in tasks})
    for format in ("rm", "dpo", "kto"):
        assert main(["label", "export", "--db", str(db), "--format", format, "--out", str(tmp_path / f"{format}.jsonl")]) == 0
    rm_rows = [json.loads(line) for line in (tmp_path / "rm.jsonl").read_text().splitlines()]
    assert len(rm_rows) == 10 and all(r["margin"] == 1.0 for r in rm_rows) and rm_rows[0]["chosen"].endswith("yes")
    unpaired, report = load_examples(tmp_path / "kto.jsonl", kind="unpaired")
    assert report.skipped == 0 and sorted(e.label for e in unpaired) == [False] * 10 + [True] * 10
    assert all(e.completion.endswith("yes") == e.label for e in unpaired)
    for method in ("rm", "dpo", "kto"):
        config = tmp_path / f"{method}.yaml"
        config.write_text(f"""method: {method}
model: {{name_or_path: {tmp_path / 'base'}, dtype: float32, device: cpu}}
data: {{train: {tmp_path / f'{method}.jsonl'}, validation_fraction: 0.2, max_length: 64}}
training: {{output_dir: {tmp_path / f'run-{method}'}, max_steps: 2, batch_size: 4, learning_rate: 1.0e-3,
           lr_scheduler: constant, eval_steps: 2, progress: false, tensorboard: false}}
""")
        assert main([method, "--config", str(config)]) == 0
        summary = json.loads((tmp_path / f"run-{method}" / "summary.json").read_text())
        assert summary["steps"] == 2 and (tmp_path / f"run-{method}" / "final").is_dir()
        metrics = [json.loads(line) for line in (tmp_path / f"run-{method}" / "metrics.jsonl").read_text().splitlines()]
        assert all(m["loss"] == m["loss"] for m in metrics if "loss" in m)  # finite, not NaN
        accuracy = summary["last_eval"]["eval/accuracy" if method == "rm" else "eval/reward_accuracy"]
        assert 0.0 <= accuracy <= 1.0  # evaluated on the held-out share of the exported pairs


def test_example_job_files_read_the_exported_file_names():
    from pathlib import Path

    from alignkit import load_job

    examples = Path(__file__).resolve().parents[1] / "examples"
    for method in ("dpo", "rm"):
        job = load_job(method, str(examples / f"{method}_feedback.yaml"))
        assert job.data.train == f"feedback-{method}.jsonl" and job.data.validation_fraction == 0.1
