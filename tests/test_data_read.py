"""Readers: JSONL / JSON / CSV / Parquet / hub, sources ("file:line" or "file:#n") and file-level errors."""
import gzip
import json
import sys
import types

import pytest

from alignkit.data import DataError, iter_records, read_rows


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_data_error_string_format():
    assert str(DataError("empty text", source="a.jsonl:3", field="prompt")) == "a.jsonl:3: field 'prompt': empty text"
    assert str(DataError("no rows", source="a.jsonl")) == "a.jsonl: no rows"
    assert str(DataError("bad")) == "bad"
    assert isinstance(DataError("x"), ValueError)


def test_jsonl_skips_blank_lines_but_counts_them(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"a": 1}\n\n   \n{"a": 2}\n\n{"a": 3}\n')
    rows = list(read_rows(path))
    assert [row["a"] for _, row in rows] == [1, 2, 3]
    assert [source for source, _ in rows] == [f"{path}:1", f"{path}:4", f"{path}:6"]


def test_jsonl_gzip(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write('{"a": 1}\n{"a": 2}\n')
    assert [row["a"] for _, row in read_rows(path)] == [1, 2]


def test_jsonl_invalid_json_names_the_line(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"a": 1}\n\n{"a": 2,,}\n')
    with pytest.raises(DataError) as info:
        list(read_rows(path))
    assert str(info.value).startswith(f"{path}:3: invalid JSON")


def test_jsonl_row_must_be_an_object(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: expected a JSON object, got array"):
        list(read_rows(path))


def test_iter_records_yields_row_errors_and_carries_on(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"a": 1}\nnot json\n"text"\n{"a": 4}\n')
    records = list(iter_records(path))
    assert [type(r).__name__ for _, r in records] == ["dict", "DataError", "DataError", "dict"]
    assert records[1][1].source == f"{path}:2"
    assert records[3] == (f"{path}:4", {"a": 4})


def test_json_list_and_wrapped_lists(tmp_path):
    for key in (None, "data", "rows", "examples"):
        rows = [{"a": 1}, {"a": 2}]
        path = write(tmp_path / f"d_{key}.json", json.dumps(rows if key is None else {key: rows, "meta": 1}))
        got = list(read_rows(path))
        assert got == [(f"{path}:#1", {"a": 1}), (f"{path}:#2", {"a": 2})]


def test_json_errors(tmp_path):
    path = write(tmp_path / "obj.json", '{"items": [{"a": 1}]}')
    with pytest.raises(DataError, match=r"under 'data', 'rows' or 'examples'.*'items'"):
        list(read_rows(path))
    path = write(tmp_path / "bad.json", '[{"a": 1},\n {"a": }]')
    with pytest.raises(DataError, match=r"bad.json:2: invalid JSON"):
        list(read_rows(path))
    path = write(tmp_path / "rec.json", '[{"a": 1}, "x"]')
    with pytest.raises(DataError, match=r"rec.json:#2: expected a JSON object, got string"):
        list(read_rows(path))


def test_json_file_holding_json_lines_is_read_as_lines(tmp_path):
    path = write(tmp_path / "lines.json", '{"a": 1}\n{"a": 2}\n')
    assert list(read_rows(path)) == [(f"{path}:1", {"a": 1}), (f"{path}:2", {"a": 2})]


def test_csv_line_numbers_count_the_header_and_multiline_fields(tmp_path):
    path = write(tmp_path / "d.csv", 'prompt,completion\nhi,hello\n"two\nlines",ok\n\nq,a\n')
    rows = list(read_rows(path))
    assert [source for source, _ in rows] == [f"{path}:2", f"{path}:3", f"{path}:6"]
    assert rows[1][1] == {"prompt": "two\nlines", "completion": "ok"}


def test_csv_wrong_field_count_names_the_line(tmp_path):
    path = write(tmp_path / "d.csv", "prompt,completion\nhi,hello\nx,y,z\n")
    with pytest.raises(DataError, match=r"d.csv:3: row has 3 fields but the header has 2"):
        list(read_rows(path))


def test_tsv(tmp_path):
    path = write(tmp_path / "d.tsv", "prompt\tcompletion\na, b\tc\n")
    assert list(read_rows(path)) == [(f"{path}:2", {"prompt": "a, b", "completion": "c"})]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    table = pa.table({"prompt": ["a", "b", "c"], "messages": [[{"role": "user", "content": "x"}]] * 3,
                      "score": [1.0, 2.0, None]})
    pq.write_table(table, path)
    rows = list(read_rows(path))
    assert [source for source, _ in rows] == [f"{path}:#1", f"{path}:#2", f"{path}:#3"]
    assert rows[0][1] == {"prompt": "a", "messages": [{"role": "user", "content": "x"}], "score": 1.0}
    assert rows[2][1]["score"] is None


def test_corrupt_parquet(tmp_path):
    path = write(tmp_path / "d.parquet", "not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        list(read_rows(path))


@pytest.mark.parametrize("name,text", [("e.jsonl", ""), ("b.jsonl", "\n\n  \n"), ("e.json", "[]"),
                                       ("h.csv", "prompt,completion\n")])
def test_empty_files_have_no_rows(tmp_path, name, text):
    path = write(tmp_path / name, text)
    with pytest.raises(DataError, match="no rows"):
        list(read_rows(path))


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        list(read_rows(tmp_path / "nope.jsonl"))
    path = write(tmp_path / "d.txt", "hello")
    with pytest.raises(DataError) as info:
        list(read_rows(path))
    assert str(path) in str(info.value) and ".jsonl" in str(info.value) and ".parquet" in str(info.value)


def _fake_datasets(monkeypatch, load):
    module = types.ModuleType("datasets")
    module.load_dataset = load
    monkeypatch.setitem(sys.modules, "datasets", module)


def test_hub_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match=r"pip install 'alignkit\[data\]'"):
        list(read_rows("hf://owner/name"))


def test_hub_offline_names_the_id_and_suggests_a_local_file(monkeypatch):
    def load(name, config=None, split=None):
        raise ConnectionError("offline")

    _fake_datasets(monkeypatch, load)
    with pytest.raises(DataError) as info:
        list(read_rows("hf://owner/name:test"))
    message = str(info.value)
    assert "'owner/name'" in message and "split 'test'" in message and "local file" in message


def test_hub_rows_sources_config_and_split(monkeypatch, tmp_path):
    calls = []

    def load(name, config=None, split=None):
        calls.append((name, config, split))
        return [{"question": "q1", "answer": "a"}, {"question": "q2", "answer": "b"}]

    _fake_datasets(monkeypatch, load)
    rows = list(read_rows("hf://openai/gsm8k/main:test"))
    assert calls[-1] == ("openai/gsm8k", "main", "test")
    assert rows[1] == ("hf://openai/gsm8k/main:test:#2", {"question": "q2", "answer": "b"})
    list(read_rows("hf://owner/name", split="validation"))
    assert calls[-1] == ("owner/name", None, "validation")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # offline, a bare id is "no such file" at once
    list(read_rows("owner/bare"))  # a bare id that is not a local path goes to the hub
    assert calls[-1] == ("owner/bare", None, "train")
