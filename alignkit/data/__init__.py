"""The data layer: read files -> typed examples -> token ids + loss masks -> batches.

See ``docs/data.md`` for the accepted files and row shapes, and ``docs/architecture.md`` for the contract.
"""
from alignkit.data.collate import (
    block_diagonal_attention_mask,
    length_bucketed_batches,
    pack_rows,
    pad_batch,
)
from alignkit.data.errors import DataError, FatalDataError
from alignkit.data.formats import (
    FORMATS,
    KINDS,
    LoadReport,
    answer_value,
    detect_format,
    load_examples,
    parse_hh_dialogue,
    parse_label,
    to_chat_example,
    to_preference_examples,
    to_prompt_example,
    to_unpaired_examples,
)
from alignkit.data.prepare import (
    deduplicate,
    filter_by_length,
    normalize_text,
    train_validation_split,
)
from alignkit.data.read import ACCEPTED_EXTENSIONS, iter_records, read_rows
from alignkit.data.tokenize import (
    TokenizedRow,
    TokenizeReport,
    ToolSupport,
    check_tool_support,
    render_chat,
    render_fallback_template,
    template_tool_support,
    tokenize_chat,
    tokenize_dataset,
    tokenize_prompt,
    tokenize_prompt_response,
    tokenize_text,
)
from alignkit.data.types import (
    ChatExample,
    PreferenceExample,
    PromptExample,
    TextExample,
    UnpairedExample,
)

__all__ = [
    "ACCEPTED_EXTENSIONS", "answer_value", "block_diagonal_attention_mask", "ChatExample",
    "check_tool_support", "DataError", "deduplicate", "detect_format", "FatalDataError", "filter_by_length",
    "FORMATS", "iter_records", "KINDS", "length_bucketed_batches", "load_examples", "LoadReport",
    "normalize_text", "pack_rows", "pad_batch", "parse_hh_dialogue", "parse_label", "PreferenceExample",
    "PromptExample", "read_rows", "render_chat", "render_fallback_template", "template_tool_support",
    "TextExample", "to_chat_example", "to_preference_examples", "to_prompt_example", "to_unpaired_examples",
    "tokenize_chat", "tokenize_dataset", "tokenize_prompt", "tokenize_prompt_response", "tokenize_text",
    "TokenizedRow", "TokenizeReport", "ToolSupport", "train_validation_split", "UnpairedExample",
]
