"""`alignkit pipeline`: named stages, each an ordinary job, chained by references, re-run only when changed.

A pipeline file names its stages in order; a stage's values may refer to an earlier stage's output::

    output_dir: runs/pipeline-support        # every stage gets <output_dir>/<stage>/
    defaults:                                 # merged under every training stage
      training: {progress: false}
    stages:
      data:                                   # a command stage: runs a shell command
        run: python examples/make_support_data.py --pairs --out ${dir}
        outputs: {train: support_train.jsonl, valid: support_valid.jsonl}
      sft:                                    # a training stage: any job (sft, rm, dpo, grpo, ppo)
        config: examples/sft_support.yaml     # start from a job file (optional); keys below override it
        data: {train: "${data.train}", validation: "${data.valid}"}
      dpo:
        method: dpo
        model: {name_or_path: "${sft.final}"}
      eval:                                   # the report: every model on the same held-out metrics
        method: eval
        models: {base: smollm2-135m-instruct, sft: "${sft.final}", dpo: "${dpo.final}"}
        data: "${data.valid}"
        metrics: [perplexity]

What the runner does, and why:

* **References.** ``${stage.output}`` is replaced by that stage's output path: ``final`` (the trained
  model or adapter) and ``dir`` for training stages; ``dir``, ``report`` and ``json`` for the eval
  stage; ``dir`` and every name under ``outputs`` for command stages. ``${dir}`` is the stage's own
  folder. References decide the order (a topological sort that keeps the file's order where it is
  free); a cycle or a reference to an unknown stage or output fails before anything runs, in one
  line that names it. Every training stage's job is validated before the first stage starts.
* **Content-hash skipping.** Each stage has a key: the SHA-256 of its kind, its validated config
  (defaults filled in, so spelling a default out changes nothing; ``training.output_dir``,
  ``resume`` and ``progress`` left out), the alignkit version, the contents of every input file or
  folder its config names (data files, a local model, the script a command runs), and, for every
  stage it refers to, that stage's key. A stage whose key matches its last finished run, and whose
  outputs are still there, is skipped; changing one stage re-runs it and the stages downstream of
  it, nothing else. File digests are remembered by (path, size, modification time), so unchanged
  files are not read again.
* **Resume.** The state of every stage (``running``, ``done``, ``failed``, ``interrupted``) is kept in
  ``<output_dir>/pipeline.json``, written atomically. A training stage found ``running``, ``failed``
  or ``interrupted`` with the same key continues from its last checkpoint (the job's own
  ``training.resume``; set ``training.save_steps`` for checkpoints to exist). A stage whose key
  changed starts from an empty folder.
* **Selection.** ``only=[S]`` runs S alone; ``start=S`` runs S and every stage downstream of it; both
  re-run the selected stages even when up to date, and need the outputs of the stages they refer
  to. ``force=True`` re-runs every stage.
* **Report.** ``<output_dir>/pipeline.md`` lists every stage (ran / resumed / skipped, seconds, key,
  outputs) and includes the eval stage's side-by-side table (see `alignkit.evaluate.side_by_side`).

One pipeline runs at a time in an output folder (a lock file says which process holds it).
"""
from __future__ import annotations

import difflib
import fcntl
import gc
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import ValidationError

from alignkit import run_folder
from alignkit.config import (
    ConfigError,
    apply_overrides,
    format_validation_error,
    parse_override,
)
from alignkit.evaluate.side_by_side import EvalStageConfig, run_eval_stage
from alignkit.methods.base import run_job
from alignkit.methods.registry import build_job, methods

KEY_FORMAT = 1
TRAINING_OUTPUTS = ("final", "dir")
EVAL_OUTPUTS = ("dir", "report", "json")
TOP_LEVEL_KEYS = ("name", "description", "output_dir", "defaults", "stages")
COMMAND_KEYS = ("run", "outputs", "inputs", "env", "needs")
NOT_HASHED = (("training", "output_dir"), ("training", "resume"), ("training", "progress"))
REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_-]*)(?:\.([A-Za-z_][A-Za-z0-9_]*))?\}")
STAGE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
STATE_FILE = "pipeline.json"


class PipelineError(ConfigError):
    """A pipeline that cannot run; the message is one line naming the stage and what is wrong."""


# ------------------------------------------------------------------------------------------------ model

@dataclass
class Stage:
    """One stage: ``kind`` is ``training`` (``method`` one of the job methods), ``eval`` or ``command``."""

    name: str
    kind: str
    method: str
    raw: dict[str, Any]                       # the stage's config, references still unresolved
    needs: list[str] = field(default_factory=list)   # stages it refers to, in first-mention order

    def outputs(self) -> tuple[str, ...]:
        if self.kind == "training":
            return TRAINING_OUTPUTS
        if self.kind == "eval":
            return EVAL_OUTPUTS
        return ("dir", *(self.raw.get("outputs") or {}))


@dataclass
class Pipeline:
    path: Path
    output_dir: Path
    stages: dict[str, Stage]                  # in run order
    description: str = ""

    @property
    def order(self) -> list[str]:
        return list(self.stages)

    def stage_dir(self, name: str) -> Path:
        return self.output_dir / name

    def output_path(self, stage: str, output: str) -> Path:
        """Where ``${stage.output}`` points (the path is fixed before anything runs)."""
        kind = self.stages[stage].kind
        folder = self.stage_dir(stage)
        if output == "dir":
            return folder
        if kind == "training":
            return folder / "final"
        if kind == "eval":
            return folder / ("report.md" if output == "report" else "report.json")
        return folder / str(self.stages[stage].raw["outputs"][output])

    def downstream(self, name: str) -> list[str]:
        """``name`` and every stage that depends on it, directly or not, in run order."""
        chosen = {name}
        for stage in self.order:
            if any(need in chosen for need in self.stages[stage].needs):
                chosen.add(stage)
        return [stage for stage in self.order if stage in chosen]


# ------------------------------------------------------------------------------------------------ loading

def _close(word: str, options) -> str:
    match = difflib.get_close_matches(word, list(options), n=1)
    return f"; did you mean '{match[0]}'?" if match else ""


def _deep_merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _strings(value: Any):
    """Every string inside a nested config (dict values, list items)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _map_strings(value: Any, function: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return function(value)
    if isinstance(value, dict):
        return {key: _map_strings(item, function) for key, item in value.items()}
    if isinstance(value, list):
        return [_map_strings(item, function) for item in value]
    return value


def _read_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise PipelineError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise PipelineError(f"{path}: not valid YAML: {first}") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _split_overrides(overrides: list[str], stage_names: set[str], source: str) -> tuple[list[str], dict[str, list[str]]]:
    """``--set`` items: ``stage.key=value`` go to that stage, top-level keys (``output_dir=...``) stay here."""
    top, per_stage = [], {}
    for text in overrides or []:
        path, _ = parse_override(text)
        if path[0] in TOP_LEVEL_KEYS:
            top.append(text)
        elif path[0] in stage_names and len(path) > 1:
            per_stage.setdefault(path[0], []).append(text.split(".", 1)[1])
        else:
            raise PipelineError(f"{source}: override '{text}' names no stage (stages: {', '.join(sorted(stage_names))})"
                                f"{_close(path[0], stage_names)}")
    return top, per_stage


def load_pipeline(path: str | os.PathLike, overrides: list[str] | None = None) -> Pipeline:
    """Read and check a pipeline file: stages, references, order, and every training stage's job."""
    path = Path(path)
    raw = _read_yaml(path, "pipeline file")
    source = str(path)
    unknown = [key for key in raw if key not in TOP_LEVEL_KEYS]
    if unknown:
        raise PipelineError(f"{source}: unknown top-level key '{unknown[0]}'{_close(unknown[0], TOP_LEVEL_KEYS)} "
                            f"(valid: {', '.join(TOP_LEVEL_KEYS)})")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise PipelineError(f"{source}: 'stages' must be a mapping of stage names to stage configs")
    top_overrides, stage_overrides = _split_overrides(overrides or [], set(stages_raw), source)
    raw = apply_overrides(raw, top_overrides)
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise PipelineError(f"{source}: 'defaults' must be a mapping (keys merged under every training stage)")
    output_dir = Path(str(raw.get("output_dir") or f"runs/pipeline-{path.stem}"))

    stages: dict[str, Stage] = {}
    for name, config in stages_raw.items():
        name = str(name)
        where = f"{source}: stage '{name}'"
        if not STAGE_NAME.match(name):
            raise PipelineError(f"{where}: a stage name is letters, digits, '_' and '-', starting with a letter")
        if config is None:
            config = {}
        if not isinstance(config, dict):
            raise PipelineError(f"{where}: must be a mapping of keys, got {type(config).__name__}")
        stages[name] = _make_stage(name, dict(config), defaults, stage_overrides.get(name, []), path, where)

    for stage in stages.values():
        _check_references(stage, stages, source)
    order = _run_order(stages, source)
    pipeline = Pipeline(path=path, output_dir=output_dir, stages={name: stages[name] for name in order},
                        description=str(raw.get("description") or raw.get("name") or ""))
    for stage in pipeline.stages.values():   # fail on a bad job before the first stage trains
        if stage.kind == "training":
            _training_job(pipeline, stage, resolve=lambda s, o: f"/{s}/{o}")
        elif stage.kind == "eval":
            _eval_config(pipeline, stage, resolve=lambda s, o: f"/{s}/{o}")
    return pipeline


def _make_stage(name: str, config: dict, defaults: dict, overrides: list[str], path: Path, where: str) -> Stage:
    if "run" in config:
        unknown = [key for key in config if key not in COMMAND_KEYS]
        if unknown:
            raise PipelineError(f"{where}: unknown key '{unknown[0]}' for a command stage{_close(unknown[0], COMMAND_KEYS)} "
                                f"(valid: {', '.join(COMMAND_KEYS)})")
        outputs = config.get("outputs") or {}
        if not isinstance(outputs, dict) or any(not isinstance(v, str) for v in outputs.values()):
            raise PipelineError(f"{where}: 'outputs' must map output names to file names inside the stage folder")
        bad = [key for key in outputs if key == "dir" or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", str(key))]
        if bad:
            raise PipelineError(f"{where}: output name '{bad[0]}' is reserved or not a plain name")
        config = apply_overrides(config, overrides)
        return Stage(name, "command", "command", config)
    base_file = config.pop("config", None)
    merged = dict(defaults)
    if base_file is not None:
        job_file = Path(str(base_file))
        if not job_file.is_absolute() and not job_file.exists():
            job_file = path.parent / job_file
        merged = _deep_merge(merged, _read_yaml(job_file, f"{where}: job file"))
    merged = _deep_merge(merged, config)
    method = str(merged.get("method") or "")
    if not method:
        raise PipelineError(f"{where}: no method (add 'method: sft|rm|dpo|grpo|ppo|eval', or 'run:' for a command)")
    if method == "eval":
        merged = _deep_merge({}, config)   # defaults are training keys: not for the eval stage
        merged = apply_overrides(merged, overrides)
        return Stage(name, "eval", "eval", merged)
    known = methods()
    if method not in known:
        raise PipelineError(f"{where}: unknown method '{method}'{_close(method, [*known, 'eval'])} "
                            f"(known: {', '.join(sorted([*known, 'eval']))}, or 'run:' for a command)")
    merged = apply_overrides(merged, overrides)
    return Stage(name, "training", method, merged)


def _check_references(stage: Stage, stages: dict[str, Stage], source: str) -> None:
    for text in _strings(stage.raw):
        for match in REFERENCE.finditer(text):
            target, output = match.group(1), match.group(2)
            if output is None:
                if target == "dir":
                    continue
                raise PipelineError(f"{source}: stage '{stage.name}' refers to {match.group(0)}: write "
                                    f"${{STAGE.OUTPUT}} (e.g. ${{{target}.final}}) or ${{dir}} for its own folder")
            if target == stage.name:
                raise PipelineError(f"{source}: stage '{stage.name}' refers to itself ({match.group(0)}); "
                                    "use ${dir} for its own folder")
            if target not in stages:
                raise PipelineError(f"{source}: stage '{stage.name}' refers to {match.group(0)}: there is no stage "
                                    f"'{target}'{_close(target, stages)} (stages: {', '.join(stages)})")
            valid = stages[target].outputs()
            if output not in valid:
                raise PipelineError(f"{source}: stage '{stage.name}' refers to {match.group(0)}: stage '{target}' has "
                                    f"no output '{output}'{_close(output, valid)} (outputs: {', '.join(valid)})")
            if target not in stage.needs:
                stage.needs.append(target)
    extra = stage.raw.get("needs") if stage.kind == "command" else None
    for target in extra or []:
        if target not in stages:
            raise PipelineError(f"{source}: stage '{stage.name}' needs '{target}': there is no such stage"
                                f"{_close(str(target), stages)}")
        if target not in stage.needs:
            stage.needs.append(str(target))


def _run_order(stages: dict[str, Stage], source: str) -> list[str]:
    """Stages in an order where each comes after those it refers to; the file order where free."""
    names = list(stages)
    state = {name: 0 for name in names}   # 0 new, 1 on the current path, 2 placed
    order: list[str] = []
    path: list[str] = []

    def visit(name: str) -> None:
        if state[name] == 2:
            return
        if state[name] == 1:
            cycle = path[path.index(name):] + [name]
            raise PipelineError(f"{source}: the stages form a cycle: {' -> '.join(cycle)} "
                                "(each refers to the next)")
        state[name] = 1
        path.append(name)
        for need in stages[name].needs:
            visit(need)
        path.pop()
        state[name] = 2
        order.append(name)

    for name in names:
        visit(name)
    return order


# ------------------------------------------------------------------------------------------------ resolving

def _substitute(text: str, resolve: Callable[[str, str], str], own_dir: str) -> str:
    def replace(match: re.Match) -> str:
        if match.group(2) is None:
            return own_dir
        return resolve(match.group(1), match.group(2))

    return REFERENCE.sub(replace, text)


def _resolved(pipeline: Pipeline, stage: Stage, resolve: Callable[[str, str], str] | None = None) -> dict:
    """The stage's config with references replaced (by real paths unless ``resolve`` says otherwise)."""
    if resolve is None:
        def resolve(target: str, output: str) -> str:
            return str(pipeline.output_path(target, output))
    own = str(pipeline.stage_dir(stage.name))
    return _map_strings(stage.raw, lambda text: _substitute(text, resolve, own))


def _training_job(pipeline: Pipeline, stage: Stage, resolve=None):
    raw = _resolved(pipeline, stage, resolve)
    raw.setdefault("training", {})
    if not isinstance(raw["training"], dict):
        raise PipelineError(f"{pipeline.path}: stage '{stage.name}': 'training' must be a mapping")
    raw["training"] = {**raw["training"], "output_dir": str(pipeline.stage_dir(stage.name)), "resume": False}
    try:
        return build_job(stage.method, raw, f"{pipeline.path}: stage '{stage.name}'")
    except ConfigError as error:
        raise PipelineError(str(error).replace("\n", ";")) from None


def _eval_config(pipeline: Pipeline, stage: Stage, resolve=None):

    raw = _resolved(pipeline, stage, resolve)
    where = f"{pipeline.path}: stage '{stage.name}'"
    try:
        return EvalStageConfig.model_validate(raw)
    except ValidationError as error:
        problems = [item for item in error.errors() if item.get("type") != "extra_forbidden"]
        if len(problems) < len(error.errors()):
            message = format_validation_error(error, EvalStageConfig, where)
            raise PipelineError(message.replace("\n", ";")) from None
        item = problems[0]
        place = ".".join(str(part) for part in item.get("loc", ()))
        text = str(item.get("msg", "")).removeprefix("Value error, ")
        raise PipelineError(f"{where}: {place + ': ' if place else ''}{text}") from None


# ------------------------------------------------------------------------------------------------ keys

class DigestMemo:
    """SHA-256 of files, remembered by (path, size, mtime) so unchanged files are read once."""

    def __init__(self, table: dict | None = None):
        self.table: dict[str, list] = dict(table or {})

    def file(self, path: Path) -> str:
        stat = path.stat()
        absolute = str(path.resolve())
        known = self.table.get(absolute)
        if known and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
            return known[2]
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        value = digest.hexdigest()
        self.table[absolute] = [stat.st_size, stat.st_mtime_ns, value]
        return value

    def path(self, path: Path) -> str:
        if path.is_file():
            return self.file(path)
        digest = hashlib.sha256()
        for item in sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                           and ".git" not in p.parts):
            digest.update(f"{item.relative_to(path)}\0{self.file(item)}\n".encode())
        return digest.hexdigest()


def _input_paths(values, pipeline: Pipeline) -> list[Path]:
    """Existing files and folders named by the config's strings (whole strings, words of a command,
    and ``file.py:function`` specs), outside the pipeline's own output folder."""
    found: dict[str, Path] = {}
    own = pipeline.output_dir.resolve()
    for text in values:
        if "@stage:" in text or len(text) > 4096:
            continue
        candidates = [text]
        if " " in text:
            try:
                candidates += shlex.split(text)
            except ValueError:
                candidates += text.split()
        for candidate in list(candidates):
            if ":" in candidate and not candidate.startswith(("http:", "https:", "hf:")):
                candidates.append(candidate.rsplit(":", 1)[0])
        for candidate in candidates:
            if not candidate or candidate in (".", "..", "/") or "\n" in candidate:
                continue
            path = Path(candidate).expanduser()
            try:
                if not path.exists():
                    continue
                resolved = path.resolve()
            except OSError:
                continue
            if resolved == own or own in resolved.parents or resolved == Path.cwd().resolve():
                continue
            found[str(resolved)] = path
    return [found[key] for key in sorted(found)]


def _without(config: dict, paths) -> dict:
    config = json.loads(json.dumps(config, default=str))
    for path in paths:
        node = config
        for part in path[:-1]:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return config


def stage_key(pipeline: Pipeline, stage: Stage, keys: dict[str, str], memo: DigestMemo) -> tuple[str, dict]:
    """The stage's key (hex SHA-256) and what went into it."""
    import alignkit

    def token(target: str, output: str) -> str:
        return f"@stage:{target}:{keys[target][:16]}:{output}"

    if stage.kind == "training":
        config = _without(_training_job(pipeline, stage, token).model_dump(mode="json"), NOT_HASHED)
    elif stage.kind == "eval":
        config = _eval_config(pipeline, stage, token).model_dump(mode="json")
    else:
        config = _resolved(pipeline, stage, token)
        config["run"] = config["run"].replace(str(pipeline.stage_dir(stage.name)), "${dir}") \
            if isinstance(config["run"], str) else config["run"]
    inputs = {}
    for item in _input_paths(_strings(config), pipeline):
        inputs[str(item)] = memo.path(item)
    payload = {"format": KEY_FORMAT, "alignkit": alignkit.__version__, "kind": stage.kind, "method": stage.method,
               "config": config, "inputs": inputs,
               "upstream": {need: keys[need] for need in stage.needs}}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest(), payload


# ------------------------------------------------------------------------------------------------ state

class State:
    """``<output_dir>/pipeline.json``: each stage's key, status, times and summary; file digests."""

    def __init__(self, folder: Path):
        self.path = folder / STATE_FILE
        data = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                data = {}
        self.stages: dict[str, dict] = data.get("stages", {})
        self.memo = DigestMemo(data.get("digests", {}))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"format": KEY_FORMAT, "stages": self.stages, "digests": self.memo.table},
                                        indent=1, default=str))
        os.replace(temporary, self.path)

    def update(self, name: str, **values) -> None:
        self.stages.setdefault(name, {}).update(values)
        self.save()


class _Lock:
    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / ".pipeline.lock"
        self.handle = None

    def __enter__(self):
        self.handle = self.path.open("a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "another process"
            self.handle.close()
            raise PipelineError(f"another alignkit pipeline is running in {self.path.parent} (pid {holder})") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(str(os.getpid()))
        self.handle.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


# ------------------------------------------------------------------------------------------------ planning

@dataclass
class StepPlan:
    stage: str
    key: str
    action: str        # run | resume | skip | not selected
    reason: str


def _outputs_exist(pipeline: Pipeline, stage: Stage) -> bool:
    if stage.kind == "training":
        return pipeline.output_path(stage.name, "final").exists()
    if stage.kind == "eval":
        return pipeline.output_path(stage.name, "json").exists()
    return all(pipeline.output_path(stage.name, output).exists() for output in stage.outputs())


def _checkpoints(folder: Path) -> bool:
    return run_folder.latest_checkpoint(folder / "checkpoints") is not None


def plan(pipeline: Pipeline, state: State, only: list[str] | None = None, start: str | None = None,
         force: bool = False) -> list[StepPlan]:
    """What each stage will do and why, without running anything."""
    for name in [*(only or []), *([start] if start else [])]:
        if name not in pipeline.stages:
            raise PipelineError(f"{pipeline.path}: no stage '{name}'{_close(name, pipeline.stages)} "
                                f"(stages: {', '.join(pipeline.stages)})")
    if only and start:
        raise PipelineError("give --only or --from, not both")
    selected = set(only) if only else set(pipeline.downstream(start)) if start else set(pipeline.stages)
    forced = force or bool(only) or bool(start)
    keys: dict[str, str] = {}
    steps = []
    for name, stage in pipeline.stages.items():
        key, _ = stage_key(pipeline, stage, keys, state.memo)
        keys[name] = key
        record = state.stages.get(name, {})
        same = record.get("key") == key
        if name not in selected:
            status = "up to date" if same and record.get("status") == "done" else "out of date"
            steps.append(StepPlan(name, key, "not selected", status))
            continue
        if same and record.get("status") in ("running", "failed", "interrupted") and stage.kind == "training" \
                and _checkpoints(pipeline.stage_dir(name)):
            steps.append(StepPlan(name, key, "resume", f"last run {record['status']}; continues from its checkpoint"))
        elif same and record.get("status") == "done" and _outputs_exist(pipeline, stage) and not forced:
            steps.append(StepPlan(name, key, "skip", "up to date"))
        elif forced and same and record.get("status") == "done":
            steps.append(StepPlan(name, key, "run", "selected to re-run"))
        elif not record:
            steps.append(StepPlan(name, key, "run", "never ran"))
        elif not same:
            changed = [need for need in stage.needs if state.stages.get(need, {}).get("key") != keys[need]]
            steps.append(StepPlan(name, key, "run", f"upstream changed ({', '.join(changed)})" if changed
                                  else "config or inputs changed"))
        elif not _outputs_exist(pipeline, stage):
            steps.append(StepPlan(name, key, "run", "outputs missing"))
        else:
            steps.append(StepPlan(name, key, "run", f"last run {record.get('status')}"))
    running = {step.stage for step in steps if step.action in ("run", "resume")}
    for step in steps:
        if step.action not in ("run", "resume"):
            continue
        for need in pipeline.stages[step.stage].needs:
            if need in running:
                continue
            if not _outputs_exist(pipeline, pipeline.stages[need]):
                raise PipelineError(f"stage '{step.stage}' needs the outputs of stage '{need}', which has not run "
                                    f"(run it first, e.g. --from {need})")
    return steps


# ------------------------------------------------------------------------------------------------ running

def _run_training(pipeline: Pipeline, stage: Stage, resume: bool) -> dict:
    job = _training_job(pipeline, stage)
    job.training.resume = bool(resume)
    summary = run_job(job)
    return {"final": summary["final"], "steps": summary["steps"], "seconds": summary["seconds"],
            "first_eval": summary.get("first_eval", {}), "last_eval": summary.get("last_eval", {})}


def _run_command(pipeline: Pipeline, stage: Stage) -> dict:
    config = _resolved(pipeline, stage)
    folder = pipeline.stage_dir(stage.name)
    folder.mkdir(parents=True, exist_ok=True)
    command = config["run"]
    environment = {**os.environ, "ALIGNKIT_STAGE_DIR": str(folder),
                   **{str(k): str(v) for k, v in (config.get("env") or {}).items()}}
    shell = isinstance(command, str)
    print(f"[pipeline] {stage.name}: $ {command if shell else shlex.join(map(str, command))}", flush=True)
    completed = subprocess.run(command if shell else [str(c) for c in command], shell=shell, env=environment)
    if completed.returncode != 0:
        raise PipelineError(f"stage '{stage.name}': the command exited with status {completed.returncode}")
    missing = [name for name in stage.outputs() if not pipeline.output_path(stage.name, name).exists()]
    if missing:
        raise PipelineError(f"stage '{stage.name}': the command finished but did not write output '{missing[0]}' "
                            f"({pipeline.output_path(stage.name, missing[0])})")
    return {"outputs": {name: str(pipeline.output_path(stage.name, name)) for name in stage.outputs()}}


def _run_eval(pipeline: Pipeline, stage: Stage) -> dict:
    config = _eval_config(pipeline, stage)
    if config.judge and config.against is None:
        config = config.model_copy(update={"against": default_against(pipeline, stage)})
    memo = DigestMemo()
    paths = list(config.data.values()) if isinstance(config.data, dict) else [config.data]
    digests = {path: memo.path(Path(path)) for path in [*paths, config.judge_data] if path and Path(path).exists()}
    return run_eval_stage(config, pipeline.stage_dir(stage.name), pipeline.output_dir / ".cache" / "eval",
                          model_keys=_model_keys(pipeline, stage, config), data_digests=digests)


def default_against(pipeline: Pipeline, stage: Stage) -> dict[str, str]:
    """Each model of an eval stage paired with the model its training stage started from.

    ``dpo: ${dpo.final}`` whose stage starts from ``${sft.final}`` is compared with the model entry
    that names ``${sft.final}``; ``sft`` starting from ``smollm2-135m-instruct`` with the entry naming
    that model. Models with no such entry are not compared.
    """
    models = {name: str(spec) for name, spec in (stage.raw.get("models") or {}).items()}
    pairs = {}
    for name, spec in models.items():
        references = REFERENCE.findall(spec)
        if not references or pipeline.stages[references[0][0]].kind != "training":
            continue
        source = pipeline.stages[references[0][0]]
        start = (source.raw.get("model") or {})
        start = str(start.get("adapter") or start.get("name_or_path") or "smollm2-135m-instruct") \
            if isinstance(start, dict) else str(start)
        start_references = {target for target, _ in REFERENCE.findall(start)}
        for other, other_spec in models.items():
            if other == name:
                continue
            other_references = {target for target, _ in REFERENCE.findall(other_spec)}
            if (start_references and start_references == other_references) or \
                    (not start_references and other_spec == start):
                pairs[name] = other
                break
    return pairs


def _model_keys(pipeline: Pipeline, stage: Stage, config) -> dict[str, str]:
    """For the eval cache: each model's identity, the key of the stage that made it when it is a reference."""
    state = State(pipeline.output_dir)
    keys = {}
    for name, spec in stage.raw.get("models", {}).items() if isinstance(stage.raw.get("models"), dict) else []:
        references = REFERENCE.findall(str(spec))
        if references:
            keys[name] = "+".join(f"{t}:{state.stages.get(t, {}).get('key', '')}:{o}" for t, o in references)
        else:
            resolved = config.models[name]
            path = Path(resolved)
            keys[name] = f"{resolved}:{DigestMemo(state.memo.table).path(path)}" if path.exists() else resolved
    return keys


def run_pipeline(pipeline: Pipeline, only: list[str] | None = None, start: str | None = None, force: bool = False,
                 dry_run: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the stages that need running; returns ``{"steps": [...], "report": path}``."""
    with _Lock(pipeline.output_dir):
        state = State(pipeline.output_dir)
        steps = plan(pipeline, state, only=only, start=start, force=force)
        width = max(len(name) for name in pipeline.stages)
        log(f"[pipeline] {pipeline.path} -> {pipeline.output_dir}")
        for step in steps:
            log(f"[pipeline]   {step.stage:<{width}}  {step.action:<12} {step.reason}  (key {step.key[:12]})")
        if dry_run:
            return {"steps": [vars(step) for step in steps], "report": None}
        done = []
        for step in steps:
            stage = pipeline.stages[step.stage]
            if step.action in ("skip", "not selected"):
                done.append({**vars(step), "seconds": state.stages.get(step.stage, {}).get("seconds")})
                continue
            folder = pipeline.stage_dir(step.stage)
            resume = step.action == "resume"
            if not resume and folder.exists():
                shutil.rmtree(folder)   # a stale run of another key, or a forced re-run: start clean
            log(f"[pipeline] {step.stage}: {'resuming' if resume else 'running'} ({stage.method})")
            state.update(step.stage, key=step.key, status="running", method=stage.method,
                         started=time.strftime("%Y-%m-%d %H:%M:%S"), error=None)
            started = time.time()
            try:
                if stage.kind == "training":
                    result = _run_training(pipeline, stage, resume)
                elif stage.kind == "eval":
                    result = _run_eval(pipeline, stage)
                else:
                    result = _run_command(pipeline, stage)
            except KeyboardInterrupt:
                state.update(step.stage, status="interrupted", seconds=round(time.time() - started, 1))
                log(f"[pipeline] {step.stage}: interrupted; the next run resumes it")
                raise
            except BaseException as error:
                state.update(step.stage, status="failed", error=f"{type(error).__name__}: {error}"[:500],
                             seconds=round(time.time() - started, 1))
                raise
            finally:
                gc.collect()
            seconds = round(time.time() - started, 1)
            state.update(step.stage, status="done", seconds=seconds, finished=time.strftime("%Y-%m-%d %H:%M:%S"),
                         result=result, resumed=resume)
            (folder / "stage.json").write_text(json.dumps({"stage": step.stage, "key": step.key, "method": stage.method,
                                                           "result": result}, indent=1, default=str))
            done.append({**vars(step), "seconds": seconds})
            log(f"[pipeline] {step.stage}: done in {seconds} s")
        report = write_pipeline_report(pipeline, State(pipeline.output_dir), done)
        log(f"[pipeline] report: {report}")
        return {"steps": done, "report": str(report)}


def write_pipeline_report(pipeline: Pipeline, state: State, steps: list[dict]) -> Path:
    """``<output_dir>/pipeline.md``: every stage with what happened, and the eval stages' tables."""
    lines = [f"# alignkit pipeline: {pipeline.path.name}", ""]
    if pipeline.description:
        lines += [pipeline.description, ""]
    lines += ["| stage | method | this run | seconds (last run) | key | output |", "| --- | --- | --- | --- | --- | --- |"]
    for step in steps:
        name = step["stage"]
        stage = pipeline.stages[name]
        record = state.stages.get(name, {})
        happened = {"run": "ran", "resume": "resumed", "skip": "skipped (up to date)"}.get(step["action"], step["action"])
        output = pipeline.output_path(name, "final" if stage.kind == "training" else
                                      "report" if stage.kind == "eval" else "dir")
        lines.append(f"| {name} | {stage.method} | {happened} | {record.get('seconds', '—')} | "
                     f"`{step['key'][:12]}` | `{output}` |")
    for name, stage in pipeline.stages.items():
        record = state.stages.get(name, {})
        if stage.kind == "training" and record.get("status") == "done":
            result = record.get("result", {})
            first, last = result.get("first_eval") or {}, result.get("last_eval") or {}
            if first.get("step") == last.get("step"):   # one evaluation only (no eval at step 0)
                first = {}
            shown = [k for k in last if k != "step"][:6]
            if shown:
                lines += ["", f"## {name}: validation during training", "",
                          "| metric | start | end |", "| --- | --- | --- |"]
                lines += [f"| {k} | {_number(first.get(k))} | {_number(last.get(k))} |" for k in shown]
    for name, stage in pipeline.stages.items():
        report = pipeline.output_path(name, "report") if stage.kind == "eval" else None
        if report is not None and report.exists():
            body = report.read_text().split("\n", 1)[1] if report.read_text().startswith("#") else report.read_text()
            lines += ["", f"## {name}", body.strip()]
    path = pipeline.output_dir / "pipeline.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)
