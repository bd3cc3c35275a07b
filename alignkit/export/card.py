"""Model cards (``README.md``) for a run's ``final/`` folder and for every export.

A card says what was done, from what the run folder already records:

* YAML front matter in the Hub's model-card format, written with ``huggingface_hub.ModelCardData``:
  ``base_model`` (a hub id: the embedded model's upstream id, or the hub id the run started from;
  left out for local folders, which the Hub cannot link to), ``library_name`` (``peft`` for an
  adapter, ``transformers`` for a full model, ``gguf`` for a GGUF file), ``tags`` (``alignkit``, the
  method, ``lora``, ``reward-model`` ...), ``datasets`` (only data named on the Hub:
  ``hf://name`` or a bare ``org/name`` that is not a local file), ``pipeline_tag``;
* the base model, the method and its own settings (``beta``, ``loss_type``, ``num_generations`` ...),
  LoRA or full weights, the optimisation settings;
* every data file with its row counts (read, kept, skipped; the run's own notes);
* steps and time, the last training step's metrics, validation metrics at the start and the end,
  and the headline numbers of any ``alignkit eval`` report (``report.json``) with their intervals;
* how to load the folder, the alignkit version and the exact commands (training, export).

The training command is recorded in the run folder as ``command.txt`` when the card is first
written (`write_run_card`, called by ``run_job``), so export cards can quote it later.
"""
from __future__ import annotations

import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCardData

from alignkit import __version__
from alignkit.config import job_config, redact_secret_text
from alignkit.evaluate.report import _fmt as format_number
from alignkit.evaluate.report import _fmt_interval, headline_rows
from alignkit.model.heads import HEAD_CONFIG
from alignkit.model.load import (
    EMBEDDED_ALIASES,
    EMBEDDED_PUBLIC_ID,
    EMBEDDED_WEIGHTS_NOTE,
    SAVE_RECORD,
    public_model_id,
)

COMMAND_FILE = "command.txt"
CARD_FILE = "README.md"
METHOD_NAMES = {
    "sft": "supervised fine-tuning",
    "rm": "a reward model, Bradley-Terry on ranked pairs",
    "dpo": "direct preference optimisation, DPO family",
    "grpo": "reinforcement fine-tuning, GRPO",
    "ppo": "RLHF, PPO",
}
METHOD_TAGS = {"sft": ["sft"], "rm": ["reward-model"], "dpo": ["dpo"], "grpo": ["grpo", "reinforcement-learning"],
               "ppo": ["ppo", "rlhf", "reinforcement-learning"]}
TRAINING_KEYS = ("learning_rate", "lr_scheduler", "warmup_steps", "warmup_ratio", "batch_size",
                 "gradient_accumulation_steps", "epochs", "max_steps", "weight_decay", "max_grad_norm",
                 "precision", "gradient_checkpointing", "seed")
SECTIONS = ("method", "model", "lora", "data", "training")


def command_line(argv: list[str] | None = None) -> str:
    """The command that is running, as a user would type it (``alignkit ...`` for the CLI)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return ""
    program = Path(argv[0])
    if program.name == "alignkit" or (program.name == "__main__.py" and program.parent.name == "alignkit"):
        return shlex.join(["alignkit", *argv[1:]])
    return shlex.join(["python", *argv])


# ------------------------------------------------------------------------------------------------ facts

@dataclass
class RunFacts:
    """What a run folder records: its resolved config, summary, command and eval reports."""

    run_dir: Path | None
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    command: str | None = None
    eval_reports: list[dict] = field(default_factory=list)

    @property
    def method(self) -> str | None:
        return self.config.get("method") or self.summary.get("method")


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def find_eval_reports(run_dir: Path | None, extra: list[str | Path] = ()) -> list[dict]:
    """``report.json`` files of ``alignkit eval``: the ones given, then any inside the run folder."""
    paths: list[Path] = []
    for item in extra:
        path = Path(item)
        path = path / "report.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"--eval-report {item}: no report.json there (write one with alignkit eval "
                                    "--report-dir)")
        paths.append(path)
    if run_dir is not None:
        paths += sorted(p for p in run_dir.glob("*/report.json") if p not in paths)
    reports = []
    for path in paths:
        report = _read_json(path)
        if "headline" in report or "metrics" in report:
            reports.append({**report, "path": str(path)})
    return reports


def collect_run_facts(run_dir: str | Path | None, eval_reports: list[str | Path] = ()) -> RunFacts:
    """Read ``config.yaml``, ``summary.json``, ``command.txt`` and eval reports of a run folder."""
    if run_dir is None:
        return RunFacts(None, eval_reports=find_eval_reports(None, eval_reports))
    run_dir = Path(run_dir)
    config: dict = {}
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        config = {}
    command_path = run_dir / COMMAND_FILE
    command = command_path.read_text().strip() if command_path.is_file() else None
    return RunFacts(run_dir, config if isinstance(config, dict) else {}, _read_json(run_dir / "summary.json"),
                    command, find_eval_reports(run_dir, eval_reports))


# ------------------------------------------------------------------------------------------------ metadata

def hub_base_model(name_or_path: str | None) -> str | None:
    """The hub id to name as ``base_model``: `public_model_id` of the base, or, for a base that is itself
    a saved alignkit model (a run's ``final/``), the public id its ``alignkit.json`` records."""
    if not name_or_path:
        return None
    text = str(name_or_path).strip()
    public = public_model_id(text)
    if public is None and (Path(text).expanduser() / SAVE_RECORD).is_file():
        public = _read_json(Path(text).expanduser() / SAVE_RECORD).get("base_model_id")
    return public


def hub_datasets(data: dict) -> list[str]:
    """Training data the Hub can link to: ``hf://name`` or a bare ``org/name`` that is not a local file."""
    names = []
    for key in ("train", "validation"):
        value = data.get(key)
        if not value:
            continue
        value = str(value)
        if value.startswith("hf://"):
            names.append(value.removeprefix("hf://").split(":", 1)[0])
        elif "/" in value and public_model_id(value) == value and not value.endswith(
                (".jsonl", ".json", ".csv", ".parquet")):
            names.append(value)
    return list(dict.fromkeys(names))


def card_metadata(facts: RunFacts, library_name: str, extra_tags: list[str] = (), pipeline_tag: str | None = None,
                  base_model: str | None = None) -> dict:
    model = facts.config.get("model") or {}
    base = base_model or hub_base_model(model.get("name_or_path"))
    tags = ["alignkit", *METHOD_TAGS.get(facts.method or "", []), *extra_tags]
    lora = facts.config.get("lora") or {}
    if lora and lora.get("enabled", True):
        tags.append("lora")
    metadata: dict[str, Any] = {"base_model": base, "library_name": library_name,
                                "tags": list(dict.fromkeys(tags)), "pipeline_tag": pipeline_tag}
    datasets = hub_datasets(facts.config.get("data") or {})
    if datasets:
        metadata["datasets"] = datasets
    return {key: value for key, value in metadata.items() if value}


# ------------------------------------------------------------------------------------------------ body

def _fmt(value: Any) -> str:
    return format_number(value)


def _settings_rows(facts: RunFacts) -> list[tuple[str, str]]:
    config = facts.config
    rows: list[tuple[str, str]] = []
    model = config.get("model") or {}
    if model:
        rows.append(("base model", f"`{model.get('name_or_path')}`"
                     + (f" + adapter `{model['adapter']}`" if model.get("adapter") else "")))
    if facts.method:
        rows.append(("method", f"`{facts.method}`: {METHOD_NAMES.get(facts.method, facts.method)}"))
    lora = config.get("lora") or {}
    if lora and lora.get("enabled", True):
        layers = lora.get("layers")
        rows.append(("weights trained", f"LoRA rank {lora.get('rank')}, alpha {lora.get('alpha')}, dropout "
                     f"{lora.get('dropout')}, modules {lora.get('target_modules')}"
                     + (f", layers {layers}" if layers is not None else "")))
    elif facts.method:
        rows.append(("weights trained", "all (full fine-tuning)"))
    for key, value in config.items():  # the method's own settings: every top-level key that is not a section
        if key in SECTIONS or value is None or isinstance(value, (dict, list)) and not value:
            continue
        rows.append((key, f"`{json.dumps(value) if isinstance(value, (dict, list)) else value}`"))
    training = config.get("training") or {}
    for key in TRAINING_KEYS:
        if training.get(key) is not None:
            rows.append((key, f"`{training[key]}`"))
    data = config.get("data") or {}
    if data.get("max_length"):
        rows.append(("max_length", f"`{data['max_length']}`"))
    return rows


def _metrics_table(title: str, metrics: dict) -> list[str]:
    rows = [(k, v) for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))]
    if not rows:
        return []
    return [title, "", "| metric | value |", "| --- | --- |", *[f"| {k} | {_fmt(v)} |" for k, v in rows], ""]


def _eval_lines(reports: list[dict]) -> list[str]:
    lines: list[str] = []
    for report in reports:
        rows = report.get("headline") or headline_rows(report.get("metrics") or {})
        if not rows:
            continue
        meta = report.get("meta") or {}
        lines += [f"`alignkit eval` report `{report.get('path')}`"
                  + (f" (data: {meta['data']}; seed {meta.get('seed')})" if meta.get("data") else "") + ":", "",
                  "| metric | value | 95% interval | n |", "| --- | --- | --- | --- |"]
        for row in rows:
            name = row["name"] if row["name"] == row["metric"] else f"{row['metric']}: {row['name']}"
            lines.append(f"| {name} | {_fmt(row['value'])} | {_fmt_interval(row.get('low'), row.get('high'))} | "
                         f"{row.get('n') if row.get('n') is not None else '—'} |")
        if meta.get("command"):
            lines += ["", f"Command: `{meta['command']}`"]
        lines.append("")
    return lines


def render_card(facts: RunFacts, *, title: str, library_name: str, usage: str, description: str,
                extra_tags: list[str] = (), pipeline_tag: str | None = "text-generation",
                export_lines: list[str] = (), export_command: str | None = None,
                base_model: str | None = None) -> str:
    """The card's Markdown with its YAML front matter (`card_metadata`)."""
    metadata = ModelCardData(**card_metadata(facts, library_name, list(extra_tags), pipeline_tag, base_model))
    lines = ["---", metadata.to_yaml(), "---", "", f"# {title}", "", description, ""]
    if str((facts.config.get("model") or {}).get("name_or_path", "")).lower() in EMBEDDED_ALIASES:
        lines += [f"Base model: `{EMBEDDED_PUBLIC_ID}`. alignkit's embedded copy of it is {EMBEDDED_WEIGHTS_NOTE}; "
                  "an adapter fits that copy best, and a merged or GGUF export carries the exact weights.", ""]
    settings = _settings_rows(facts)
    if settings:
        lines += ["## Training", "", "| setting | value |", "| --- | --- |",
                  *[f"| {key} | {value} |" for key, value in settings], ""]
    notes = facts.summary.get("notes") or []
    if notes:
        lines += ["## Data", "", "Where every row went (read, kept, skipped), as the run reported it:", "",
                  *[f"- {note}" for note in notes], ""]
    summary = facts.summary
    results: list[str] = []
    if summary.get("steps") is not None:
        results += [f"- optimizer steps: {summary['steps']} in {summary.get('seconds')} s"
                    + (" (stopped early)" if summary.get("stopped_early") else ""), ""]
    results += _metrics_table("Last training step:", summary.get("last_train") or {})
    first, last = summary.get("first_eval") or {}, summary.get("last_eval") or {}
    eval_keys = [k for k in last if k != "step" and isinstance(last[k], (int, float))]
    if eval_keys:
        results += ["Validation (start of training -> end):", "", "| metric | start | end |", "| --- | --- | --- |"]
        for key in eval_keys:
            results.append(f"| {key} | {_fmt(first.get(key, math.nan))} | {_fmt(last[key])} |")
        results.append("")
    results += _eval_lines(facts.eval_reports)
    if results:
        lines += ["## Results", "", *results]
    if export_lines:
        lines += ["## This export", "", *export_lines, ""]
    lines += ["## How to use", "", usage.strip(), ""]
    reproduce = [f"- alignkit {__version__}, card written {time.strftime('%Y-%m-%d %H:%M')}"]
    if facts.command:
        reproduce.append(f"- training: `{facts.command}`")
    if facts.run_dir is not None:
        reproduce.append(f"- run folder: `{facts.run_dir}` (config.yaml, metrics.jsonl, summary.json, report.md)")
    if export_command:
        reproduce.append(f"- export: `{export_command}`")
    lines += ["## Reproduce", "", *reproduce, ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ usage text

def adapter_usage(folder: str) -> str:
    return (
        "A LoRA adapter: load its base model, then the adapter (or `alignkit generate --adapter`).\n\n"
        "```python\nfrom peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
        f"model = AutoPeftModelForCausalLM.from_pretrained(\"{folder}\")\n"
        f"tokenizer = AutoTokenizer.from_pretrained(\"{folder}\")\n```\n\n"
        f"For a standalone model or a GGUF file: `alignkit export {folder} --format merged|gguf --out PATH`.")


def causal_usage(folder: str) -> str:
    return (
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"model = AutoModelForCausalLM.from_pretrained(\"{folder}\")\n"
        f"tokenizer = AutoTokenizer.from_pretrained(\"{folder}\")\n"
        "messages = [{\"role\": \"user\", \"content\": \"Hello!\"}]\n"
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
        "return_dict=True)\n"
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0]))\n```\n\n"
        f"vLLM: `vllm serve {folder}`.")


def reward_usage(folder: str, bias: float) -> str:
    shift = (f" transformers' score leaves out the head's constant bias {bias:+.6g} (its `score` layer has no "
             "bias; `alignkit_score_bias` in config.json), so add it back to get alignkit's number; rankings and "
             "margins do not depend on it.") if bias else ""
    return (
        "A reward model: one score per conversation, read at the end-of-turn token that closes the assistant's "
        "reply (for ChatML templates `<|im_end|>`, without the newline the template writes after it)." + shift
        + "\n\n```python\nimport torch\nfrom transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
        f"model = AutoModelForSequenceClassification.from_pretrained(\"{folder}\")\n"
        f"tokenizer = AutoTokenizer.from_pretrained(\"{folder}\")\n"
        "messages = [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello!\"}]\n"
        "text = tokenizer.apply_chat_template(messages, tokenize=False).rstrip(\"\\n\")\n"
        "with torch.no_grad():\n"
        "    reward = model(**tokenizer(text, return_tensors=\"pt\")).logits[0, 0].item()\n```")


def scalar_folder_usage(folder: str) -> str:
    return (
        "alignkit's reward-model folder (backbone or adapter + `head.safetensors` + `head.json`): load it with "
        "`alignkit.model.heads.load_scalar_model`, score with `alignkit score`, or export it for transformers, "
        f"TRL, OpenRLHF and vLLM: `alignkit export {folder} --format merged --out PATH` "
        "(`AutoModelForSequenceClassification`).")


def gguf_usage(file_name: str) -> str:
    return (
        "```bash\n"
        f"llama-cli -m {file_name} -cnv                       # llama.cpp, chat with the embedded template\n"
        f"llama-server -m {file_name} --port 8080             # OpenAI-compatible server\n"
        f"printf 'FROM ./{file_name}\\n' > Modelfile && ollama create my-model -f Modelfile && ollama run my-model\n"
        "```\n\nLM Studio: put the file under its models folder (or `lms import` it).")


# ------------------------------------------------------------------------------------------------ writing

def is_alignkit_card(path: Path) -> bool:
    """True for a README.md this module wrote (front matter tags include ``alignkit``), or one PEFT wrote."""
    try:
        text = path.read_text()
    except OSError:
        return False
    if not text.startswith("---"):
        return "generated automatically" in text.lower() or not text.strip()
    try:
        metadata = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return False
    tags = metadata.get("tags") or []
    return "alignkit" in tags or metadata.get("library_name") == "peft"


def write_card(folder: str | Path, text: str, replace_foreign: bool = False) -> Path | None:
    """Write ``README.md`` into ``folder``; a README that alignkit (or PEFT) did not write is kept unless asked."""
    path = Path(folder) / CARD_FILE
    if path.exists() and not replace_foreign and not is_alignkit_card(path):
        return None
    path.write_text(text)
    return path


def final_folder_card(facts: RunFacts, folder: Path) -> str:
    """The card of a run's ``final/`` (or ``final-merged/``) folder, by what the folder holds."""
    name = facts.run_dir.name if facts.run_dir is not None else folder.name
    method = facts.method or "alignkit"
    what = METHOD_NAMES.get(method, method)
    base = (facts.config.get("model") or {}).get("name_or_path")
    if (folder / HEAD_CONFIG).is_file():
        return render_card(facts, title=f"{name}: reward model", library_name="transformers",
                           usage=scalar_folder_usage(str(folder)), pipeline_tag="text-classification",
                           extra_tags=["reward-model"],
                           description=f"A reward model trained from `{base}` by alignkit ({what}).")
    if (folder / "adapter_config.json").is_file():
        return render_card(facts, title=f"{name}: LoRA adapter", library_name="peft", usage=adapter_usage(str(folder)),
                           description=f"A LoRA adapter for `{base}`, trained by alignkit ({what}).")
    return render_card(facts, title=name, library_name="transformers", usage=causal_usage(str(folder)),
                       description=f"`{base}` fine-tuned by alignkit ({what}); full weights.")


def write_run_card(job, summary: dict) -> list[Path]:
    """Record the command and write the card of a finished run's ``final/`` (and ``final-merged/``).

    Called once by ``run_job`` after the final model is saved; returns the cards written.
    """
    run_dir = Path(summary["run_dir"])
    command = redact_secret_text(command_line())  # a secret given with --set stays off the disk
    (run_dir / COMMAND_FILE).write_text(command + "\n")
    facts = RunFacts(run_dir, job_config(job), summary, command, find_eval_reports(run_dir))
    written = []
    for folder in (Path(summary["final"]), Path(f"{summary['final']}-merged")):
        if folder.is_dir():
            path = write_card(folder, final_folder_card(facts, folder))
            if path is not None:
                written.append(path)
    return written
