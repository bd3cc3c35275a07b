"""Take a model out of alignkit: merged transformers folders, GGUF files, model cards.

    from alignkit.export import export_model
    export_model("runs/sft-support", "exports/sft-merged", format="merged")
    export_model("runs/sft-support", "exports/sft-gguf", format="gguf", quant="q8_0")

`source` (what is exported), `merged` (transformers folders, reward models as sequence
classifiers), `gguf` (llama.cpp files), `card` (README.md model cards). Every export writes a card.
"""
from __future__ import annotations

from pathlib import Path

from alignkit.export.card import (
    CARD_FILE,
    METHOD_NAMES,
    causal_usage,
    collect_run_facts,
    gguf_usage,
    render_card,
    reward_usage,
    write_card,
)
from alignkit.export.gguf import gguf_type_name, write_gguf
from alignkit.export.merged import ExportResult, export_merged, load_merged_causal_lm
from alignkit.export.source import ExportError, ExportSource, resolve_source

FORMATS = ("merged", "gguf")

__all__ = ["ExportError", "ExportResult", "ExportSource", "FORMATS", "export_model", "resolve_source"]


def gguf_target(out: str | Path, name: str, tensor_type: str) -> tuple[Path, Path]:
    """``(folder, file)``: ``--out x.gguf`` is the file itself; any other ``--out`` is a folder for
    ``{name}-{TYPE}.gguf`` (the naming llama.cpp users expect, e.g. ``sft-support-Q8_0.gguf``)."""
    out = Path(out).expanduser()
    if out.suffix.lower() == ".gguf":
        return out.parent, out
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file that is not .gguf; give a folder or a .gguf path")
    return out, out / f"{name}-{tensor_type.upper()}.gguf"


def export_model(source: str | Path | ExportSource, out: str | Path, format: str = "merged", dtype: str | None = None,
                 quant: str | None = None, tokenizer_pre: str | None = None, eval_reports: list = (),
                 command: str | None = None) -> ExportResult:
    """Export ``source`` (a run folder, its ``final/``, or a model) to ``out`` and write its model card."""
    if format not in FORMATS:
        raise ExportError(f"--format {format!r}: use one of {', '.join(FORMATS)}")
    if not isinstance(source, ExportSource):
        source = resolve_source(source)
    facts = collect_run_facts(source.run_dir, list(eval_reports))
    if source.run_dir is None:  # a model, not a run: the card still names what it came from
        facts.config.setdefault("model", {"name_or_path": source.given})
    method = facts.method
    what = METHOD_NAMES.get(method, method) if method else None
    origin = f" trained by alignkit ({what})" if what else ""
    if format == "merged":
        if quant is not None:
            raise ExportError("--quant applies to --format gguf; a merged export is f32, f16 or bf16 (--dtype)")
        result = export_merged(source, out, dtype)
        folder = result.path
        details = result.details
        if source.is_scalar:
            usage = reward_usage(str(folder), details.get("score_bias", 0.0))
            lines = [f"- `{details['architecture']}` with one label (the reward), {details['dtype']} safetensors; "
                     f"padding token id {details['pad_token_id']} (see How to use)",
                     f"- alignkit's reward head bias: {details['score_bias']:.6g} (not in transformers' score layer)"]
            text = render_card(facts, title=f"{source.name} (reward model)", library_name="transformers",
                               usage=usage, pipeline_tag="text-classification", extra_tags=["reward-model"],
                               description=f"A reward model{origin}, exported for transformers, TRL, OpenRLHF and "
                                           "vLLM as a sequence classifier.",
                               export_lines=lines, export_command=command)
        else:
            lines = [f"- `{details['architecture']}`, {details['dtype']} safetensors, LoRA (if any) merged in float32 "
                     "before casting; tokenizer and chat template included"]
            text = render_card(facts, title=source.name, library_name="transformers", usage=causal_usage(str(folder)),
                               description=f"A merged model{origin}: a standard transformers folder.",
                               export_lines=lines, export_command=command)
        result.card = write_card(folder, text)
        return result
    if source.is_scalar:
        raise ExportError(f"{source.given}: a {source.kind} model has no GGUF form here (llama.cpp runs language "
                          "models); export it with --format merged")
    tensor_type = gguf_type_name(dtype, quant)
    folder, file = gguf_target(out, source.name, tensor_type)
    model, tokenizer = load_merged_causal_lm(source)
    info = write_gguf(model, tokenizer, file, tensor_type, name=source.name, tokenizer_pre=tokenizer_pre)
    counts = ", ".join(f"{count} {kind.upper()}" for kind, count in sorted(info["tensors"].items()))
    lines = [f"- `{file.name}`: GGUF, architecture `{info['architecture']}`, weights {tensor_type.upper()} "
             f"({counts} tensors; norms stay F32), {info['bytes'] / 2**20:.1f} MiB",
             f"- tokenizer: byte-level BPE, llama.cpp pre-tokenizer `{info['tokenizer_pre']}`, chat template "
             + ("from the tokenizer" if info["chat_template"] == "tokenizer" else "alignkit's fallback (ChatML-like)")]
    text = render_card(facts, title=f"{source.name} (GGUF)", library_name="gguf", usage=gguf_usage(file.name),
                       extra_tags=["gguf", "llama.cpp"],
                       description=f"A GGUF file{origin} for llama.cpp, Ollama and LM Studio.",
                       export_lines=lines, export_command=command)
    card = write_card(folder, text)
    notes = [] if card is not None else [
        f"{folder / CARD_FILE} exists and was not written by alignkit; card not written"]
    return ExportResult(file, "gguf", card, notes, info)
