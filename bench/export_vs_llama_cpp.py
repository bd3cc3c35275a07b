"""alignkit's GGUF writer against llama.cpp's own converter, and what readers compute from the files.

    python bench/export_vs_llama_cpp.py --llama-cpp /path/to/llama.cpp [--model M] [--types f16,bf16,q8_0]
                                        [--fidelity] [--runtime]

1. ``alignkit export M --format merged`` (float32), then for every type ``alignkit export --format gguf``
   and llama.cpp's ``convert_hf_to_gguf.py`` on the merged folder (one process each, timed). The files
   are compared key by key and tensor by tensor (type, shape, bytes).
2. ``--fidelity``: transformers reads each alignkit GGUF back (``gguf_file=``) and its next-token
   logits on a few chat prompts are compared with the merged float32 model's: max |delta logit|,
   KL(float || GGUF) per token (mean, max), top-1 agreement.
3. ``--runtime``: the same comparison with llama.cpp itself computing the logits (the
   ``llama-cpp-python`` package), and its tokenizer's ids against transformers'.

Nothing here needs a GPU; the default model is the embedded SmolLM2-135M-Instruct.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [{"role": "user", "content": "Write 17 + 25 = ? and explain the carry."}],
    [{"role": "system", "content": "You are Acme Support."},
     {"role": "user", "content": "How do I export my Acme Mail data, e.g. 2,048 messages?"}],
]


def run(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    return time.perf_counter() - started


def compare_files(ours: Path, theirs: Path) -> tuple[list[str], int, int]:
    """(metadata lines that differ, tensors byte-identical, tensors) of two GGUF files."""
    import gguf

    a, b = gguf.GGUFReader(str(ours)), gguf.GGUFReader(str(theirs))
    lines = []
    for key in sorted(set(a.fields) | set(b.fields)):
        if key.startswith("GGUF."):
            continue
        if key not in b.fields:
            lines.append(f"only alignkit: {key} = {str(a.fields[key].contents())[:60]}")
        elif key not in a.fields:
            lines.append(f"only llama.cpp: {key} = {str(b.fields[key].contents())[:60]}")
        elif a.fields[key].contents() != b.fields[key].contents():
            lines.append(f"differs: {key}: {str(a.fields[key].contents())[:40]!r} vs "
                         f"{str(b.fields[key].contents())[:40]!r}")
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    same = sum(1 for name, t in ta.items() if name in tb and t.tensor_type == tb[name].tensor_type
               and list(t.shape) == list(tb[name].shape)
               and np.array_equal(np.asarray(t.data), np.asarray(tb[name].data)))
    if set(ta) != set(tb):
        lines.append(f"tensor names differ: {sorted(set(ta) ^ set(tb))[:5]}")
    return lines, same, max(len(ta), len(tb))


def logit_stats(expected: torch.Tensor, got: torch.Tensor) -> dict:
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), expected.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1)
    return {"max_delta": float((got - expected).abs().max()), "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1": float((got.argmax(-1) == expected.argmax(-1)).float().mean()), "positions": int(kl.numel())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--llama-cpp", default=None, help="a llama.cpp source folder (convert_hf_to_gguf.py)")
    parser.add_argument("--types", default="f16,bf16,q8_0")
    parser.add_argument("--fidelity", action="store_true", help="transformers reads the GGUF files back")
    parser.add_argument("--runtime", action="store_true", help="llama.cpp (llama-cpp-python) computes the logits")
    parser.add_argument("--work", default=None, help="folder for the files (default: a temporary one)")
    parser.add_argument("--reuse", action="store_true", help="keep files already in --work (no export, no timing)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work or tempfile.mkdtemp(prefix="alignkit-export-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    alignkit = [sys.executable, "-m", "alignkit", "export", args.model]
    merged = work / "merged"
    if not (args.reuse and (merged / "config.json").is_file()):
        seconds = run(alignkit + ["--format", "merged", "--dtype", "f32", "--out", str(merged)])
        print(f"merged export (float32): {seconds:.1f} s -> {merged}")
    rows, fidelity = [], []
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in PROMPTS]
    token_ids = [tokenizer(text)["input_ids"] for text in texts]
    with torch.no_grad():
        expected = [reference(torch.tensor([ids])).logits[0].float() for ids in token_ids]
    for kind in types:
        ours = work / f"alignkit-{kind}.gguf"
        quant = ["--quant", kind] if kind == "q8_0" else ["--dtype", kind]
        row = {"type": kind}
        if not (args.reuse and ours.is_file()):
            row["alignkit_s"] = run(alignkit + ["--format", "gguf", *quant, "--out", str(ours)])
        row["mib"] = ours.stat().st_size / 2**20
        theirs = work / f"llama-cpp-{kind}.gguf"
        if args.llama_cpp and not (args.reuse and theirs.is_file()):
            row["llama_s"] = run([sys.executable, str(Path(args.llama_cpp) / "convert_hf_to_gguf.py"), str(merged),
                                  "--outtype", kind, "--outfile", str(theirs)])
        if theirs.is_file():
            row["diff"], row["same"], row["tensors"] = compare_files(ours, theirs)
        rows.append(row)
        if args.fidelity:
            model = AutoModelForCausalLM.from_pretrained(str(work), gguf_file=ours.name, dtype=torch.float32).eval()
            read_tokenizer = AutoTokenizer.from_pretrained(str(work), gguf_file=ours.name)
            same_ids = all(read_tokenizer(text)["input_ids"] == ids for text, ids in zip(texts, token_ids))
            with torch.no_grad():
                got = torch.cat([model(torch.tensor([ids])).logits[0].float() for ids in token_ids])
            fidelity.append({"type": kind, "reader": "transformers", "ids": same_ids,
                             **logit_stats(torch.cat(expected), got)})
            del model
        if args.runtime:
            from llama_cpp import Llama

            llm = Llama(model_path=str(ours), n_ctx=512, logits_all=True, n_threads=1, verbose=False)
            got, same_ids = [], True
            for text, ids in zip(texts, token_ids):
                same_ids &= llm.tokenize(text.encode(), add_bos=False, special=True) == ids
                llm.reset()
                llm.eval(ids)
                got.append(torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32)))
            llm.close()
            fidelity.append({"type": kind, "reader": "llama.cpp", "ids": same_ids,
                             **logit_stats(torch.cat(expected), torch.cat(got))})
    print(f"\nmodel {args.model}; files in {work}\n")
    print("| type | alignkit export s | llama.cpp convert s | size MiB | tensors byte-identical "
          "| metadata differences |")
    print("| --- | ---: | ---: | ---: | --- | --- |")
    for row in rows:
        same = f"{row['same']}/{row['tensors']}" if "same" in row else "—"
        diff = "; ".join(row.get("diff", [])) or ("none" if "diff" in row else "—")
        llama = f"{row['llama_s']:.1f}" if "llama_s" in row else "—"
        ours_s = f"{row['alignkit_s']:.1f}" if "alignkit_s" in row else "—"
        print(f"| {row['type']} | {ours_s} | {llama} | {row['mib']:.1f} | {same} | {diff} |")
    if fidelity:
        print(f"\nnext-token logits on {len(PROMPTS)} chat prompts ({sum(len(i) for i in token_ids)} positions) "
              "against the merged float32 model:\n")
        print("| type | computed by | same token ids | max abs delta logit | KL mean (nats) | KL max | top-1 agree |")
        print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
        for item in fidelity:
            print(f"| {item['type']} | {item['reader']} | {item['ids']} | {item['max_delta']:.4f} | "
                  f"{item['kl_mean']:.2e} | {item['kl_max']:.2e} | {100 * item['top1']:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
