"""`alignkit pipeline`: run a pipeline file's stages in order, skipping those already up to date.

    alignkit pipeline examples/pipeline_support.yaml             # run what changed; resume what was cut
    alignkit pipeline examples/pipeline_support.yaml --dry-run   # say what would run, and why
    alignkit pipeline FILE --only dpo                            # re-run one stage
    alignkit pipeline FILE --from rm                             # re-run rm and everything after it
    alignkit pipeline FILE --set sft.training.max_steps=10 --set output_dir=runs/small

See `alignkit.pipeline` for the file format, references (``${sft.final}``), keys and resume.
"""
from __future__ import annotations

import argparse

from alignkit.pipeline import load_pipeline, run_pipeline


def register(subparsers) -> None:
    parser = subparsers.add_parser("pipeline", help="run a multi-stage pipeline (sft -> rm -> ppo | dpo -> eval)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline_file", help="pipeline YAML file")
    selection = parser.add_mutually_exclusive_group()
    selection.add_argument("--only", action="append", metavar="STAGE",
                           help="run only this stage (repeatable), even if it is up to date")
    selection.add_argument("--from", dest="start", metavar="STAGE",
                           help="re-run this stage and every stage downstream of it")
    parser.add_argument("--force", action="store_true", help="re-run every stage")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (run / resume / skip, and why) and stop")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE",
                        help="override a stage's key (sft.training.max_steps=10) or a top-level one (output_dir=...)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    pipeline = load_pipeline(args.pipeline_file, args.overrides)
    run_pipeline(pipeline, only=args.only, start=args.start, force=args.force, dry_run=args.dry_run)
    return 0
