"""`alignkit prepare-model`: convert the embedded model's GGUF once and cache it as safetensors."""
from __future__ import annotations

from alignkit.model import ensure_embedded_model


def register(commands) -> None:
    parser = commands.add_parser("prepare-model", help="convert and cache the embedded default model")
    parser.add_argument("--quiet", action="store_true")
    parser.set_defaults(handler=prepare_model)


def prepare_model(args) -> int:
    path = ensure_embedded_model()
    if not args.quiet:
        print(f"embedded model ready at {path}")
    return 0
