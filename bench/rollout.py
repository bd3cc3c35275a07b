"""Rollout throughput: ``transformers.generate`` against alignkit's static-cache engine, side by side.

Both sample (temperature 1, no top-k/top-p) the same prompts for exactly ``--new-tokens`` tokens per
row (EOS is ignored, so every row does the same work), from the same model in the same dtype, one
batch size at a time. Reported per backend: generated tokens per second (``rows * new_tokens /
seconds``) and milliseconds per decoding step (``seconds / new_tokens``); both include the prefill.
The static engine's time also includes building its batch (decoding texts, masks); its prefill /
decode split is printed below the table.

    python bench/rollout.py                      # GPU: SmolLM2-135M bf16, batches 64,256,1024, 128 tokens
    python bench/rollout.py                      # CPU: the same model in float32, batches 4,16, 32 tokens
    python bench/rollout.py --tiny               # a tiny random Llama (no model files needed)
    python bench/rollout.py --model Qwen/Qwen2.5-0.5B-Instruct --batch-sizes 64,256 --dtype bf16

Before timing, ``--check`` (on by default) compares greedy outputs of the two backends on 8 prompts.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "If I have 3 apples and buy 5 more, then give away 2, how many apples do I have? Think step by step.",
    "Name three prime numbers greater than 20.",
    "Translate 'good morning, how are you today?' into Spanish and Italian.",
    "Give me a short list of tips for writing clear documentation for a Python library.",
    "What is 17 times 23?",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
    "Suggest a name for a bakery that sells only croissants.",
    "How do I reverse a list in Python?",
    "Describe a cat to someone who has never seen one.",
    "What are the three states of matter?",
    "Write a polite email declining a meeting invitation because of a scheduling conflict next Tuesday.",
    "Is 221 a prime number?",
    "Why do leaves change colour in autumn?",
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="anything alignkit.model.load_model_and_tokenizer accepts (default: the embedded model)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of --model")
    parser.add_argument("--batch-sizes", default=None, help="comma separated (default: 64,256,1024 on GPU, 4,16 on CPU)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default: 128 on GPU, 32 on CPU")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, float32 on CPU), float32, bf16, fp16")
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per cell, median kept (default 1 GPU, 3 CPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 avoids OpenMP thrashing on a busy machine)")
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the greedy agreement check")
    parser.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                        help="run the static engine's decode step eagerly on GPU too")
    return parser.parse_args(argv)


def load(args, device):
    from alignkit.model import load_model_and_tokenizer, resolve_dtype

    dtype = resolve_dtype(args.dtype, device)
    if args.tiny:
        from tests.helpers import make_tiny_model, make_tiny_tokenizer

        tokenizer = make_tiny_tokenizer()
        model = make_tiny_model(tokenizer, hidden_size=64, layers=4).to(device=device, dtype=dtype)
        return model.eval(), tokenizer, "tiny random Llama (4 layers, hidden 64)", dtype
    model, tokenizer = load_model_and_tokenizer(args.model, device=device, dtype=dtype)
    return model, tokenizer, args.model, dtype


def make_prompts(tokenizer, count: int) -> list[list[int]]:
    prompts = []
    for index in range(count):
        question = QUESTIONS[index % len(QUESTIONS)]
        if index >= len(QUESTIONS):
            question = f"(request {index}) {question}"
        messages = [{"role": "user", "content": question}]
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        else:
            ids = tokenizer.encode(question)
        prompts.append(list(ids))
    return prompts


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def run_transformers(model, tokenizer, prompts, new_tokens, device, greedy=False):
    """``model.generate`` with left padding and the KV cache; EOS disabled so all rows run to the end."""
    width = max(len(ids) for ids in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompts], device=device)
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts], device=device)
    sampling = (dict(do_sample=False, temperature=None, top_p=None, top_k=None) if greedy
                else dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0))
    config = model.generation_config
    saved_eos = config.eos_token_id
    config.eos_token_id = None
    try:
        synchronize(device)
        started = time.perf_counter()
        output = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=new_tokens,
                                min_new_tokens=None, pad_token_id=pad, **sampling)
        synchronize(device)
        seconds = time.perf_counter() - started
    finally:
        config.eos_token_id = saved_eos
    return seconds, output[:, width:].tolist()


def run_static(backend, model, tokenizer, prompts, new_tokens, device, greedy=False):
    from alignkit.rollout.base import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0 if greedy else 1.0, seed=0,
                            eos_token_ids=[-1])
    synchronize(device)
    started = time.perf_counter()
    batch = backend.generate(model, tokenizer, prompts, 1, params)
    synchronize(device)
    seconds = time.perf_counter() - started
    rows = [row[mask.bool()].tolist() for row, mask in zip(batch.completion_ids, batch.completion_mask)]
    return seconds, rows


def measure_batch(backend, model, tokenizer, device, batch_size: int, new_tokens: int, repeats: int) -> dict:
    """One table row: both backends on the same ``batch_size`` prompts, one warm-up run each, then the
    median of ``repeats`` timed runs; ``static_stats`` is the engine's split of its last run."""
    prompts = make_prompts(tokenizer, batch_size)
    times = {}
    for label, runner in (("hf", lambda: run_transformers(model, tokenizer, prompts, new_tokens, device)),
                          ("static", lambda: run_static(backend, model, tokenizer, prompts, new_tokens, device))):
        runner()  # warm-up (allocator, kernels, lazy init)
        times[label] = statistics.median(runner()[0] for _ in range(repeats))
    generated = batch_size * new_tokens
    return {"batch": batch_size, "new_tokens": new_tokens,
            "hf_tokens_per_s": generated / times["hf"], "hf_ms_per_step": 1000 * times["hf"] / new_tokens,
            "static_tokens_per_s": generated / times["static"],
            "static_ms_per_step": 1000 * times["static"] / new_tokens,
            "speedup": times["hf"] / times["static"], "static_stats": dict(backend.last_stats)}


def greedy_agreement(backend, model, tokenizer, device, new_tokens=32, count=8) -> dict:
    """Greedy outputs of both backends on the same ``count`` prompts: how many rows are identical,
    and where the first differing token is (``new_tokens`` when a row matches to the end)."""
    prompts = make_prompts(tokenizer, count)
    _, reference = run_transformers(model, tokenizer, prompts, new_tokens, device, greedy=True)
    _, ours = run_static(backend, model, tokenizer, prompts, new_tokens, device, greedy=True)
    identical = sum(a == b for a, b in zip(reference, ours))
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(reference, ours)]
    return {"prompts": count, "new_tokens": new_tokens, "identical_rows": identical,
            "first_divergence_worst": min(prefix), "matching_prefix_mean": statistics.mean(prefix)}


def check_agreement(backend, model, tokenizer, device, new_tokens=32, count=8) -> str:
    result = greedy_agreement(backend, model, tokenizer, device, new_tokens, count)
    return (f"greedy agreement with transformers.generate ({count} prompts x {new_tokens} tokens): "
            f"{result['identical_rows']}/{count} rows identical; first divergence at token "
            f"{result['first_divergence_worst']} at worst "
            "(bf16 kernels may legitimately diverge after near-ties)")


def main(argv=None) -> None:
    args = parse_args(argv)
    from alignkit.rollout.static import StaticCacheBackend, supports, unsupported_reason

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    batch_sizes = [int(x) for x in (args.batch_sizes or ("64,256,1024" if on_gpu else "4,16")).split(",")]
    new_tokens = args.new_tokens or (128 if on_gpu else 32)
    repeats = args.repeats or (1 if on_gpu else 3)
    torch.manual_seed(0)
    model, tokenizer, name, dtype = load(args, device)
    if not supports(model):
        print(f"note: the static engine falls back to transformers.generate for this model: {unsupported_reason(model)}")
    backend = StaticCacheBackend(use_cuda_graph=args.cuda_graph)
    where = torch.cuda.get_device_name(device) if on_gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# Rollout benchmark: {name}, {str(dtype).removeprefix('torch.')}, {where}")
    print(f"command: python bench/rollout.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    if not on_gpu:
        load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print("CPU run: small batches and few tokens so it finishes quickly; the GPU target "
              "(batches 64/256/1024, 128 tokens, CUDA graphs) is not measured by this run. "
              f"Load average at start: {load_average:.1f} on {os.cpu_count()} cores.")
    print(f"sampling: temperature 1, no top-k/top-p, EOS ignored, {new_tokens} new tokens per row; "
          f"median of {repeats} timed run(s) after one warm-up run per backend and batch size")
    if args.check:
        print(check_agreement(backend, model, tokenizer, device))
    print()
    rows, breakdown = [], []
    for batch_size in batch_sizes:
        row = measure_batch(backend, model, tokenizer, device, batch_size, new_tokens, repeats)
        rows.append((batch_size, row["hf_tokens_per_s"], row["hf_ms_per_step"], row["static_tokens_per_s"],
                     row["static_ms_per_step"], row["speedup"]))
        stats = row["static_stats"]
        if "decode_seconds" in stats:
            steps = max(stats.get("decode_steps", 0), 1)
            breakdown.append(f"batch {batch_size}: prefill {1000 * stats['prefill_seconds']:.1f} ms, "
                             f"decode {1000 * stats['decode_seconds'] / steps:.2f} ms/step over {steps} steps, "
                             f"CUDA graph {'on' if stats.get('cuda_graph') else 'off'}"
                             + (f" (capture {1000 * stats['capture_seconds']:.0f} ms)" if stats.get("cuda_graph") else ""))
        if on_gpu:
            torch.cuda.empty_cache()
    print("| batch | new tokens | transformers tok/s | transformers ms/step | static tok/s | static ms/step | speed-up |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for batch_size, hf_tps, hf_ms, st_tps, st_ms, ratio in rows:
        print(f"| {batch_size} | {new_tokens} | {hf_tps:,.0f} | {hf_ms:.1f} | {st_tps:,.0f} | {st_ms:.1f} | {ratio:.2f}x |")
    if breakdown:
        print()
        print("static engine, last timed run: " + "; ".join(breakdown))


if __name__ == "__main__":
    main()
