"""Export: merged transformers folders, reward models as sequence classifiers, GGUF round trips, cards, push."""
import json
import os
import subprocess
import sys
import textwrap

import gguf
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard

from alignkit.cli import main
from alignkit.export import ExportError, export_model, resolve_source
from alignkit.export.card import card_metadata, RunFacts
from alignkit.export.gguf import fallback_chat_template, permute_for_rope, write_gguf
from alignkit.model import add_lora, load_model_and_tokenizer, merge_adapter, save_model, unwrap
from alignkit.model.heads import ScalarHeadModel, load_scalar_model
from tests.helpers import make_tiny_model, make_tiny_tokenizer

CHATS = [
    [{"role": "user", "content": "what is the capital of france?"}, {"role": "assistant", "content": "paris"}],
    [{"role": "user", "content": "what is the capital of italy?"}, {"role": "assistant", "content": "rome"}],
    [{"role": "user", "content": "two plus two"}, {"role": "assistant", "content": "four"}],
    [{"role": "user", "content": "a red fruit?"}, {"role": "assistant", "content": "cherry"}],
]
PROMPTS = ["<|im_start|>user\nthe cat is red, what is 12+7?<|im_end|>\n<|im_start|>assistant\n",
           "hello world: acme support ticket #42 — refund in 3 days? ok"]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps({"messages": row}) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A finished LoRA SFT run on a tiny Llama saved to a folder, started through the CLI."""
    root = tmp_path_factory.mktemp("sft")
    tokenizer = make_tiny_tokenizer()
    save_model(make_tiny_model(tokenizer), tokenizer, root / "base")
    train = _write_jsonl(root / "train.jsonl", CHATS)
    config = root / "sft.yaml"
    config.write_text(textwrap.dedent(f"""\
        method: sft
        model: {{name_or_path: {root / 'base'}, dtype: float32, device: cpu}}
        lora: {{rank: 4, alpha: 8, dropout: 0.0}}
        data: {{train: {train}, validation_fraction: 0.25, max_length: 64}}
        training: {{output_dir: {root / 'run'}, max_steps: 3, batch_size: 2, learning_rate: 0.05,
                   lr_scheduler: constant, eval_steps: 3, progress: false, report_to: none}}
        """))
    argv = sys.argv
    sys.argv = ["/usr/local/bin/alignkit", "sft", "--config", str(config)]
    try:
        assert main(sys.argv[1:]) == 0
    finally:
        sys.argv = argv
    return root / "run"


def merged_reference(run_dir):
    """The run's policy with its adapter merged, loaded the alignkit way."""
    model, tokenizer = load_model_and_tokenizer(str(run_dir / "final"), device="cpu", dtype="float32")
    return unwrap(merge_adapter(model)).eval(), tokenizer


def logits_of(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


# ------------------------------------------------------------------------------------------------ GGUF

def test_gguf_round_trip_transformers_reads_what_the_merged_model_computes(sft_run, tmp_path):
    """F32 is exact, F16 within half-precision rounding, Q8_0 equals the Q8_0-rounded weights exactly and
    stays within the stated bound of the float model; the tokenizer and chat template survive."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference, tokenizer = merged_reference(sft_run)
    adapter_effect = (logits_of(reference, tokenizer(PROMPTS[0])["input_ids"])
                      - logits_of(unwrap(load_model_and_tokenizer(str(sft_run.parent / "base"), device="cpu",
                                                                  dtype="float32")[0]),
                                  tokenizer(PROMPTS[0])["input_ids"])).abs().max()
    assert adapter_effect > 1e-3  # the LoRA update is really in the exported weights
    quantized, _ = merged_reference(sft_run)
    with torch.no_grad():  # the Q8_0 rounding of every matrix, by the definition: 32-weight blocks, scale amax/127
        for parameter in quantized.parameters():
            if parameter.ndim == 2:
                blocks = parameter.reshape(-1, 32)
                scale = blocks.abs().amax(-1, keepdim=True) / 127
                steps = torch.round(blocks * torch.where(scale == 0, torch.zeros_like(scale), 1 / scale))
                parameter.copy_((steps * scale.half().float()).reshape(parameter.shape))
    for kind, quant, dtype in (("F32", None, "f32"), ("F16", None, "f16"), ("Q8_0", "q8_0", None)):
        result = export_model(sft_run, tmp_path / kind.lower(), format="gguf", dtype=dtype, quant=quant)
        assert result.path.name == f"run-{kind}.gguf" and result.card == tmp_path / kind.lower() / "README.md"
        model = AutoModelForCausalLM.from_pretrained(str(result.path.parent), gguf_file=result.path.name,
                                                     dtype=torch.float32)
        loaded = AutoTokenizer.from_pretrained(str(result.path.parent), gguf_file=result.path.name)
        assert loaded.chat_template == tokenizer.chat_template
        assert (loaded.eos_token, loaded.bos_token, loaded.pad_token) == (tokenizer.eos_token, tokenizer.bos_token,
                                                                           tokenizer.pad_token)
        for text in PROMPTS:
            ids = tokenizer(text)["input_ids"]
            assert loaded(text)["input_ids"] == ids
            expected, got = logits_of(reference, ids), logits_of(model, ids)
            if kind == "F32":
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
            elif kind == "F16":
                torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)
            else:
                torch.testing.assert_close(got, logits_of(quantized, ids), atol=1e-4, rtol=0)
                # stated bound against the float model (measured 0.004 here; SmolLM2 in docs/export.md)
                # stated bound against the float model: KL(float || Q8_0) below 1e-3 nats at every position
                # (measured at most 1e-5 here; SmolLM2 numbers in docs/export.md)
                kl = torch.nn.functional.kl_div(got.log_softmax(-1), expected.log_softmax(-1), log_target=True,
                                                reduction="none").sum(-1)
                assert 0 < kl.max() < 1e-3


def test_llama_cpp_itself_runs_the_exported_gguf(sft_run, tmp_path):
    """llama.cpp (llama-cpp-python, when installed: it compiles llama.cpp, so CI does not have it) tokenizes
    like the tokenizer, reads the chat template, and computes the merged model's logits."""
    llama_cpp = pytest.importorskip("llama_cpp")
    reference, tokenizer = merged_reference(sft_run)
    for quant, dtype in ((None, "f32"), ("q8_0", None)):
        result = export_model(sft_run, tmp_path / (quant or dtype), format="gguf", dtype=dtype, quant=quant)
        llm = llama_cpp.Llama(model_path=str(result.path), n_ctx=128, logits_all=True, n_threads=1, verbose=False)
        try:
            assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
            for text in PROMPTS:
                ids = tokenizer(text)["input_ids"]
                assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
                llm.reset()
                llm.eval(ids)
                got = torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))
                expected = logits_of(reference, ids)
                if quant is None:
                    torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)
                else:  # llama.cpp also rounds activations to 8 bits in Q8_0 products
                    kl = torch.nn.functional.kl_div(got.log_softmax(-1), expected.log_softmax(-1), log_target=True,
                                                    reduction="none").sum(-1)
                    assert kl.max() < 1e-3
        finally:
            llm.close()


def test_gguf_file_holds_llama_cpp_metadata_and_permuted_tensors(tmp_path):
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(tokenizer)
    info = write_gguf(model, tokenizer, tmp_path / "m.gguf", "q8_0", name="tiny")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("general.name") == "tiny"
    assert field("general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert (field("llama.block_count"), field("llama.embedding_length"), field("llama.attention.head_count"),
            field("llama.attention.head_count_kv"), field("llama.rope.dimension_count")) == (2, 32, 4, 2, 8)
    assert field("llama.rope.freq_base") == pytest.approx(10000.0)
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "smollm"  # no digit merges
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert len(tokens) == model.config.vocab_size == len(tokenizer)
    assert [tokens[i] for i in range(5)] == ["<unk>", "<pad>", "<s>", "<|im_start|>", "<|im_end|>"]
    assert types[:5] == [int(gguf.TokenType.CONTROL)] * 5 and set(types[5:]) == {int(gguf.TokenType.NORMAL)}
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert len(field("tokenizer.ggml.merges")) == len(merges)
    assert (field("tokenizer.ggml.eos_token_id"), field("tokenizer.ggml.padding_token_id")) == (4, 1)
    assert field("tokenizer.ggml.add_bos_token") is False
    assert field("tokenizer.chat_template") == tokenizer.chat_template
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" in tensors and info["tensors"] == {"q8_0": 16, "f32": 5}
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["blk.1.attn_k.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    # the key projection is stored in GGML's rope order: un-permuting the file's rows gives transformers' weight
    key = gguf.dequantize(tensors["blk.1.attn_k.weight"].data, gguf.GGMLQuantizationType.Q8_0)
    inverse = key.reshape(2, 8 // 2, 2, 32).swapaxes(1, 2).reshape(16, 32)  # 2 kv heads of 8
    original = model.model.layers[1].self_attn.k_proj.weight.detach().numpy()
    assert np.abs(inverse - original).max() < np.abs(original).max() / 127
    assert not np.allclose(key, original, atol=np.abs(original).max() / 127)


def test_pre_tokenizer_name_follows_the_split_rule_digits_and_space_cleaning():
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    from alignkit.export.gguf import pre_tokenizer_name

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert pre_tokenizer_name(byte_level, {"a": 0, "1": 1, "\u0120the": 2}) == "smollm"
    assert pre_tokenizer_name(byte_level, {"a": 0, "12": 1}) == "gpt-2"  # llama.cpp's smollm would split "12"
    assert pre_tokenizer_name(byte_level, {"\u0120\u00c2\u00b2": 0}) == "gpt-2"  # " ²" is a number too
    assert pre_tokenizer_name(byte_level, {"\u00e4\u00b8\u0122": 0, "1": 1}) == "smollm"  # "一" is a letter
    assert pre_tokenizer_name(byte_level, {"a": 0}, clean_up_spaces=True) == "gpt-2"
    llama3 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": GGUF_PRE_TOKENIZER_SPLITS["llama3"]}, "behavior": "Isolated"},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}
    assert pre_tokenizer_name(llama3) == "llama-bpe"
    llama3["pretokenizers"][0]["pattern"]["Regex"] = "[0-9]+"
    with pytest.raises(ExportError, match="no name for"):
        pre_tokenizer_name(llama3)


def test_permute_for_rope_pairs_the_halves_of_each_head():
    rows = np.arange(8, dtype=np.float32)[:, None]  # one head of 8: halves [0 1 2 3] and [4 5 6 7]
    assert permute_for_rope(rows, 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_gguf_of_tied_embeddings_has_no_output_tensor_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    tokenizer = make_tiny_tokenizer()
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, rope_parameters={"rope_type": "linear",
                                                                               "rope_theta": 5000.0, "factor": 2.0})
    model = LlamaForCausalLM(config).eval()
    write_gguf(model, tokenizer, tmp_path / "tied.gguf", "f32")
    reader = gguf.GGUFReader(str(tmp_path / "tied.gguf"))
    assert "output.weight" not in {t.name for t in reader.tensors}
    assert reader.fields["llama.attention.key_length"].contents() == 16  # head_dim * heads != hidden_size
    assert reader.fields["llama.rope.scaling.factor"].contents() == pytest.approx(2.0)
    assert reader.fields["llama.rope.scaling.type"].contents() == "linear"
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tied.gguf", dtype=torch.float32)
    assert loaded.config.tie_word_embeddings
    ids = tokenizer(PROMPTS[1])["input_ids"]
    # transformers' GGUF reader does not read RoPE scaling back, so compare against the unscaled model
    config.rope_parameters = {"rope_type": "default", "rope_theta": 5000.0}
    plain = LlamaForCausalLM(config).eval()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(logits_of(loaded, ids), logits_of(plain, ids), atol=1e-5, rtol=0)


def test_llama3_rope_divisors_reproduce_transformers_inverse_frequencies(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 64})
    model = LlamaForCausalLM(config).eval()
    write_gguf(model, tokenizer, tmp_path / "l3.gguf", "f16")
    reader = gguf.GGUFReader(str(tmp_path / "l3.gguf"))
    divisors = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data
    plain = 1.0 / 500000.0 ** (np.arange(0, 32, 2) / 32)
    # llama.cpp divides each plain frequency by its factor; that must give transformers' llama3 frequencies
    np.testing.assert_allclose(plain / divisors, model.model.rotary_emb.inv_freq.numpy(), rtol=1e-5)
    assert divisors.min() == pytest.approx(1.0) and divisors.max() == pytest.approx(8.0)


def test_gguf_refuses_what_it_cannot_write_with_one_line(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = make_tiny_tokenizer()
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ExportError, match="supports LlamaForCausalLM; this model is Qwen2ForCausalLM"):
        write_gguf(qwen, tokenizer, tmp_path / "q.gguf")
    biased = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32,
                                          num_hidden_layers=1, num_attention_heads=4, attention_bias=True))
    with pytest.raises(ExportError, match="attention biases"):
        write_gguf(biased, tokenizer, tmp_path / "b.gguf")
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    spm = Tokenizer(models.BPE(vocab={"<unk>": 0, "▁a": 1, "a": 2, "▁": 3}, merges=[("▁", "a")],
                               byte_fallback=True, unk_token="<unk>"))
    spm.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    spm.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback()])
    small = LlamaForCausalLM(LlamaConfig(vocab_size=4, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=4))
    with pytest.raises(ExportError, match="SentencePiece"):
        write_gguf(small, PreTrainedTokenizerFast(tokenizer_object=spm, unk_token="<unk>"), tmp_path / "s.gguf")
    digits = make_tiny_tokenizer()
    digits.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    with pytest.raises(ExportError, match="--tokenizer-pre"):
        write_gguf(make_tiny_model(digits), digits, tmp_path / "d.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".tmp-*"))


def test_fallback_chat_template_renders_what_training_rendered(tmp_path):
    from alignkit.data.tokenize import fallback_end_marker, render_fallback_template

    tokenizer = make_tiny_tokenizer(chat_template=None)
    template = fallback_chat_template(tokenizer)
    messages = [{"role": "system", "content": "be brief"}, *CHATS[0]]
    rendered = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == render_fallback_template(messages, True, fallback_end_marker(tokenizer))
    write_gguf(make_tiny_model(tokenizer), tokenizer, tmp_path / "f.gguf", "f32")
    assert gguf.GGUFReader(str(tmp_path / "f.gguf")).fields["tokenizer.chat_template"].contents() == template


# ------------------------------------------------------------------------------------------------ merged + reward

@pytest.fixture(scope="module")
def reward_folder(tmp_path_factory):
    """A LoRA reward model whose tokenizer pads with its end-of-turn token, as SmolLM2's does, and whose
    head has a non-zero bias."""
    root = tmp_path_factory.mktemp("rm")
    tokenizer = make_tiny_tokenizer()
    tokenizer.pad_token = "<|im_end|>"
    save_model(make_tiny_model(tokenizer, seed=3), tokenizer, root / "base")
    backbone, tokenizer = load_model_and_tokenizer(str(root / "base"), device="cpu", dtype="float32")
    backbone = add_lora(backbone, rank=4, dropout=0.0)
    torch.manual_seed(5)
    for name, parameter in backbone.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.2)
    model = ScalarHeadModel(backbone)
    torch.nn.init.constant_(model.head.bias, 0.375)
    model.save(root / "final", tokenizer)
    return root / "final"


def alignkit_rewards(folder, conversations):
    """alignkit's reward of each conversation, read where alignkit reads it, and the token ids scored."""
    from alignkit.data import tokenize_prompt_response

    model, tokenizer = load_scalar_model(folder, device="cpu", dtype="float32")
    rows = []
    for conversation in conversations:
        prompt, response, _ = tokenize_prompt_response(tokenizer, conversation[:-1], conversation[-1]["content"], None)
        rows.append(prompt + response)
    with torch.no_grad():
        scores = [model.sequence_scores(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long)).item()
                  for row in rows]
    return scores, rows


PLAIN_TRANSFORMERS = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
merged, reward, ids, rows = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
model = AutoModelForCausalLM.from_pretrained(merged)
tokenizer = AutoTokenizer.from_pretrained(merged)
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0].tolist()
text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
classifier = AutoModelForSequenceClassification.from_pretrained(reward)
reward_tokenizer = AutoTokenizer.from_pretrained(reward)
width = max(len(row) for row in rows)
padded = [row + [reward_tokenizer.pad_token_id] * (width - len(row)) for row in rows]
mask = [[1] * len(row) + [0] * (width - len(row)) for row in rows]
with torch.no_grad():
    scores = classifier(input_ids=torch.tensor(padded), attention_mask=torch.tensor(mask)).logits[:, 0].tolist()
print(json.dumps({"logits": logits, "template": text, "scores": scores, "dtype": str(model.dtype),
                  "alignkit_imported": any(name.startswith("alignkit") for name in sys.modules),
                  "classifier": type(classifier).__name__, "bias": classifier.config.alignkit_score_bias}))
"""


def test_plain_transformers_loads_the_merged_and_reward_exports(sft_run, reward_folder, tmp_path):
    """A subprocess with only transformers (no alignkit import) reproduces alignkit's logits and rewards."""
    merged = export_model(sft_run, tmp_path / "merged", format="merged")
    reward = export_model(reward_folder, tmp_path / "reward", format="merged")
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "README.md"} <= {p.name for p in merged.path.iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert {oct(p.stat().st_mode & 0o777) for p in [*merged.path.iterdir(), *reward.path.iterdir()]} == \
        {oct(0o666 & ~umask)}  # not the 0600 of temporary files: servers and other users read exports
    config = json.loads((merged.path / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] and config["torch_dtype"] == "float32"
    assert json.loads((merged.path / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"
    assert any("bias +0.375" in note for note in reward.notes)
    card = (reward.path / "README.md").read_text()  # a model folder, not a run: the card names where it came from
    assert f"| base model | `{reward_folder}` |" in card and "alignkit_score_bias" in card
    reference, tokenizer = merged_reference(sft_run)
    ids = tokenizer(PROMPTS[0])["input_ids"]
    conversations = [CHATS[0], CHATS[2], [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]]
    expected_scores, rows = alignkit_rewards(reward_folder, conversations)
    process = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, str(merged.path), str(reward.path),
                              json.dumps(ids), json.dumps(rows)], capture_output=True, text=True, timeout=300,
                             env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert process.returncode == 0, process.stderr[-2000:]
    out = json.loads(process.stdout.strip().splitlines()[-1])
    assert out["alignkit_imported"] is False and out["classifier"] == "LlamaForSequenceClassification"
    torch.testing.assert_close(torch.tensor(out["logits"]), logits_of(reference, ids), atol=1e-5, rtol=0)
    assert out["template"] == tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                            add_generation_prompt=True)
    # right-padded batch, padding with the exported pad token: transformers' score + the head's bias = alignkit's
    assert out["bias"] == pytest.approx(0.375)
    np.testing.assert_allclose(np.array(out["scores"]) + 0.375, expected_scores, atol=1e-5)
    assert reward.details["pad_token_id"] == 0  # not '<|im_end|>' (id 4), which the tokenizer padded with


def test_reward_export_to_gguf_and_quant_on_merged_are_refused(reward_folder, sft_run, tmp_path, capsys):
    assert main(["export", str(reward_folder), "--format", "gguf", "--out", str(tmp_path / "x")]) == 2
    assert "has no GGUF form" in capsys.readouterr().err
    assert main(["export", str(sft_run), "--format", "merged", "--quant", "q8_0", "--out", str(tmp_path / "y")]) == 2
    assert "--quant applies to --format gguf" in capsys.readouterr().err
    unfinished = tmp_path / "crashed"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("method: sft\n")
    assert main(["export", str(unfinished), "--out", str(tmp_path / "z")]) == 2
    assert "has no final/ folder: the run did not finish" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


# ------------------------------------------------------------------------------------------------ cards

def _card(path):
    card = ModelCard.load(path)
    return card.data.to_dict(), card.text


def test_run_card_records_settings_row_counts_metrics_and_command(sft_run):
    data, text = _card(sft_run / "final" / "README.md")
    assert data["library_name"] == "peft" and data["pipeline_tag"] == "text-generation"
    assert data["tags"] == ["alignkit", "sft", "lora"] and "base_model" not in data  # a local base: no hub link
    summary = json.loads((sft_run / "summary.json").read_text())
    assert f"{sft_run.parent / 'train.jsonl'}: read 4 rows, kept 4, skipped 0" in text
    assert summary["notes"] and all(f"- {note}" in text for note in summary["notes"])  # every data note, verbatim
    assert f"optimizer steps: {summary['steps']} in {summary['seconds']} s" in text
    assert "| learning_rate | `0.05` |" in text and "LoRA rank 4, alpha 8.0" in text
    loss = summary["last_eval"]["eval/loss"]
    assert f"| eval/loss | {summary['first_eval']['eval/loss']:.4g} | {loss:.4g} |" in text
    assert (sft_run / "command.txt").read_text().strip() == f"alignkit sft --config {sft_run.parent / 'sft.yaml'}"
    assert f"- training: `alignkit sft --config {sft_run.parent / 'sft.yaml'}`" in text


def test_card_front_matter_names_hub_models_and_data_only(tmp_path):
    facts = RunFacts(None, {"method": "dpo", "model": {"name_or_path": "smollm2-135m-instruct"},
                            "lora": {"enabled": False},
                            "data": {"train": "hf://Anthropic/hh-rlhf", "validation": "examples/data/x.jsonl"}})
    metadata = card_metadata(facts, "transformers")
    assert metadata == {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "library_name": "transformers",
                        "tags": ["alignkit", "dpo"], "datasets": ["Anthropic/hh-rlhf"]}
    facts.config["model"]["name_or_path"] = "meta-llama/Llama-3.2-1B-Instruct"
    assert card_metadata(facts, "gguf")["base_model"] == "meta-llama/Llama-3.2-1B-Instruct"
    (tmp_path / "alignkit.json").write_text(json.dumps({"base_model_id": "meta-llama/Llama-3.2-1B"}))
    facts.config["model"]["name_or_path"] = str(tmp_path)  # a DPO run started from an SFT run's final/
    assert card_metadata(facts, "gguf")["base_model"] == "meta-llama/Llama-3.2-1B"


def test_export_card_quotes_eval_report_intervals_and_both_commands(sft_run, tmp_path, monkeypatch, capsys):
    from alignkit.evaluate.report import write_report
    from alignkit.evaluate.stats import wilson_interval

    low, high = wilson_interval(17, 20)
    write_report({"accuracy": {"accuracy": 0.85, "accuracy_interval": [low, high], "n": 20}}, tmp_path / "eval",
                 {"data": "held-out.jsonl", "seed": 0})
    monkeypatch.setattr(sys, "argv", ["alignkit", "export", str(sft_run), "--format", "gguf"])
    assert main(["export", str(sft_run), "--format", "gguf", "--quant", "q8_0", "--out", str(tmp_path / "out"),
                 "--eval-report", str(tmp_path / "eval")]) == 0
    assert "exported gguf" in capsys.readouterr().out
    data, text = _card(tmp_path / "out" / "README.md")
    assert data["library_name"] == "gguf" and {"gguf", "llama.cpp", "sft"} <= set(data["tags"])
    assert f"| accuracy | 0.85 | [{low:.4g}, {high:.4g}] | 20 |" in text
    assert "`run-Q8_0.gguf`: GGUF, architecture `llama`, weights Q8_0 (5 F32, 16 Q8_0 tensors" in text
    assert f"- export: `alignkit export {sft_run} --format gguf`" in text
    assert "- training: `alignkit sft --config" in text
    assert "llama-cli -m run-Q8_0.gguf" in text


def test_card_command_rewrites_final_card_and_keeps_foreign_readmes(sft_run, tmp_path):
    from alignkit.export.card import write_card

    foreign = tmp_path / "README.md"
    foreign.write_text("# my own notes\n")
    assert write_card(tmp_path, "---\ntags: [alignkit]\n---\n") is None and foreign.read_text() == "# my own notes\n"
    report_dir = sft_run / "eval-after"
    from alignkit.evaluate.report import write_report

    write_report({"accuracy": {"accuracy": 0.5, "accuracy_interval": [0.3, 0.7], "n": 10}}, report_dir, {})
    try:
        assert main(["card", str(sft_run)]) == 0  # reports inside the run folder are found without --eval-report
        assert "| accuracy | 0.5 | [0.3, 0.7] | 10 |" in (sft_run / "final" / "README.md").read_text()
    finally:
        import shutil

        shutil.rmtree(report_dir)


# ------------------------------------------------------------------------------------------------ push

def test_push_uploads_the_final_folder_with_its_card(sft_run, tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled

    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("create", (repo_id, kw)))

    def upload_folder(self, **kw):
        from huggingface_hub.utils import filter_repo_objects
        from pathlib import Path

        folder = Path(kw["folder_path"])
        every = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        calls["files"] = sorted(filter_repo_objects(every, allow_patterns=kw["allow_patterns"],
                                                    ignore_patterns=kw["ignore_patterns"]))
        calls["upload"] = kw
        return "https://hub.example/commit/1"

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    junk = sft_run / "final" / ".tmp-final-abc"
    junk.mkdir()
    (junk / "partial.bin").write_text("x")
    try:
        assert main(["push", str(sft_run), "--repo", "me/tiny-sft", "--private"]) == 0
    finally:
        junk.joinpath("partial.bin").unlink()
        junk.rmdir()
    assert calls["create"] == ("me/tiny-sft", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls["upload"]["folder_path"] == str(sft_run / "final") and calls["upload"]["repo_id"] == "me/tiny-sft"
    assert calls["files"] == sorted(["README.md", "adapter_config.json", "adapter_model.safetensors", "alignkit.json",
                                     "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"])
    captured = capsys.readouterr()
    assert "7 files" in captured.out and "  README.md" in captured.out
    assert "the adapter's base model is" in captured.err and "which the Hub cannot load" in captured.err
    assert 'AutoPeftModelForCausalLM.from_pretrained("me/tiny-sft")' in (sft_run / "final" / "README.md").read_text()

    gguf_dir = tmp_path / "gguf"
    export_model(sft_run, gguf_dir, format="gguf", dtype="f32")
    (gguf_dir / "notes.txt").write_text("not for the hub")
    calls.clear()
    assert main(["push", str(gguf_dir / "run-F32.gguf"), "--repo", "me/tiny-sft-GGUF", "--dry-run"]) == 0
    assert calls == {} and "2 files" in capsys.readouterr().out
    assert main(["push", str(gguf_dir / "run-F32.gguf"), "--repo", "me/tiny-sft-GGUF"]) == 0
    assert calls["files"] == ["README.md", "run-F32.gguf"]

    def offline(self, *args, **kwargs):
        raise OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled.")

    monkeypatch.setattr(HfApi, "create_repo", offline)
    assert main(["push", str(sft_run), "--repo", "me/tiny-sft"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("alignkit: error: push to me/tiny-sft failed: OfflineModeIsEnabled")


def test_resolve_source_of_run_final_and_model_folders(sft_run, reward_folder):
    run = resolve_source(sft_run)
    assert (run.model_path, run.kind, run.name, run.run_dir) == (str(sft_run / "final"), "causal", "run", sft_run)
    assert resolve_source(sft_run / "final").run_dir == sft_run
    reward = resolve_source(reward_folder)
    assert reward.kind == "reward" and reward.run_dir is None and reward.is_scalar
