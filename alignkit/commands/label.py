"""`alignkit label`: collect human preferences and turn them into reward-model and DPO data.

    alignkit label generate --prompts examples/label_prompts.jsonl --models smollm2-135m-instruct \
        --candidates 4 --diversity independent --compare --out tasks.jsonl
    alignkit label add-annotator alice --db feedback.sqlite          prints alice's personal login link
    alignkit label serve --db feedback.sqlite --tasks tasks.jsonl    http://127.0.0.1:8080
    alignkit label stats --db feedback.sqlite                        agreement and leaderboard in the terminal
    alignkit label export --db feedback.sqlite --format dpo --out pairs.jsonl
    alignkit dpo --config job.yaml --set data.train=pairs.jsonl

See docs/feedback.md for the whole loop and alignkit/label/ for the parts.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from alignkit.errors import UsageError

DEFAULT_DB = "feedback.sqlite"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def register(subparsers) -> None:
    parser = subparsers.add_parser("label", help="human feedback: diverse candidates, a labelling web app, export",
                                   description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="label_command", metavar="SUBCOMMAND", required=True)

    generate = commands.add_parser("generate", help="candidate responses per prompt from one or more models")
    generate.add_argument("--prompts", required=True, help="prompt file (jsonl/json/csv/parquet; any prompt-bearing rows)")
    generate.add_argument("--models", default="smollm2-135m-instruct",
                          help="comma-separated models or adapter folders (runs' final/); candidates go round robin")
    generate.add_argument("--candidates", type=int, default=4, help="responses per prompt (default 4)")
    generate.add_argument("--diversity", choices=["nc", "independent"], default="independent",
                          help="independent (default): plain samples; nc: each candidate sees the earlier ones and is "
                               "asked to differ (needs a model that follows instructions; see docs/feedback.md)")
    generate.add_argument("--compare", action="store_true",
                          help="also sample the other mode on the same prompts and print both modes' diversity")
    generate.add_argument("--out", required=True, help="tasks file to write (JSONL), the input of `label serve`")
    generate.add_argument("--report", help="also write the diversity numbers as JSON here")
    generate.add_argument("--temperature", type=float, default=0.8)
    generate.add_argument("--top-p", type=float, default=0.95)
    generate.add_argument("--max-new-tokens", type=int, default=256)
    generate.add_argument("--context-chars", type=int, default=300, help="nc: earlier candidates are clipped to this")
    generate.add_argument("--nc-pool", type=int, default=1,
                          help="nc: draw this many samples per candidate and keep the least similar to the earlier ones")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--batch-size", type=int, default=16)
    generate.add_argument("--limit", type=int, help="use at most this many prompts")
    generate.add_argument("--no-embedding-similarity", action="store_true",
                          help="skip the hidden-state similarity (one forward pass over the candidates)")
    generate.add_argument("--device", default=None)
    generate.add_argument("--dtype", default=None)
    generate.set_defaults(handler=run_generate)

    serve = commands.add_parser("serve", help="run the labelling web app")
    serve.add_argument("--db", default=DEFAULT_DB, help=f"SQLite database (created if missing; default {DEFAULT_DB})")
    serve.add_argument("--tasks", action="append", default=[], help="tasks file(s) to import (repeatable; re-importing is a no-op)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--overlap", type=float, default=0.2,
                       help="share of items given to several annotators, for agreement (default 0.2)")
    serve.add_argument("--raters-per-overlap", type=int, default=2, help="annotators per overlap item (default 2)")
    serve.add_argument("--max-pairs-per-prompt", type=int, help="compare at most this many candidate pairs per prompt")
    serve.add_argument("--lease-minutes", type=float, default=30.0,
                       help="an item shown but not answered returns to the pool after this long")
    serve.add_argument("--guidelines", help="text file with project-specific instructions for the guidelines page")
    serve.add_argument("--public-url", help="base URL printed in login links (default http://HOST:PORT)")
    serve.add_argument("--secure-cookies", action="store_true", help="mark the session cookie Secure (behind HTTPS)")
    serve.add_argument("--synchronous", choices=["FULL", "NORMAL"], default="FULL",
                       help="SQLite sync: FULL survives power loss; NORMAL survives a killed process, faster")
    serve.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")
    serve.set_defaults(handler=run_serve)

    export = commands.add_parser("export", help="write training data from the judgements")
    export.add_argument("--db", default=DEFAULT_DB)
    export.add_argument("--format", required=True, choices=["dpo", "rm", "kto", "ratings"])
    export.add_argument("--out", required=True, help="JSONL file to write")
    export.add_argument("--aggregate", choices=["majority", "each"], default="majority",
                        help="majority: one verdict per item; each: one row per label")
    export.add_argument("--margin-scale", type=float, default=1.0, help="rm: margin = scale x rating advantage")
    export.set_defaults(handler=run_export)

    add = commands.add_parser("add-annotator", help="create an annotator and print the personal login link")
    add.add_argument("name")
    add.add_argument("--db", default=DEFAULT_DB)
    add.add_argument("--admin", action="store_true", help="may open the admin view and export")
    add.add_argument("--rotate", action="store_true", help="issue a new token to an existing annotator")
    add.add_argument("--url", default="http://127.0.0.1:8080", help="the server's address, for the printed link")
    add.set_defaults(handler=run_add_annotator)

    stats = commands.add_parser("stats", help="progress, agreement and the model leaderboard in the terminal")
    stats.add_argument("--db", default=DEFAULT_DB)
    stats.add_argument("--json", action="store_true", help="print everything as JSON")
    stats.set_defaults(handler=run_stats)


def _existing_db(path: str):
    from alignkit.label.store import LabelStore

    if not Path(path).is_file():
        raise FileNotFoundError(f"database not found: {path} (`alignkit label serve --db {path}` creates it)")
    return LabelStore(path)


# ------------------------------------------------------------------------------------------- generate
def run_generate(args) -> int:
    from alignkit.data import load_examples
    from alignkit.label.generate import (
        CandidateModel,
        candidate_diversity,
        diversity_table,
        generate_candidates,
    )
    from alignkit.label.tasks import write_tasks
    from alignkit.model import load_model_and_tokenizer

    specs = [spec.strip() for spec in args.models.split(",") if spec.strip()]
    if not specs:
        raise UsageError("--models is empty; give one or more models or adapter folders, comma-separated")
    if len(set(specs)) != len(specs):
        raise UsageError(f"--models names a model twice: {args.models}")
    examples, report = load_examples(args.prompts, kind="prompt", limit=args.limit)
    models = []
    for spec in specs:
        model, tokenizer = load_model_and_tokenizer(spec, device=args.device, dtype=args.dtype)
        models.append(CandidateModel(spec, model, tokenizer))
    settings = dict(candidates=args.candidates, temperature=args.temperature, top_p=args.top_p,
                    max_new_tokens=args.max_new_tokens, seed=args.seed, batch_size=args.batch_size,
                    context_chars=args.context_chars)
    if args.nc_pool != 1 and args.diversity != "nc":
        raise UsageError("--nc-pool applies to --diversity nc only")
    modes = [args.diversity] + ([m for m in ("nc", "independent") if m != args.diversity] if args.compare else [])
    embedder = None if args.no_embedding_similarity else models[0]
    results, reports = {}, {}
    for mode in modes:
        print(f"[alignkit] sampling {args.candidates} candidates x {len(examples)} prompts ({mode})", file=sys.stderr)
        tasks, reports[mode] = generate_candidates(models, examples, diversity=mode,
                                                   nc_pool=args.nc_pool if mode == "nc" else 1, **settings)
        if mode == args.diversity:
            write_tasks(args.out, tasks)
            written = len(tasks)
        results[mode] = candidate_diversity([[c.text for c in t.candidates] for t in tasks], embedder=embedder)
    print(diversity_table(results))
    for mode, info in reports.items():
        dropped = f"; {info['empty_dropped']} empty samples dropped" if info["empty_dropped"] else ""
        print(f"[alignkit] {mode}: {info['tasks']} tasks in {info['seconds']} s{dropped}", file=sys.stderr)
    if args.report:
        Path(args.report).write_text(json.dumps({"diversity": results, "generation": reports}, indent=2) + "\n")
    print(f"[alignkit] wrote {written} tasks to {args.out}; next: alignkit label serve --tasks {args.out}",
          file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------- serve
def run_serve(args) -> int:
    from alignkit.label.store import LabelStore
    from alignkit.label.tasks import read_tasks

    try:
        import uvicorn

        from alignkit.label.app import create_app
    except ImportError as error:
        raise UsageError(f"the labelling app needs FastAPI and uvicorn ({error.name} is missing): "
                         "pip install 'alignkit[label]'") from None
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be 1-65535, got {args.port}")
    tasks = [task for path in args.tasks for task in read_tasks(path)]  # every file checked before any import
    guidelines = Path(args.guidelines).read_text(encoding="utf-8") if args.guidelines else None
    store = LabelStore(args.db, synchronous=args.synchronous, lease_seconds=args.lease_minutes * 60)
    if tasks:
        added = store.import_tasks(tasks, overlap=args.overlap, raters_per_overlap=args.raters_per_overlap,
                                   max_pairs_per_task=args.max_pairs_per_prompt)
        print(f"[alignkit] tasks: {added['tasks']} new ({added['items']} items to compare), "
              f"{added['existing_tasks']} already in {args.db}"
              + (f"; {added['identical_pairs_skipped']} pairs of identical candidates skipped"
                 if added["identical_pairs_skipped"] else ""), file=sys.stderr)
    counts = store.counts()
    if counts["items"] == 0:
        raise UsageError(f"{args.db} has no items to label; pass --tasks FILE (written by `alignkit label generate`)")
    host_in_url = f"[{args.host}]" if ":" in args.host else args.host
    base_url = (args.public_url or f"http://{host_in_url}:{args.port}").rstrip("/")
    if not store.has_admin():
        token = store.add_annotator("admin", is_admin=True)
        print(f"[alignkit] admin login (shown once; `alignkit label add-annotator admin --admin --rotate` issues a "
              f"new one):\n  {base_url}/login?token={token}", file=sys.stderr)
    if args.host not in LOOPBACK_HOSTS:
        print(f"[alignkit] warning: serving on {args.host}, reachable from other machines; tokens travel in the "
              "clear unless HTTPS is in front (then add --secure-cookies)", file=sys.stderr)
    print(f"[alignkit] {counts['items']} items, {counts['labels']} labels so far; serving {base_url} "
          f"(add annotators: alignkit label add-annotator NAME --db {args.db} --url {base_url})", file=sys.stderr)
    app = create_app(store, guidelines=guidelines, secure_cookies=args.secure_cookies, base_url=base_url)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        store.close()
    return 0


# ------------------------------------------------------------------------------------------- export / stats
def run_export(args) -> int:
    from alignkit.label.export import export

    store = _existing_db(args.db)
    try:
        report = export(store, args.format, args.out, aggregate=args.aggregate, margin_scale=args.margin_scale)
    finally:
        store.close()
    print(f"[alignkit] wrote {args.out}: {report.summary()}", file=sys.stderr)
    if report.rows == 0:
        print("[alignkit] warning: no rows (no judgements yet, or none with a preference)", file=sys.stderr)
    return 0


def run_add_annotator(args) -> int:
    from alignkit.label.store import LabelStore

    store = LabelStore(args.db)
    try:
        token = store.add_annotator(args.name, is_admin=args.admin, rotate=args.rotate)
    finally:
        store.close()
    role = "admin" if args.admin else "annotator"
    print(f"[alignkit] {role} {args.name.strip()!r}: personal login link (shown once, keep it private):",
          file=sys.stderr)
    print(f"{args.url.rstrip('/')}/login?token={token}")
    return 0


def run_stats(args) -> int:
    from alignkit.label.report import summary

    store = _existing_db(args.db)
    try:
        stats = summary(store)
    finally:
        store.close()
    if args.json:
        print(json.dumps(stats, indent=2, default=str))
        return 0
    counts, agreement = stats["counts"], stats["agreement"]
    print(f"{counts['labels']} labels; {counts['items_complete']}/{counts['items']} items complete; "
          f"{counts['tasks']} prompts; {counts['annotators']} annotators")
    print("\n| annotator | labels | skipped | median s/label |\n| --- | --- | --- | --- |")
    for row in stats["annotators"]:
        median = "n/a" if row["median_seconds"] is None else f"{row['median_seconds']:.1f}"
        print(f"| {row['name']} | {row['labels']} | {row['skipped']} | {median} |")
    if agreement["overlap_items"]:
        print(f"\nagreement on {agreement['overlap_items']} items with 2+ labels: "
              f"{100 * agreement['percent_agreement']:.1f}% agree, Krippendorff's alpha "
              f"{agreement['krippendorff_alpha']:.3f}, Fleiss' kappa {agreement['fleiss_kappa']:.3f} "
              f"({agreement['fleiss_items']} items x {agreement['fleiss_raters']} raters)")
        for pair in agreement["pairs"]:
            print(f"  {pair['annotators'][0]} / {pair['annotators'][1]}: {pair['shared_items']} items, "
                  f"Cohen's kappa {pair['cohen_kappa']:.3f}")
    else:
        print("\nagreement: no item has two labels yet")
    if stats["leaderboard"]:
        print("\n| model | rating | 95% interval | comparisons |\n| --- | --- | --- | --- |")
        for row in stats["leaderboard"]:
            print(f"| {row['model']} | {row['rating']:.0f} | {row['low']:.0f} - {row['high']:.0f} | {row['comparisons']} |")
    return 0
