"""Options several commands share, and the one way a command loads the model the user named."""
from __future__ import annotations

import argparse

from alignkit.config import ConfigError
from alignkit.model import EMBEDDED_MODEL, load_model_and_tokenizer


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=EMBEDDED_MODEL,
                        help="embedded name, local folder, run folder, or hub id (default: the embedded model)")
    parser.add_argument("--adapter", help="a LoRA adapter folder to apply")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when present)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 (default: bf16 on GPU, fp32 on CPU)")


def load_model_from_args(args):
    """``(model, tokenizer)`` for ``--model/--adapter/--device/--dtype``, for inference (eval mode)."""
    return load_model_and_tokenizer(args.model, device=args.device, dtype=args.dtype, adapter=args.adapter,
                                    is_trainable=False)


def add_columns_argument(parser: argparse.ArgumentParser) -> None:
    """``--columns OURS=THEIRS`` (repeatable), the one way a command that reads data maps column names."""
    parser.add_argument("--columns", action="append", default=[], metavar="OURS=THEIRS",
                        help="map a field name to the file's column, e.g. --columns completion=output (repeatable)")


def parse_columns(items: list[str]) -> dict[str, str] | None:
    """``["prompt=question", ...]`` -> ``{"prompt": "question"}``; one clear error for a malformed item."""
    columns = {}
    for item in items or []:
        ours, equals, theirs = item.partition("=")
        if not equals or not ours.strip() or not theirs.strip():
            raise ConfigError(f"--columns {item!r}: expected OURS=THEIRS, e.g. --columns completion=output")
        columns[ours.strip()] = theirs.strip()
    return columns or None
