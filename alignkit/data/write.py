"""Write rows as JSON Lines: the one writer for the files alignkit produces (pairs, tasks, scores, ...)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """One JSON object per line (UTF-8, non-ASCII kept), written to ``path.tmp`` and renamed into place, so
    a crash never leaves half a file; parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    temporary.replace(path)
    return path
