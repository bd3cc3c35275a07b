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

from alignkit.config import (
    ConfigError,
    Job,
    apply_aliases,
    apply_overrides,
    format_validation_error,
    read_job_file,
)


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
    """Validate a job given as a mapping (YAML already read, overrides applied)."""
    method = method or raw.get("method")
    if not method:
        raise ConfigError(f"{source}: no method given (add 'method: sft' or use 'alignkit sft')")
    cls = get_method(method, source).job
    raw = apply_aliases(dict(raw), cls.ALIASES)
    raw.setdefault("method", method)
    try:
        return cls.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, cls, source)) from None


def load_job(method: str | None, path: str | Path | None, overrides: list[str] | None = None) -> Job:
    """Read a YAML job file (or none), apply ``key=value`` overrides, validate."""
    raw, source = read_job_file(path)
    if method and raw.get("method") and raw["method"] != method:
        raise ConfigError(f"{source}: file says method '{raw['method']}' but the command is '{method}'")
    apply_overrides(raw, overrides or [])
    return build_job(method, raw, source)
