"""What `tests/test_distributed.py` runs under ``accelerate launch --num_processes 2`` (and in-process
with one): tiny SFT, DPO, reward-model, KTO, GRPO and PPO jobs, a resume, a NaN and a Ctrl-C on one process,
and FSDP2. Not collected by pytest (no ``test_`` prefix).

    python tests/distributed_worker.py make ASSETS                 # tiny model + data files
    accelerate launch --multi_gpu --num_processes 2 tests/distributed_worker.py run ASSETS OUT

Every process writes ``OUT/process-<rank>.json``: what it saw (steps, errors) and every file it
opened for writing, created, renamed or removed under ``ASSETS/runs`` (an audit hook): the test
asserts that the main process's list is full and the other's empty.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import torch
import yaml

from alignkit import distributed
from alignkit.cli import main as cli_main
from alignkit.distributed import ParallelModel
from alignkit.engine import Engine, TrainingDiverged
from alignkit.methods import get_method, load_job
from alignkit.methods.base import run_job
from alignkit.methods.sft import SFTRecipe
from alignkit.rollout.hf import build_rollout_batch
from alignkit.rollout.stops import stop_token_ids
from alignkit.seeding import seed_everything
from tests.helpers import WORDS, save_tiny_model

STEPS = 3
PRESETS = Path(__file__).resolve().parents[1] / "examples" / "accelerate"
# an SFT job with LoRA whose adapter is also saved merged (final-merged/)
LORA_MERGED = {"rank": 4, "alpha": 8, "dropout": 0.0, "merge_on_save": True}


# ----------------------------------------------------------------------------- assets

def make_assets(folder: Path) -> None:
    """A tiny Llama + tokenizer and small data files whose rows have very different lengths."""
    folder.mkdir(parents=True, exist_ok=True)
    save_tiny_model(folder / "model")
    save_tiny_model(folder / "model-tied", tie_word_embeddings=True)  # one parameter for input and output embeddings
    generator = torch.Generator().manual_seed(7)

    def text(n):
        return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=generator).tolist())

    def write(name, rows):
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))

    write("chat_train.jsonl", [{"prompt": text(3), "completion": text(1 + (5 * i) % 13)} for i in range(24)])
    write("chat_valid.jsonl", [{"prompt": text(2), "completion": text(2 + 3 * i)} for i in range(5)])
    # 11 training pairs, batch 4: the third step has 3 pairs, split 2 / 1 between two processes
    pairs = [{"prompt": text(2 + i % 3), "chosen": text(1 + i % 4) + " yes", "rejected": text(2 + i % 5) + " no"}
             for i in range(16)]
    write("pairs_train.jsonl", pairs[:11])
    write("pairs_valid.jsonl", pairs[11:])
    write("prompts.jsonl", [{"prompt": text(1 + i % 4), "answer": "yes"} for i in range(8)])
    feedback = [{"prompt": text(2 + i % 3), "completion": text(1 + i % 5), "label": i % 3 != 0} for i in range(16)]
    write("feedback_train.jsonl", feedback[:11])
    write("feedback_valid.jsonl", feedback[11:])


# ----------------------------------------------------------------------------- jobs

def job_file(assets: Path, method: str, run: str, **top) -> Path:
    """A job file for ``method`` writing to ``ASSETS/runs/<run>``; ``top`` keys replace the defaults."""
    training = {"max_steps": STEPS, "batch_size": 4, "learning_rate": 1e-4, "lr_scheduler": "constant",
                "output_dir": str(assets / "runs" / run), "progress": False, "tensorboard": False, "seed": 3,
                **top.pop("training", {})}
    job = {"method": method, "model": {"name_or_path": str(assets / "model"), "device": "cpu"}, "training": training}
    if method == "sft":
        job["data"] = {"train": str(assets / "chat_train.jsonl"), "validation": str(assets / "chat_valid.jsonl"),
                       "max_length": 64}
        training.setdefault("eval_steps", STEPS)
    elif method in ("dpo", "rm", "kto"):
        data = "feedback" if method == "kto" else "pairs"
        job["data"] = {"train": str(assets / f"{data}_train.jsonl"), "validation": str(assets / f"{data}_valid.jsonl"),
                       "max_length": 64}
        training.setdefault("eval_steps", STEPS)
        if method == "kto":
            job.update(beta=0.5, lora={"rank": 4, "alpha": 8, "dropout": 0.0})
            job["reference_cache_dir"] = str(assets / "runs" / run / "reference-cache")
        elif method == "dpo":
            job.update(beta=0.5, lora={"rank": 4, "alpha": 8, "dropout": 0.0})
            job["reference_cache_dir"] = str(assets / "runs" / run / "reference-cache")
        else:  # centring gives the head's bias a gradient (the pairwise loss alone cancels it)
            job["center_rewards_coefficient"] = 0.01
    elif method == "grpo":
        job["data"] = {"train": str(assets / "prompts.jsonl"), "validation_fraction": 0.0}
        job.update(num_generations=4, prompts_per_step=4, max_completion_length=8, beta=0.1,
                   rewards=[{"name": "tests.distributed_worker:count_yes"}],
                   lora={"rank": 4, "alpha": 8, "dropout": 0.0})
        training["batch_size"] = 8
    else:  # ppo: a separate critic, the KL penalty, two minibatches per rollout (rows of both processes)
        job["data"] = {"train": str(assets / "prompts.jsonl"), "validation_fraction": 0.0}
        job.update(num_generations=2, prompts_per_step=4, max_completion_length=8, kl_coef=0.1, ppo_epochs=1,
                   num_mini_batches=2, critic="separate", rewards=[{"name": "tests.distributed_worker:count_yes"}],
                   lora={"rank": 4, "alpha": 8, "dropout": 0.0})
    job.update(top)
    path = assets / "jobs" / f"{run}.yaml"
    if distributed.is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(job))  # JSON is YAML
    distributed.barrier()
    return path


def tied_model(assets: Path) -> dict:
    """The ``model:`` section of a job on the tiny model whose output layer is its input embeddings."""
    return {"name_or_path": str(assets / "model-tied"), "device": "cpu"}


def count_yes(prompts, completions, **fields):
    return [c.count("yes") / 2 for c in completions]


class ScriptedSampler:
    """Completions that depend only on the prompt and the sample's place in its group (not on which
    process samples it, nor on a seed): so one process and two train on the same samples."""

    name = "scripted"

    def generate(self, model, tokenizer, prompt_ids, num_generations, params, with_logprobs=True):
        eos = stop_token_ids(tokenizer, model)
        words = ["yes", "no", "cat", "dog", "red"]
        expanded, sampled = [], []
        for prompt in prompt_ids:
            for j in range(num_generations):
                key = (sum(prompt) * 31 + j * 7) % 97
                text = " ".join(words[(key + k) % len(words)] for k in range(1 + (key + j) % 5))
                expanded.append(list(prompt))
                sampled.append(tokenizer(text, add_special_tokens=False)["input_ids"][:params.max_new_tokens - 1]
                               + [eos[0]])
        return build_rollout_batch(model, tokenizer, expanded, sampled, num_generations, params, eos,
                                   tokenizer.pad_token_id, with_logprobs=with_logprobs)


LOADED: dict[str, list[int]] = {}  # run -> [bytes of parameters with storage, bytes of all], before preparation
_RUN = [""]


def record_loading() -> None:
    """Record, per run, how much of the model this process held when the engine prepared it: with
    low-memory loading the main process holds all of it and the others nothing (meta parameters)."""
    original = ParallelModel.__init__

    def prepare(self, model, *args, **kwargs):
        sizes = [(p.numel() * p.element_size(), p.is_meta) for p in model.parameters()]
        LOADED[_RUN[0]] = [sum(n for n, meta in sizes if not meta), sum(n for n, _ in sizes)]
        original(self, model, *args, **kwargs)

    ParallelModel.__init__ = prepare


def train(assets: Path, method: str, run: str, **top) -> dict:
    """Train the job (SFT through the command line, the others through `run_job`); the run's summary."""
    _RUN[0] = run
    path = job_file(assets, method, run, **top)
    if method == "sft":
        code = cli_main(["train", str(path)])
        assert code == 0, code
        return json.loads((assets / "runs" / run / "summary.json").read_text()) if distributed.is_main_process() else {}
    job = load_job(None, path)
    recipe = None
    if method in ("grpo", "ppo"):
        seed_everything(job.training.seed)  # what run_job does before it builds a recipe
        recipe = get_method(method).recipe(job, backend=ScriptedSampler())
    return run_job(job, recipe=recipe)


# ----------------------------------------------------------------------------- failures on one process

class OneProcessFails(SFTRecipe):
    """SFT whose loss turns NaN, or which receives Ctrl-C, on the last process at its second step."""

    def __init__(self, job, failure: str):
        super().__init__(job)
        self.failure, self.calls = failure, 0

    def loss(self, batch):
        loss, metrics = super().loss(batch)
        self.calls += 1
        if distributed.rank() == distributed.world_size() - 1 and self.calls == 2:
            if self.failure == "nan":
                loss = loss * float("nan")
            else:
                os.kill(os.getpid(), signal.SIGINT)
        return loss, metrics


def fail_on_one_process(assets: Path, failure: str) -> dict:
    job = load_job(None, job_file(assets, "sft", f"fail-{failure}", training={"max_steps": 4, "eval_steps": None}))
    engine = Engine(job.training, OneProcessFails(job, failure), job.output_dir())
    try:
        engine.train()
    except TrainingDiverged as error:
        return {"stopped": "diverged", "step": engine.step, "message": str(error)}
    except KeyboardInterrupt as error:
        return {"stopped": "interrupted", "step": engine.step, "message": str(error)}
    return {"stopped": None, "step": engine.step}


# ----------------------------------------------------------------------------- the scenarios

def use_fsdp2() -> None:
    """Switch this process's accelerate state to the FSDP2 preset (the environment ``accelerate launch
    --config_file examples/accelerate/fsdp2.yaml`` sets: ``FSDP_<KEY>`` per ``fsdp_<key>``), keeping
    the process group."""
    from accelerate.state import AcceleratorState

    preset = yaml.safe_load((PRESETS / "fsdp2.yaml").read_text())
    assert preset["distributed_type"] == "FSDP"
    os.environ["ACCELERATE_USE_FSDP"] = "true"
    for key, value in preset["fsdp_config"].items():
        os.environ["FSDP_" + key.removeprefix("fsdp_").upper()] = str(value).lower() if isinstance(value, bool) \
            else str(value)
    AcceleratorState._reset_state()


def scenarios(assets: Path, suffix: str) -> dict:
    """Everything, as run by N processes (the runs are named with ``suffix``)."""
    seen = {}
    for method in ("sft", "dpo", "rm", "kto", "grpo", "ppo"):
        train(assets, method, f"{method}-{suffix}")
    # resume: stop after step 2 (checkpoint), keep a copy for the test to resume under one process,
    # then resume under these processes to step 3
    train(assets, "sft", f"resume-{suffix}", training={"max_steps": 2, "save_steps": 1, "eval_steps": None})
    if distributed.is_main_process():
        shutil.copytree(assets / "runs" / f"resume-{suffix}", assets / "runs" / f"resume-{suffix}-copy")
    distributed.barrier()
    train(assets, "sft", f"resume-{suffix}", training={"max_steps": STEPS, "save_steps": 1, "eval_steps": None,
                                                       "resume": True})
    seen["nan"] = fail_on_one_process(assets, "nan")
    seen["interrupt"] = fail_on_one_process(assets, "interrupt")
    use_fsdp2()  # the preset loads the weights on the main process only (fsdp_cpu_ram_efficient_loading)
    for method in ("sft", "dpo", "grpo", "rm", "ppo"):
        train(assets, method, f"{method}-fsdp2-{suffix}",
              training={"save_steps": 2, "eval_steps": STEPS if method not in ("grpo", "ppo") else None})
    train(assets, "sft", f"sft-lora-fsdp2-{suffix}", lora=LORA_MERGED, training={"eval_steps": None})
    train(assets, "sft", f"sft-tied-fsdp2-{suffix}", model=tied_model(assets), training={"eval_steps": None})
    # full fine-tuning with a KL term: the frozen reference copy is sent whole to the other process
    train(assets, "grpo", f"grpo-full-fsdp2-{suffix}", lora=None)
    # the step-2 checkpoint of the FSDP2 SFT run resumed under FSDP2 (its model built empty again on the
    # second process, then the checkpoint's whole weights and optimizer state loaded into the shards)
    checkpoint = assets / "runs" / f"sft-fsdp2-{suffix}" / "checkpoints" / "step-0000002"
    train(assets, "sft", f"sft-fsdp2-resumed-{suffix}", training={"resume": str(checkpoint), "eval_steps": None})
    seen["loaded"] = LOADED
    return seen


def audit_writes(root: Path, record: list) -> None:
    """Record every write under ``root`` this process makes (open for writing, mkdir, rename, remove)."""
    root = str(root.resolve())

    def hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            mode = str(args[1] or "r") if len(args) > 1 else "r"
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            writing = any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            path = os.path.abspath(os.fsdecode(args[0]))
            if writing and path.startswith(root):
                record.append(f"open {path}")
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "shutil.copytree"):
            named = args and isinstance(args[0], (str, bytes, os.PathLike))
            path = os.path.abspath(os.fsdecode(args[0])) if named else ""
            if path.startswith(root):
                record.append(f"{event} {path}")

    sys.addaudithook(hook)


def main(argv: list[str]) -> None:
    command, assets = argv[0], Path(argv[1]).resolve()
    if command == "make":
        make_assets(assets)
        return
    out = Path(argv[2])
    writes: list[str] = []
    audit_writes(assets / "runs", writes)
    record_loading()
    seen = scenarios(assets, str(distributed.world_size()))
    report = {"rank": distributed.rank(), "processes": distributed.world_size(), "seen": seen, "writes": writes}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"process-{distributed.rank()}.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
