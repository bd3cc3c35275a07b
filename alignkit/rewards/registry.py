"""Find reward functions by name, by module path, or by file path.

Every reward function has one signature::

    fn(prompts: list[str], completions: list[str], **fields) -> list[float]

where each ``fields[name]`` is a list with one entry per completion (dataset columns such as
``answer`` or ``answer_value``). Functions must accept fields they do not use (``**fields``).

A spec given to :func:`get_reward_function` is one of

* a registered name (``"numeric_match"``; see :func:`available_reward_functions`);
* ``"package.module:function"`` (imported with :mod:`importlib`);
* ``"path/to/file.py:function"`` (the file is loaded by path, once per resolved path);
* a callable (returned as is, or with its options bound).

Two kinds of things can be registered:

* a *reward function* with :func:`register`. Keyword options given at lookup
  (``get_reward_function("numeric_match", abs_tol=0.01)``) are bound to it; each option must be a
  named parameter of the function, so a misspelt option fails at lookup, not in the middle of
  training. Bound options win over dataset fields of the same name.
* a *factory* with :func:`register_factory`: ``factory(**options) -> reward function``. Use this
  for rewards that need construction work or arguments, e.g. a regex to compile, a JSON schema
  to load, or a reward model to load once (``register_factory("reward_model", load_rm_reward)``
  then ``get_reward_function("reward_model", path="runs/rm")``).
"""
from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from alignkit.errors import UserError


class RewardFunction(Protocol):
    def __call__(self, prompts: list[str], completions: list[str], **fields: Any) -> list[float]: ...


class RewardSpecError(UserError, ValueError):
    """A reward spec that cannot be resolved: unknown name, missing module/file/attribute, bad options."""


@dataclass(frozen=True)
class _Entry:
    kind: str  # "function" or "factory"
    target: Callable[..., Any]


_REGISTRY: dict[str, _Entry] = {}
_FILE_MODULES: dict[str, Any] = {}


def _add(name: str, entry: _Entry, overwrite: bool) -> None:
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"reward function names must be non-empty strings without ':', got {name!r}")
    old = _REGISTRY.get(name)
    if old is not None and not overwrite and old != entry:
        raise ValueError(
            f"a reward function named {name!r} is already registered ({_describe(old.target)}); "
            "pass overwrite=True to replace it"
        )
    _REGISTRY[name] = entry


def register(name: str, fn: Callable | None = None, *, aliases: Sequence[str] = (), overwrite: bool = False):
    """Register a reward function under ``name`` (and ``aliases``).

    Use as a decorator (``@register("my_reward")``) or directly (``register("my_reward", fn)``).
    Registering a different object under a taken name raises unless ``overwrite=True``.
    """

    def decorate(target: Callable) -> Callable:
        if not callable(target):
            raise TypeError(f"register({name!r}): {target!r} is not callable")
        for each in (name, *aliases):
            _add(each, _Entry("function", target), overwrite)
        return target

    return decorate if fn is None else decorate(fn)


def register_factory(
    name: str, factory: Callable | None = None, *, aliases: Sequence[str] = (), overwrite: bool = False
):
    """Register ``factory(**options) -> reward function`` under ``name``.

    :func:`get_reward_function` calls the factory with the lookup's keyword options and returns
    what it builds. Works as a decorator too.
    """

    def decorate(target: Callable) -> Callable:
        if not callable(target):
            raise TypeError(f"register_factory({name!r}): {target!r} is not callable")
        for each in (name, *aliases):
            _add(each, _Entry("factory", target), overwrite)
        return target

    return decorate if factory is None else decorate(factory)


def unregister(name: str) -> None:
    """Remove a registered name (mostly for tests)."""
    _REGISTRY.pop(name, None)


def _load_builtins() -> None:
    # builtin.py registers itself on import; imported here lazily to avoid an import cycle.
    importlib.import_module("alignkit.rewards.builtin")
    importlib.import_module("alignkit.judges")  # registers the `llm_judge` factory
    importlib.import_module("alignkit.evaluate.factuality")  # registers `factual_answer`


def available_reward_functions() -> list[str]:
    """Sorted registered names (built-ins, aliases, factories and anything users registered)."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_reward_function(spec: str | Callable, **options: Any) -> Callable[..., list[float]]:
    """Resolve ``spec`` to a reward function, binding ``options`` (see the module docstring)."""
    if callable(spec):
        return _bind(spec, options, str(getattr(spec, "__name__", spec)))
    if not isinstance(spec, str) or not spec.strip():
        raise RewardSpecError(f"a reward spec must be a name, 'module:function', 'file.py:function' or a callable, got {spec!r}")
    spec = spec.strip()
    if ":" in spec and not _is_windows_drive_only(spec):
        location, _, attribute = spec.rpartition(":")
        if not location or not attribute:
            raise RewardSpecError(f"reward spec {spec!r}: expected 'module:function' or 'path/to/file.py:function'")
        if _looks_like_path(location):
            module = _load_file(location, spec)
        else:
            module = _import_module(location, spec)
        target = _get_attribute(module, attribute, spec)
        if not callable(target):
            raise RewardSpecError(f"reward spec {spec!r}: {attribute!r} is a {type(target).__name__}, not a callable")
        return _bind(target, options, spec)
    if spec.endswith(".py"):
        raise RewardSpecError(f"reward spec {spec!r}: name the function too, as '{spec}:function_name'")

    _load_builtins()
    entry = _REGISTRY.get(spec)
    if entry is None:
        names = sorted(_REGISTRY)
        close = difflib.get_close_matches(spec, names, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RewardSpecError(
            f"unknown reward function {spec!r}.{hint} Available: {', '.join(names)}. "
            "Custom functions: 'package.module:function' or 'path/to/file.py:function'."
        )
    if entry.kind == "factory":
        try:
            inspect.signature(entry.target).bind(**options)
        except TypeError as error:
            raise RewardSpecError(f"reward function {spec!r}: {error}{_option_hint(entry.target, options)}") from error
        except ValueError:  # no signature available (builtins implemented in C)
            pass
        built = entry.target(**options)
        if not callable(built):
            raise RewardSpecError(f"reward factory {spec!r} returned {type(built).__name__}, not a callable")
        return built
    return _bind(entry.target, options, spec)


def check_reward_spec(spec: str | Callable, **options: Any) -> None:
    """Raise `RewardSpecError` for a spec `get_reward_function` would refuse, without building anything
    heavy: a registered factory (``reward_model``, ``llm_judge``) is never called, only its options are
    checked; a ``module:function`` or ``file.py:function`` is imported (once; it is cached) to find the
    function and check its options. Job validation uses it, so a misspelt reward or option fails before
    any model is loaded (and before ``--print-config`` prints)."""
    if callable(spec) or (isinstance(spec, str) and ":" in spec and not _is_windows_drive_only(spec.strip())):
        get_reward_function(spec, **options)  # imports and binds; calls nothing
        return
    if not isinstance(spec, str) or not spec.strip():
        raise RewardSpecError(f"a reward spec must be a name, 'module:function', 'file.py:function' or a callable, got {spec!r}")
    spec = spec.strip()
    if spec.endswith(".py"):
        raise RewardSpecError(f"reward spec {spec!r}: name the function too, as '{spec}:function_name'")
    _load_builtins()
    load_reward_plugins()
    entry = _REGISTRY.get(spec)
    if entry is None:
        get_reward_function(spec)  # raises the unknown-name error with its suggestion
    if entry.kind == "factory":
        try:
            inspect.signature(entry.target).bind(**options)
        except TypeError as error:
            raise RewardSpecError(f"reward function {spec!r}: {error}{_option_hint(entry.target, options)}") from None
        except ValueError:
            pass
    else:
        _bind(entry.target, options, spec)


# -- helpers ---------------------------------------------------------------------------------------


def _is_windows_drive_only(spec: str) -> bool:
    # "C:\\rewards\\mine.py" (no function) — the only ':' is the drive's.
    return len(spec) > 2 and spec[1] == ":" and spec[0].isalpha() and spec.count(":") == 1 and spec[2] in "\\/"


def _looks_like_path(location: str) -> bool:
    return location.endswith(".py") or "/" in location or "\\" in location or location.startswith(".")


def _describe(target: Any) -> str:
    module = getattr(target, "__module__", None) or "?"
    name = getattr(target, "__qualname__", None) or repr(target)
    return f"{module}.{name}"


def _import_module(module_name: str, spec: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise RewardSpecError(
                f"reward spec {spec!r}: module {module_name!r} not found (is its folder on sys.path / "
                "PYTHONPATH? for a file, write 'path/to/file.py:function')"
            ) from error
        raise RewardSpecError(f"reward spec {spec!r}: importing {module_name!r} failed: {error}") from error
    except Exception as error:  # the module itself raised while importing
        raise RewardSpecError(
            f"reward spec {spec!r}: importing {module_name!r} failed: {type(error).__name__}: {error}"
        ) from error


def _load_file(location: str, spec: str):
    path = Path(location).expanduser().resolve()
    if not path.is_file():
        raise RewardSpecError(f"reward spec {spec!r}: file not found: {path}")
    key = str(path)
    cached = _FILE_MODULES.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    module_name = f"alignkit_reward_file_{path.stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise RewardSpecError(f"reward spec {spec!r}: cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    # Registered before executing so dataclasses, pickling and relative lookups see it.
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        sys.modules.pop(module_name, None)
        raise RewardSpecError(f"reward spec {spec!r}: running {path} failed: {type(error).__name__}: {error}") from error
    _FILE_MODULES[key] = module
    return module


def _get_attribute(module: Any, attribute: str, spec: str):
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None))]
            close = difflib.get_close_matches(part, public, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RewardSpecError(
                f"reward spec {spec!r}: {getattr(module, '__file__', None) or module.__name__} has no "
                f"attribute {attribute!r}.{hint}"
            )
        target = getattr(target, part)
    return target


def _named_parameters(fn: Callable) -> set[str] | None:
    """Names an option may take, or None when the signature cannot be read."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    names = {
        p.name
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    return names - {"prompts", "completions", "self"}


def _option_hint(fn: Callable, options: dict) -> str:
    names = _named_parameters(fn) or set()
    hints = []
    for key in options:
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.5)
            if close:
                hints.append(f"{key!r} -> {close[0]!r}?")
    return f" (did you mean {', '.join(hints)})" if hints else ""


class BoundReward:
    """A reward function with options bound; options take precedence over same-named fields."""

    def __init__(self, fn: Callable, options: dict[str, Any], name: str):
        self.fn = fn
        self.options = dict(options)
        self.__name__ = getattr(fn, "__name__", name)
        functools.update_wrapper(self, fn, assigned=("__module__", "__doc__", "__qualname__"), updated=())

    def __call__(self, prompts: list[str], completions: list[str], **fields: Any) -> list[float]:
        fields.update(self.options)
        return self.fn(prompts, completions, **fields)

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{self.__name__}({options})"


def _bind(fn: Callable, options: dict[str, Any], spec: str) -> Callable:
    if not options:
        return fn
    names = _named_parameters(fn)
    if names is not None:
        unknown = [key for key in options if key not in names]
        if unknown:
            listed = ", ".join(sorted(names)) or "none"
            raise RewardSpecError(
                f"reward function {spec!r} has no option {', '.join(map(repr, unknown))}"
                f"{_option_hint(fn, options)}; its named parameters: {listed}"
            )
    return BoundReward(fn, options, spec)


PLUGIN_MODULES = ("alignkit.rewards.reward_model", "alignkit.judges", "alignkit.rewards.graders")


def load_reward_plugins() -> None:
    """Import the modules that register constructed rewards (``reward_model``, ``llm_judge``)."""
    for name in PLUGIN_MODULES:
        importlib.import_module(name)
