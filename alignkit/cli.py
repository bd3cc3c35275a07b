"""The `alignkit` command: training commands read one YAML job; tools take flags.

    alignkit sft --config examples/sft_support.yaml --set training.max_steps=20
    alignkit train config.yaml                      (method taken from the file's `method:` key)
    alignkit generate --model runs/sft/final --prompt "Where is my order?"
    alignkit eval --model smollm2-135m-instruct --data valid.jsonl --metrics perplexity
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TRAIN_METHODS = {
    "sft": "supervised fine-tuning on prompt/response or chat data",
    "rm": "train a reward model on ranked pairs (Bradley-Terry)",
    "dpo": "direct preference optimisation and its variants",
    "grpo": "reinforcement fine-tuning with reward functions (GRPO)",
    "ppo": "RLHF with PPO: actor, critic, reward model, reference",
}


def _add_job_arguments(parser: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        parser.add_argument("config_file", nargs="?", help="YAML job file")
    parser.add_argument("--config", "-c", help="YAML job file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set training.learning_rate=1e-4 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default="smollm2-135m-instruct",
                        help="embedded name, local folder, run folder, or hub id (default: the embedded model)")
    parser.add_argument("--adapter", help="a LoRA adapter folder to apply")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when present)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 (default: bf16 on GPU, fp32 on CPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignkit", description="Align language models end to end.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for method, help_text in TRAIN_METHODS.items():
        _add_job_arguments(commands.add_parser(method, help=help_text, description=help_text))
    _add_job_arguments(commands.add_parser("train", help="train with the method named in the config's `method:` key"),
                       positional=True)

    generate = commands.add_parser("generate", help="chat with a model or a trained adapter")
    _add_model_arguments(generate)
    generate.add_argument("--prompt", "-p", action="append", help="a prompt (repeatable); none: interactive chat")
    generate.add_argument("--system", help="system prompt")
    generate.add_argument("--max-new-tokens", type=int, default=256)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    generate.add_argument("--top-p", type=float, default=1.0)

    evaluate = commands.add_parser("eval", help="score a model with named metrics; writes a JSON/Markdown/PNG report")
    _add_model_arguments(evaluate)
    from alignkit.evaluate.command import add_arguments as add_eval_arguments

    add_eval_arguments(evaluate)

    prepare = commands.add_parser("prepare-model", help="convert and cache the embedded default model")
    prepare.add_argument("--quiet", action="store_true")
    _register_command_modules(commands)
    return parser


def _register_command_modules(commands) -> None:
    """Add the sub-commands defined in `alignkit/commands/*.py` (see that package's docstring)."""
    import importlib
    import pkgutil

    import alignkit.commands as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"alignkit.commands.{info.name}")
        module.register(commands)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from alignkit import __version__

        print(__version__)
        return 0
    if not args.command:
        parser.print_help()
        return 0
    try:
        return _dispatch(args)
    except KeyboardInterrupt as interrupt:
        print(f"\n[alignkit] stopped: {interrupt}", file=sys.stderr)
        return 130
    except Exception as error:  # the user sees one clear line, not a traceback, for known errors
        from alignkit.config import ConfigError

        known = (ConfigError, FileNotFoundError, ValueError)
        try:
            from alignkit.data import DataError

            known = known + (DataError,)
        except ImportError:
            pass
        try:
            from alignkit.model import ModelLoadError

            known = known + (ModelLoadError,)
        except ImportError:
            pass
        try:
            from alignkit.engine import TrainingDiverged

            known = known + (TrainingDiverged,)
        except ImportError:
            pass
        if isinstance(error, known):
            print(f"alignkit: error: {error}", file=sys.stderr)
            return 2
        raise


def _dispatch(args) -> int:
    if getattr(args, "handler", None) is not None:
        return args.handler(args)
    if args.command in TRAIN_METHODS or args.command == "train":
        return _train(args)
    if args.command == "generate":
        return _generate(args)
    if args.command == "eval":
        return _evaluate(args)
    if args.command == "prepare-model":
        from alignkit.model import ensure_embedded_model

        path = ensure_embedded_model()
        if not args.quiet:
            print(f"embedded model ready at {path}")
        return 0
    raise ValueError(f"unknown command {args.command}")


def _train(args) -> int:
    from alignkit.config import job_to_yaml, load_job
    from alignkit.methods.base import run_job

    method = None if args.command == "train" else args.command
    config = args.config or getattr(args, "config_file", None)
    overrides = list(args.overrides)
    if args.resume:
        overrides.append("training.resume=true")
    job = load_job(method, config, overrides)
    if args.print_config:
        print(job_to_yaml(job))
        return 0
    summary = run_job(job)
    print(f"[alignkit] done: {summary['steps']} steps in {summary['seconds']} s; run folder {summary['run_dir']}")
    if summary["last_eval"]:
        first, last = summary["first_eval"], summary["last_eval"]
        for key, value in last.items():
            if key != "step":
                before = first.get(key)
                print(f"  {key}: {before:.4g} -> {value:.4g}" if isinstance(before, float) else f"  {key}: {value:.4g}")
    return 0


def _load(args):
    from alignkit.model import load_model_and_tokenizer

    return load_model_and_tokenizer(args.model, device=args.device, dtype=args.dtype, adapter=args.adapter,
                                    is_trainable=False)


def _generate(args) -> int:
    from alignkit.generation import chat_generate

    model, tokenizer = _load(args)
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    if args.prompt:
        conversations = [[*([{"role": "system", "content": args.system}] if args.system else []),
                          {"role": "user", "content": prompt}] for prompt in args.prompt]
        for prompt, answer in zip(args.prompt, chat_generate(model, tokenizer, conversations, **settings)):
            print(f"> {prompt}\n{answer}\n")
        return 0
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("alignkit chat: type a message, /reset to start over, Ctrl-D to quit")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not text:
            continue
        if text == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": text})
        answer = chat_generate(model, tokenizer, [history], **settings)[0]
        history.append({"role": "assistant", "content": answer})
        print(f"model> {answer}")


def _evaluate(args) -> int:
    from alignkit.evaluate.command import run

    return run(args, _load)


if __name__ == "__main__":
    sys.exit(main())
