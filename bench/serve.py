"""Multi-adapter serving: mixed-adapter batches against swapping one adapter in at a time.

Several `alignkit serve` processes on 127.0.0.1 hold the same base model and the same 16 LoRA adapters:

* **mixed** (the default server): requests for different adapters share every forward pass (PEFT
  mixed-adapter batches), new requests join the running batch at the next step;
* **swap** (``--adapter-mode swap``, the comparison point): the adapter of the oldest waiting request
  is merged into the base weights, that adapter's requests run (batched together, new ones of the
  same adapter join), the adapter is unmerged, and the next adapter gets its turn;
* **swap-per-request** (``--adapter-mode swap-per-request``): the issue's literal baseline: merge the
  adapter of the oldest request, run that one request alone, unmerge, next request.

``--modes`` picks the servers (default: all three; ``mixed-static`` adds the mixed server on the
static-cache engine). The same requests go to every server: every prompt distinct, greedy, ``ignore_eos`` so every request decodes
exactly ``--max-tokens`` tokens, adapters assigned round-robin over 1, 4 or 16 distinct adapters, sent by
``concurrency`` client threads (httpx, one request at a time each). Per cell: requests/s, generated
tokens/s (``completion_tokens`` summed / wall seconds), and p50/p95 request latency. One warm-up
request per adapter before timing. All servers run at once and each cell is run on every server in
turn (order alternating between repeats), ``--repeats`` times; the table shows medians, so a change
in the machine's load hits both sides of a ratio alike.

    python bench/serve.py --tiny                     # tiny random Llama (4 layers, hidden 256): the full grid
    python bench/serve.py --concurrency 1,8 --requests-per-client 2      # the embedded SmolLM2-135M
    python bench/serve.py --device cuda --modes mixed,swap,swap-per-request,mixed-static   # a GPU
    python bench/serve.py --tiny --modes mixed,mixed-static                  # the two engines on CPU
    python bench/serve.py --tiny --kernels           # only the LoRA part: PEFT adapter_names vs stacked, in-process
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Name three prime numbers greater than 20.",
    "What is 17 times 23?", "How do I reverse a list in Python?", "Describe a cat to someone who has never seen one.",
    "What are the three states of matter?", "Why do leaves change colour in autumn?",
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="base model (default: the embedded one)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of --model")
    parser.add_argument("--adapters", default="1,4,16", help="distinct adapters in the mix (comma separated)")
    parser.add_argument("--concurrency", default="1,8,32", help="client threads (comma separated)")
    parser.add_argument("--requests-per-client", type=int, default=1, help="requests per client thread per cell")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell (median reported)")
    parser.add_argument("--min-requests", type=int, default=8, help="at least this many requests per cell")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of the adapters (all linear layers)")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server (OMP_NUM_THREADS)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modes", default="mixed,swap,swap-per-request",
                        help="servers to compare: mixed, swap (merge one adapter, batch its requests), "
                             "swap-per-request (merge, one request, unmerge), mixed-static (mixed on --engine static)")
    parser.add_argument("--engine", default="dynamic", choices=["auto", "dynamic", "static"],
                        help="--engine of the mixed and swap servers (default dynamic: the swap modes cannot run "
                             "on the static engine, so all compare on one engine; mixed-static adds the static one)")
    parser.add_argument("--output", help="also write the rows as JSON here")
    parser.add_argument("--kernels", action="store_true",
                        help="instead: time one forward of 32 rows through PEFT's adapter_names path and the stacked path")
    return parser.parse_args(argv)


def make_models(args, folder: Path) -> tuple[str, list[tuple[str, str]], str]:
    """The base model folder (or name) and 16 random adapters saved under ``folder``."""
    import torch

    from alignkit.model import add_lora, load_model_and_tokenizer, save_model

    count = max(int(x) for x in args.adapters.split(","))
    if args.tiny:
        from tests.helpers import make_tiny_model, make_tiny_tokenizer

        tokenizer = make_tiny_tokenizer()
        base = str(save_model(make_tiny_model(tokenizer, hidden_size=256, layers=4), tokenizer, folder / "base"))
        label = "tiny random Llama (4 layers, hidden 256, vocab 400)"
    else:
        base, label = args.model, args.model
    adapters = []
    for index in range(count):
        model, tokenizer = load_model_and_tokenizer(base, device="cpu")
        model = add_lora(model, rank=args.rank, dropout=0.0)
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
        adapters.append((f"adapter{index}", str(save_model(model, tokenizer, folder / f"adapter{index}"))))
        del model
    return base, adapters, label


def start_server(args, base: str, adapters, mode: str, port: int):
    """``mode``: an ``--adapter-mode`` (mixed, swap, swap-per-request), or ``mixed-static``: mixed on the
    static-cache engine (``--engine static``)."""
    adapter_mode, engine = ("mixed", "static") if mode == "mixed-static" else (mode, args.engine)
    command = [sys.executable, "-m", "alignkit.cli", "serve", "--model", base, "--served-model-name", "base",
               "--port", str(port), "--device", args.device, "--max-batch", str(args.max_batch),
               "--max-wait-ms", str(args.max_wait_ms), "--max-queue", "1024", "--log-level", "warning",
               "--adapter-mode", adapter_mode, "--engine", engine]
    command += [item for name, path in adapters for item in ("--adapter", f"{name}={path}")]
    environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the {mode} server exited: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"the {mode} server did not start")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cell(url: str, adapters: list[str], concurrency: int, total: int, max_tokens: int) -> dict:
    # every prompt differs (the server computes a prompt shared by requests of one adapter only once)
    jobs = [(adapters[i % len(adapters)], f"{QUESTIONS[i % len(QUESTIONS)]} (request {i})") for i in range(total)]
    latencies, tokens = [], 0

    def one(job):
        model, question = job
        started = time.perf_counter()
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=3600, json={
            "model": model, "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": max_tokens, "ignore_eos": True})
        reply.raise_for_status()
        return time.perf_counter() - started, reply.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for latency, count in pool.map(one, jobs):
            latencies.append(latency)
            tokens += count
    seconds = time.perf_counter() - started
    latencies.sort()
    return {"requests": total, "seconds": seconds, "requests_per_s": total / seconds, "tokens_per_s": tokens / seconds,
            "p50_s": statistics.median(latencies), "p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]}


def time_kernels(args) -> int:
    """ms per forward of a batch of 32 rows (one new token each, over a 32-token cache) with 1, 4 and 16
    adapters: PEFT's ``adapter_names=`` path against `alignkit.serve.mixed_lora`'s stacked path."""
    import torch
    from peft import LoraConfig, PeftModel

    from alignkit.model import add_lora, load_model_and_tokenizer
    from alignkit.serve import mixed_lora

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    if args.tiny:
        from tests.helpers import make_tiny_model, make_tiny_tokenizer

        tokenizer = make_tiny_tokenizer()
        base, label = make_tiny_model(tokenizer, hidden_size=256, layers=4), "tiny random Llama (4 layers, hidden 256)"
    else:
        base, tokenizer = load_model_and_tokenizer(args.model, device=args.device)
        label = args.model
    model = add_lora(base, rank=args.rank, dropout=0.0)           # adapter "default"
    count = max(int(x) for x in args.adapters.split(","))
    for index in range(1, count):
        model.add_adapter(f"adapter{index}", LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                        target_modules=model.peft_config["default"].target_modules))
    names = list(model.peft_config)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.normal_(std=0.01)
    model.eval()
    assert isinstance(model, PeftModel)
    slots = {name: i + 1 for i, name in enumerate(names)}
    mixed_lora.install(model, slots)
    prompt = torch.randint(5, len(tokenizer), (32, 32))
    print(f"# {label}, LoRA r{args.rank} on all linear layers, 32 rows, {args.threads} thread(s): ms per decode forward")
    print("| adapters in the batch | PEFT adapter_names | stacked (alignkit) | speed-up |")
    print("| ---: | ---: | ---: | ---: |")
    for adapters in (int(x) for x in args.adapters.split(",")):
        rows = [names[i % adapters] for i in range(32)]
        cache = model(input_ids=prompt, use_cache=True).past_key_values
        step = torch.randint(5, len(tokenizer), (32, 1))

        def run(path):
            import copy

            past = copy.deepcopy(cache)
            started = time.perf_counter()
            if path == "peft":
                model(input_ids=step, past_key_values=past, use_cache=True, adapter_names=rows)
            else:
                with mixed_lora.mixed_batch(rows, slots, "cpu"):
                    model.get_base_model()(input_ids=step, past_key_values=past, use_cache=True)
            return time.perf_counter() - started

        timings = {}
        for path in ("peft", "stacked"):
            run(path)
            timings[path] = statistics.median(run(path) for _ in range(7)) * 1000
        print(f"| {adapters} | {timings['peft']:.1f} | {timings['stacked']:.1f} | "
              f"{timings['peft'] / timings['stacked']:.2f}x |", flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.kernels:
        return time_kernels(args)
    counts = [int(x) for x in args.adapters.split(",")]
    levels = [int(x) for x in args.concurrency.split(",")]
    modes = args.modes.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="alignkit-bench-serve-") as folder:
        made = time.perf_counter()
        base, adapters, label = make_models(args, Path(folder))
        print(f"# {label}; {len(adapters)} LoRA adapters r{args.rank} on all linear layers "
              f"(made in {time.perf_counter() - made:.0f} s); {args.max_tokens} new tokens per request, greedy, "
              f"ignore_eos; max batch {args.max_batch}, max wait {args.max_wait_ms:g} ms; "
              f"{args.threads} torch thread(s) per server; device {args.device}; {args.repeats} repeats, "
              "servers interleaved cell by cell, medians", flush=True)
        servers = {}
        try:
            for mode in modes:  # all servers up at once, so every cell runs under the same machine load
                servers[mode] = start_server(args, base, adapters, mode, free_port())
                for name, _ in adapters:  # warm-up: one request per adapter
                    run_cell(servers[mode][1], [name], 1, 1, 2)
            samples: dict[tuple, list[dict]] = {}
            for repeat in range(args.repeats):
                # adapter counts innermost: "16 adapters / 1 adapter" compares cells run back to back
                for concurrency in levels:
                    for count in counts:
                        names = [name for name, _ in adapters[:count]]
                        total = max(args.min_requests, concurrency * args.requests_per_client)
                        for mode in (modes if repeat % 2 == 0 else modes[::-1]):
                            result = run_cell(servers[mode][1], names, concurrency, total, args.max_tokens)
                            samples.setdefault((mode, count, concurrency), []).append(result)
                            print(f"  [{repeat + 1}/{args.repeats}] {mode:16} adapters {count:2} concurrency "
                                  f"{concurrency:2}: {result['requests_per_s']:.2f} req/s, "
                                  f"{result['tokens_per_s']:.1f} tok/s", flush=True)
            for (mode, count, concurrency), results in samples.items():
                row = {"mode": mode, "adapters": count, "concurrency": concurrency, "repeats": len(results)}
                for key in results[0]:
                    row[key] = statistics.median(result[key] for result in results)
                rows.append(row)
            for mode, (_, url) in servers.items():
                stats = httpx.get(f"{url}/stats").json()
                print(f"  {mode} server ({stats.get('engine', 'dynamic')} engine): "
                      f"{stats.get('mixed_adapter_forwards', 0)} mixed-adapter forwards, at most "
                      f"{stats['max_adapters_in_forward']} adapters and {stats['max_rows_in_forward']} rows in one "
                      f"forward, {stats.get('adapter_merges', 0)} merges", flush=True)
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(30)
    print_table(rows, counts, levels)
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2))
    return 0


def print_table(rows: list[dict], counts: list[int], levels: list[int]) -> None:
    table = {(r["mode"], r["adapters"], r["concurrency"]): r for r in rows}
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    others = [m for m in modes if m != "mixed"]
    header = ["adapters", "concurrency"]
    for mode in modes:
        header += [f"{mode} req/s", f"{mode} tok/s", f"{mode} p50 / p95 s"]
    mixing = [m for m in modes if m.startswith("mixed")]     # mixed, mixed-static: their own 1-adapter ratio
    header += [f"mixed / {m}" for m in others] + [f"{m} / {m} with 1 adapter" for m in mixing]
    print("\n| " + " | ".join(header) + " |")
    print("|" + " ---: |" * len(header))
    for count in counts:
        for level in levels:
            cells = [str(count), str(level)]
            for mode in modes:
                row = table.get((mode, count, level))
                cells += ["", "", ""] if row is None else [
                    f"{row['requests_per_s']:.2f}", f"{row['tokens_per_s']:.1f}", f"{row['p50_s']:.2f} / {row['p95_s']:.2f}"]
            mixed = table.get(("mixed", count, level))
            for mode in others:
                other = table.get((mode, count, level))
                cells.append(f"{mixed['tokens_per_s'] / other['tokens_per_s']:.2f}x" if mixed and other else "")
            for mode in mixing:
                row, single = table.get((mode, count, level)), table.get((mode, 1, level))
                cells.append(f"{row['tokens_per_s'] / single['tokens_per_s']:.2f}x" if row and single else "")
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
