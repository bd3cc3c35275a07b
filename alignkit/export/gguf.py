"""GGUF export for llama.cpp, Ollama and LM Studio, written with the ``gguf`` package's `GGUFWriter`.

Supported: the Llama family as transformers names it, ``LlamaForCausalLM`` (SmolLM, Llama 2/3,
TinyLlama and other models saved with that class), with SiLU MLPs and no attention or MLP biases;
RoPE ``default``, ``linear`` or ``llama3``. Everything else is refused with one line naming what is
not supported. The tokenizer must be a byte-level BPE (GPT-2 style, as SmolLM2, Llama 3 and most
recent models use); SentencePiece vocabularies are refused.

What the file holds (llama.cpp's names, the same its own ``convert_hf_to_gguf.py`` writes):

* ``general.*``: architecture ``llama``, name, file type, quantization version;
* ``llama.*``: context length, embedding length, block count, feed-forward length, head counts,
  RoPE base and dimension count (the head size), RMS-norm epsilon, vocabulary size, and for
  ``linear`` RoPE scaling its type and factor;
* ``tokenizer.ggml.*``: model ``gpt2``, the pre-tokenizer's name (decided from the tokenizer's
  split rule, see `pre_tokenizer_name`), every token in id order with its type (normal, control for
  special tokens, user-defined for other added tokens, unused for padding rows), the merges, the
  bos/eos/unk/pad ids, whether to add bos/eos, and ``tokenizer.chat_template``;
* tensors under llama.cpp's names (``token_embd``, ``blk.N.attn_q`` ...; mapped by the ``gguf``
  package's `TensorNameMap`). The query and key projections are permuted from transformers'
  half-split rotary layout to GGML's interleaved one (``permute_for_rope``); ``output.weight`` is left
  out for tied embeddings (llama.cpp and transformers then reuse ``token_embd``). For ``llama3`` RoPE,
  a ``rope_freqs`` tensor holds the per-frequency divisors, computed as transformers' plain inverse
  frequencies over its llama3-scaled ones.

Types: norms and other 1-D tensors stay F32 (as llama.cpp keeps them); matrices are F32, F16,
BF16 or Q8_0 (``quant="q8_0"``: 32 weights per block with one F16 scale, via ``gguf.quants``; a
matrix whose rows are not a multiple of 32 falls back to F16, as llama.cpp's converter does).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from alignkit.data.tokenize import IM_START, fallback_end_marker
from alignkit.export.source import ExportError, set_default_permissions

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
ROPE_TYPES = ("default", "linear", "llama3")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
# the tokenizer's split rule -> llama.cpp's pre-tokenizer name (checked against transformers' own table)
_GPT2_NAME = "gpt-2"
_PREFERRED_NAMES = ("llama-bpe", "qwen2", "gpt-4o", "tekken")


@dataclass(frozen=True)
class GGUFPlan:
    """What `export_gguf` writes, decided before any tensor is converted (so refusals are cheap)."""

    architecture: str
    tensor_type: str  # f32 | f16 | bf16 | q8_0
    file_type: int


def gguf_type_name(dtype: str | None, quant: str | None) -> str:
    """The file's weight type from ``--dtype`` and ``--quant`` (``--quant`` wins; default f16)."""
    if quant is not None:
        key = quant.strip().lower()
        if key not in ("q8_0",):
            raise ExportError(f"--quant {quant!r}: this export writes q8_0 (for smaller types, run llama.cpp's "
                              "llama-quantize on an f16 export)")
        return key
    key = (dtype or "f16").strip().lower()
    if key not in ("f32", "f16", "bf16"):
        raise ExportError(f"--dtype {dtype!r}: a GGUF export is f32, f16 or bf16 (or --quant q8_0)")
    return key


def check_supported(model) -> str:
    """The GGUF architecture name for ``model``, or `ExportError` naming what is not supported."""
    name = type(model).__name__
    config = model.config
    if name not in SUPPORTED_ARCHITECTURES:
        raise ExportError(f"GGUF export supports {', '.join(SUPPORTED_ARCHITECTURES)}; this model is {name} "
                          "(export it with --format merged and convert it with llama.cpp's convert_hf_to_gguf.py)")
    problems = []
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config.hidden_act!r} (llama.cpp's llama graph uses SiLU)")
    if getattr(config, "attention_bias", False):
        problems.append("attention biases")
    if getattr(config, "mlp_bias", False):
        problems.append("MLP biases")
    rope = rope_parameters(config)
    if rope.get("rope_type", "default") not in ROPE_TYPES:
        problems.append(f"RoPE type {rope.get('rope_type')!r} (supported: {', '.join(ROPE_TYPES)})")
    if problems:
        raise ExportError(f"GGUF export of this {name} is not supported: " + "; ".join(problems))
    return "llama"


def rope_parameters(config) -> dict:
    """RoPE settings as one dict (transformers 5 ``rope_parameters``, or 4.x ``rope_theta``/``rope_scaling``)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        return dict(params)
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    return {"rope_theta": getattr(config, "rope_theta", 10000.0), "rope_type": "default", **scaling}


def head_dimension(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def permute_for_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder a query/key projection's output rows from transformers' rotary layout to GGML's.

    transformers rotates the two halves of each head against each other (``rotate_half``); GGML's
    rope rotates neighbouring pairs. Row ``j`` of half ``h`` of a head moves to row ``2 j + h``, which
    transformers' GGUF reader undoes on loading.
    """
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


# ------------------------------------------------------------------------------------------- tokenizer

def fallback_chat_template(tokenizer) -> str:
    """A Jinja chat template that renders what `alignkit.data.tokenize.render_fallback_template` does,
    for tokenizers that have none (alignkit trained them with that fallback)."""
    end = fallback_end_marker(tokenizer)
    return ("{% for message in messages %}{{ '" + IM_START + "' + message['role'] + '\\n' + message['content'] + '"
            + end + "' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '" + IM_START
            + "assistant\\n' }}{% endif %}")


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("GGUF export needs a fast tokenizer (tokenizer.json); this one is a Python tokenizer")
    return json.loads(backend.to_str())


def _known_splits() -> dict[str, str]:
    """regex -> llama.cpp pre-tokenizer name, from transformers' GGUF reader (so the reader agrees)."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_PRE_TOKENIZER_SPLITS,
        )
    except ImportError:  # an older transformers: only the plain GPT-2 rule is known
        return {}
    names: dict[str, str] = {}
    for name in _PREFERRED_NAMES:
        if name in GGUF_PRE_TOKENIZER_SPLITS:
            names.setdefault(GGUF_PRE_TOKENIZER_SPLITS[name], name)
    for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
        names.setdefault(regex, name)
    return names


def digits_stand_alone(vocabulary) -> bool:
    """True when no token of a byte-level vocabulary holds a number character (Unicode category N, the
    regex class \\p{N}) next to anything else."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_byte = {character: byte for byte, character in bytes_to_unicode().items()}
    for token in vocabulary:
        if len(token) < 2 or any(character not in to_byte for character in token):
            continue  # one byte, or an added token written as plain text
        text = bytes(to_byte[character] for character in token).decode("utf-8", errors="ignore")
        if len(text) > 1 and any(unicodedata.category(character).startswith("N") for character in text):
            return False
    return True


def pre_tokenizer_name(pre_tokenizer: dict | None, vocabulary: dict[str, int] | None = None,
                       clean_up_spaces: bool = False) -> str:
    """llama.cpp's name for the way a byte-level tokenizer splits text before BPE, or `ExportError`.

    A bare ``ByteLevel`` with its built-in regex is GPT-2's rule. llama.cpp has two names for it:
    ``gpt-2`` (which also cleans spaces before punctuation when decoding) and ``smollm`` (which first
    splits every digit on its own, and does not clean spaces). When no token of the vocabulary holds
    a digit next to anything else, splitting digits first changes nothing, so ``smollm`` tokenizes
    exactly as the tokenizer does and decodes as it does unless the tokenizer cleans up spaces;
    that is the name llama.cpp's own converter gives SmolLM2's tokenizer. Otherwise ``gpt-2``.

    A ``Split`` on a known regex followed by ``ByteLevel`` without regex is the model family whose
    regex it is (Llama 3: ``llama-bpe``, Qwen2: ``qwen2`` ...). Anything else is refused: llama.cpp
    would split the text differently from training, silently.
    """
    if pre_tokenizer is None:
        raise ExportError("the tokenizer has no pre-tokenizer; GGUF export supports byte-level BPE tokenizers")
    kind = pre_tokenizer.get("type")
    if kind == "ByteLevel" and pre_tokenizer.get("use_regex", True):
        alone = vocabulary is not None and digits_stand_alone(vocabulary)
        return "smollm" if alone and not clean_up_spaces else _GPT2_NAME
    if kind == "Sequence":
        steps = pre_tokenizer.get("pretokenizers") or []
        if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel"
                and not steps[1].get("use_regex", True)):
            pattern = steps[0].get("pattern") or {}
            regex = pattern.get("Regex")
            name = _known_splits().get(regex) if regex else None
            if name is not None:
                return name
            raise ExportError(f"the tokenizer splits text with a regex llama.cpp has no name for ({regex!r}); "
                              "pass --tokenizer-pre NAME if you know llama.cpp's name for it")
        if len(steps) == 1:
            return pre_tokenizer_name(steps[0], vocabulary, clean_up_spaces)
    raise ExportError(f"the tokenizer's pre-tokenizer ({kind}) is not a byte-level BPE rule llama.cpp knows; "
                      "pass --tokenizer-pre NAME if you know llama.cpp's name for it")


@dataclass
class GGUFVocabulary:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    chat_template: str


def byte_level_vocabulary(tokenizer, vocab_size: int, pre: str | None = None) -> GGUFVocabulary:
    """Everything ``tokenizer.ggml.*`` needs from a byte-level BPE tokenizer, rows padded to ``vocab_size``."""
    data = _tokenizer_json(tokenizer)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        fallback = " with byte fallback (SentencePiece)" if model.get("byte_fallback") else ""
        raise ExportError("GGUF export supports byte-level BPE tokenizers (GPT-2 style); this one is "
                          f"{model.get('type')}{fallback}")
    if data.get("normalizer") is not None:
        raise ExportError(f"the tokenizer normalizes text ({data['normalizer'].get('type')}) before BPE, which a "
                          "GGUF byte-level vocabulary cannot express")
    vocabulary = tokenizer.get_vocab()
    name = pre or pre_tokenizer_name(data.get("pre_tokenizer"), model.get("vocab") or vocabulary,
                                     bool(getattr(tokenizer, "clean_up_tokenization_spaces", False)))
    if len(vocabulary) and max(vocabulary.values()) >= vocab_size:
        raise ExportError(f"the tokenizer has ids up to {max(vocabulary.values())} but the model's embedding has "
                          f"only {vocab_size} rows")
    by_id: dict[int, str] = {index: token for token, index in vocabulary.items()}
    added = {int(index): token for index, token in (tokenizer.added_tokens_decoder or {}).items()}
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif index in added:
            tokens.append(by_id[index])
            types.append(int(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(by_id[index])
            types.append(int(gguf.TokenType.NORMAL))
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges") or []]
    special_ids = {}
    for key in ("bos", "eos", "unk", "pad"):
        value = getattr(tokenizer, f"{key}_token_id", None)
        if value is not None:
            special_ids[key] = int(value)
    probe = tokenizer("hello")["input_ids"]
    add_bos = bool(probe) and "bos" in special_ids and probe[0] == special_ids["bos"]
    add_eos = bool(probe) and "eos" in special_ids and probe[-1] == special_ids["eos"]
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()))
    return GGUFVocabulary(tokens, types, merges, name, special_ids, add_bos, add_eos,
                          template or fallback_chat_template(tokenizer))


# ------------------------------------------------------------------------------------------- tensors

def _tensor_type(tensor_type: str):
    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[tensor_type]


def file_type(tensor_type: str) -> int:
    return int({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[tensor_type])


def encode_tensor(array: np.ndarray, tensor_type: str):
    """``(data, raw_dtype or None, type written)`` for one tensor: 1-D stays F32; Q8_0 needs rows of 32k."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim <= 1 or tensor_type == "f32":
        return array, None, "f32"
    if tensor_type == "f16":
        return array.astype(np.float16), None, "f16"
    kind = _tensor_type(tensor_type)
    block = gguf.GGML_QUANT_SIZES[kind][0]
    if array.shape[-1] % block != 0:
        return array.astype(np.float16), None, "f16"
    return gguf.quants.quantize(array, kind), kind, tensor_type


def llama3_rope_divisors(config) -> np.ndarray:
    """Per-frequency divisors llama.cpp applies for ``llama3`` RoPE: plain inverse frequency / scaled one."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    dimension = head_dimension(config)
    base = float(rope_parameters(config)["rope_theta"])
    plain = 1.0 / (base ** (torch.arange(0, dimension, 2, dtype=torch.int64).float() / dimension))
    return (plain / scaled.float()).numpy().astype(np.float32)


def gguf_tensors(model, tensor_type: str):
    """Yield ``(gguf name, data, raw_dtype, type written)`` for every weight of a Llama model."""
    config = model.config
    blocks = int(config.num_hidden_layers)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, blocks)
    heads, kv_heads = int(config.num_attention_heads), int(config.num_key_value_heads)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ExportError(f"no GGUF name for the weight {name!r}; this model is not a plain Llama")
        array = tensor.detach().to("cpu", torch.float32).numpy()
        if name.endswith("self_attn.q_proj.weight"):
            array = permute_for_rope(array, heads)
        elif name.endswith("self_attn.k_proj.weight"):
            array = permute_for_rope(array, kv_heads)
        yield (target, *encode_tensor(array, tensor_type))
    if rope_parameters(config).get("rope_type") == "llama3":
        yield (gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_divisors(config), None, "f32")


# ------------------------------------------------------------------------------------------- the file

def write_gguf(model, tokenizer, path: str | Path, tensor_type: str = "f16", name: str | None = None,
               tokenizer_pre: str | None = None) -> dict:
    """Write ``model`` (a plain, merged `LlamaForCausalLM`) and ``tokenizer`` to one GGUF file.

    The file is written beside ``path`` under a temporary name and renamed into place. Returns a
    summary: tensor counts by type, the pre-tokenizer name, the file size.
    """
    architecture = check_supported(model)
    if tensor_type not in GGUF_TYPES:
        raise ExportError(f"GGUF tensor type {tensor_type!r}: use one of {', '.join(GGUF_TYPES)}")
    config = model.config
    vocab_size = int(config.vocab_size)
    vocabulary = byte_level_vocabulary(tokenizer, vocab_size, tokenizer_pre)
    path = Path(path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".tmp-{path.stem}-", suffix=".gguf", dir=path.parent)
    os.close(handle)
    counts: dict[str, int] = {}
    try:
        writer = gguf.GGUFWriter(staging, architecture)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or getattr(config, "name_or_path", None) or "model")
        writer.add_file_type(file_type(tensor_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        dimension = head_dimension(config)
        writer.add_context_length(int(config.max_position_embeddings))
        writer.add_embedding_length(int(config.hidden_size))
        writer.add_block_count(int(config.num_hidden_layers))
        writer.add_feed_forward_length(int(config.intermediate_size))
        writer.add_head_count(int(config.num_attention_heads))
        writer.add_head_count_kv(int(config.num_key_value_heads))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(vocab_size)
        writer.add_rope_dimension_count(dimension)
        writer.add_key_length(dimension)
        writer.add_value_length(dimension)
        rope = rope_parameters(config)
        writer.add_rope_freq_base(float(rope["rope_theta"]))
        if rope.get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocabulary.pre)
        writer.add_token_list(vocabulary.tokens)
        writer.add_token_types(vocabulary.types)
        writer.add_token_merges(vocabulary.merges)
        for key, value in vocabulary.special_ids.items():
            getattr(writer, {"bos": "add_bos_token_id", "eos": "add_eos_token_id", "unk": "add_unk_token_id",
                             "pad": "add_pad_token_id"}[key])(value)
        writer.add_add_bos_token(vocabulary.add_bos)
        writer.add_add_eos_token(vocabulary.add_eos)
        writer.add_chat_template(vocabulary.chat_template)
        for tensor_name, data, raw_dtype, written in gguf_tensors(model, tensor_type):
            writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
            counts[written] = counts.get(written, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        set_default_permissions(staging)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return {"path": str(path), "architecture": architecture, "tensor_type": tensor_type, "tensors": counts,
            "tokenizer_pre": vocabulary.pre, "bytes": path.stat().st_size,
            "chat_template": "fallback" if getattr(tokenizer, "chat_template", None) is None else "tokenizer"}
