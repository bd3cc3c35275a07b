"""What the `alignkit` command prints, and what it keeps other libraries from printing.

`quiet_libraries` (called once by the CLI, never by the importable API) hides output a user cannot
act on: transformers' and the hub's per-file progress bars ("Loading weights", "Writing model
shards": the loads take a second and alignkit prints what it loaded), and deprecation warnings
that transformers and PEFT raise about their *own* internal calls. Each hidden message is listed
in `HIDDEN_WARNINGS` with the reason; anything else still shows. ``ALIGNKIT_VERBOSE=1`` shows
everything.
"""
from __future__ import annotations

import logging
import os
import re
import warnings

# (warning category, message pattern, why a user cannot act on it)
HIDDEN_WARNINGS = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated",
     "transformers calls its own deprecated property while training"),
    (FutureWarning, r"`past_key_values` is deprecated",
     "PEFT passes transformers' old argument name in generate()"),
    (UserWarning, r"Converting a tensor with requires_grad=True to a scalar",
     "a metric read from a tensor that still carries a gradient; the value is correct"),
)
# transformers log records (logger name prefix, message pattern, why)
HIDDEN_LOGS = (
    ("transformers", r"Setting `pad_token_id` to `eos_token_id`",
     "alignkit passes pad_token_id itself where it matters"),
    ("transformers", r"The following generation flags are not valid and may be ignored",
     "greedy decoding resets sampling flags the model's generation config sets"),
)


class _Drop(logging.Filter):
    def __init__(self, patterns):
        super().__init__()
        self.patterns = [re.compile(pattern) for pattern in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(pattern.search(message) for pattern in self.patterns)


def quiet_libraries(verbose: bool | None = None) -> None:
    """Hide the library output listed above (unless ``verbose`` or ``ALIGNKIT_VERBOSE=1``)."""
    if verbose is None:
        verbose = os.environ.get("ALIGNKIT_VERBOSE", "").strip().lower() in ("1", "true", "yes")
    if verbose:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    for category, pattern, _ in HIDDEN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    by_logger: dict[str, list[str]] = {}
    for name, pattern, _ in HIDDEN_LOGS:
        by_logger.setdefault(name, []).append(pattern)
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(patterns))
            for handler in logger.handlers:
                handler.addFilter(_Drop(patterns))
