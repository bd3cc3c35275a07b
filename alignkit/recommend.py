"""`alignkit recommend`: which method fits the data you have, why, and a starter job for it.

Each input is inspected with `alignkit.data`'s readers (`read_rows`, `detect_format`) and classified:

| kind | what it looks like |
| --- | --- |
| ``demonstrations`` | prompt + good response rows: ``messages``, ``prompt``/``completion``, alpaca, HH ``text`` |
| ``pairs`` | ``prompt``/``chosen``/``rejected`` or HH ``chosen``/``rejected`` dialogues |
| ``rankings`` | ``prompt`` + ``responses`` (best first) |
| ``checkable`` | prompts whose answer a program can check: a short or numeric ``answer`` (GSM8K ``#### 42``), ``answer_value``, ``solution``... |
| ``prompts`` | prompts alone (no response, no answer) |
| ``rubric`` | a text file (``.txt``/``.md``) or a ``rubric`` column: what a good answer is, in words |
| ``reward_model`` | a folder saved by ``alignkit rm`` (``head.json``) |
| ``model`` | a model or adapter folder to start from |

Then the decision tree of ``docs/choosing.md`` picks the method (the first rule that applies):

1. checkable answers -> **GRPO** (reinforcement fine-tuning on a verifiable reward); with
   demonstrations too (or worked solutions in the same rows) -> **SFT then GRPO**.
2. pairs or rankings -> with unlabelled prompts as well -> **reward model then PPO** (the reward
   model scores the prompts nobody labelled); with demonstrations -> **SFT then DPO**; else **DPO**.
3. a reward model and prompts -> **PPO** against that reward model.
4. a rubric and prompts -> **GRPO with an LLM judge** grading on the rubric.
5. demonstrations -> **SFT**; when most prompts are fact-seeking questions, the factuality-aware
   variant is suggested (train on the model's own answers that a check accepts).
6. anything else -> no method yet: what to collect first.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alignkit.data import DataError, detect_format, read_rows
from alignkit.errors import UsageError
from alignkit.model.heads import is_scalar_model

CHECKABLE_FIELDS = ("answer_value", "answer", "answers", "solution", "reference_answer", "ground_truth", "target",
                    "expected", "label")
RUBRIC_SUFFIXES = (".txt", ".md", ".rst")
DEMONSTRATION_SHAPES = ("messages", "prompt_completion", "alpaca", "hh")
SAMPLE_ROWS = 5000
SHORT_ANSWER_WORDS = 6
FACT_QUESTION = re.compile(r"^\s*(who|what|when|where|which|how (many|much|old|long|far|tall))\b.*\?\s*$",
                           re.IGNORECASE | re.DOTALL)


@dataclass
class Found:
    """What one input is: its kinds (a file can be both demonstrations and checkable) and facts."""

    path: str
    kinds: list[str]
    rows: int = 0
    shape: str = ""
    numeric: bool = False
    answer_field: str | None = None
    fact_seeking: float = 0.0
    rubric_text: str | None = None
    notes: list[str] = field(default_factory=list)

    def count(self) -> str:
        return f"{self.rows:,}{'+' if self.rows >= SAMPLE_ROWS else ''}"

    def describe(self) -> str:
        if "reward_model" in self.kinds:
            return f"{self.path}: a reward model (alignkit rm output)"
        if "model" in self.kinds:
            return f"{self.path}: a model or adapter to start from"
        if "rubric" in self.kinds and not self.rows:
            return f"{self.path}: a rubric ({len(self.rubric_text or '')} characters of text)"
        what = " and ".join(KIND_WORDS[k] for k in self.kinds)
        extra = f"; answers in '{self.answer_field}'{' (numbers)' if self.numeric else ''}" if self.answer_field else ""
        return f"{self.path}: {self.count()} rows of {what} (row shape '{self.shape}'{extra})"


KIND_WORDS = {"demonstrations": "demonstrations", "pairs": "preference pairs", "rankings": "rankings",
              "checkable": "prompts with checkable answers", "prompts": "prompts without answers",
              "rubric": "rubric", "reward_model": "reward model", "model": "model"}


@dataclass
class Recommendation:
    method: str                      # sft | dpo | grpo | ppo | sft+dpo | sft+grpo | rm+ppo | none
    title: str
    reasons: list[str]
    alternatives: list[str]
    starter: str                     # a job file (one method) or a pipeline file (several stages); "" for none
    starter_kind: str                # job | pipeline | none
    found: list[Found]

    def render(self) -> str:
        lines = ["What you have:"] + [f"  - {f.describe()}" for f in self.found]
        for f in self.found:
            lines += [f"      note: {note}" for note in f.notes]
        lines += ["", f"Recommended: {self.title}", "", "Why:"] + [f"  - {r}" for r in self.reasons]
        if self.alternatives:
            lines += ["", "Alternatives:"] + [f"  - {a}" for a in self.alternatives]
        if self.starter:
            run = {"job": f"alignkit train {self.method}.yaml",
                   "pipeline": "alignkit pipeline pipeline.yaml"}[self.starter_kind]
            lines += ["", f"Starter {self.starter_kind} file (save it, adjust, then: {run}):", "", self.starter.rstrip()]
        lines += ["", "The decision tree: docs/choosing.md"]
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ inspect

def _answer(row: dict) -> tuple[str | None, Any]:
    for name in CHECKABLE_FIELDS:
        if name in row and row[name] not in (None, "", []):
            return name, row[name]
    return None, None


_NUMBER = re.compile(r"^\s*[-+]?[$€£]?\s?\d[\d,]*(\.\d+)?\s*%?\s*$")


def _is_number(value: Any) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    return isinstance(value, str) and ("####" in value or bool(_NUMBER.match(value)))


def _is_short(value: Any) -> bool:
    if isinstance(value, list):
        return bool(value) and all(_is_short(v) for v in value)
    return isinstance(value, (int, float)) or (isinstance(value, str) and
                                                ("####" in value or len(value.split()) <= SHORT_ANSWER_WORDS))


def _prompt_text(row: dict) -> str:
    for name in ("prompt", "question", "instruction"):
        value = row.get(name)
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value and isinstance(value[-1], dict):
            return str(value[-1].get("content", ""))
    messages = row.get("messages")
    if isinstance(messages, list):
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[0].get("content", "")) if users else ""
    return ""


def inspect_input(path: str) -> Found:
    """Classify one input (a data file, a text rubric, a model or reward-model folder)."""
    location = Path(path)
    if not location.exists():
        raise FileNotFoundError(f"recommend: {path}: no such file or folder")
    if location.is_dir():
        if is_scalar_model(location):
            return Found(path, ["reward_model"])
        if (location / "config.json").is_file() or (location / "adapter_config.json").is_file():
            return Found(path, ["model"])
        raise UsageError(f"recommend: {path}: a folder that is neither a model (config.json / adapter_config.json) "
                         "nor a reward model (head.json)")
    if location.suffix.lower() in RUBRIC_SUFFIXES:
        text = location.read_text().strip()
        if not text:
            raise UsageError(f"recommend: {path}: the rubric file is empty")
        return Found(path, ["rubric"], rubric_text=text)
    shapes: Counter = Counter()
    answer_fields: Counter = Counter()
    numeric = short = rubric_rows = fact = worked = 0
    rows = 0
    for _, row in read_rows(path):
        rows += 1
        if rows > SAMPLE_ROWS:
            rows = SAMPLE_ROWS
            break
        shape = detect_format(row) or "unknown"
        shapes[shape] += 1
        name, value = _answer(row)
        if name is not None and shape not in ("preference", "ranked", "hh_pair"):
            answer_fields[name] += 1
            numeric += _is_number(value)
            short += _is_short(value)
            worked += isinstance(value, str) and "####" in value
        rubric_rows += isinstance(row.get("rubric"), str) and bool(row.get("rubric", "").strip())
        fact += bool(FACT_QUESTION.match(_prompt_text(row)))
    if not rows:
        raise DataError("no rows", source=path)
    shape, count = shapes.most_common(1)[0]
    if shape == "unknown":
        raise DataError("no row shape recognised (see docs/data.md: messages, prompt/completion, prompt/chosen/"
                        "rejected, prompt/responses, question/answer, prompt...)", source=f"{path}:1")
    found = Found(path, [], rows=rows, shape=shape, fact_seeking=fact / rows)
    if count < rows:
        found.notes.append(f"mixed row shapes: {dict(shapes)}; classified by the most common one")
    if shape in ("preference", "hh_pair"):
        found.kinds.append("pairs")
    elif shape == "ranked":
        found.kinds.append("rankings")
    else:
        answered = sum(answer_fields.values())
        if answered >= rows / 2 and short >= answered / 2:
            found.kinds.append("checkable")
            found.answer_field = answer_fields.most_common(1)[0][0]
            found.numeric = numeric >= answered / 2
        # question/answer rows are demonstrations when the answer is a worked solution (GSM8K's "... #### 42")
        # or a long text, checkable only when it is short
        if shape in DEMONSTRATION_SHAPES or (shape == "question_answer" and ("checkable" not in found.kinds
                                                                             or worked >= rows / 2)):
            found.kinds.insert(0, "demonstrations")
        if not found.kinds:
            found.kinds.append("prompts")
        if rubric_rows >= rows / 2:
            found.kinds.append("rubric")
    return found


# ------------------------------------------------------------------------------------------------ decide

def _files(found: list[Found], kind: str) -> list[Found]:
    return [f for f in found if kind in f.kinds]


def recommend(paths: list[str]) -> Recommendation:
    """Inspect ``paths`` and walk the decision tree (module docstring; docs/choosing.md)."""
    if not paths:
        raise UsageError("recommend: give at least one --data FILE (data, rubric, model or reward-model folder)")
    found = [inspect_input(p) for p in paths]
    demos, pairs = _files(found, "demonstrations"), _files(found, "pairs") + _files(found, "rankings")
    checkable, prompts = _files(found, "checkable"), _files(found, "prompts")
    rubrics, reward_models, models = _files(found, "rubric"), _files(found, "reward_model"), _files(found, "model")
    base = models[0].path if models else "smollm2-135m-instruct"
    any_prompts = prompts or demos or checkable or pairs

    if checkable:
        task = checkable[0]
        reward = "numeric_match" if task.numeric else "factual_answer"
        reward_words = ("the final number of the answer equals the reference (numeric_match)" if task.numeric else
                        "the answer names the reference and nothing else from the answer set (factual_answer)")
        worked = [f for f in demos if f is not task] + ([task] if "demonstrations" in task.kinds else [])
        reasons = [f"{task.path} has {task.count()} prompts whose answer a program can check: {reward_words}; "
                   "a verifiable reward cannot be gamed the way a learned reward model can",
                   "GRPO samples several answers per prompt and pushes up the ones the check accepts, relative to "
                   "their group: no reward model, no critic, no preference labels"]
        alternatives = ["DPO on pairs built from the check (best-of-n: correct vs incorrect samples), when online "
                        "sampling is too slow", "`alignkit eval --metrics accuracy --samples 8 --k 4,8` first: if "
                        "pass@8 is near 0 the model never finds a correct answer to reinforce; SFT first"]
        if worked:
            reasons.append(f"{worked[0].path} holds worked answers: SFT on them first teaches the answer format, "
                           "so GRPO starts from a model that already gets some answers right")
            starter = _pipeline([("sft", _sft_job(base, worked[0].path)),
                                 ("grpo", _grpo_job("${sft.final}", task, reward))],
                                _eval_stage({"base": base, "sft": "${sft.final}", "grpo": "${grpo.final}"},
                                            task.path, ["accuracy"], reward))
            return Recommendation("sft+grpo", "SFT, then GRPO (reinforcement fine-tuning on a verifiable reward)",
                                  reasons, alternatives, starter, "pipeline", found)
        return Recommendation("grpo", "GRPO: reinforcement fine-tuning on a verifiable reward", reasons, alternatives,
                              _yaml(_grpo_job(base, task, reward)), "job", found)

    if pairs:
        data = pairs[0]
        kind = "rankings" if "rankings" in data.kinds else "preference pairs"
        if prompts:
            reasons = [f"{data.path} has {data.count()} {kind}; {prompts[0].path} has {prompts[0].count()} prompts "
                       "nobody labelled",
                       "a reward model trained on the pairs can score answers to the unlabelled prompts too; PPO then "
                       "learns online from the policy's own samples, with a KL penalty to the starting model",
                       "the reward model is reusable: best-of-n, `alignkit eval` win rates, data filtering"]
            alternatives = ["DPO on the pairs alone: simpler and cheaper, but it only ever sees the labelled prompts",
                            "check the reward model's held-out accuracy (`alignkit eval --metrics reward_accuracy`) "
                            "before PPO: PPO optimises whatever the reward model gets wrong too"]
            starter = _pipeline([("rm", _preference_job("rm", base, data)),
                                 ("ppo", _ppo_job(base, prompts[0].path, "${rm.final}"))],
                                _eval_stage({"base": base, "ppo": "${ppo.final}"}, prompts[0].path, ["drift"], None,
                                            judge="reward-model:${rm.final}"))
            return Recommendation("rm+ppo", "a reward model, then PPO (RLHF)", reasons, alternatives, starter,
                                  "pipeline", found)
        reasons = [f"{data.path} has {data.count()} {kind}: DPO learns the preference directly, with no reward model "
                   "and no sampling during training",
                   "SFT on the chosen replies alone would also raise the likelihood of the rejected ones (they "
                   "share most of their words); DPO pushes them apart (measured in docs/choosing.md)"]
        alternatives = ["a reward model then PPO, if you also have prompts without labels (add them with --data)",
                        "DPO variants: loss_type ipo (noisy or deterministic labels), robust with label_smoothing "
                        "(flipped labels), simpo/orpo (no reference model)"]
        if demos:
            reasons.append(f"{demos[0].path} has demonstrations: SFT on them first moves the model onto the "
                           "distribution of the pairs, then DPO refines it (the usual order)")
            starter = _pipeline([("sft", _sft_job(base, demos[0].path)),
                                 ("dpo", _preference_job("dpo", "${sft.final}", data))],
                                _eval_stage({"base": base, "sft": "${sft.final}", "dpo": "${dpo.final}"},
                                            data.path, ["reward_accuracy"], None))
            return Recommendation("sft+dpo", "SFT, then DPO", reasons, alternatives, starter, "pipeline", found)
        return Recommendation("dpo", "DPO (direct preference optimisation)", reasons, alternatives,
                              _yaml(_preference_job("dpo", base, data)), "job", found)

    if reward_models:
        if not any_prompts:
            return _nothing(found, [f"{reward_models[0].path} is a reward model, but there are no prompts to "
                                    "sample answers for: add a prompt file with --data"])
        source = (prompts or demos)[0]
        reasons = [f"{reward_models[0].path} scores answers; {source.path} gives {source.count()} prompts to "
                   "sample them for",
                   "PPO optimises the reward model's score with a per-token KL penalty to the starting model, "
                   "so the policy cannot drift far to exploit the reward model's blind spots"]
        alternatives = ["GRPO with the reward_model reward (no critic: cheaper on memory)",
                        "best-of-n with the reward model (`alignkit best-of-n --scorer reward-model:PATH`), "
                        "then SFT on the best samples: no RL at all"]
        return Recommendation("ppo", "PPO against your reward model", reasons, alternatives,
                              _yaml(_ppo_job(base, source.path, reward_models[0].path)), "job", found)

    if rubrics and any_prompts:
        rubric = rubrics[0]
        source = (prompts or demos)[0]
        text = rubric.rubric_text or "see the rubric column"
        reasons = [f"{rubric.path} says in words what a good answer is; {source.path} gives {source.count()} "
                   "prompts",
                   "GRPO with an LLM judge grading each sampled answer on the rubric turns the rubric into a "
                   "reward (malformed judgements are counted, never guessed)"]
        alternatives = ["Constitutional AI data: `alignkit constitution` critiques and revises answers against "
                        "principles, giving pairs for DPO (offline, cheaper per step)",
                        "a stronger judge than the 135M embedded model (llm:MODEL@URL, any OpenAI-compatible "
                        "server): a small judge measures its own taste more than the rubric"]
        job = _grpo_job(base, source, None)
        job["rewards"] = [{"name": "llm_judge", "kwargs": {"model": "smollm2-135m-instruct", "method": "logprobs",
                                                           "rubric": text}}]
        return Recommendation("grpo", "GRPO with an LLM judge on your rubric", reasons, alternatives, _yaml(job),
                              "job", found)

    if demos:
        data = demos[0]
        reasons = [f"{data.path} has {data.count()} demonstrations (prompt and a good response): supervised "
                   "fine-tuning imitates them directly; it is the first stage of every pipeline"]
        alternatives = ["collect preferences on the SFT model's answers (`alignkit label`) and add DPO when "
                        "imitation plateaus: SFT cannot learn what *not* to say"]
        if data.fact_seeking >= 0.5:
            reasons.append(f"{data.fact_seeking:.0%} of its prompts are fact-seeking questions: SFT on reference "
                           "answers the model does not know teaches it to invent answers (FLAME); the factuality-"
                           "aware variant trains on the model's own sampled answers that a check accepts "
                           "(`alignkit factuality sft-data`, docs/choosing.md)")
        return Recommendation("sft", "SFT (supervised fine-tuning)", reasons, alternatives,
                              _yaml(_sft_job(base, data.path)), "job", found)

    why = []
    if prompts:
        why.append(f"{prompts[0].path} has prompts only: nothing says which answers are good")
    if rubrics:
        why.append(f"{rubrics[0].path} is a rubric, but there are no prompts to apply it to")
    if models and not why:
        why.append(f"{models[0].path} is a model to start from, but there is no data")
    return _nothing(found, why)


def _nothing(found, why) -> Recommendation:
    todo = ["demonstrations (prompt + good answer) for SFT",
            "preferences between two answers (`alignkit label generate|serve|export`) for DPO or a reward model",
            "answers a program can check (numbers, short facts) for GRPO",
            "a rubric in words (a .txt file) for GRPO with an LLM judge"]
    return Recommendation("none", "no method yet: collect one of the inputs below first", why + ["you need one of: " +
                          "; ".join(todo)], [], "", "none", found)


# ------------------------------------------------------------------------------------------------ starters

def _common(base: str) -> dict:
    return {"model": {"name_or_path": base}, "lora": {"rank": 16, "alpha": 32, "dropout": 0.0}}


def _sft_job(base: str, train: str) -> dict:
    return {"method": "sft", **_common(base),
            "data": {"train": train, "validation_fraction": 0.1, "max_length": 512},
            "training": {"max_steps": 100, "batch_size": 8, "learning_rate": 2.0e-4, "warmup_steps": 5,
                         "eval_steps": 50, "save_steps": 50}}


def _preference_job(method: str, base: str, data: Found) -> dict:
    job = {"method": method, **_common(base),
           "data": {"train": data.path, "validation_fraction": 0.1, "max_length": 512, "max_prompt_length": 384,
                    "on_error": "skip"},
           "training": {"max_steps": 100, "batch_size": 8, "learning_rate": 5.0e-5 if method == "dpo" else 2.0e-4,
                        "warmup_steps": 4, "eval_steps": 50, "save_steps": 50}}
    if "rankings" in data.kinds:
        job["ranking_pairs"] = "adjacent"
    if method == "dpo":
        job.update({"loss_type": "sigmoid", "beta": 0.1})
    else:
        job["center_rewards_coefficient"] = 0.01
    return job


def _grpo_job(base: str, data: Found, reward: str | None) -> dict:
    job = {"method": "grpo", **_common(base),
           "data": {"train": data.path, "validation_fraction": 0.1},
           "num_generations": 8, "prompts_per_step": 4, "max_completion_length": 256 if data.numeric else 64,
           "temperature": 1.0, "beta": 0.0,
           "training": {"max_steps": 100, "batch_size": 16, "learning_rate": 5.0e-5, "eval_steps": 20,
                        "save_steps": 20}}
    if reward is not None:
        term: dict[str, Any] = {"name": reward}
        if data.answer_field and data.answer_field not in ("answer", "answer_value", "solution"):
            term["kwargs"] = {"field": data.answer_field}
        job["rewards"] = [term]
    return job


def _ppo_job(base: str, prompts: str, reward_model: str) -> dict:
    return {"method": "ppo", **_common(base), "data": {"train": prompts, "validation_fraction": 0.05},
            "reward_model": reward_model, "critic": "separate", "prompts_per_step": 16,
            "max_completion_length": 128, "kl_coef": 0.05, "ppo_epochs": 4, "num_mini_batches": 2,
            "training": {"max_steps": 200, "batch_size": 8, "learning_rate": 1.0e-5, "lr_scheduler": "constant",
                         "eval_steps": 40, "save_steps": 40}}


def _eval_stage(models: dict, data: str, metrics: list[str], reward: str | None, judge: str | None = None) -> dict:
    stage: dict[str, Any] = {"method": "eval", "models": models, "data": data, "metrics": metrics,
                             "options": {"limit": 100, "max_new_tokens": 128}}
    if "accuracy" in metrics and reward:
        stage["options"]["reward"] = reward
    if "reward_accuracy" in metrics:
        stage["options"] = {"limit": 100}
    if judge:
        stage["judge"] = judge
    return stage


def _pipeline(stages: list[tuple[str, dict]], evaluation: dict) -> str:
    body = {"output_dir": "runs/pipeline", "defaults": {"training": {"seed": 42}},
            "stages": {**{name: job for name, job in stages}, "eval": evaluation}}
    return _yaml(body)


def _yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False, width=100)
