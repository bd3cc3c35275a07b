"""The quickstart: teach the embedded SmolLM2-135M-Instruct a company's answer format with LoRA SFT.

1. writes the Acme support data set (examples/make_support_data.py) if it is not there;
2. measures the base model on the held-out questions: share of greedy answers in the house format,
   and validation perplexity of the reference answers;
3. trains a LoRA adapter with `alignkit sft` (examples/sft_support.yaml);
4. measures the same two numbers with the adapter, and prints both side by side.

Every number printed is measured in this run.

    python examples/sft_quickstart.py [--set training.max_steps=20 ...]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from make_support_data import FORMAT_PATTERN, build  # noqa: E402


def format_share(model, tokenizer, questions: list[str], max_new_tokens: int) -> tuple[float, list[str]]:
    from alignkit.generation import chat_generate

    answers = chat_generate(model, tokenizer, [[{"role": "user", "content": q}] for q in questions],
                            max_new_tokens=max_new_tokens, temperature=0.0, batch_size=len(questions))
    hits = sum(bool(FORMAT_PATTERN.match(answer.strip())) for answer in answers)
    return hits / len(answers), answers


def main() -> int:
    parser = argparse.ArgumentParser(description="LoRA SFT quickstart on the embedded model")
    parser.add_argument("--config", default=str(ROOT / "examples/sft_support.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--max-new-tokens", type=int, default=80)
    parser.add_argument("--questions", type=int, default=20, help="held-out questions for the format check")
    args = parser.parse_args()

    from alignkit import load_job, load_model_and_tokenizer, run_job

    started = time.time()
    data_dir = ROOT / "examples/data"
    train_file, valid_file = data_dir / "support_train.jsonl", data_dir / "support_valid.jsonl"
    if not (train_file.exists() and valid_file.exists()):
        data_dir.mkdir(parents=True, exist_ok=True)
        train, validation = build()
        for path, rows in ((train_file, train), (valid_file, validation)):
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    held_out = [json.loads(line) for line in valid_file.read_text().splitlines()]
    # format check on one phrasing of each held-out (topic, product) pair and one more: 20 questions
    questions = [row["messages"][0]["content"] for row in held_out][::2][:args.questions]
    # training.overwrite: each quickstart run starts afresh in the same run folder
    overrides = [f"data.train={train_file}", f"data.validation={valid_file}", "training.eval_at_start=true",
                 "training.overwrite=true", *args.overrides]
    job = load_job("sft", args.config, overrides)

    print(f"[quickstart] base model: {job.model.name_or_path}; {len(questions)} held-out questions")
    model, tokenizer = load_model_and_tokenizer(job.model.name_or_path)
    before_share, before_answers = format_share(model, tokenizer, questions, args.max_new_tokens)
    del model

    # the engine evaluates the held-out split before the first step and after the last one
    summary = run_job(job)
    before_ppl = summary["first_eval"]["eval/perplexity"]
    after_ppl = summary["last_eval"]["eval/perplexity"]

    model, tokenizer = load_model_and_tokenizer(job.model.name_or_path, adapter=summary["final"])
    after_share, after_answers = format_share(model, tokenizer, questions, args.max_new_tokens)

    print("\nExample held-out question:", questions[0])
    print("--- before ---\n" + before_answers[0][:400])
    print("--- after ---\n" + after_answers[0][:400])
    print("\n| held-out metric (measured) | base model | after LoRA SFT |")
    print("| --- | --- | --- |")
    print(f"| answers in the house format | {before_share:.0%} | {after_share:.0%} |")
    print(f"| perplexity of reference answers | {before_ppl:.2f} | {after_ppl:.2f} |")
    print(f"\n[quickstart] training: {summary['steps']} steps in {summary['seconds']} s; "
          f"total {time.time() - started:.0f} s; adapter in {summary['final']}")
    print(f"[quickstart] chat with it: alignkit generate --adapter {summary['final']} "
          f"--prompt \"{questions[1]}\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
