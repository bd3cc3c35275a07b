"""Processes: which one this is, how many there are, and the few collectives alignkit needs.

A job runs unchanged as one process or as N data-parallel processes started by ``accelerate launch``
or ``torchrun`` (one per GPU, on one machine or several). Everything here asks the launcher's
environment (``WORLD_SIZE``, ``RANK``...) through Hugging Face accelerate's `PartialState`, which
joins the process group (NCCL on GPUs, gloo on CPUs) the first time anything here is asked; run
without a launcher, every function answers for a single process and touches no process group.

The rule that makes N processes equal to one: a global batch is split *by rows* across processes
(`shard_range`, contiguous, sizes differ by at most one), every process computes the sum of its
rows' losses, and the engine divides by the count of units (tokens, pairs, completions) summed over
every process (`alignkit.engine`). Evaluation shards its rows the same way and sums (`sum_across`)
or gathers (`gather_tensors`, `gather_objects`) what it measured, so every held-out row is counted
once. See ``docs/scaling.md``.

`ParallelModel` is the engine's side: it wraps the recipe's model for accelerate (DDP, FSDP2 or
DeepSpeed, as the launch configuration says) without the recipes knowing.

Loading once (`low_memory_loading`): under FSDP2 with ``fsdp_cpu_ram_efficient_loading: true`` (the
``fsdp2.yaml`` preset) only the main process reads the weights; the others build the same model on
PyTorch's ``meta`` device (shapes, no storage), LoRA and heads included, and accelerate's FSDP2
preparation shards the empty model and sends every process its shard of the main process's values
(``fsdp2_load_full_state_dict``, a broadcast per tensor). What a recipe does before that with real
weights (DPO's reference pass, deciding whether an adapter is fresh, a frozen reference copy) is done
by the main process alone, or its values are sent to the others (`fill_from_main`).
"""
from __future__ import annotations

import contextlib
import copy
import os
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from transformers import PreTrainedModel

from alignkit.errors import UsageError

_STATE = None


# ----------------------------------------------------------------------------- who am I

def launched() -> bool:
    """True under a launcher that started more than one process (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _uses_cpu() -> bool:
    flag = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return flag or not torch.cuda.is_available()


def state():
    """accelerate's `PartialState` for a launched run (joins the process group once); None otherwise."""
    global _STATE
    if _STATE is None and launched():
        _STATE = PartialState(cpu=_uses_cpu())
    return _STATE


def world_size() -> int:
    current = state()
    return current.num_processes if current is not None else 1


def rank() -> int:
    current = state()
    return current.process_index if current is not None else 0


def is_main_process() -> bool:
    return rank() == 0


def device() -> torch.device | None:
    """This process's device under a launcher (``cuda:<local rank>`` or cpu); None without one."""
    current = state()
    return current.device if current is not None else None


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def low_memory_loading() -> bool:
    """True when only the main process reads the model's weights and the others build it empty (meta):
    a launched FSDP2 run whose accelerate configuration says ``fsdp_cpu_ram_efficient_loading: true``."""
    return (launched() and _flag("ACCELERATE_USE_FSDP") and _flag("FSDP_CPU_RAM_EFFICIENT_LOADING")
            and os.environ.get("FSDP_VERSION", "2").strip() == "2")


def holds_weights(model: torch.nn.Module) -> bool:
    """False for a model built empty (on the meta device) that waits for the main process's values."""
    return not any(parameter.is_meta for parameter in model.parameters())


def model_device(model: torch.nn.Module) -> torch.device:
    """The device ``model`` computes on in this process: its parameters' device, or, for a model built
    empty until FSDP2 fills it (`low_memory_loading`), this process's device."""
    parameter = next(model.parameters())
    if parameter.is_meta:
        return device() or torch.device("cpu")
    return parameter.device


def fill_from_main(module: torch.nn.Module) -> torch.nn.Module:
    """Give a module that is empty on the processes other than the main one (built from a model loaded
    with `low_memory_loading`) the main process's values, on this process's device: for the modules that
    must stay whole on every process (a frozen reference copy). A collective; a no-op when every process
    holds its weights."""
    if world_size() == 1 or all(gather_objects(holds_weights(module))):
        return module
    if not holds_weights(module):
        module.to_empty(device=device() or torch.device("cpu"))
    with torch.no_grad():
        for _, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            torch.distributed.broadcast(tensor.data, src=0)
    return module


def empty_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s modules whose parameters are on the meta device (no storage; small buffers
    are copied): the skeleton a gathered state dict is loaded into (``load_state_dict(assign=True)``)."""
    memo = {id(parameter): torch.nn.Parameter(torch.empty_like(parameter, device="meta"),
                                              requires_grad=parameter.requires_grad)
            for parameter in model.parameters()}
    return copy.deepcopy(model, memo)


# ----------------------------------------------------------------------------- splitting work

def shard_range(count: int, process: int | None = None, processes: int | None = None) -> tuple[int, int]:
    """``(start, stop)`` of process ``process``'s contiguous share of ``count`` items.

    Shares differ by at most one item, the first ``count % processes`` processes taking the larger
    ones, and concatenating the shares in process order gives back ``range(count)``.
    """
    process = rank() if process is None else process
    processes = world_size() if processes is None else processes
    base, extra = divmod(count, processes)
    start = process * base + min(process, extra)
    return start, start + base + (1 if process < extra else 0)


def shard(items: list) -> list:
    """This process's contiguous share of ``items`` (all of them for a single process)."""
    start, stop = shard_range(len(items))
    return items[start:stop]


def check_split(count: int, what: str, keys: str) -> None:
    """One clear error when ``count`` units per step cannot be split evenly across the processes."""
    processes = world_size()
    if processes == 1:
        return
    if count < processes:
        raise UsageError(f"{processes} processes but only {count} {what} per step ({keys}): every process needs "
                         f"at least one; raise {keys.split(' ')[0]} or launch fewer processes")
    if count % processes:
        raise UsageError(f"{count} {what} per step ({keys}) cannot be split evenly across {processes} processes; "
                         f"make it a multiple of {processes} (the global batch stays what the job names)")


# ----------------------------------------------------------------------------- collectives

def gather_objects(value: Any) -> list:
    """Every process's ``value`` (picklable), in process order; ``[value]`` for a single process."""
    if world_size() == 1:
        return [value]
    out: list = [None] * world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def broadcast_object(value: Any, source: int = 0) -> Any:
    """Process ``source``'s ``value`` on every process."""
    if world_size() == 1:
        return value
    box = [value if rank() == source else None]
    torch.distributed.broadcast_object_list(box, src=source)
    return box[0]


def sum_across(values: dict[str, float]) -> dict[str, float]:
    """Each value summed over the processes; a key some process lacks (it had nothing to measure)
    counts 0 there."""
    if world_size() == 1:
        return dict(values)
    keys = sorted(set().union(*gather_objects(sorted(values))))
    current = state()
    tensor = torch.tensor([float(values.get(k, 0.0)) for k in keys], dtype=torch.float64, device=current.device)
    torch.distributed.all_reduce(tensor)
    return dict(zip(keys, tensor.tolist()))


def gather_tensors(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenation along dim 0 of every process's ``tensor`` (CPU; first dims may differ)."""
    if world_size() == 1:
        return tensor
    parts = gather_objects(tensor.detach().cpu())
    return torch.cat(parts) if parts else tensor


def masked_moments(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance of the masked entries of ``values`` over every process's entries."""
    mask = mask.to(values.dtype)
    local = torch.stack([mask.sum(), (values * mask).sum(), (values * values * mask).sum()]).double()
    if world_size() > 1:
        local = local.to(state().device)
        torch.distributed.all_reduce(local)
    count, total, squares = local.cpu().tolist()
    mean = total / max(count, 1.0)
    variance = (squares - count * mean * mean) / max(count - 1.0, 1.0)
    return torch.tensor(mean, dtype=values.dtype), torch.tensor(max(variance, 0.0), dtype=values.dtype)


# ----------------------------------------------------------------------------- the engine's side

class TrainingModule(torch.nn.Module):
    """The one module the data-parallel wrappers see: its forward runs any function of the recipe.

    alignkit's training forward reaches into the decoder and applies the output layer itself
    (`alignkit.model.forward`), so it never calls ``model(...)``. DDP only synchronises gradients of
    a forward that went through its wrapper, FSDP2 gathers the parameters of the root (embeddings,
    final norm, output layer) only in the root's forward, and DeepSpeed hooks the same way. So the
    engine runs each micro-batch's whole loss *as* this module's forward: ``wrapped(recipe.loss,
    batch)``; the decoder layers, sharded on their own, gather in their own forward.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        # FSDP2's auto-wrap (accelerate) shards each decoder layer on its own: the layer classes
        # the wrapped transformers models name as unsplittable
        names: set[str] = set()
        for module in model.modules():
            names.update(getattr(module, "_no_split_modules", None) or [])
        self._no_split_modules = sorted(names)

    def forward(self, function: Callable, *args, **kwargs):
        return function(*args, **kwargs)

    def tie_weights(self) -> None:
        """Tie each transformers model's output layer to its input embeddings again, where its configuration
        says so: accelerate calls this around FSDP2's low-memory loading, which replaces every parameter
        (without it a tied output layer would become a second, untrained copy)."""
        tie_weights(self.model)


def tie_weights(model: torch.nn.Module) -> None:
    """``tie_weights()`` of every transformers model inside ``model`` (an output layer tied to the input
    embeddings becomes that one parameter again, where the configuration says so)."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.tie_weights()


def _precision_name(autocast_dtype: torch.dtype | None, model: torch.nn.Module) -> str:
    """accelerate's ``mixed_precision`` for this run. DDP: "no" (alignkit's own autocast and the model's
    dtype decide, exactly as in one process). FSDP2 and DeepSpeed with bf16 (the job's autocast or bf16
    trainable weights): "bf16", so they keep fp32 master copies of the trainable weights and compute
    in bf16 (FSDP2 also needs one dtype per sharded group, e.g. a bf16 backbone with an fp32 head)."""
    sharding = any(os.environ.get(flag, "").lower() == "true"
                   for flag in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))
    bf16 = autocast_dtype == torch.bfloat16 or any(p.dtype == torch.bfloat16 for p in model.parameters()
                                                   if p.requires_grad)
    return "bf16" if sharding and bf16 else "no"


class ParallelModel:
    """The recipe's model and optimizer prepared by accelerate for N processes, and what the engine
    needs of them: a forward that synchronises, backward with or without the gradient all-reduce,
    clipping, full parameters for sampling/evaluation/saving, and full checkpoint states.

    With one process and no launcher nothing is wrapped: ``forward(function, ...)`` is
    ``function(...)`` and the engine behaves as it always did.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 autocast_dtype: torch.dtype | None = None):
        self.model = model
        self.optimizer = optimizer
        self.accelerator = None
        self.wrapped: torch.nn.Module | None = None
        self._skeleton: torch.nn.Module | None = None
        self.processes = world_size()
        if not launched():
            return
        self.accelerator = Accelerator(mixed_precision=_precision_name(autocast_dtype, model),
                                       device_placement=False, cpu=_uses_cpu())
        if _uses_cpu() and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
            _fsdp2_on_cpu(self.accelerator)
        if _uses_cpu() and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
            _deepspeed_on_cpu(self.accelerator)
        # FSDP2: the modules of the model without storage, kept by the main process to hold the gathered
        # weights when saving (an FSDP2 model cannot be copied, and merging an adapter copies the model)
        self._skeleton = empty_copy(model) if self.accelerator.is_fsdp2 and is_main_process() else None
        if self.kind == "deepspeed":
            # alignkit makes its own batches: DeepSpeed's batch-size keys only feed its logging
            config = self.accelerator.state.deepspeed_plugin.deepspeed_config
            if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
                config["train_micro_batch_size_per_gpu"] = 1
        # a model built empty (low-memory loading): accelerate pairs the optimizer's parameters with their
        # sharded replacements by storage address, which empty parameters do not have; pair them by name
        names = {id(parameter): name for name, parameter in model.named_parameters()}
        order = None if holds_weights(model) else [[names[id(p)] for p in group["params"]]
                                                    for group in optimizer.param_groups]
        self.wrapped, self.optimizer = self.accelerator.prepare(TrainingModule(model), optimizer)
        if order is not None:
            current = dict(self.model.named_parameters())
            for group, group_names in zip(_inner_optimizer(self.optimizer).param_groups, order):
                group["params"] = [current[name] for name in group_names]

    # -- what the launch configuration chose
    @property
    def kind(self) -> str:
        """``single``, ``ddp``, ``fsdp2`` or ``deepspeed``."""
        if self.accelerator is None:
            return "single"
        if self.accelerator.is_fsdp2:
            return "fsdp2"
        name = str(self.accelerator.distributed_type).split(".")[-1]
        if name == "DEEPSPEED":
            return "deepspeed"
        if name == "FSDP":
            return "fsdp1"
        return "ddp"

    @property
    def sharded(self) -> bool:
        return self.kind in ("fsdp2", "fsdp1") or (self.kind == "deepspeed" and self._zero_stage() == 3)

    def _zero_stage(self) -> int:
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        return int(getattr(plugin, "zero_stage", 0) or 0)

    @property
    def zero3(self) -> bool:
        return self.kind == "deepspeed" and self._zero_stage() == 3

    def _gathered(self, parameters=None, modifier_rank: int | None = None):
        """DeepSpeed ZeRO-3: ``parameters`` (default all) whole on every process inside the block."""
        import deepspeed

        parameters = list(self.model.parameters()) if parameters is None else list(parameters)
        return deepspeed.zero.GatheredParameters(parameters, modifier_rank=modifier_rank)

    # -- training
    def forward(self, function: Callable, *args, **kwargs):
        """``function(*args)`` as the wrapped model's forward (see `TrainingModule`)."""
        if self.wrapped is None:
            return function(*args, **kwargs)
        return self.wrapped(function, *args, **kwargs)

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward. Every micro-batch of a step but the ``last``
        accumulates its gradients locally (no all-reduce). Under ZeRO-3 the output layer stays gathered
        throughout: alignkit reads its weight directly (chunked log-probs), in forward and in backward."""
        with contextlib.ExitStack() as stack:
            if self.zero3:
                layers = [m.get_output_embeddings() for m in self.model.modules()
                          if hasattr(m, "get_output_embeddings")]
                stack.enter_context(self._gathered(
                    {id(p): p for layer in layers if layer is not None for p in layer.parameters()}.values()))
            if self.accelerator is not None and not last:
                self.accelerator.gradient_state._set_sync_gradients(False)
                stack.callback(self.accelerator.gradient_state._set_sync_gradients, True)
                stack.enter_context(self.accelerator.no_sync(self.wrapped))
            yield

    def backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def clip_grad_norm(self, max_norm: float) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.accelerator is None:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        norm = self.accelerator.clip_grad_norm_(params, max_norm)
        if norm is None:
            return float("nan")
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    # -- everything outside the training forward
    def run(self, function: Callable, *args, **kwargs):
        """``function(*args)`` with every parameter whole on every process: sampling, evaluation,
        saving. A no-op wrapper for one process and for DDP; with FSDP2 it runs inside the root's
        forward with every layer unsharded (a collective: every process must call it)."""
        if self.zero3:
            with self._gathered():
                return function(*args, **kwargs)
        if self.kind != "fsdp2":
            return function(*args, **kwargs)
        return self.wrapped(self._unsharded, function, *args, **kwargs)

    def _unsharded(self, function: Callable, *args, **kwargs):
        layers = [m for m in self.model.modules() if isinstance(m, FSDPModule)]
        for module in layers:
            module.unshard()
        try:
            return function(*args, **kwargs)
        finally:
            for module in layers:
                module.reshard()

    @contextlib.contextmanager
    def saving(self, owner: Any = None) -> Iterator[None]:
        """Inside, the model can be saved as usual (``save_pretrained``, a head's ``state_dict()``, a merged
        copy of a LoRA model) on the main process. With FSDP2 the whole weights are gathered to the main
        process's CPU (a collective: every process must enter): every module's ``state_dict()`` returns
        them, and each attribute of ``owner`` (the recipe) that is the model or one of its modules is, on
        the main process, replaced by the same module of an ordinary (unsharded) copy holding them, so
        that saving code may copy it (``save_model(..., merge=True)``). A no-op otherwise."""
        if self.zero3:
            with self._gathered():
                yield
            return
        if self.kind != "fsdp2":
            yield
            return
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        modules = list(self.model.named_modules())
        for path, module in modules:
            module.state_dict = _whole_state_dict(full, f"{path}." if path else "")
        swapped: list[tuple[str, Any]] = []
        if owner is not None and self._skeleton is not None:  # the main process
            self._skeleton.load_state_dict(full, assign=True)
            tie_weights(self._skeleton)  # assigning gave tied weights two tensors
            whole = dict(self._skeleton.named_modules())
            counterpart = {id(module): whole[path] for path, module in modules}
            for name, value in list(vars(owner).items()):
                if isinstance(value, torch.nn.Module) and id(value) in counterpart:
                    swapped.append((name, value))
                    setattr(owner, name, counterpart[id(value)])
        try:
            yield
        finally:
            for name, value in swapped:
                setattr(owner, name, value)
            for _, module in modules:
                del module.state_dict

    # -- checkpoints
    def trainable_state(self) -> dict[str, torch.Tensor] | None:
        """Every trainable parameter, whole, on the CPU, on the main process (None elsewhere)."""
        if self.kind == "fsdp2":
            names = {name for name, p in self.model.named_parameters() if p.requires_grad}
            full = get_model_state_dict(self.model, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
            return {k: v.contiguous() for k, v in full.items() if k in names} if is_main_process() else None
        with self._gathered() if self.zero3 else contextlib.nullcontext():
            if not is_main_process():
                return None
            return {name: p.detach().contiguous().cpu().clone() for name, p in self.model.named_parameters()
                    if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.kind == "fsdp2":
            set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True, strict=False))
            return
        params = dict(self.model.named_parameters())
        with self._gathered(modifier_rank=0) if self.zero3 else contextlib.nullcontext(), torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))

    def optimizer_state(self) -> dict | None:
        """The optimizer's whole state on the main process (None elsewhere): ``optimizer.state_dict()``
        where every process holds it all (one process, DDP), parameter names as keys when sharded
        (FSDP2). DeepSpeed's ZeRO optimizer keeps its own partitions: each process's is kept, and such a
        checkpoint resumes under the same number of processes only."""
        if self.kind == "deepspeed":
            parts = gather_objects(self.optimizer.state_dict())
            return {"deepspeed_partitions": parts} if is_main_process() else None
        if self.kind == "fsdp2":
            full = get_optimizer_state_dict(self.model, _inner_optimizer(self.optimizer),
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return full if is_main_process() else None
        return self.optimizer.state_dict() if is_main_process() else None

    def load_optimizer_state(self, state: dict, source: Any = "checkpoint") -> None:
        if "deepspeed_partitions" in state or self.kind == "deepspeed":
            parts = state.get("deepspeed_partitions")
            if self.kind != "deepspeed" or parts is None or len(parts) != self.processes:
                written = f"DeepSpeed with {len(parts)} processes" if parts else "without DeepSpeed"
                raise UsageError(f"{source} was written {written}; its optimizer state resumes only under the "
                                 f"same DeepSpeed setup and process count (this run: {self.kind}, "
                                 f"{self.processes} processes)")
            self.optimizer.load_state_dict(parts[rank()])
            return
        keyed_by_name = any(isinstance(key, str) for key in state.get("state", {}))
        if keyed_by_name or self.kind == "fsdp2":
            if not keyed_by_name:
                state = optimizer_state_by_name(self.model, _inner_optimizer(self.optimizer), state)
            set_optimizer_state_dict(self.model, _inner_optimizer(self.optimizer), state,
                                     options=StateDictOptions(full_state_dict=True))
            return
        self.optimizer.load_state_dict(state)


def _whole_state_dict(full: dict[str, torch.Tensor], path: str) -> Callable:
    """A module's ``state_dict`` that answers from ``full`` (keys relative to the model) instead."""

    def state_dict(*args, destination=None, prefix: str = "", keep_vars: bool = False):
        mine = {prefix + key[len(path):]: value for key, value in full.items() if key.startswith(path)}
        if destination is None:
            return mine
        destination.update(mine)
        return destination

    return state_dict


def _fsdp2_on_cpu(accelerator) -> None:
    """accelerate chooses FSDP only on accelerators (GPU, NPU, XPU...), but torch's FSDP2
    (``fully_shard``) also runs on CPU processes over gloo: give accelerate's state the FSDP plugin
    the launch configuration describes, so ``prepare`` shards the model exactly as it would on GPUs
    (this is how the tests run FSDP2)."""
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise UsageError("FSDP on CPU processes needs fsdp_version: 2 (FSDP2) in the accelerate configuration")
    accelerator.state.fsdp_plugin = plugin
    # both shared states: accelerate copies the process state's type into its own whenever asked again
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP


def _deepspeed_on_cpu(accelerator) -> None:
    """accelerate turns DeepSpeed off for CPU processes, but DeepSpeed runs there too (its CPU
    accelerator, gloo): select the plugin the launch configuration describes, as accelerate does on
    GPUs (how DeepSpeed is tried on a machine without GPUs; set ``DS_ACCELERATOR=cpu``)."""
    plugin = DeepSpeedPlugin()
    plugin.set_mixed_precision(accelerator.state.mixed_precision)
    plugin.select(_from_accelerator_state=True)
    accelerator.state.deepspeed_plugins = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
    accelerator.state.distributed_type = DistributedType.DEEPSPEED


def _inner_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)


def optimizer_state_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """``optimizer.state_dict()`` (parameters numbered in group order) with parameter names as keys,
    as `torch.distributed.checkpoint.state_dict` writes them."""
    names = {id(p): name for name, p in model.named_parameters()}
    numbered = []
    for group in optimizer.param_groups:
        numbered.extend(names[id(p)] for p in group["params"])
    groups = []
    for saved in state["param_groups"]:
        group = dict(saved)
        group["params"] = [numbered[i] for i in saved["params"]]
        groups.append(group)
    return {"state": {numbered[int(k)]: v for k, v in state["state"].items()}, "param_groups": groups}
