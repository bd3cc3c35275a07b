"""The `alignkit` command. Every sub-command is a module of `alignkit.commands` with
``register(subparsers)`` that sets ``handler``; training commands come from the method registry.

    alignkit sft --config examples/sft_support.yaml --set training.max_steps=20
    alignkit train config.yaml                      (method taken from the file's `method:` key)
    alignkit generate --model runs/sft/final --prompt "Where is my order?"
    alignkit eval --model smollm2-135m-instruct --data valid.jsonl --metrics perplexity

Errors that are the user's to fix (`alignkit.errors.UserError`: config, data, model paths, rewards,
judges; and a missing file) print one line and exit 2; anything else is a bug and shows its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import signal
import sys

import alignkit
import alignkit.commands as command_package
from alignkit.console import quiet_libraries
from alignkit.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignkit", description="Align language models end to end.")
    parser.add_argument("--version", action="version", version=f"alignkit {alignkit.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(command_package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"alignkit.commands.{info.name}")
        if hasattr(module, "register"):
            module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()  # progress bars and warnings users cannot act on (alignkit/console.py)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    try:
        return args.handler(args)
    except KeyboardInterrupt as interrupt:  # Ctrl-C: 130; SIGTERM (schedulers): 143
        if _main_process():
            print(f"\n[alignkit] stopped: {interrupt}", file=sys.stderr)
        return 128 + getattr(interrupt, "signal_number", signal.SIGINT)
    except (UserError, FileNotFoundError) as error:
        if _main_process():  # under a launcher every process meets the same error: one line
            print(f"alignkit: error: {error}", file=sys.stderr)
        return 2


def _main_process() -> bool:
    """Rank 0 (or no launcher), read from the launcher's environment: asking the process group could
    wait for processes that have already stopped."""
    return int(os.environ.get("RANK", "0")) == 0


if __name__ == "__main__":
    sys.exit(main())
