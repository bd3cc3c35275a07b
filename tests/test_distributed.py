"""Data parallelism: two processes (gloo on CPU, started by ``accelerate launch``) make the same updates
as one, resume across process counts, write only from the main process, count every held-out row
once, stop together on NaN and Ctrl-C, and do the same under FSDP2; splitting rules and bad input.

One launch runs every two-process scenario (`tests/distributed_worker.py`); the one-process runs of
the same jobs happen here, in-process.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from alignkit import distributed
from alignkit.data import tokenize_dataset
from alignkit.data.formats import load_examples
from alignkit.data.types import ChatExample
from alignkit.engine import CheckpointMismatch, Engine
from alignkit.errors import UsageError
from alignkit.methods import load_job
from alignkit.methods.base import BatchSchedule, process_share
from alignkit.methods.kto import kto_objective
from alignkit.methods.sft import SFTRecipe
from tests import distributed_worker as worker

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5  # max |a - b| / max |b| per tensor, float32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(env: dict, folder: Path, preset: str, *command: str) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file examples/accelerate/<preset> --num_processes 2 <command>`` (on
    CPUs: gloo, one thread each)."""
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "examples" / "accelerate" / preset), "--num_processes", "2",
                           "--main_process_port", str(free_port()), *command],
                          env=env, cwd=folder, capture_output=True, text=True, timeout=900)


def launch_environment(folder: Path) -> dict:
    """CPU processes (no GPU is used even where there is one: the one-process runs here are on CPU)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "CUDA_VISIBLE_DEVICES": "",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "ALIGNKIT_HOME": str(folder / "home")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Assets, the two processes' reports, and the one-process runs of the same jobs."""
    folder = tmp_path_factory.mktemp("distributed")
    assets = folder / "assets"
    worker.make_assets(assets)
    env = launch_environment(folder)
    done = launch(env, folder, "ddp.yaml", str(ROOT / "tests" / "distributed_worker.py"), "run", str(assets),
                  str(folder / "out"))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-6000:]
    reports = [json.loads((folder / "out" / f"process-{rank}.json").read_text()) for rank in (0, 1)]
    for method in ("sft", "dpo", "rm", "kto", "grpo", "ppo"):  # the same jobs, one process
        worker.train(assets, method, f"{method}-1")
    worker.train(assets, "sft", "sft-lora-1", lora=worker.LORA_MERGED, training={"eval_steps": None})
    worker.train(assets, "grpo", "grpo-full-1", lora=None)
    worker.train(assets, "sft", "sft-tied-1", model=worker.tied_model(assets), training={"eval_steps": None})
    return assets, reports


def final_tensors(run: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file under the run's final/ folder."""
    out = {}
    for path in sorted((run / "final").rglob("*.safetensors")):
        for name, tensor in load_file(str(path)).items():
            out[f"{path.relative_to(run)}:{name}"] = tensor.float()
    assert out, f"no weights under {run / 'final'}"
    return out


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12)) for k in a)


def logged(run: Path, key: str) -> list[float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [line[key] for line in lines if key in line]


@pytest.mark.parametrize("method", ["sft", "dpo", "rm", "kto", "grpo", "ppo"])
def test_two_processes_make_the_same_updates_as_one(runs, method):
    assets, _ = runs
    two, one = assets / "runs" / f"{method}-2", assets / "runs" / f"{method}-1"
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["data_parallel"] == "ddp"
    # PPO (beyond the list): its critic adds a second adapter that starts at zero, so three
    # tiny Adam steps leave tensors whose float noise is larger relative to their size
    tolerance = 5 * TOLERANCE if method == "ppo" else TOLERANCE
    assert largest_difference(final_tensors(two), final_tensors(one)) <= tolerance
    losses_two, losses_one = logged(two, "loss"), logged(one, "loss")
    assert len(losses_two) == len(losses_one) == worker.STEPS
    assert losses_two == pytest.approx(losses_one, rel=TOLERANCE, abs=1e-7)
    assert len(set(losses_one)) == worker.STEPS  # the steps really differ
    if method not in ("grpo", "ppo"):  # held-out metrics from the shared-out evaluation equal the one-process ones
        assert logged(two, "eval/loss") == pytest.approx(logged(one, "eval/loss"), rel=TOLERANCE)


class PerProcessMean:
    """SFT trained as if each of two processes averaged its own loss and DDP averaged the two: each
    micro-batch weighs ``tokens / (its process's tokens * 2)`` instead of ``tokens / all tokens``."""

    def __init__(self, recipe: SFTRecipe):
        self.recipe, self.model = recipe, recipe.model

    def steps_per_epoch(self):
        return self.recipe.steps_per_epoch()

    def updates(self, start_step):
        for chunk in self.recipe.schedule.updates(start_step):
            step = []
            for process in range(2):
                batches = [self.recipe.collate([self.recipe.train_rows[i] for i in rows])
                           for rows in process_share(chunk, self.recipe.job.training.batch_size, process, 2)]
                tokens = sum(self.recipe.loss_weight(b) for b in batches)
                step += [(b, self.recipe.loss_weight(b) / tokens / 2) for b in batches]
            yield step

    def loss(self, item):
        return self.recipe.loss(item[0])

    def loss_weight(self, item):
        return item[1]

    def evaluate(self):
        return {}


def test_a_per_process_mean_would_fail_the_comparison(runs, tmp_path):
    """The data give the two processes different token counts, so averaging per process moves the
    weights measurably elsewhere: the comparison above would catch that mistake."""
    assets, _ = runs
    job = load_job(None, worker.job_file(assets, "sft", "per-process-mean"))
    recipe = SFTRecipe(job)
    Engine(job.training, PerProcessMean(recipe), tmp_path / "run").train()
    trained = {f"final/model.safetensors:{k}": v.detach().float() for k, v in recipe.model.state_dict().items()}
    global_mean = final_tensors(assets / "runs" / "sft-2")
    assert largest_difference(trained, global_mean) > 100 * TOLERANCE


def test_resume_under_two_and_under_one_process_equals_the_uninterrupted_run(runs):
    assets, _ = runs
    uninterrupted = final_tensors(assets / "runs" / "sft-1")
    # two processes stopped after step 2 and resumed under two processes
    resumed_two = assets / "runs" / "resume-2"
    assert logged(resumed_two, "loss") == pytest.approx(logged(assets / "runs" / "sft-1", "loss"), rel=TOLERANCE)
    assert largest_difference(final_tensors(resumed_two), uninterrupted) <= TOLERANCE
    # the same step-2 checkpoint resumed under one process
    worker.train(assets, "sft", "resume-2-copy", training={"max_steps": worker.STEPS, "save_steps": 1,
                                                           "eval_steps": None, "resume": True})
    assert largest_difference(final_tensors(assets / "runs" / "resume-2-copy"), uninterrupted) <= TOLERANCE
    # an FSDP2 checkpoint (sharded weights and optimizer state, gathered when written) under one process
    checkpoint = assets / "runs" / "sft-fsdp2-2" / "checkpoints" / "step-0000002"
    assert json.loads((checkpoint / "checkpoint.json").read_text())["processes"] == 2
    worker.train(assets, "sft", "from-fsdp2", training={"resume": str(checkpoint), "eval_steps": None})
    assert largest_difference(final_tensors(assets / "runs" / "from-fsdp2"), uninterrupted) <= TOLERANCE
    # and under FSDP2 again, loading once (the second process's model empty until the shards arrive)
    resumed_fsdp2 = assets / "runs" / "sft-fsdp2-resumed-2"
    assert [json.loads(line)["step"] for line in (resumed_fsdp2 / "metrics.jsonl").read_text().splitlines()] == [3]
    assert largest_difference(final_tensors(resumed_fsdp2), uninterrupted) <= TOLERANCE


def test_only_the_main_process_writes(runs):
    assets, reports = runs
    main, other = reports
    assert main["writes"] and any("metrics.jsonl" in w for w in main["writes"])  # the audit sees writes
    assert other["writes"] == []
    steps = [json.loads(line)["step"] for line in (assets / "runs" / "sft-2" / "metrics.jsonl").read_text().splitlines()
             if "loss" in line and "eval/loss" not in line]
    assert steps == [1, 2, 3]  # every step logged once
    assert not list((assets / "runs").rglob(".tmp-*"))


def test_evaluation_counts_every_held_out_row_once(runs):
    assets, _ = runs
    job = load_job(None, worker.job_file(assets, "sft", "count"))
    recipe = SFTRecipe(job)
    examples, _ = load_examples(str(assets / "chat_valid.jsonl"), kind="chat")
    rows, _ = tokenize_dataset(recipe.tokenizer, examples, job.data.max_length, "assistant")
    tokens = sum(sum(row.loss_mask[1:]) for row in rows)  # predicted tokens of the 5 rows, by hand
    for two in ("sft-2", "sft-fsdp2-2"):
        assert logged(assets / "runs" / two, "eval/tokens") == [tokens, tokens]  # 5 rows over 2 processes: 3 + 2
    for method in ("dpo", "rm"):
        assert logged(assets / "runs" / f"{method}-2", "eval/pairs") == [5, 5]


def test_nan_and_ctrl_c_on_one_process_stop_every_process_at_the_same_step(runs):
    assets, reports = runs
    nan = [r["seen"]["nan"] for r in reports]
    assert [n["stopped"] for n in nan] == ["diverged", "diverged"] and {n["step"] for n in nan} == {1}
    assert all(n["message"].startswith("step 2: loss is nan") for n in nan)
    interrupted = [r["seen"]["interrupt"] for r in reports]
    assert [i["stopped"] for i in interrupted] == ["interrupted", "interrupted"]
    assert {i["step"] for i in interrupted} == {2}
    checkpoints = sorted(p.name for p in (assets / "runs" / "fail-interrupt" / "checkpoints").iterdir())
    assert checkpoints == ["step-0000002"]


@pytest.mark.parametrize("method", ["sft", "dpo", "grpo", "rm", "ppo"])
def test_fsdp2_makes_the_same_updates_as_one_process(runs, method):
    assets, _ = runs
    two = assets / "runs" / f"{method}-fsdp2-2"
    assert json.loads((two / "summary.json").read_text())["data_parallel"] == "fsdp2"
    tolerance = 5 * TOLERANCE if method == "ppo" else TOLERANCE  # as under DDP: the critic's adapter starts at 0
    assert largest_difference(final_tensors(two), final_tensors(assets / "runs" / f"{method}-1")) <= tolerance


def test_fsdp2_preset_loads_the_weights_on_the_main_process_only(runs):
    """fsdp2.yaml has fsdp_cpu_ram_efficient_loading: the second process built every FSDP2 run's model
    (LoRA and reward head included) without storage, and received its shards from the first; the runs
    above still equal one process."""
    assets, reports = runs
    main, other = (report["seen"]["loaded"] for report in reports)
    runs_checked = {"sft-fsdp2-2", "dpo-fsdp2-2", "grpo-fsdp2-2", "rm-fsdp2-2", "ppo-fsdp2-2", "sft-lora-fsdp2-2",
                    "grpo-full-fsdp2-2", "sft-tied-fsdp2-2"}
    assert runs_checked <= main.keys() and runs_checked <= other.keys()
    for run in runs_checked:
        held, total = main[run]
        assert total > 100_000 and held == total  # the tiny model's float32 weights, all read by the main process
        assert other[run] == [0, total]           # nothing on the other process before FSDP2 filled its shards
    assert other["sft-2"] == main["sft-2"]  # under DDP every process loads the whole model
    # a model whose output layer is its input embeddings (SmolLM2's case) stays tied: one trained parameter,
    # saved once (the keys of final/ are one process's keys)
    assert largest_difference(final_tensors(assets / "runs" / "sft-tied-fsdp2-2"),
                              final_tensors(assets / "runs" / "sft-tied-1")) <= TOLERANCE
    # GRPO without LoRA: its frozen reference copy (received from the main process) gave the same updates
    assert largest_difference(final_tensors(assets / "runs" / "grpo-full-fsdp2-2"),
                              final_tensors(assets / "runs" / "grpo-full-1")) <= TOLERANCE


def merged_tensors(run: Path) -> dict[str, torch.Tensor]:
    return {f"{path.name}:{name}": tensor.float() for path in sorted((run / "final-merged").rglob("*.safetensors"))
            for name, tensor in load_file(str(path)).items()}


def test_fsdp2_saves_the_adapter_and_the_merged_model_as_one_process_does(runs):
    """lora.merge_on_save under FSDP2: the sharded weights are gathered to the main process, which writes
    final/ (the adapter) and final-merged/ (base + adapter, a full model) once, equal to one process's."""
    assets, _ = runs
    two, one = assets / "runs" / "sft-lora-fsdp2-2", assets / "runs" / "sft-lora-1"
    assert (two / "final" / "adapter_config.json").is_file()
    assert largest_difference(final_tensors(two), final_tensors(one)) <= TOLERANCE
    merged_two, merged_one = merged_tensors(two), merged_tensors(one)
    assert "model.safetensors:model.layers.0.mlp.up_proj.weight" in merged_one  # plain names: a merged full model
    assert largest_difference(merged_two, merged_one) <= TOLERANCE
    base = load_file(str(assets / "model" / "model.safetensors"))
    moved = max(float((merged_one[f"model.safetensors:{k}"] - v.float()).abs().max()) for k, v in base.items())
    assert moved > 1e-5  # the merged weights are not the base's: the adapter really is in them


def test_an_empty_model_has_the_loaded_models_structure_without_storage(tmp_path, tiny_model, tiny_tokenizer):
    """What a process other than the main one builds under low-memory loading: the same parameters
    (names, shapes, dtypes) on the meta device, real rotary buffers, a LoRA adapter on top likewise."""
    from alignkit.model import add_lora, load_model_and_tokenizer, save_model

    save_model(tiny_model, tiny_tokenizer, tmp_path / "model")
    loaded, _ = load_model_and_tokenizer(tmp_path / "model", device="cpu", dtype="float32")
    empty, tokenizer = load_model_and_tokenizer(tmp_path / "model", device="cpu", dtype="float32",
                                                empty_from=loaded.config)
    assert tokenizer.get_vocab() == tiny_tokenizer.get_vocab()
    shapes = {n: (tuple(p.shape), p.dtype) for n, p in loaded.named_parameters()}
    assert {n: (tuple(p.shape), p.dtype) for n, p in empty.named_parameters()} == shapes
    assert all(p.is_meta for p in empty.parameters()) and not distributed.holds_weights(empty)
    buffers = dict(loaded.named_buffers())
    for name, buffer in empty.named_buffers():
        assert torch.equal(buffer, buffers[name])  # e.g. rotary frequencies: computed, not read
    assert distributed.model_device(empty) == torch.device("cpu")  # where it will compute, not "meta"
    adapted = add_lora(empty, rank=4, alpha=8, dropout=0.0)
    assert all(p.is_meta for n, p in adapted.named_parameters() if "lora_" in n)
    skeleton = distributed.empty_copy(tiny_model)
    assert all(p.is_meta for p in skeleton.parameters()) and not any(p.is_meta for p in tiny_model.parameters())
    skeleton.load_state_dict(tiny_model.state_dict(), assign=True)
    assert all(torch.equal(a, b) for a, b in zip(skeleton.parameters(), tiny_model.parameters()))


# ----------------------------------------------------------------------------- splitting rules, bad input

def test_every_row_of_a_step_goes_to_exactly_one_process():
    chunk = [[5, 2, 9, 1], [7, 3, 0, 4], [8, 6]]  # a step of 10 rows in three micro-batches
    for processes in (1, 2, 3, 4):
        shares = [process_share(chunk, 4, p, processes) for p in range(processes)]
        rows = [i for share in shares for batch in share for i in batch]
        assert rows == [5, 2, 9, 1, 7, 3, 0, 4, 8, 6]  # all, once, in order
        sizes = [sum(len(b) for b in share) for share in shares]
        assert max(sizes) - min(sizes) <= 1 and all(len(b) <= 4 for s in shares for b in s)
    assert process_share([[3]], 4, 1, 2) == []  # a short last step: nothing for the second process


def test_a_batch_that_cannot_be_split_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(UsageError, match=r"^8 rows per step \(training.batch_size 4 x gradient_accumulation_steps 2\) "
                                         r"cannot be split evenly across 3 processes; make it a multiple of 3"):
        BatchSchedule([5] * 20, 4, 2, seed=0)
    monkeypatch.setattr(distributed, "world_size", lambda: 8)
    with pytest.raises(UsageError, match=r"^8 processes but only 4 prompt groups per step \(prompts_per_step 4\)"):
        distributed.check_split(4, "prompt groups", "prompts_per_step 4")
    BatchSchedule([5] * 20, 4, 2, seed=0)  # 8 rows, 8 processes: one each


def test_a_checkpoint_of_another_job_is_one_clear_error(tmp_path, tiny_model, tiny_tokenizer):
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000001"
    checkpoint.mkdir(parents=True)
    save_file({"model.layers.0.mlp.up_proj.lora_A.default.weight": torch.zeros(4, 32)},
              str(checkpoint / "trainable.safetensors"))
    torch.save({}, checkpoint / "state.pt")
    job = load_job("sft", None, [f"training.output_dir={tmp_path / 'run'}", "training.resume=true",
                                 "training.progress=false", "training.tensorboard=false"])
    recipe = SFTRecipe(job, model=tiny_model, tokenizer=tiny_tokenizer,
                       train=[worker_example(i) for i in range(4)], validation=[])
    with pytest.raises(CheckpointMismatch, match=r"step-0000001 does not fit this job's model: 21 trainable weights "
                                                 r"missing .*; 1 it has that this model lacks"):
        Engine(job.training, recipe, tmp_path / "run").train()


def worker_example(i):
    return ChatExample(messages=[{"role": "user", "content": "hello"},
                                 {"role": "assistant", "content": "yes " * (i + 1)}], source=f"t:{i}")


def test_kto_reference_point_is_shared_by_the_processes(monkeypatch):
    """z_0 is a batch statistic: each process's share of a micro-batch uses the mean over all shares."""
    job = load_job("kto", None, ["beta=0.5"])
    policy = torch.tensor([-3.0, -5.0, -2.0, -7.0])         # own completions of 4 examples
    mismatched = torch.tensor([-4.0, -6.5, -3.0, -9.0])     # their mismatched completions
    reference = policy - torch.tensor([0.3, -0.2, 0.1, 0.4])
    reference_mismatched = mismatched - torch.tensor([0.2, 1.5, 0.6, 0.9])  # drifts differ, mean 0.8
    labels = torch.tensor([True, False, True, False])
    whole_loss, whole = kto_objective(job, torch.cat([policy, mismatched]),
                                      torch.cat([reference, reference_mismatched]), labels)
    assert whole["kl"] == pytest.approx(0.8)  # z_0 > 0: the test can see it
    halves = [slice(0, 1), slice(1, 4)]         # uneven shares, as on a short step
    drift = mismatched - reference_mismatched
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    losses = []
    for mine, other in (halves, halves[::-1]):
        peer = {"sum": float(drift[other].sum()), "count": float(drift[other].numel())}
        monkeypatch.setattr(distributed, "sum_across",
                            lambda values, peer=peer: {k: values[k] + peer[k] for k in values})
        loss, metrics = kto_objective(job, torch.cat([policy[mine], mismatched[mine]]),
                                      torch.cat([reference[mine], reference_mismatched[mine]]), labels[mine],
                                      shared_reference_point=True)
        assert metrics["kl"] == pytest.approx(whole["kl"])
        losses.append(float(loss) * (mine.stop - mine.start))
    assert sum(losses) / 4 == pytest.approx(float(whole_loss))  # the engine's weighting by examples


@pytest.mark.parametrize("preset", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_deepspeed_presets_make_the_same_updates_as_one_process(runs, preset):
    """Only where DeepSpeed is installed (``pip install deepspeed``; on CPUs with ``DS_ACCELERATOR=cpu``;
    its first run compiles a communication op for minutes)."""
    pytest.importorskip("deepspeed")
    assets, _ = runs
    run = f"sft-{preset.removesuffix('.yaml')}"
    job = worker.job_file(assets, "sft", run)
    env = {"DS_ACCELERATOR": "cpu", **launch_environment(assets.parent)}
    done = launch(env, assets.parent, preset, "-m", "alignkit", "train", str(job))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-6000:]
    assert json.loads((assets / "runs" / run / "summary.json").read_text())["data_parallel"] == "deepspeed"
    assert largest_difference(final_tensors(assets / "runs" / run),
                              final_tensors(assets / "runs" / "sft-1")) <= TOLERANCE


def test_every_preset_is_a_valid_accelerate_configuration():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {name: str(load_config_from_file(str(ROOT / "examples" / "accelerate" / name)).distributed_type)
             for name in ("ddp.yaml", "fsdp2.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml")}
    assert kinds == {"ddp.yaml": "DistributedType.MULTI_GPU", "fsdp2.yaml": "DistributedType.FSDP",
                     "deepspeed_zero2.yaml": "DistributedType.DEEPSPEED",
                     "deepspeed_zero3.yaml": "DistributedType.DEEPSPEED"}
