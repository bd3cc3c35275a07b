"""What GRPO and PPO share: prompts in, scored rollouts out, on the one training engine.

An online recipe fits the engine's "one item per optimizer step" contract like this:

    for rollout r = 0, 1, 2, ...:                      # a rollout batch: prompts_per_step prompts
        prompts  = epoch permutation of the prompt set, slice r   (a pure function of seed and r)
        samples  = backend.generate(policy, prompts, num_generations)   # no grad, eval mode
        rewards  = CombinedReward(prompt, completion, **row fields)
        ... the method turns them into advantages (GRPO: group-relative; PPO: values + GAE) ...
        yield K lists of micro-batches, one per optimizer step over (a minibatch of) the rollout

so the engine's *step* is an optimizer step, and one rollout spans K of them (GRPO:
``num_iterations``; PPO: ``ppo_epochs * num_mini_batches``). ``steps_per_epoch`` is
``ceil(num_prompts / prompts_per_step) * K``.

Determinism and resume: the prompt slice depends only on (seed, r) and sampling runs under its own
seed ``seed * 1_000_003 + r`` (the global RNG is untouched). The current rollout is part of the
recipe's ``state_dict``, so a checkpoint taken in the middle of a rollout resumes on the very same
samples; one taken at a rollout boundary regenerates the next rollout exactly as an uninterrupted
run would have.

Processes: under N data-parallel processes each one samples its contiguous share of the rollout's
prompts (``prompts_per_step / N``, whole groups: a prompt's completions never split across
processes) under its own seed, scores and trains on them; the engine divides by the loss units
summed over every process, so the step is the one a single process would make on the same samples.
Metrics are averaged over the processes; evaluation prompts are shared out and their scores gathered.

Timing: ``time/generation`` (sampling + the sampling log-prob pass, in the backend),
``time/reward``, ``time/reference`` (reference / value forward passes done once per rollout) and
``time/training`` (forward, backward and optimizer step) are logged separately for every step.

Thinking (``thinking_level``): a system instruction asks the model to reason inside
``<think>...</think>`` within a token budget, then answer; the sampling limit becomes
``budget + max_completion_length`` and reward functions see only the final answer (the text after
the last ``</think>``; no closing tag means no answer). See ``docs/online_rl.md``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from alignkit import distributed
from alignkit.config import ConfigError, Job, Section
from alignkit.data import tokenize_prompt
from alignkit.errors import UsageError
from alignkit.evaluate.drift import DEFAULT_THRESHOLDS, DriftMonitor, rollout_statistics, text_statistics
from alignkit.losses import masked_mean
from alignkit.methods.base import policy_and_data
from alignkit.model import resolve_model, save_model
from alignkit.model.forward import (
    completion_layout,
    completion_logprobs,
    grouped_completion_logprobs,
)
from alignkit.reference import ReferencePolicy, eval_mode
from alignkit.rewards import CombinedReward, RewardResult, load_reward_plugins, reward_inputs
from alignkit.rewards.combine import RewardSpec
from alignkit.rewards.registry import check_reward_spec
from alignkit.rollout import SamplingParams, get_backend, padding_id

# ----------------------------------------------------------------------------- thinking

THINKING_BUDGETS = {"none": 0, "minimal": 128, "low": 512, "medium": 1024, "high": 4096}
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def thinking_instruction(budget: int) -> str:
    return (f"Before answering, think step by step inside {THINK_OPEN} and {THINK_CLOSE}, using at most "
            f"about {budget} tokens for the thinking. After {THINK_CLOSE}, write only the final answer.")


def final_answer(text: str) -> str:
    """The text after the last ``</think>``; empty when the thinking was never closed."""
    if THINK_CLOSE not in text:
        return ""
    return text.rsplit(THINK_CLOSE, 1)[1].strip()


# ----------------------------------------------------------------------------- config

# Managed-RFT names of online keys; the ones every method shares (epochCount, batchSize, adapterSize,
# learningRateMultiplier with its BASE_LEARNING_RATE) are in alignkit.aliases.
MANAGED_RFT_ALIASES = {
    "samplesPerPrompt": "num_generations",
    "maxOutputTokens": "max_completion_length",
    "evaluateInterval": "training.eval_steps",
    "checkpointInterval": "training.save_steps",
    "thinkingLevel": "thinking_level",
}


class RewardTerm(Section):
    name: str = Field(description="built-in name, 'module:function' or 'path/file.py:function'")
    weight: float = 1.0
    kwargs: dict[str, Any] = Field(default_factory=dict, description="options of the function or factory")
    label: str | None = None

    @model_validator(mode="after")
    def _known(self):
        """An unknown name or option fails here, before any model loads (nothing is built)."""
        check_reward_spec(self.name, **self.kwargs)
        return self


class DriftSection(Section):
    """The training log's drift alarms (``alignkit.evaluate.drift.DriftMonitor``); see docs/online_rl.md."""

    enabled: bool = True
    thresholds: dict[str, float | None] = Field(
        default_factory=dict, description=f"override a threshold (None disables it): {', '.join(DEFAULT_THRESHOLDS)}")
    patience: int = Field(2, ge=1, description="consecutive rollouts a check must hold before its alarm fires")
    baseline_rollouts: int = Field(1, ge=1, description="first rollouts averaged into the baseline")
    task_rewards: list[str] = Field(
        default_factory=list, description="labels of the reward terms that measure the task itself; the other terms "
        "are side terms, and the side_reward_share alarm fires when they pay for most of the reward gained")

    @field_validator("thresholds")
    @classmethod
    def _known(cls, value: dict) -> dict:
        unknown = sorted(set(value) - set(DEFAULT_THRESHOLDS))
        if unknown:
            raise ValueError(f"unknown drift threshold(s) {unknown}; known: {', '.join(DEFAULT_THRESHOLDS)}")
        return value


class OnlineJob(Job):
    """Keys GRPO and PPO share (sampling, rewards, prompts per rollout, thinking)."""

    DATA_KIND = "prompt"

    ALIASES = MANAGED_RFT_ALIASES

    prompts_per_step: int = Field(8, gt=0, description="prompts per rollout batch")
    num_generations: int = Field(8, gt=0, description="completions sampled per prompt (the group size)")
    max_completion_length: int = Field(256, gt=0, description="new tokens per completion (the answer part)")
    temperature: float = Field(1.0, ge=0, description="sampling temperature; 0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 = off")
    stop_strings: list[str] = Field(default_factory=list)
    rewards: list[RewardTerm] = Field(default_factory=list)
    reward_on_error: Literal["raise", "zero"] = Field(
        "raise", description="a reward function that fails: stop with the prompt and completion, or score 0 and count")
    thinking_level: str = Field("none", description="none | minimal | low | medium | high")
    thinking_budget: int | None = Field(None, ge=0, description="tokens of thinking; overrides the level's budget")
    rollout_backend: Literal["auto", "hf", "static", "vllm"] = "auto"
    generation_batch_size: int | None = Field(None, gt=0, description="samples per generate call; None: all")
    logprob_chunk_size: int = Field(1024, gt=0)
    eval_max_prompts: int | None = Field(64, gt=0, description="validation prompts scored at each evaluation")
    eval_temperature: float = Field(0.0, ge=0, description="0: greedy answers at evaluation")
    drift: DriftSection = Field(default_factory=DriftSection, description="reward-hacking alarms in the training log")

    @field_validator("thinking_level", mode="before")
    @classmethod
    def _level(cls, value: Any) -> str:
        text = str(value).strip().lower()
        text = {"off": "none", "disabled": "none", "false": "none", "thinking_level_unspecified": "none"}.get(text, text)
        if text not in THINKING_BUDGETS:
            raise ValueError(f"thinking_level must be one of {', '.join(THINKING_BUDGETS)}, got {value!r}")
        return text

    def thinking_tokens(self) -> int:
        return self.thinking_budget if self.thinking_budget is not None else THINKING_BUDGETS[self.thinking_level]

    def prompt_token_limit(self) -> int | None:
        """Tokens a prompt keeps: ``data.max_prompt_length``, and what ``data.max_length`` leaves after
        the sampled tokens, so that ``max_length`` bounds prompt + completion here as in every other
        method. The default ``max_length`` applies too, unless the sampled tokens alone exceed it (a
        large thinking budget): then only an explicit ``max_length`` is an error."""
        limits = [self.data.max_prompt_length] if self.data.max_prompt_length else []
        room = self.data.max_length - self.max_completion_length - self.thinking_tokens()
        if "max_length" in self.data.model_fields_set or room >= 1:
            limits.append(room)
        return min(limits) if limits else None

    def reward_labels(self) -> list[str]:
        """The labels the job's reward terms are logged under (``rollout/rewards/<label>``)."""
        return [RewardSpec.coerce(term.model_dump()).default_label() for term in self.rewards]

    @model_validator(mode="after")
    def _task_rewards(self):
        labels = self.reward_labels()
        unknown = [label for label in self.drift.task_rewards if label not in labels]
        if unknown:
            raise ValueError(f"drift.task_rewards names {unknown}, which is not a reward term of this job; "
                             f"its terms: {labels}")
        return self

    @model_validator(mode="after")
    def _length_budget(self):
        limit = self.prompt_token_limit()
        if limit is not None and limit < 1:
            raise ValueError(f"data.max_length ({self.data.max_length}) leaves no room for a prompt after "
                             f"max_completion_length ({self.max_completion_length}) + thinking "
                             f"({self.thinking_tokens()}) sampled tokens")
        return self


# ----------------------------------------------------------------------------- pieces

def build_reward(job: OnlineJob, extra_terms: list[dict] | None = None) -> CombinedReward:
    load_reward_plugins()
    terms = [t.model_dump() for t in job.rewards] + list(extra_terms or [])
    if not terms:
        raise ConfigError(f"{job.method}: no reward: add 'rewards: [{{name: numeric_match}}]' "
                          "(or reward_model: path for PPO)")
    return CombinedReward(terms, on_error=job.reward_on_error)


def aggregate(values: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Token-level mean over all masked tokens, or mean over sequences of each sequence's token mean."""
    if how == "token":
        return masked_mean(values, mask)
    return masked_mean(masked_mean(values, mask, dim=-1), mask.bool().any(-1))


def merge_reward_results(results: list[RewardResult]) -> RewardResult:
    """One `RewardResult` for the completions of several (in order): what each process scored."""
    if len(results) == 1:
        return results[0]
    labels = list(results[0].per_function) if results else []
    return RewardResult(total=[t for r in results for t in r.total],
                        per_function={label: [v for r in results for v in r.per_function[label]] for label in labels},
                        errors=sum(r.errors for r in results),
                        error_messages=[m for r in results for m in r.error_messages])


def rollout_seed(seed: int, index: int, process: int = 0) -> int:
    """The sampling seed of rollout ``index`` on process ``process`` (process 0: the single-process seed)."""
    return (seed * 1_000_003 + index + process * 7_919_000_003) % (2**63 - 1)


@dataclass
class Rollout:
    """One scored rollout batch, laid out for training (CPU tensors, group after group).

    ``layout`` is `alignkit.model.forward.completion_layout` of the samples. ``per_token`` holds what
    the method adds per completion token (GRPO: ``ref_logps``; PPO: ``old_logps``, ``values``,
    ``advantages``, ``returns``) and ``per_sample`` per completion (GRPO: ``advantages``).
    """

    index: int
    layout: dict
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    sampling_logprobs: torch.Tensor
    truncated: torch.Tensor
    rewards: torch.Tensor
    metrics: dict[str, float]
    texts: list[str]
    per_token: dict[str, torch.Tensor] = field(default_factory=dict)
    per_sample: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.completion_ids.shape[0]

    def state(self) -> dict[str, Any]:
        """Plain tensors and numbers (for checkpoints): `Rollout.from_state` restores it."""
        return {"index": self.index, "layout": dict(self.layout), "completion_ids": self.completion_ids,
                "completion_mask": self.completion_mask, "sampling_logprobs": self.sampling_logprobs,
                "truncated": self.truncated, "rewards": self.rewards, "metrics": dict(self.metrics),
                "texts": list(self.texts), "per_token": dict(self.per_token), "per_sample": dict(self.per_sample)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Rollout":
        return cls(**state)


@dataclass
class CompletionBatch:
    """Rows ``[prompt | completion]`` of a rollout, trimmed to their own longest prompt and completion."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prompt_width: int
    completion_mask: torch.Tensor
    weight: float                       # loss units (tokens or completions) the loss averages over
    targets: dict[str, torch.Tensor]

    def logprobs(self, model, temperature: float, chunk_size: int, with_entropy: bool = True):
        return completion_logprobs(model, self.input_ids, self.attention_mask, self.position_ids, self.prompt_width,
                                   self.completion_mask.shape[1], temperature=temperature, chunk_size=chunk_size,
                                   with_entropy=with_entropy)


@dataclass
class GroupedCompletionBatch:
    """Whole groups of a rollout: each prompt once (``prompt_ids``, ``prompt_attention``), its ``group``
    completions after it; computed by `grouped_completion_logprobs` (each prompt runs once)."""

    prompt_ids: torch.Tensor
    prompt_attention: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    group: int
    weight: float                       # loss units (tokens or completions) the loss averages over
    targets: dict[str, torch.Tensor]

    def logprobs(self, model, temperature: float, chunk_size: int, with_entropy: bool = True):
        return grouped_completion_logprobs(model, self.prompt_ids, self.prompt_attention, self.completion_ids,
                                           self.completion_mask, self.group, temperature=temperature,
                                           chunk_size=chunk_size, with_entropy=with_entropy)


def _select(values: dict[str, torch.Tensor], rows: torch.Tensor, length: int, device) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in values.items():
        value = value[rows]
        out[key] = (value[:, :length] if value.dim() == 2 else value).to(device)
    return out


class OnlineRecipe:
    """Shared life of GRPO and PPO recipes: prompts, sampling, rewards, reference, evaluation, timing."""

    def __init__(self, job: OnlineJob, model=None, tokenizer=None, train=None, validation=None,
                 reward=None, backend=None):
        self.job = job
        # a saved adapter is merged into its base before training (so "adapters off" is the start): the
        # result must then be saved merged too, or loading final/ on the plain base drops that adapter
        self.merged_start = model is None and (job.model.adapter is not None
                                               or resolve_model(job.model.name_or_path).kind == "adapter")
        model, tokenizer, train, validation, self.notes = policy_and_data(job, model, tokenizer, train, validation,
                                                                          kind="prompt", saved_adapter="merge")
        self.policy, self.tokenizer = model, tokenizer
        self.model = model  # what the engine optimizes; PPO replaces it with actor + critic
        self.device = distributed.model_device(model)
        if not train:
            raise UsageError("no training prompts")
        distributed.check_split(job.prompts_per_step, "prompt groups", f"prompts_per_step {job.prompts_per_step}")
        self.train_examples, self.validation_examples = train, validation
        self.thinking = job.thinking_tokens()
        self.train_examples, self.train_prompt_ids = self.encode_prompts(self.train_examples, "train")
        if not self.train_examples:
            raise UsageError("no training prompts left after the prompt length limit")
        self.validation_examples, self.validation_prompt_ids = self.encode_prompts(self.validation_examples,
                                                                                    "validation")
        self.reward = reward if reward is not None else build_reward(job, self.extra_reward_terms())
        if backend is None:
            backend = get_backend(job.rollout_backend, model=model, max_batch_size=job.generation_batch_size,
                                  chunk_size=job.logprob_chunk_size)
        self.backend = backend
        self.sampling = self.sampling_params(job.temperature)
        self.reference: ReferencePolicy | None = None
        self.current: Rollout | None = None
        self.timings: dict[str, float] = {}
        self._yielded_at: float | None = None
        self.monitor = DriftMonitor(job.drift.thresholds, job.drift.patience, job.drift.baseline_rollouts) \
            if job.drift.enabled else None
        self._drift_metrics: dict[str, float] = {}
        self.notes.append(f"rollout backend: {getattr(backend, 'name', type(backend).__name__)}; reward: {self.reward!r}")

    # -- what a subclass may change
    def extra_reward_terms(self) -> list[dict]:
        return []

    def rollout_steps(self) -> int:
        """Optimizer steps per rollout batch."""
        return 1

    # -- prompts
    def encode_prompt(self, messages: list[dict]) -> list[int]:
        messages = [dict(m) for m in messages]
        if self.thinking:
            instruction = thinking_instruction(self.thinking)
            if messages and messages[0]["role"] == "system":
                messages[0]["content"] = messages[0]["content"].rstrip() + "\n\n" + instruction
            else:
                messages.insert(0, {"role": "system", "content": instruction})
        return tokenize_prompt(self.tokenizer, messages)

    def encode_prompts(self, examples: list, which: str) -> tuple[list, list[list[int]]]:
        """Token ids of each prompt under the length rule of every other row (`OnlineJob.prompt_token_limit`):
        a longer prompt is cut from the left (the latest turns stay), or skipped with ``data.on_error:
        skip`` (unless ``data.max_prompt_length`` asks for the cut); both are counted in the notes."""
        limit, data = self.job.prompt_token_limit(), self.job.data
        skip = data.on_error == "skip" and not data.max_prompt_length
        kept, ids, cut, skipped = [], [], [], []
        for example in examples:
            row = self.encode_prompt(example.prompt)
            if limit is not None and len(row) > limit:
                if skip:
                    skipped.append(example.source)
                    continue
                row = row[-limit:]
                cut.append(example.source)
            kept.append(example)
            ids.append(row)
        for sources, what in ((cut, f"cut to their last {limit} tokens"),
                              (skipped, f"longer than {limit} tokens skipped (data.on_error: skip)")):
            if sources:
                shown = ", ".join(sources[:3]) + (" ..." if len(sources) > 3 else "")
                self.notes.append(f"{which} prompts: {len(sources)} of {len(examples)} {what} "
                                  f"(prompt + {self.job.max_completion_length + self.thinking} sampled tokens "
                                  f"<= data.max_length {data.max_length}): {shown}")
        return kept, ids

    def sampling_params(self, temperature: float, seed: int | None = None) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.job.max_completion_length + self.thinking,
                              temperature=temperature, top_p=self.job.top_p, top_k=self.job.top_k,
                              stop_strings=list(self.job.stop_strings), seed=seed)

    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.train_examples) / self.job.prompts_per_step)

    def steps_per_epoch(self) -> int:
        return self.batches_per_epoch() * self.rollout_steps()

    def prompt_indices(self, index: int) -> list[int]:
        """Prompts of rollout ``index``: slice of the epoch's seeded permutation, wrapped to full size."""
        epoch, within = divmod(index, self.batches_per_epoch())
        generator = torch.Generator().manual_seed(self.job.training.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.train_examples), generator=generator).tolist()
        size = self.job.prompts_per_step
        picked = order[within * size:(within + 1) * size]
        while len(picked) < size:
            picked += order[:size - len(picked)]
        return picked

    # -- sampling and scoring
    def _generate(self, prompt_ids, num_generations, params, with_logprobs: bool):
        return self.backend.generate(self.policy, self.tokenizer, prompt_ids, num_generations, params,
                                     with_logprobs=with_logprobs)

    def score(self, examples: list, texts: list[str], num_generations: int):
        """Rewards ``[N]`` for texts laid out group after group; and the `RewardResult`."""
        prompts, completions, fields = reward_inputs(examples, texts, num_generations)
        if self.thinking:  # rewards read the final answer; the whole text stays available as a field
            fields["full_completion"] = completions
            completions = [final_answer(t) for t in completions]
        result = self.reward(prompts, completions, **fields)
        return torch.tensor(result.total, dtype=torch.float32), result

    def sample_and_score(self, index: int, num_generations: int, with_logprobs: bool) -> Rollout:
        """Generate the rollout for ``index`` (this process's share of its prompts), score it, and lay
        it out for training (CPU tensors)."""
        indices = distributed.shard(self.prompt_indices(index))
        examples = [self.train_examples[i] for i in indices]
        prompt_ids = [self.train_prompt_ids[i] for i in indices]
        params = self.sampling_params(self.job.temperature, seed=rollout_seed(self.job.training.seed, index,
                                                                              distributed.rank()))
        started = time.perf_counter()
        batch = self._generate(prompt_ids, num_generations, params, with_logprobs)
        generated = time.perf_counter()
        rewards, result = self.score(examples, batch.texts, num_generations)
        scored = time.perf_counter()
        pad = padding_id(self.tokenizer)
        layout = completion_layout(batch.prompt_ids, batch.completion_ids, batch.completion_mask, pad)
        lengths = batch.completion_mask.sum(-1)
        metrics = {f"rollout/{k}": v for k, v in result.summary().items()}
        token_ids = [row[:int(n)].tolist() for row, n in zip(batch.completion_ids, lengths)]
        statistics = text_statistics(batch.texts, lengths, batch.truncated, token_ids)
        metrics.update({
            "rollout/completion_length": statistics["length"],
            "rollout/completion_length_max": float(lengths.max()) if len(lengths) else 0.0,
            "rollout/truncated_share": statistics["truncated_share"],
            "rollout/repetition": statistics["repetition"],
            "rollout/distinct_2": statistics["distinct_2"],
            "rollout/refusal_rate": statistics["refusal_rate"],
        })
        self.timings = {"time/generation": generated - started, "time/reward": scored - generated}
        if result.error_messages:
            self.notes.append(f"rollout {index}: {result.errors} reward errors scored 0; first: {result.error_messages[0]}")
        return Rollout(index=index, layout=layout, completion_ids=batch.completion_ids,
                       completion_mask=batch.completion_mask, sampling_logprobs=batch.sampling_logprobs,
                       truncated=batch.truncated, rewards=rewards, metrics=metrics, texts=batch.texts[:4])

    # -- the reference model
    def setup_reference(self, needed: bool) -> None:
        """LoRA: the reference is the policy with adapters disabled. Full weights: a frozen copy."""
        if needed:
            self.reference = ReferencePolicy.for_training(self.policy)

    def reference_logprobs(self, layout: dict, completion_length: int, batch_size: int) -> torch.Tensor:
        if self.reference is None:
            raise RuntimeError("reference_logprobs called but no reference was set up")
        temperature, chunk = self.logprob_temperature(), self.job.logprob_chunk_size

        def function(model, input_ids, attention_mask, position_ids, prompt_width, length):
            return completion_logprobs(model, input_ids, attention_mask, position_ids, prompt_width, length,
                                       temperature=temperature, chunk_size=chunk)

        with self.reference.model() as model:
            return self.forward_in_batches(model, layout, completion_length, batch_size, function)

    def forward_in_batches(self, model, layout, completion_length, batch_size, function) -> torch.Tensor:
        """``function(model, ids, attention, positions, prompt_width, length) -> [n, length]`` over the
        rollout, ``batch_size`` rows at a time, in eval mode without grad; concatenated on the CPU."""
        outputs = []
        with eval_mode(model), torch.no_grad():
            for start in range(0, layout["input_ids"].shape[0], batch_size):
                rows = slice(start, start + batch_size)
                outputs.append(function(
                    model, layout["input_ids"][rows].to(self.device), layout["attention_mask"][rows].to(self.device),
                    layout["position_ids"][rows].to(self.device), layout["prompt_width"],
                    completion_length).float().cpu())
        return torch.cat(outputs) if outputs else torch.zeros(0, completion_length)

    def logprob_temperature(self) -> float:
        return self.job.temperature if self.job.temperature > 0 else 1.0

    # -- micro-batches
    def micro_batch(self, rollout: Rollout, rows: list[int] | torch.Tensor, weight: float,
                    targets: dict[str, torch.Tensor]) -> CompletionBatch:
        """Rows of the rollout, trimmed to their own longest prompt and completion, on the device."""
        layout = rollout.layout
        rows = torch.as_tensor(rows, dtype=torch.long)
        width = layout["prompt_width"]
        prompt_needed = int(layout["attention_mask"][rows, :width].sum(-1).max())
        completion_mask = rollout.completion_mask[rows]
        length = max(1, int(completion_mask.sum(-1).max()))
        columns = slice(width - prompt_needed, width + length)
        return CompletionBatch(
            input_ids=layout["input_ids"][rows, columns].to(self.device),
            attention_mask=layout["attention_mask"][rows, columns].to(self.device),
            position_ids=layout["position_ids"][rows, columns].to(self.device),
            prompt_width=prompt_needed, completion_mask=completion_mask[:, :length].to(self.device),
            weight=weight, targets=_select(targets, rows, length, self.device))

    def grouped_micro_batch(self, rollout: Rollout, groups: list[int], group: int, weight: float,
                            targets: dict[str, torch.Tensor]) -> GroupedCompletionBatch:
        """Whole groups of the rollout, each prompt once, its ``group`` completions after it."""
        layout = rollout.layout
        rows = torch.tensor([g * group + i for g in groups for i in range(group)], dtype=torch.long)
        width = layout["prompt_width"]
        firsts = torch.tensor([g * group for g in groups], dtype=torch.long)
        prompt_attention = layout["attention_mask"][firsts, :width]
        needed = int(prompt_attention.sum(-1).max())
        completion_mask = rollout.completion_mask[rows]
        length = max(1, int(completion_mask.sum(-1).max()))
        return GroupedCompletionBatch(
            prompt_ids=layout["input_ids"][firsts, width - needed:width].to(self.device),
            prompt_attention=prompt_attention[:, width - needed:].to(self.device),
            completion_ids=rollout.completion_ids[rows, :length].to(self.device),
            completion_mask=completion_mask[:, :length].to(self.device),
            group=group, weight=weight, targets=_select(targets, rows, length, self.device))

    def split_rows(self, rows: list[int]) -> list[list[int]]:
        size = self.job.training.batch_size
        return [rows[i:i + size] for i in range(0, len(rows), size)]

    @staticmethod
    def weights(chunks: list[list[int]], completion_mask: torch.Tensor, how: str) -> list[float]:
        """Per micro-batch loss units: completion tokens (``how == "token"``) or non-empty completions.
        The engine divides the weighted sum of micro-batch losses by their total over every micro-batch
        of every process, so the step's loss is the one aggregated over the whole (mini)batch."""
        if how == "token":
            return [float(completion_mask[c].sum()) for c in chunks]
        return [float((completion_mask[c].sum(-1) > 0).sum()) for c in chunks]

    def loss_weight(self, batch: CompletionBatch | GroupedCompletionBatch) -> float:
        return batch.weight

    @property
    def loss_unit(self) -> str:
        return "tokens" if getattr(self.job, "loss_aggregation", "token") == "token" else "completions"

    # -- the engine's hooks
    def updates(self, start_step: int):
        per_rollout = self.rollout_steps()
        step = start_step
        while True:
            index, position = divmod(step, per_rollout)
            fresh = self.current is None or self.current.index != index
            if fresh:
                self.current = self.make_rollout(index)
                self.observe_drift(step + 1, self.current)
            else:
                self.timings = {}
            micro_batches = self.micro_batches(self.current, position)
            self._yielded_at = time.perf_counter()
            yield micro_batches
            step += 1

    def observe_drift(self, step: int, rollout: Rollout) -> None:
        """Feed the rollout's statistics to the drift monitor; print and note the alarms that fire."""
        if self.monitor is None:
            return
        statistics = rollout_statistics(rollout.metrics, zip(self.reward.labels, self.reward.weights),
                                        self.job.drift.task_rewards)
        for alarm in self.monitor.observe(step, statistics):
            line = f"drift alarm at step {step} (rollout {rollout.index + 1}): {alarm.message}"
            print(f"[alignkit] {line}", flush=True)
            self.notes.append(line)
        self._drift_metrics = self.monitor.metrics(statistics)

    def on_step_end(self, step: int) -> dict[str, float]:
        metrics = dict(self.current.metrics) if self.current else {}
        metrics.update(self._drift_metrics)
        metrics["time/generation"] = self.timings.get("time/generation", 0.0)
        metrics["time/reward"] = self.timings.get("time/reward", 0.0)
        metrics["time/reference"] = self.timings.get("time/reference", 0.0)
        if self._yielded_at is not None:
            metrics["time/training"] = time.perf_counter() - self._yielded_at
        self.timings = {}
        return metrics

    def state_dict(self) -> dict:
        return {"current": self.current.state() if self.current is not None else None,
                "drift": self.monitor.state_dict() if self.monitor is not None else None}

    def final_notes(self) -> list[str]:
        """For the run report: how often each reward function (and judge endpoint) failed."""
        return self.reward.report_lines() if hasattr(self.reward, "report_lines") else []

    def load_state_dict(self, state: dict) -> None:
        current = state.get("current")
        self.current = Rollout.from_state(current) if current is not None else None
        if self.monitor is not None and state.get("drift"):
            self.monitor.load_state_dict(state["drift"])

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Rewards of answers to held-out prompts (greedy by default): ``reward``, ``rewards/<fn>``..."""
        if not self.validation_examples:
            return {}
        count = min(len(self.validation_examples), self.job.eval_max_prompts or len(self.validation_examples))
        start, stop = distributed.shard_range(count)  # each process answers its share of the prompts
        results, lengths, truncated = [], [], []
        if stop > start:
            params = self.sampling_params(self.job.eval_temperature, seed=self.job.training.seed + start)
            batch = self._generate(self.validation_prompt_ids[start:stop], 1, params, with_logprobs=False)
            _, result = self.score(self.validation_examples[start:stop], batch.texts, 1)
            results = [result]
            lengths = batch.completion_mask.sum(-1).tolist()
            truncated = batch.truncated.float().tolist()
        gathered = distributed.gather_objects((results, lengths, truncated))
        result = merge_reward_results([r for rs, _, _ in gathered for r in rs])
        lengths = [x for _, ls, _ in gathered for x in ls]
        truncated = [x for _, _, ts in gathered for x in ts]
        metrics = result.summary()
        metrics["completion_length"] = sum(lengths) / len(lengths)
        metrics["truncated_share"] = sum(truncated) / len(truncated)
        return metrics

    def save_final(self, directory) -> None:
        if self.merged_start:  # the starting adapter lives in the weights: save them whole
            self.notes.append("final/ holds full weights: the starting adapter was merged into its base")
            save_model(self.policy, self.tokenizer, directory, merge=True)
            return
        save_model(self.policy, self.tokenizer, directory)
        if self.job.lora is not None and self.job.lora.merge_on_save:
            save_model(self.policy, self.tokenizer, f"{directory}-merged", merge=True)

    # -- to be written by the method
    def make_rollout(self, index: int) -> Rollout:
        raise NotImplementedError

    def micro_batches(self, rollout: Rollout, position: int) -> list[CompletionBatch | GroupedCompletionBatch]:
        raise NotImplementedError
