"""`alignkit data check`: read, validate and tokenize a job's data without loading the model.

    alignkit data check --config job.yaml [--set data.max_length=512]
    alignkit data check --data train.jsonl [--data more.jsonl] --method dpo [--model M] [--columns prompt=question]

Prints the rows read, kept and skipped (with the first errors), the row shapes found, the examples
per split, how many were truncated or dropped (and where), the trained tokens, and a histogram of the
token lengths. Exit status: 0 when every row trains, 1 when some would be skipped or dropped, 2 when
the data cannot be used at all (the one-line error says where and why).
"""
from __future__ import annotations

from alignkit.commands.common import add_columns_argument, parse_columns
from alignkit.config import ConfigError, apply_overrides
from alignkit.data.check import check_job_data, describe
from alignkit.methods import build_job, load_job
from alignkit.model import load_tokenizer


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="check a job's data without loading the model",
                                   description=__doc__.split("\n\n")[0])
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="validate and tokenize the training data; counts, skips, "
                                             "truncations and a length histogram",
                               description=__doc__.split("\n\n")[0])
    check.add_argument("--config", "-c", help="a job file: checks its data as its method will read it")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key (repeatable)")
    check.add_argument("--data", "-d", action="append", default=[], metavar="FILE",
                       help="a data file (repeatable: a mix of equal weights); instead of --config")
    check.add_argument("--method", help="the method the data is for: sft, rm, dpo, kto, grpo, ppo (default: "
                                        "the config's, else sft)")
    check.add_argument("--model", "-m", help="whose tokenizer and chat template to use (default: the config's)")
    check.add_argument("--validation", help="a validation file")
    add_columns_argument(check)
    check.add_argument("--format", help="the row shape, instead of detecting it")
    check.add_argument("--max-length", type=int, help="tokens per example (default: the config's, 1024)")
    check.add_argument("--chat-template", help="a named chat template (chatml, llama3, gemma, zephyr) or a file")
    check.add_argument("--on-error", choices=["fail", "skip"], help="stop at the first bad row, or skip and count")
    check.set_defaults(handler=run_check)


def _overrides(args) -> list[str]:
    overrides = list(args.overrides)
    if args.data:
        overrides.append("data.train=[" + ", ".join(f"'{path}'" for path in args.data) + "]")
    for flag, key in ((args.model, "model.name_or_path"), (args.validation, "data.validation"),
                      (args.format, "data.format"), (args.max_length, "data.max_length"),
                      (args.chat_template, "model.chat_template"), (args.on_error, "data.on_error")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    for ours, theirs in (parse_columns(args.columns) or {}).items():
        overrides.append(f"data.columns.{ours}={theirs}")
    return overrides


def run_check(args) -> int:
    if not args.config and not args.data:
        raise ConfigError("data check: give --config job.yaml, or --data FILE (with --method)")
    if args.config:
        job = load_job(args.method, args.config, _overrides(args))
    else:
        job = build_job(args.method or "sft", apply_overrides({}, _overrides(args)), "<command line>")
    tokenizer = load_tokenizer(job.model.name_or_path, trust_remote_code=job.model.trust_remote_code)
    check = check_job_data(job, tokenizer)
    print("\n".join(describe(check, job, job.model.name_or_path)))
    return 1 if check.problems else 0
