"""Rollouts with vLLM (optional extra: ``pip install vllm``; needs a CUDA device).

UNTESTED in this project's CI (no GPU, no vLLM there): the code follows vLLM's offline `LLM` API
and is kept small so it can be checked quickly on a GPU machine.

Per call: (1) push the policy's current weights into the vLLM engine (LoRA adapters merged into
each adapted weight on the fly; the policy itself is not modified); (2) sample ``num_generations``
completions per prompt with vLLM's ``n``; (3) cut, mask, flag truncation and recompute the
sampling log-probs with the same code as the transformers backend (`build_rollout_batch`), so
the log-probs come from the training model's forward, not from vLLM's kernels.
"""
from __future__ import annotations

import time

import torch

from alignkit.model.load import ModelLoadError, ensure_embedded_model, resolve_model
from alignkit.model.peft import is_peft_model, unwrap
from alignkit.rollout.base import RolloutBatch, SamplingParams, padding_id
from alignkit.rollout.hf import build_rollout_batch
from alignkit.rollout.stops import stop_token_ids


def policy_weights(model):
    """(name, tensor) pairs of the plain model's weights, LoRA merged, PEFT prefixes removed."""
    if not is_peft_model(model):
        for name, tensor in model.state_dict().items():
            yield name, tensor
        return
    model.merge_adapter()
    try:
        for name, tensor in model.state_dict().items():
            if "lora_" in name or "modules_to_save" in name:
                continue
            name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            yield name, tensor.detach().clone()
    finally:
        model.unmerge_adapter()


def vllm_model_source(name: str) -> str:
    """What vLLM is started from: a folder it can read (the policy's weights are synced in afterwards).

    alignkit's own names (the embedded model's alias, an adapter folder) mean nothing to vLLM, so
    they are resolved to a folder with ``config.json``: the embedded model's safetensors copy, an
    adapter's base. Hub ids and folders pass through.
    """
    try:
        source = resolve_model(name)
    except ModelLoadError:
        return name
    if source.kind == "embedded":
        return str(ensure_embedded_model())
    if source.kind == "adapter" and source.base:
        return vllm_model_source(source.base)
    return source.location if source.kind == "local" else name


class VLLMBackend:
    name = "vllm"

    def __init__(self, gpu_memory_utilization: float = 0.3, max_model_len: int | None = None,
                 chunk_size: int = 1024, logprob_batch_size: int = 64, compute_logprobs: bool = True, **engine_options):
        try:
            import vllm  # noqa: F401
        except ImportError as error:
            raise ImportError("rollout backend 'vllm' needs the vllm package (pip install vllm)") from error
        if not torch.cuda.is_available():
            raise RuntimeError("rollout backend 'vllm' needs a CUDA device; use rollout_backend: hf")
        self.options = dict(gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                            **engine_options)
        self.chunk_size = chunk_size
        self.logprob_batch_size = logprob_batch_size
        self.compute_logprobs = compute_logprobs
        self.llm = None
        self.last_timings: dict[str, float] = {}

    @staticmethod
    def supports(model) -> bool:
        return torch.cuda.is_available()

    def _engine(self, model):
        if self.llm is None:
            from vllm import LLM

            base = unwrap(model)
            source = vllm_model_source(getattr(base.config, "_name_or_path", None) or base.name_or_path)
            dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
            options = {k: v for k, v in self.options.items() if v is not None}
            self.llm = LLM(model=source, dtype=dtype, enable_prefix_caching=True, **options)
        return self.llm

    def _sync(self, model) -> None:
        engine = self._engine(model)
        weights = list(policy_weights(model))
        executor = engine.llm_engine.model_executor
        if hasattr(engine, "collective_rpc"):  # newer vLLM
            engine.collective_rpc(lambda worker: worker.model_runner.model.load_weights(weights))
        else:  # older vLLM: the driver worker holds the model
            executor.driver_worker.model_runner.model.load_weights(weights)

    def generate(self, model, tokenizer, prompt_ids: list[list[int]], num_generations: int,
                 params: SamplingParams, with_logprobs: bool | None = None) -> RolloutBatch:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm import TokensPrompt

        with_logprobs = self.compute_logprobs if with_logprobs is None else with_logprobs
        started = time.perf_counter()
        self._sync(model)
        eos_ids = list(params.eos_token_ids) or stop_token_ids(tokenizer, model)
        pad_id = padding_id(tokenizer, eos_ids)
        sampling = VLLMSamplingParams(
            n=num_generations, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1, max_tokens=params.max_new_tokens,
            stop=list(params.stop_strings) or None, stop_token_ids=eos_ids, seed=params.seed,
            include_stop_str_in_output=True, skip_special_tokens=False)
        outputs = self._engine(model).generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids],
                                               sampling, use_tqdm=False)
        sampled, expanded = [], []
        for prompt, output in zip(prompt_ids, outputs):
            for completion in output.outputs:
                sampled.append(list(completion.token_ids))
                expanded.append(list(prompt))
        generated = time.perf_counter()
        batch = build_rollout_batch(model, tokenizer, expanded, sampled, num_generations, params, eos_ids, pad_id,
                                    with_logprobs=with_logprobs, logprob_batch_size=self.logprob_batch_size,
                                    chunk_size=self.chunk_size)
        finished = time.perf_counter()
        batch.seconds = finished - started
        self.last_timings = {"sampling": generated - started, "logprobs": finished - generated}
        return batch
