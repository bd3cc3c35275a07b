"""The one list of training methods. A method is registered once, by decorating its recipe:

    @register_method("sft", job=SFTJob, help="supervised fine-tuning on prompt/response or chat data")
    class SFTRecipe: ...

and from that the CLI gets its sub-command (``alignkit sft``), ``alignkit train FILE`` and the job
loader know the ``method:`` name, and `alignkit.methods.base.run_job` finds the recipe. Built-in
methods are the modules of this package; a method defined anywhere else (a plugin, a test) joins by
being imported.
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from alignkit.aliases import hint_for, translate_keys
from alignkit.config import (
    ConfigError,
    Job,
    apply_aliases,
    apply_overrides,
    format_validation_error,
    read_job_file,
)
from alignkit.managed_jobs import translate_managed_job


@dataclass(frozen=True)
class Method:
    name: str
    job: type[Job]          # the validated job model (its keys, defaults, aliases)
    recipe: Callable        # recipe(job) -> an object the engine trains (see alignkit/engine.py)
    help: str


METHODS: dict[str, Method] = {}


def register_method(name: str, job: type[Job], help: str):
    """Class decorator: ``recipe`` trains jobs of class ``job`` under the method ``name``."""
    if not name or not name.replace("-", "_").isidentifier():
        raise ValueError(f"method name {name!r} must be a word (letters, digits, '_' or '-')")

    def wrap(recipe):
        existing = METHODS.get(name)
        if existing is not None and existing.recipe.__qualname__ != recipe.__qualname__:
            raise ValueError(f"method {name!r} is already registered by {existing.recipe.__module__}")
        job.METHOD = name
        METHODS[name] = Method(name, job, recipe, help)
        return recipe

    return wrap


def load_builtin_methods() -> None:
    """Import every module of `alignkit.methods`, so the built-in methods register themselves."""
    package = importlib.import_module("alignkit.methods")
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"alignkit.methods.{info.name}")


def methods() -> dict[str, Method]:
    """Every registered method, built-in ones included, by name."""
    load_builtin_methods()
    return dict(METHODS)


def get_method(name: str, source: str = "<config>") -> Method:
    known = methods()
    if name not in known:
        close = difflib.get_close_matches(name, list(known), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{source}: unknown method '{name}'{hint} (known: {', '.join(sorted(known))})")
    return known[name]


def build_job(method: str | None, raw: dict[str, Any], source: str = "<config>") -> Job:
    """Validate a job given as a mapping (YAML already read, overrides applied).

    A managed fine-tuning job body (OpenAI, Vertex AI) is translated first (`alignkit.managed_jobs`),
    then other tools' key names (`alignkit.aliases`); what was translated is in ``job.notes``."""
    raw, managed_method, notes = translate_managed_job(dict(raw), source)
    if managed_method and method and method != managed_method:
        raise ConfigError(f"{source}: the job file is a {managed_method} job but the command is '{method}'")
    method = method or managed_method or raw.get("method")
    if not method:
        raise ConfigError(_no_method(raw, source))
    cls = get_method(method, source).job
    raw, alias_notes = translate_keys(raw, method)
    raw = apply_aliases(raw, cls.ALIASES)
    raw.setdefault("method", method)
    try:
        job = cls.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, cls, source, lambda loc: hint_for(loc, cls))) from None
    job.notes.extend(notes + alias_notes)
    return job


def _no_method(raw: dict[str, Any], source: str) -> str:
    """"No method" and, at once, every key that no method knows (with hints)."""
    lines = [f"{source}: no method given (add 'method: sft' or use 'alignkit sft')"]
    unknown: dict[tuple, type[Job]] = {}
    first = True
    for name, method in methods().items():
        attempt, _ = translate_keys(raw, name)
        attempt = apply_aliases(attempt, method.job.ALIASES)
        attempt["method"] = name
        try:
            method.job.model_validate(attempt)
            found: set[tuple] = set()
        except ValidationError as error:
            found = {tuple(item["loc"]) for item in error.errors() if item["type"] == "extra_forbidden"}
        if first:
            unknown = {loc: method.job for loc in found}
            first = False
        else:
            unknown = {loc: cls for loc, cls in unknown.items() if loc in found}
    for loc, cls in sorted(unknown.items(), key=lambda item: [str(p) for p in item[0]]):
        hint = hint_for(loc, cls)
        lines.append(f"  unknown key '{'.'.join(map(str, loc))}' (in every method)" + (f"; {hint}" if hint else ""))
    return "\n".join(lines)


def load_job(method: str | None, path: str | Path | None, overrides: list[str] | None = None) -> Job:
    """Read a YAML (or JSON) job file (or none), apply ``key=value`` overrides, validate."""
    raw, source = read_job_file(path)
    named = raw.get("method")
    if method and isinstance(named, str) and named and named != method:
        raise ConfigError(f"{source}: file says method '{named}' but the command is '{method}'")
    raw, managed_method, notes = translate_managed_job(raw, source)
    if managed_method and method and method != managed_method:
        raise ConfigError(f"{source}: the job file is a {managed_method} job but the command is '{method}'")
    apply_overrides(raw, overrides or [])
    job = build_job(method or managed_method, raw, source)
    job.notes[:0] = notes
    return job
