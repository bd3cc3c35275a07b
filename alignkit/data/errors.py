"""The one error type of the data layer.

Every problem with a user's data (an unreadable line, a missing field, an empty answer, ...) is a
`DataError` that says *where* (file and line, or `file:#record`) and *which field*, so that a user can
open the file at that line and fix it. `load_examples(on_error="skip")` counts and keeps these
messages instead of raising, so nothing is dropped silently.
"""
from __future__ import annotations

from alignkit.errors import UserError


class DataError(UserError, ValueError):
    """A bad file or row. ``str(error)`` reads ``"{file}:{line}: field '{field}': {message}"``.

    The ``source`` and ``field`` parts are left out when unknown. ``source`` is what the readers yield:
    ``"path:line"`` (JSONL, CSV), ``"path:#n"`` (JSON, Parquet, hub records) or just the path for
    problems with the whole file.
    """

    def __init__(self, message: str, source: str | None = None, field: str | None = None):
        super().__init__(message, source, field)
        self.message = message
        self.source = source
        self.field = field

    def __str__(self) -> str:
        parts = []
        if self.source:
            parts.append(f"{self.source}: ")
        if self.field:
            parts.append(f"field '{self.field}': ")
        parts.append(self.message)
        return "".join(parts)

    def with_source(self, source: str) -> "DataError":
        """The same error located at ``source`` (used when a row converter did not know it)."""
        return DataError(self.message, source=self.source or source, field=self.field)


class FatalDataError(DataError):
    """A problem with what the data *is* for this method (unpaired feedback given to SFT, tool calls
    for a template without a tool format, ...), not with one row: never skipped by
    ``on_error="skip"``, because skipping would drop every row or, worse, train on the wrong thing."""
