"""`alignkit export`, `alignkit card` and `alignkit push`: take a trained model out of alignkit.

    alignkit export runs/sft-support --format merged --out exports/sft-support            # transformers folder
    alignkit export runs/sft-support --format gguf --out exports/gguf [--dtype f16|bf16|f32] [--quant q8_0]
    alignkit export runs/rm-hh --format merged --out exports/rm-hh                         # sequence classifier
    alignkit card runs/sft-support --eval-report runs/eval-sft                             # rewrite final/README.md
    alignkit push runs/sft-support --repo me/sft-support [--private] [--dry-run]           # upload final/ + card
    alignkit push exports/gguf --repo me/sft-support-GGUF

See docs/export.md for what each writes and what was verified.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.utils import filter_repo_objects

from alignkit.errors import UsageError
from alignkit.export import export_model
from alignkit.export.card import (
    CARD_FILE,
    collect_run_facts,
    command_line,
    final_folder_card,
    hub_base_model,
    is_alignkit_card,
    write_card,
)

# what `push` never uploads: our temporary folders, lock files, caches
PUSH_IGNORE = [".tmp-*", ".old-*", "**/.tmp-*", "*.lock", "__pycache__/*", "**/__pycache__/*"]


def register(subparsers) -> None:
    export = subparsers.add_parser(
        "export", help="write a run's model as a merged transformers folder or a GGUF file, with a model card",
        description="Export a run folder, a run's final/ folder or any model alignkit loads.")
    export.add_argument("source", metavar="RUN_OR_MODEL",
                        help="run folder, its final/ folder, a model or adapter folder, a .gguf file, or a model name")
    export.add_argument("--format", "-f", choices=["merged", "gguf"], default="merged")
    export.add_argument("--out", "-o", required=True,
                        help="output folder (merged, gguf) or .gguf file path (gguf)")
    export.add_argument("--dtype", choices=["f32", "f16", "bf16"], default=None,
                        help="weight type (merged: default f32; gguf: default f16)")
    export.add_argument("--quant", choices=["q8_0"], default=None, help="GGUF 8-bit weights (Q8_0)")
    export.add_argument("--tokenizer-pre", default=None, metavar="NAME",
                        help="llama.cpp pre-tokenizer name, when alignkit cannot tell it from the tokenizer")
    export.add_argument("--eval-report", action="append", default=[], metavar="PATH",
                        help="an `alignkit eval` report (folder or report.json) to quote in the card (repeatable)")
    export.set_defaults(handler=run_export)

    card = subparsers.add_parser("card", help="(re)write the model card README.md of a run's final/ folder",
                                 description="Write final/README.md from the run's config, summary and eval reports.")
    card.add_argument("run", metavar="RUN", help="run folder")
    card.add_argument("--eval-report", action="append", default=[], metavar="PATH",
                      help="an `alignkit eval` report (folder or report.json) to quote (repeatable)")
    card.set_defaults(handler=run_card)

    push = subparsers.add_parser("push", help="upload a run's final/ folder or an export, with its card, to the Hub",
                                 description="Upload through huggingface_hub (log in: `hf auth login` or HF_TOKEN).")
    push.add_argument("source", metavar="RUN_OR_FOLDER", help="run folder, final/ folder, export folder or .gguf file")
    push.add_argument("--repo", required=True, help="hub repository id, user/name")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--revision", default=None, help="branch to upload to (default: main)")
    push.add_argument("--commit-message", default=None)
    push.add_argument("--dry-run", action="store_true", help="list the files that would be uploaded and stop")
    push.set_defaults(handler=run_push)


def run_export(args) -> int:
    result = export_model(args.source, args.out, format=args.format, dtype=args.dtype, quant=args.quant,
                          tokenizer_pre=args.tokenizer_pre, eval_reports=args.eval_report, command=command_line())
    for note in result.notes:
        print(f"[alignkit] {note}")
    print(f"[alignkit] exported {args.format}: {result.path}" + (f" (card: {result.card})" if result.card else ""))
    return 0


def run_card(args) -> int:
    run_dir = Path(args.run)
    final = run_dir / "final"
    if not (run_dir / "config.yaml").is_file() or not final.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a finished run folder (config.yaml and final/)")
    facts = collect_run_facts(run_dir, args.eval_report)
    written = [path for folder in (final, run_dir / "final-merged") if folder.is_dir()
               for path in [write_card(folder, final_folder_card(facts, folder))] if path is not None]
    for path in written:
        print(f"[alignkit] card: {path}")
    return 0


# ------------------------------------------------------------------------------------------------ push

def upload_plan(source: str | Path) -> tuple[Path, list[str] | None, list[str]]:
    """``(folder, allow_patterns, files)``: what `alignkit push` uploads from ``source``.

    A run folder uploads its ``final/``; a folder uploads itself; a ``.gguf`` file uploads itself
    and the README.md beside it. A run's ``final/`` without a card gets one first. ``files`` is the
    list huggingface_hub's own filter keeps (relative paths, sorted).
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"push: {path} does not exist")
    allow = None
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UsageError(f"push: {path} is a file; give a folder (run, final/, export) or a .gguf file")
        folder, allow = path.parent, [path.name, CARD_FILE]
    elif (path / "config.yaml").is_file() and (path / "final").is_dir():
        folder = path / "final"
    elif (path / "config.yaml").is_file():
        raise FileNotFoundError(f"push: run folder {path} has no final/ folder (the run did not finish)")
    else:
        folder = path
    run_dir = folder.parent if (folder.parent / "config.yaml").is_file() and folder.name.startswith("final") else None
    if run_dir is not None and not (folder / CARD_FILE).exists():
        write_card(folder, final_folder_card(collect_run_facts(run_dir), folder))
    every = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    files = sorted(filter_repo_objects(every, allow_patterns=allow, ignore_patterns=PUSH_IGNORE))
    if not files:
        raise UsageError(f"push: nothing to upload in {folder}")
    if CARD_FILE not in files:
        print(f"[alignkit] push: {folder} has no {CARD_FILE}; the repository will have no model card", file=sys.stderr)
    return folder, allow, files


def adapter_base_warnings(folder: Path) -> list[str]:
    """An adapter whose base model is not a hub id cannot be loaded from the Hub by itself: say so."""
    config = folder / "adapter_config.json"
    if not config.is_file():
        return []
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if hub_base_model(base) == base:
        return []
    return [f"the adapter's base model is {base!r}, which the Hub cannot load; users will need that model too "
            "(or push a merged export: alignkit export RUN --format merged --out DIR)"]


def name_repository_in_card(folder: Path, repo: str) -> None:
    """In an alignkit card, the local folder path in the usage code becomes the repository id."""
    card = folder / CARD_FILE
    if card.is_file() and is_alignkit_card(card):
        card.write_text(card.read_text().replace(f'"{folder.resolve()}"', f'"{repo}"')
                        .replace(f'"{folder}"', f'"{repo}"'))


def run_push(args) -> int:

    folder, allow, files = upload_plan(args.source)
    total = sum((folder / name).stat().st_size for name in files)
    print(f"[alignkit] push {folder} -> {args.repo}: {len(files)} files, {total / 2**20:.1f} MiB")
    for name in files:
        print(f"  {name}")
    for warning in adapter_base_warnings(folder):
        print(f"[alignkit] push: {warning}", file=sys.stderr)
    if args.dry_run:
        return 0
    name_repository_in_card(folder, args.repo)
    api = HfApi()
    try:
        api.create_repo(args.repo, private=args.private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=str(folder), repo_id=args.repo, repo_type="model",
                                   revision=args.revision, allow_patterns=allow, ignore_patterns=PUSH_IGNORE,
                                   commit_message=args.commit_message or f"alignkit push of {folder.name}")
    except OSError as error:  # requests' connection errors and HfHubHTTPError are OSErrors
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise UsageError(f"push to {args.repo} failed: {type(error).__name__}: {first_line}"
                         " (log in with `hf auth login` or set HF_TOKEN; check the network)") from error
    print(f"[alignkit] pushed: {getattr(commit, 'commit_url', commit)}")
    return 0
