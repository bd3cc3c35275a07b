"""Weighted sums of reward functions, with an explicit policy for functions that misbehave.

``CombinedReward(specs)(prompts, completions, **fields)`` calls every function once on the whole
batch and returns a :class:`RewardResult`: ``total[i] = sum_k weight_k * value_k[i]`` and the
unweighted values of each function under its label.

A function *misbehaves* on item ``i`` when it raises, returns a list of the wrong length, or gives a
value that is not a finite real number (None, NaN, inf, a string...). With ``on_error="raise"`` a
:class:`RewardFunctionError` names the function, the item's index, its prompt and completion
(truncated) and the cause. With ``on_error="zero"`` the item scores 0 for that function, the error
is counted in ``RewardResult.errors`` and the first messages are kept in ``error_messages``.

A whole-batch call that raises (or returns the wrong length) is retried one item at a time, so that
the bad items are found and the good ones keep their values; reward functions with side effects
(API calls) may thus see good items twice on that rare path.

Contained failures. After ``max_consecutive_failures`` items in a row have failed in that item-by-item
pass, the function is not called again for the rest of the batch (a dead endpoint is not retried
once per completion); the items left are counted in ``RewardResult.skipped``. When a function fails
on every item of a batch of two or more, even under ``on_error="zero"``, a `RewardFunctionError`
says so and the run stops: all-zero scores would train on nothing. A function that has a
``reset_circuit()`` (the ``llm_judge`` reward over HTTP) has it called at the start of every batch,
so an endpoint found down in one step is tried again in the next. ``CombinedReward.stats`` holds the
counts per function over the whole run (for the run report).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from alignkit.errors import UsageError, UserError
from alignkit.rewards.registry import get_reward_function

_MAX_SHOWN = 200


class RewardFunctionError(UserError, RuntimeError):
    """A reward function failed; ``function``, ``index`` (None for a whole batch), ``prompt``,
    ``completion`` and ``cause`` say where and why."""

    def __init__(self, function: str, index: int | None, prompt: Any, completion: Any, cause: BaseException | str,
                 where: str | None = None):
        self.function, self.index, self.prompt, self.completion, self.cause = function, index, prompt, completion, cause
        super().__init__(_describe_failure(function, index, prompt, completion, cause, where))


def _truncate(text: Any, limit: int = _MAX_SHOWN) -> str:
    text = str(text)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text) - limit} more chars)"


def _describe_failure(function: str, index: int | None, prompt: Any, completion: Any, cause: BaseException | str,
                      where: str | None = None) -> str:
    reason = f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else str(cause)
    where = where or (f"item {index}" if index is not None else "the batch (each item alone succeeded)")
    lines = [f"reward function {function!r} failed on {where}: {reason}"]
    if index is not None:
        lines.append(f"  prompt:     {_truncate(prompt)}")
        lines.append(f"  completion: {_truncate(completion)}")
    return "\n".join(lines)


@dataclass
class RewardSpec:
    """One term of a combined reward.

    ``name``: a registered name, ``"package.module:function"``, ``"path/to/file.py:function"`` or a
    callable; ``weight`` multiplies its values in the total; ``kwargs`` are its options (see
    :func:`~alignkit.rewards.get_reward_function`); ``label`` is the key of its values in
    ``RewardResult.per_function`` (default: the name, or the function part of a path spec).
    """

    name: str | Callable
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    label: str | None = None

    @classmethod
    def coerce(cls, value: RewardSpec | str | Callable | Mapping[str, Any]) -> RewardSpec:
        """A spec from a RewardSpec, a name/callable, or a mapping with keys name, weight, kwargs, label."""
        if isinstance(value, RewardSpec):
            return value
        if isinstance(value, str) or callable(value):
            return cls(value)
        if isinstance(value, Mapping):
            allowed = {"name", "weight", "kwargs", "label"}
            unknown = sorted(set(value) - allowed)
            if unknown:
                raise UsageError(f"reward spec {dict(value)!r}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
            if "name" not in value:
                raise UsageError(f"reward spec {dict(value)!r} needs a 'name'")
            return cls(value["name"], float(value.get("weight", 1.0)), dict(value.get("kwargs") or {}), value.get("label"))
        raise TypeError(f"cannot make a reward spec from {type(value).__name__}: {value!r}")

    def default_label(self) -> str:
        if self.label:
            return self.label
        if callable(self.name):
            return str(getattr(self.name, "__name__", type(self.name).__name__))
        return self.name.rpartition(":")[2] if ":" in self.name else self.name


@dataclass
class RewardResult:
    """Per-completion totals, unweighted values per function, and the errors met on the way."""

    total: list[float]
    per_function: dict[str, list[float]]
    errors: int = 0
    error_messages: list[str] = field(default_factory=list)
    skipped: int = 0  # items not scored because their function had failed too often in a row

    def summary(self) -> dict[str, float]:
        """Means for logging: ``reward``, ``reward_std``, ``rewards/<label>``, ``reward_errors``
        (failed items, skipped ones included)."""
        n = len(self.total)
        mean = sum(self.total) / n if n else 0.0
        std = math.sqrt(sum((t - mean) ** 2 for t in self.total) / n) if n else 0.0
        out = {"reward": mean, "reward_std": std}
        for label, values in self.per_function.items():
            out[f"rewards/{label}"] = sum(values) / n if n else 0.0
        out["reward_errors"] = float(self.errors)
        return out


class CombinedReward:
    """``sum_k weight_k * reward_k`` over a list of specs, with an error policy (see module docstring)."""

    def __init__(
        self,
        specs: Sequence[RewardSpec | str | Callable | Mapping[str, Any]] | RewardSpec | str | Callable,
        on_error: str = "raise",
        max_error_messages: int = 5,
        max_consecutive_failures: int = 3,
    ):
        if on_error not in ("raise", "zero"):
            raise UsageError(f"on_error must be 'raise' or 'zero', got {on_error!r}")
        if max_consecutive_failures < 1:
            raise UsageError(f"max_consecutive_failures must be >= 1, got {max_consecutive_failures}")
        self.max_consecutive_failures = max_consecutive_failures
        if isinstance(specs, (RewardSpec, str, Mapping)) or callable(specs):
            specs = [specs]
        self.specs = [RewardSpec.coerce(s) for s in specs]
        if not self.specs:
            raise UsageError("CombinedReward needs at least one reward spec")
        self.on_error = on_error
        self.max_error_messages = max_error_messages
        self.labels: list[str] = []
        self.weights: list[float] = []
        self.functions: list[Callable] = []
        for spec in self.specs:
            label = spec.default_label()
            if label in self.labels:
                raise UsageError(f"two reward functions would both be reported as {label!r}; give them distinct labels")
            weight = float(spec.weight)
            if not math.isfinite(weight):
                raise UsageError(f"reward {label!r}: weight must be finite, got {spec.weight!r}")
            self.labels.append(label)
            self.weights.append(weight)
            self.functions.append(get_reward_function(spec.name, **spec.kwargs))
        self.stats = {label: {"batches": 0, "items": 0, "errors": 0, "skipped": 0} for label in self.labels}

    def report_lines(self) -> list[str]:
        """One line per function that failed at least once over the run (for the run report)."""
        lines = []
        for label, function in zip(self.labels, self.functions):
            counts = self.stats[label]
            circuit = getattr(function, "circuit_stats", None)
            endpoint = circuit() if callable(circuit) else None
            if not counts["errors"] and not (endpoint and endpoint["failed_requests"]):
                continue
            line = (f"reward {label}: {counts['errors']} of {counts['items']} items failed in {counts['batches']} "
                    f"batches ({counts['skipped']} not called after {self.max_consecutive_failures} failures in a row)")
            if endpoint:
                line += (f"; endpoint {endpoint['endpoint']}: {endpoint['failed_requests']} requests failed, "
                         f"{endpoint['skipped_requests']} refused while down, down {endpoint['circuit_opened']} times")
            lines.append(line)
        return lines

    def __repr__(self) -> str:
        terms = " + ".join(f"{w:g}*{label}" for w, label in zip(self.weights, self.labels))
        return f"CombinedReward({terms}, on_error={self.on_error!r})"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> RewardResult:
        prompts, completions = list(prompts), list(completions)
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} completions")
        for name, column in fields.items():
            if isinstance(column, (str, bytes)) or not hasattr(column, "__len__") or len(column) != n:
                size = len(column) if hasattr(column, "__len__") and not isinstance(column, (str, bytes)) else "not a list"
                raise ValueError(f"field {name!r} must be a list with one entry per completion ({n}), got {size}")

        result = RewardResult(total=[0.0] * n, per_function={})
        for label, weight, function in zip(self.labels, self.weights, self.functions):
            reset = getattr(function, "reset_circuit", None)
            if callable(reset):
                reset()
            errors_before, skipped_before, messages_before = result.errors, result.skipped, len(result.error_messages)
            values = self._call_one(label, function, prompts, completions, fields, result)
            failed = result.errors - errors_before
            counts = self.stats[label]
            counts["batches"] += 1
            counts["items"] += n
            counts["errors"] += failed
            counts["skipped"] += result.skipped - skipped_before
            if n >= 2 and failed >= n:
                first = result.error_messages[messages_before] if len(result.error_messages) > messages_before else ""
                raise RewardFunctionError(
                    label, None, None, None,
                    f"{first.splitlines()[0] if first else 'no value'}. With every score 0 this step would train on "
                    "nothing, so the run stops here",
                    where=f"every one of the {n} completions of this batch")
            result.per_function[label] = values
            result.total = [t + weight * v for t, v in zip(result.total, values)]
        return result

    # -- internals ---------------------------------------------------------------------------------

    def _fail(self, result: RewardResult, label: str, index: int | None, prompt, completion, cause) -> None:
        if self.on_error == "raise":
            error = RewardFunctionError(label, index, prompt, completion, cause)
            if isinstance(cause, BaseException):
                raise error from cause
            raise error
        result.errors += 1
        if len(result.error_messages) < self.max_error_messages:
            result.error_messages.append(_describe_failure(label, index, prompt, completion, cause))

    def _call_one(self, label, function, prompts, completions, fields, result: RewardResult) -> list[float]:
        n = len(completions)
        try:
            raw = _as_list(function(prompts, completions, **fields))
            batch_problem: BaseException | str | None = None
            if raw is None or len(raw) != n:
                got = "a non-list" if raw is None else f"{len(raw)} values"
                batch_problem = f"returned {got} for {n} completions"
        except Exception as error:  # noqa: BLE001 - any failure of user code is handled by policy
            batch_problem, raw = error, None

        if batch_problem is None:
            values = []
            for i, value in enumerate(raw):
                number, problem = _check_value(value)
                if problem is not None:
                    self._fail(result, label, i, prompts[i], completions[i], problem)
                values.append(number)
            return values

        # The batch is unusable: call item by item to find the bad ones and keep the good ones.
        values, failed, in_a_row = [], 0, 0
        for i in range(n):
            if in_a_row >= self.max_consecutive_failures:  # contained: not called for the rest of the batch
                result.skipped += n - i
                for j in range(i, n):
                    self._fail(result, label, j, prompts[j], completions[j],
                               f"not called: it failed on {in_a_row} items in a row in this batch")
                values.extend([0.0] * (n - i))
                failed += n - i
                break
            item_fields = {name: _slice(column, i) for name, column in fields.items()}
            try:
                item = _as_list(function(prompts[i : i + 1], completions[i : i + 1], **item_fields))
                if item is None or len(item) != 1:
                    got = "a non-list" if item is None else f"{len(item)} values"
                    raise ValueError(f"returned {got} for 1 completion")
                number, problem = _check_value(item[0])
            except Exception as error:  # noqa: BLE001
                number, problem = 0.0, error
            if problem is not None:
                failed += 1
                in_a_row += 1
                self._fail(result, label, i, prompts[i], completions[i], problem)
            else:
                in_a_row = 0
            values.append(number)
        if failed == 0:
            # Only the batch call failed; items alone are fine (a batch-dependent bug). Report it once.
            self._fail(result, label, None, None, None, batch_problem)
        return values


def _slice(column: Any, i: int):
    try:
        return column[i : i + 1]
    except TypeError:
        return [column[i]]


def _as_list(values: Any) -> list | None:
    if values is None or isinstance(values, (str, bytes, Mapping)):
        return None
    if hasattr(values, "tolist") and not isinstance(values, list):  # numpy arrays, torch tensors
        values = values.tolist()
        if not isinstance(values, list):
            values = [values]
    try:
        return list(values)
    except TypeError:
        return None


def _check_value(value: Any) -> tuple[float, str | None]:
    """(float value, None) for a finite real number, else (0.0, a description of the problem)."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (TypeError, ValueError):
            pass
    if isinstance(value, numbers.Real):
        number = float(value)
        if math.isfinite(number):
            return number, None
        return 0.0, f"returned a non-finite value {number!r}"
    return 0.0, f"returned {type(value).__name__} {value!r} where a number was expected"
