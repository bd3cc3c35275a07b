"""`alignkit sft|rm|dpo|grpo|ppo|...` (one sub-command per registered method) and `alignkit train FILE`
(the method named by the file's ``method:`` key). Every training command reads one YAML job."""
from __future__ import annotations

import argparse

from alignkit import distributed
from alignkit.config import job_to_yaml
from alignkit.methods import load_job, methods
from alignkit.methods.base import run_job


def _add_job_arguments(parser: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        parser.add_argument("config_file", nargs="?", help="YAML job file")
    parser.add_argument("--config", "-c", help="YAML job file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set training.learning_rate=1e-4 (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the same job from the last checkpoint in output_dir")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the previous run in output_dir and start afresh")
    parser.add_argument("--force-resume", action="store_true",
                        help="with --resume: continue even though the job differs from the checkpoint's")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def register(commands) -> None:
    for name, method in methods().items():
        parser = commands.add_parser(name, help=method.help, description=method.help)
        _add_job_arguments(parser)
        parser.set_defaults(handler=train, method=name)
    parser = commands.add_parser("train", help="train with the method named in the config's `method:` key")
    _add_job_arguments(parser, positional=True)
    parser.set_defaults(handler=train, method=None)


def train(args) -> int:
    config = args.config or getattr(args, "config_file", None)
    overrides = list(args.overrides)
    if args.resume or args.force_resume:
        overrides.append("training.resume=true")
    if args.overwrite:
        overrides.append("training.overwrite=true")
    if args.force_resume:
        overrides.append("training.force_resume=true")
    job = load_job(args.method, config, overrides)
    if args.print_config:
        print(job_to_yaml(job))
        return 0
    summary = run_job(job)
    if not distributed.is_main_process():  # under a launcher every process trains; one reports
        return 0
    print(f"[alignkit] done: {summary['steps']} steps in {summary['seconds']} s; run folder {summary['run_dir']}")
    if summary["last_eval"]:
        first, last = summary["first_eval"], summary["last_eval"]
        for key, value in last.items():
            if key != "step":
                before = first.get(key)
                print(f"  {key}: {before:.4g} -> {value:.4g}" if isinstance(before, float) else f"  {key}: {value:.4g}")
    return 0
