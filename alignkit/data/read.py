"""Read rows from files and hub data sets: ``read_rows(path) -> (source, row)`` pairs.

Accepted inputs (chosen by the file name's ending; ``.gz`` is allowed after the text formats):

* ``.jsonl`` / ``.ndjson`` — one JSON object per line; blank lines are skipped but still counted,
  so ``source`` always names the real line (``"train.jsonl:7"``).
* ``.json`` — a list of objects, or an object holding that list under ``data``, ``rows`` or
  ``examples``. Records are numbered ``"train.json:#3"`` (1-based). A ``.json`` file that is really
  JSON Lines (one object per line) is read as JSON Lines.
* ``.csv`` / ``.tsv`` — a header row, then one record per row; line numbers count the header, so the
  first record is line 2. Every value is a string.
* ``.parquet`` / ``.pq`` — through ``pyarrow``; records are numbered ``"train.parquet:#3"``.
* ``hf://owner/name[:split]`` (and a bare ``owner/name`` that is not a local path) — through the
  optional ``datasets`` package (``pip install 'alignkit[data]'``). A third path part names the
  configuration: ``hf://openai/gsm8k/main:test``. The default split is ``train``.

Every row must be a JSON object (a dict). Problems raise `DataError` naming the file and line; a
missing file raises ``FileNotFoundError`` naming the path.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
from pathlib import Path
from typing import Iterator, Union

from alignkit.data.errors import DataError

PathLike = Union[str, "os.PathLike[str]"]

JSONL_EXTENSIONS = (".jsonl", ".ndjson")
JSON_EXTENSIONS = (".json",)
CSV_EXTENSIONS = (".csv", ".tsv")
PARQUET_EXTENSIONS = (".parquet", ".pq")
ACCEPTED_EXTENSIONS = JSONL_EXTENSIONS + JSON_EXTENSIONS + CSV_EXTENSIONS + PARQUET_EXTENSIONS
HUB_PREFIX = "hf://"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.-]+)?(:[\w.\-\[\]%+]+)?$")

Record = Union[dict, DataError]


def read_rows(path_or_hub_id: PathLike, split: str | None = None) -> Iterator[tuple[str, dict]]:
    """Yield ``(source, row)`` for every row of a file or hub data set, raising on the first problem.

    ``split`` applies to hub data sets only (it overrides a ``:split`` suffix). Raises
    ``FileNotFoundError`` for a missing file and `DataError` for everything else (unknown file type,
    invalid JSON on a line, a row that is not an object, a file without rows).
    """
    for source, record in iter_records(path_or_hub_id, split=split):
        if isinstance(record, DataError):
            raise record
        yield source, record


def iter_records(path_or_hub_id: PathLike, split: str | None = None) -> Iterator[tuple[str, Record]]:
    """Like `read_rows`, but a bad *row* is yielded as ``(source, DataError)`` instead of raised, so
    that a caller can skip it and carry on (``load_examples(on_error="skip")``). Problems with the
    whole file (missing, unknown type, unparsable JSON document, no rows at all) still raise."""
    target = os.fspath(path_or_hub_id)
    if target.startswith(HUB_PREFIX):
        yield from _check_not_empty(_read_hub(target[len(HUB_PREFIX):], split), target)
        return
    path = Path(target)
    if not path.exists():
        local_reason = _why_local(target)
        if _looks_like_hub_id(target) and local_reason is None:
            yield from _check_not_empty(_read_hub(target, split), HUB_PREFIX + target)
            return
        hint = (f" ({local_reason}, so it is not tried as a hub data set; write hf://{target} for one)"
                if _looks_like_hub_id(target) else "")
        raise FileNotFoundError(f"data file not found: {target}: no such file{hint}")
    if path.is_dir():
        raise DataError(f"is a directory, expected a data file ({', '.join(ACCEPTED_EXTENSIONS)})", source=target)
    kind = file_kind(path)
    readers = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}
    yield from _check_not_empty(readers[kind](path), target)


def file_kind(path: PathLike) -> str:
    """``"jsonl"``, ``"json"``, ``"csv"`` or ``"parquet"`` from the file name; `DataError` otherwise."""
    name = os.fspath(path).lower()
    base = name[:-3] if name.endswith(".gz") else name
    for kind, endings in (("jsonl", JSONL_EXTENSIONS), ("json", JSON_EXTENSIONS), ("csv", CSV_EXTENSIONS)):
        if base.endswith(endings):
            return kind
    if name.endswith(PARQUET_EXTENSIONS):
        return "parquet"
    raise DataError(
        f"unknown file type; accepted extensions: {', '.join(ACCEPTED_EXTENSIONS)} "
        f"(the text formats may end in .gz), or a hub data set 'hf://owner/name[:split]'",
        source=os.fspath(path),
    )


def _looks_like_hub_id(target: str) -> bool:
    if target.lower().endswith(ACCEPTED_EXTENSIONS + (".gz",)) or target.startswith((".", "/", "~")):
        return False
    return bool(_HUB_ID.match(target))


def _why_local(target: str) -> str | None:
    """Why a missing bare ``owner/name`` is a local path rather than a hub id, or None."""
    first = target.split("/", 1)[0]
    if first and Path(first).is_dir():
        return f"the folder '{first}' exists here"
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{variable} is set"
    return None


def _check_not_empty(records: Iterator[tuple[str, Record]], name: str) -> Iterator[tuple[str, Record]]:
    count = 0
    for item in records:
        count += 1
        yield item
    if count == 0:
        raise DataError("no rows (the file is empty)", source=name)


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _type_name(value) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number"}.get(type(value), type(value).__name__)


def _as_row(value, source: str) -> Record:
    if isinstance(value, dict):
        return value
    return DataError(f"expected a JSON object, got {_type_name(value)}", source=source)


# ---------------------------------------------------------------------------------------- JSON Lines
def _read_jsonl(path: Path) -> Iterator[tuple[str, Record]]:
    with _open_binary(path) as handle:
        yield from _jsonl_lines(handle, str(path))


def _jsonl_lines(handle, name: str) -> Iterator[tuple[str, Record]]:
    for line_number, raw in enumerate(handle, start=1):
        source = f"{name}:{line_number}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            yield source, DataError(f"not valid UTF-8 text ({error.reason} at byte {error.start})", source=source)
            continue
        if line_number == 1:
            text = text.lstrip("\ufeff")
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            yield source, DataError(f"invalid JSON: {error.msg} (column {error.colno})", source=source)
            continue
        yield source, _as_row(value, source)


# ---------------------------------------------------------------------------------------------- JSON
def _read_json(path: Path) -> Iterator[tuple[str, Record]]:
    with _open_binary(path) as handle:
        data = handle.read()
    name = str(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"not valid UTF-8 text ({error.reason} at byte {error.start})", source=name) from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data" and text.lstrip().startswith("{"):
            # One object per line under a .json name: read it as JSON Lines.
            yield from _jsonl_lines(io.BytesIO(data), name)
            return
        raise DataError(f"invalid JSON: {error.msg} (column {error.colno})", source=f"{name}:{error.lineno}") from None
    if isinstance(document, dict):
        for key in ("data", "rows", "examples"):
            if isinstance(document.get(key), list):
                document = document[key]
                break
        else:
            keys = ", ".join(repr(k) for k in list(document)[:8])
            raise DataError(
                "expected a list of objects, or an object holding that list under 'data', 'rows' or "
                f"'examples'; got an object with keys {keys or '(none)'}", source=name)
    if not isinstance(document, list):
        raise DataError(f"expected a list of objects, got {_type_name(document)}", source=name)
    for index, value in enumerate(document, start=1):
        source = f"{name}:#{index}"
        yield source, _as_row(value, source)


# ----------------------------------------------------------------------------------------------- CSV
def _read_csv(path: Path) -> Iterator[tuple[str, Record]]:
    name = str(path)
    delimiter = "\t" if path.name.lower().removesuffix(".gz").endswith(".tsv") else ","
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    # Undecodable bytes become lone surrogates (\udc80-\udcff) so that one bad record is reported
    # with its line (and skipped under on_error: skip) instead of failing the whole file.
    with opener(path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        header: list[str] | None = None
        previous_line = 0
        while True:
            try:
                values = next(reader)
            except StopIteration:
                break
            except csv.Error as error:
                raise DataError(f"invalid CSV: {error}", source=f"{name}:{reader.line_num}") from None
            start_line, previous_line = previous_line + 1, reader.line_num
            if not values or (len(values) == 1 and not values[0].strip() and header is not None):
                continue
            source = f"{name}:{start_line}"
            bad = _undecodable(values, header)
            if header is None:
                if bad is not None:
                    raise DataError(f"the header is not valid UTF-8 text ({bad})", source=source)
                header = [column.strip() for column in values]
                duplicates = sorted({c for c in header if header.count(c) > 1})
                if duplicates:
                    raise DataError(f"duplicate column names in the header: {', '.join(duplicates)}", source=source)
                continue
            if len(values) != len(header):
                yield source, DataError(
                    f"row has {len(values)} fields but the header has {len(header)} "
                    f"({', '.join(header)})", source=source)
                continue
            if bad is not None:
                yield source, DataError(f"not valid UTF-8 text ({bad})", source=source)
                continue
            yield source, dict(zip(header, values))


def _undecodable(values: list[str], header: list[str] | None) -> str | None:
    """Where a CSV record holds bytes that were not UTF-8 (decoded as lone surrogates), or None."""
    for column, value in enumerate(values):
        for offset, character in enumerate(value):
            if "\udc80" <= character <= "\udcff":
                where = f"column '{header[column]}'" if header and column < len(header) else f"column {column + 1}"
                return f"byte 0x{ord(character) - 0xDC00:02x} in {where}, character {offset + 1}"
    return None


# ------------------------------------------------------------------------------------------- Parquet
def _read_parquet(path: Path) -> Iterator[tuple[str, Record]]:
    name = str(path)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading Parquet needs pyarrow: pip install 'alignkit[data]'", source=name) from None
    try:
        parquet_file = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises ArrowInvalid / OSError for corrupt files
        raise DataError(f"not a readable Parquet file ({type(error).__name__}: {error})", source=name) from None
    index = 0
    for batch in parquet_file.iter_batches(batch_size=1024):
        for value in batch.to_pylist():
            index += 1
            source = f"{name}:#{index}"
            yield source, _as_row(value, source)


# ----------------------------------------------------------------------------------------------- Hub
def parse_hub_id(hub_id: str, split: str | None = None) -> tuple[str, str | None, str]:
    """``"owner/name[/config][:split]"`` -> ``(name, config or None, split)``; ``split`` wins."""
    name, _, suffix = hub_id.partition(":")
    parts = name.strip("/").split("/")
    config = None
    if len(parts) == 3:
        name, config = "/".join(parts[:2]), parts[2]
    elif len(parts) > 3:
        raise DataError(f"not a hub data set id: '{hub_id}' (expected hf://owner/name[/config][:split])")
    return name, config, split or suffix or "train"


def _read_hub(hub_id: str, split: str | None) -> Iterator[tuple[str, Record]]:
    name, config, split = parse_hub_id(hub_id, split)
    display = f"{HUB_PREFIX}{name}{'/' + config if config else ''}:{split}"
    try:
        import datasets
    except ImportError:
        raise DataError(
            "reading hub data sets needs the optional 'datasets' package: pip install 'alignkit[data]' "
            "(or download the data and pass a local .jsonl/.json/.csv/.parquet file)", source=display) from None
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as error:  # offline, unknown id, unknown split, ... : one clear message
        raise DataError(
            f"could not load hub data set '{name}'"
            f"{' (configuration ' + repr(config) + ')' if config else ''} split '{split}': "
            f"{type(error).__name__}: {error}. If you are offline, download it where you have a network "
            "and pass a local file instead (.jsonl, .json, .csv or .parquet)", source=display) from None
    for index, value in enumerate(dataset, start=1):
        source = f"{display}:#{index}"
        yield source, _as_row(dict(value) if hasattr(value, "keys") else value, source)
