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
    tokenize_chat,
    tokenize_dataset,
    tokenize_prompt,
    tokenize_prompt_response,
    tokenize_text,
    template_tool_support,
)
from alignkit.data.types import ChatExample, PreferenceExample, PromptExample, TextExample, UnpairedExample

__all__ = [
    "ACCEPTED_EXTENSIONS", "FORMATS", "KINDS", "ChatExample", "DataError", "FatalDataError", "LoadReport",
    "PreferenceExample", "PromptExample", "TextExample", "UnpairedExample", "parse_label", "to_unpaired_examples",
    "ToolSupport", "check_tool_support", "tokenize_text", "template_tool_support", "TokenizeReport", "TokenizedRow", "answer_value", "block_diagonal_attention_mask",
    "deduplicate", "detect_format", "filter_by_length", "iter_records", "length_bucketed_batches",
    "load_examples", "normalize_text", "pack_rows", "pad_batch", "parse_hh_dialogue", "read_rows",
    "render_chat", "render_fallback_template", "to_chat_example", "to_preference_examples",
    "to_prompt_example", "tokenize_chat", "tokenize_dataset", "tokenize_prompt", "tokenize_prompt_response",
    "train_validation_split",
]
