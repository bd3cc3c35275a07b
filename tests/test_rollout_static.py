"""The static-cache rollout engine against transformers on tiny random Llama / Qwen2 / Mistral models.

Every test compares with an independent reference (``transformers.generate``, a fresh forward pass,
a PEFT model's own generation, the exact sampling distribution) so a wrong mask, rope, bias, window,
cache slot, sampler or stop rule makes it fail.
"""
from __future__ import annotations

import logging

import pytest
import torch

from alignkit.model.forward import model_token_logprobs
from alignkit.rollout.base import SamplingParams
from alignkit.rollout.static import (
    StaticCacheBackend,
    _Sampler,
    supports,
    unsupported_reason,
)
from tests.helpers import make_tiny_model, make_tiny_tokenizer

TEXTS = ["hello the cat is", "what", "one two three four five six seven eight nine ten", "red green"]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def llama(tokenizer):
    return make_tiny_model(tokenizer)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    ids = [tokenizer.encode(text) for text in TEXTS]
    assert len({len(row) for row in ids}) == len(ids)  # ragged: left padding is exercised
    return ids


def _config_kwargs(tokenizer, **extra):
    kwargs = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                  bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False)
    kwargs.update(extra)
    return kwargs


def _scaled_init(model, std=0.3):
    """Random weights large enough that the next-token distribution is far from uniform."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.normal_(0, std)
    return model.eval()


def make_qwen2(tokenizer, **extra):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = _scaled_init(Qwen2ForCausalLM(Qwen2Config(**_config_kwargs(tokenizer, rope_parameters={
        "rope_type": "default", "rope_theta": 1000.0}, **extra))))
    assert model.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0  # biases really in play
    return model


def make_mistral(tokenizer, window=6):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    return _scaled_init(MistralForCausalLM(MistralConfig(**_config_kwargs(
        tokenizer, sliding_window=window, head_dim=16))))


def make_llama_variant(tokenizer, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return _scaled_init(LlamaForCausalLM(LlamaConfig(**_config_kwargs(tokenizer, **extra))))


def hf_greedy(model, tokenizer, prompts, max_new_tokens, eos_ids):
    """transformers.generate(do_sample=False) on a left-padded batch; rows cut after the first EOS."""
    width = max(len(row) for row in prompts)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in prompts])
    attention = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in prompts])
    output = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                            do_sample=False, temperature=None, top_p=None, top_k=None,
                            pad_token_id=pad, eos_token_id=eos_ids)
    rows = []
    for row in output[:, width:].tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in eos_ids), len(row))
        rows.append(row[:end])
    return rows


def completions(batch):
    return [row[mask.bool()].tolist() for row, mask in zip(batch.completion_ids, batch.completion_mask)]


def greedy(max_new_tokens=16, **kwargs):
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, **kwargs)


# --------------------------------------------------------------------------------------------------
# greedy == transformers.generate


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral-sliding-window", "qwen2-sliding-layer",
                                    "llama3-rope-tied", "yarn-rope"])
def test_greedy_matches_transformers_generate(family, tokenizer, llama, prompts):
    model = {
        "llama": lambda: llama,
        "qwen2": lambda: make_qwen2(tokenizer),
        "mistral-sliding-window": lambda: make_mistral(tokenizer, window=6),
        # layer 0 full attention, layer 1 a 5-token window
        "qwen2-sliding-layer": lambda: make_qwen2(tokenizer, use_sliding_window=True, sliding_window=5,
                                                  max_window_layers=1),
        "llama3-rope-tied": lambda: make_llama_variant(tokenizer, tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
        "yarn-rope": lambda: make_llama_variant(tokenizer, rope_parameters={
            "rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0, "original_max_position_embeddings": 8}),
    }[family]()
    if family == "yarn-rope":  # yarn also scales cos/sin: make sure that path is exercised
        assert model.model.rotary_emb.attention_scaling != 1.0
    assert supports(model), unsupported_reason(model)
    eos = [tokenizer.eos_token_id]
    batch = StaticCacheBackend().generate(model, tokenizer, prompts, 1, greedy(16, eos_token_ids=eos))
    expected = hf_greedy(model, tokenizer, prompts, 16, eos)
    assert completions(batch) == expected
    assert sum(len(row) for row in expected) > 2 * len(prompts)  # the comparison covers real decoding


def test_sliding_window_changes_the_output(tokenizer, prompts):
    """Guards the Mistral case above: with window 6 the output must differ from a full-attention run."""
    windowed, full = make_mistral(tokenizer, window=6), make_mistral(tokenizer, window=None)
    full.load_state_dict(windowed.state_dict())
    backend = StaticCacheBackend()
    a = backend.generate(windowed, tokenizer, prompts, 1, greedy(16, eos_token_ids=[-1]))
    b = backend.generate(full, tokenizer, prompts, 1, greedy(16, eos_token_ids=[-1]))
    assert completions(a) != completions(b)
    assert completions(b) == hf_greedy(full, tokenizer, prompts, 16, [-1])


def test_groups_are_laid_out_prompt_after_prompt(tokenizer, llama, prompts):
    batch = StaticCacheBackend().generate(llama, tokenizer, prompts, 3, greedy(8, eos_token_ids=[-1]))
    assert batch.group_size == 3 and batch.completion_ids.shape == (12, 8)
    assert batch.prompt_ids == [row for row in prompts for _ in range(3)]
    expected = hf_greedy(llama, tokenizer, prompts, 8, [-1])
    assert completions(batch) == [row for row in expected for _ in range(3)]
    assert batch.truncated.all()


# --------------------------------------------------------------------------------------------------
# sampling


def _forward_logprobs(model, prompt, completion, temperature):
    ids = torch.tensor([prompt + completion])
    logps = model_token_logprobs(model, ids, torch.ones_like(ids), temperature=temperature)
    return logps[0, len(prompt) - 1:]


def test_sampling_is_reproducible_and_logprobs_match_a_forward_pass(tokenizer, prompts):
    model = make_qwen2(tokenizer)
    backend = StaticCacheBackend()
    params = SamplingParams(max_new_tokens=12, temperature=0.7, top_p=0.9, top_k=50, seed=123)
    first = backend.generate(model, tokenizer, prompts, 2, params)
    again = backend.generate(model, tokenizer, prompts, 2, params)
    other = backend.generate(model, tokenizer, prompts, 2,
                             SamplingParams(max_new_tokens=12, temperature=0.7, top_p=0.9, top_k=50, seed=7))
    assert torch.equal(first.completion_ids, again.completion_ids)
    assert torch.equal(first.sampling_logprobs, again.sampling_logprobs)
    assert not torch.equal(first.completion_ids, other.completion_ids)
    assert not torch.equal(first.completion_ids[0], first.completion_ids[1])  # each row has its own noise
    for row, completion in enumerate(completions(first)):
        reference = _forward_logprobs(model, first.prompt_ids[row], completion, temperature=0.7)
        got = first.sampling_logprobs[row, :len(completion)]
        torch.testing.assert_close(got, reference, atol=2e-5, rtol=1e-5)
        assert (first.sampling_logprobs[row, len(completion):] == 0).all()


def test_greedy_logprobs_are_untempered_forward_logprobs(tokenizer, llama, prompts):
    batch = StaticCacheBackend().generate(llama, tokenizer, prompts, 1, greedy(10, eos_token_ids=[-1]))
    for row, completion in enumerate(completions(batch)):
        reference = _forward_logprobs(llama, prompts[row], completion, temperature=1.0)
        torch.testing.assert_close(batch.sampling_logprobs[row], reference, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("settings", [dict(top_k=1), dict(top_p=1e-6), dict(top_k=3, top_p=1e-6)])
def test_top_k_one_and_tiny_top_p_equal_greedy(settings, tokenizer, prompts):
    model = make_qwen2(tokenizer)
    backend = StaticCacheBackend()
    reference = backend.generate(model, tokenizer, prompts, 1, greedy(12, eos_token_ids=[-1]))
    sampled = backend.generate(model, tokenizer, prompts, 2, SamplingParams(
        max_new_tokens=12, temperature=1.0, seed=3, eos_token_ids=[-1], **settings))
    assert completions(sampled) == [row for row in completions(reference) for _ in range(2)]
    torch.testing.assert_close(sampled.sampling_logprobs[::2], reference.sampling_logprobs)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 3, 1.0),
                                                     (1.0, 0, 0.7), (2.0, 4, 0.8)])
def test_sampler_draws_from_the_filtered_distribution(temperature, top_k, top_p):
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    rows = 40000
    expected = torch.softmax(logits[0] / temperature, -1)
    if top_k:
        expected[expected < torch.topk(expected, top_k).values[-1]] = 0
        expected /= expected.sum()
    if top_p < 1:
        before = torch.cumsum(expected, 0) - expected   # logits are already sorted, largest first
        expected[before >= top_p] = 0
        expected /= expected.sum()
    generator = torch.Generator().manual_seed(0)
    noise = torch.empty(rows, logits.shape[1]).exponential_(generator=generator)
    tokens, logps = _Sampler(temperature, top_k, top_p)(logits.expand(rows, -1), noise)
    frequencies = torch.bincount(tokens, minlength=logits.shape[1]).float() / rows
    torch.testing.assert_close(frequencies, expected, atol=0.01, rtol=0)
    unfiltered = torch.log_softmax(logits[0] / temperature, -1)
    torch.testing.assert_close(logps, unfiltered[tokens])


# --------------------------------------------------------------------------------------------------
# stopping


def test_eos_ends_each_row_at_its_first_eos_and_pads_after(tokenizer, prompts):
    model = make_qwen2(tokenizer)
    backend = StaticCacheBackend()
    params = dict(max_new_tokens=14, temperature=1.0, seed=11)
    free = backend.generate(model, tokenizer, prompts, 2, SamplingParams(eos_token_ids=[-1], **params))
    rows = free.completion_ids.tolist()
    # choose as "EOS" the tokens sampled at step 2 of row 0 and step 9 of row 3: the same seed gives
    # the same samples up to each row's first EOS, whatever other rows do
    eos = [rows[0][2], rows[3][9]]
    stopped = backend.generate(model, tokenizer, prompts, 2, SamplingParams(eos_token_ids=eos, **params))
    pad = tokenizer.pad_token_id
    for row, full in enumerate(rows):
        end = next((i + 1 for i, token in enumerate(full) if token in eos), None)
        length = int(stopped.completion_mask[row].sum())
        assert length == (end or 14)
        assert stopped.truncated[row].item() == (end is None)
        assert stopped.completion_ids[row, :length].tolist() == full[:length]
        assert (stopped.completion_ids[row, length:] == pad).all()
        assert (stopped.sampling_logprobs[row, length:] == 0).all()
        torch.testing.assert_close(stopped.sampling_logprobs[row, :length], free.sampling_logprobs[row, :length])
        assert stopped.completion_mask[row, :length].eq(1).all()
        body = full[:length - 1] if end else full           # the EOS token is not part of the text
        assert stopped.texts[row] == tokenizer.decode(body, skip_special_tokens=True)
    assert stopped.truncated.any() and not stopped.truncated.all()
    # EOS as the very last allowed token: finished, not truncated
    last = next(i + 1 for i, token in enumerate(rows[3]) if token in eos)
    exact = backend.generate(model, tokenizer, prompts, 2, SamplingParams(
        eos_token_ids=eos, **{**params, "max_new_tokens": last}))
    assert exact.completion_mask[3].sum() == last and not exact.truncated[3]


def test_eos_forced_through_the_lm_head_ends_generation(tokenizer, prompts):
    """Bias the head so EOS beats prompt 0's greedy first token: that row is one EOS token long."""
    model = make_llama_variant(tokenizer)
    eos = tokenizer.eos_token_id
    plain = StaticCacheBackend().generate(model, tokenizer, prompts, 1, greedy(8, eos_token_ids=[-1]))
    first = int(plain.completion_ids[0, 0])
    with torch.no_grad():
        model.lm_head.weight[eos] = 2 * model.lm_head.weight[first]
    batch = StaticCacheBackend().generate(model, tokenizer, prompts, 2, greedy(8))  # default EOS ids
    assert completions(batch) == [row for row in hf_greedy(model, tokenizer, prompts, 8, [eos]) for _ in range(2)]
    assert batch.completion_ids[0, 0] == eos and batch.completion_mask[0].sum() == 1
    assert not batch.truncated[0] and batch.texts[0] == ""
    assert batch.sampling_logprobs[0, 0] < 0 and (batch.sampling_logprobs[0, 1:] == 0).all()


@pytest.mark.parametrize("sync_every", [1, 5])
def test_stop_string_cuts_at_the_exact_token(sync_every, tokenizer, llama, prompts):
    backend = StaticCacheBackend(sync_every=sync_every)
    free = backend.generate(llama, tokenizer, prompts, 1, greedy(16, eos_token_ids=[-1]))
    text = free.texts[0]
    start = next(i for i in range(4, len(text) - 1) if text[i:i + 2].isascii() and text[i:i + 2].isalpha())
    stop = text[start:start + 2]
    batch = backend.generate(llama, tokenizer, prompts, 1, greedy(16, eos_token_ids=[-1], stop_strings=[stop]))
    for row in range(len(prompts)):
        tokens = free.completion_ids[row].tolist()
        decode = lambda k, skip=False: tokenizer.decode(tokens[:k], skip_special_tokens=skip)  # noqa: E731
        first = next((k for k in range(1, 17) if stop in decode(k)), None)
        length = int(batch.completion_mask[row].sum())
        if first is None:
            assert length == 16 and batch.truncated[row] and batch.texts[row] == free.texts[row]
        else:
            assert length == first and not batch.truncated[row]
            assert batch.completion_ids[row, :length].tolist() == tokens[:length]
            assert (batch.completion_ids[row, length:] == tokenizer.pad_token_id).all()
            assert batch.texts[row] == decode(first, True)[:decode(first, True).find(stop)]
            assert stop not in batch.texts[row]
    assert not batch.truncated[0]


def test_padding_never_leaks(tokenizer, llama, prompts):
    batch = StaticCacheBackend().generate(llama, tokenizer, prompts, 2, SamplingParams(
        max_new_tokens=10, temperature=1.0, seed=5))
    pad = tokenizer.pad_token_id
    # each prompt alone (no padding at all) gives the same tokens as inside the ragged batch
    together = completions(StaticCacheBackend().generate(llama, tokenizer, prompts, 1, greedy(10)))
    for index, prompt in enumerate(prompts):
        alone = StaticCacheBackend().generate(llama, tokenizer, [prompt], 1, greedy(10))
        assert completions(alone) == [together[index]]
    assert (batch.completion_ids[batch.completion_mask == 0] == pad).all()
    assert all("<pad>" not in text for text in batch.texts)


# --------------------------------------------------------------------------------------------------
# LoRA, fallback, validation


def test_lora_samples_from_the_adapted_policy_without_touching_weights(tokenizer, prompts):
    from alignkit.model import add_lora

    base = make_llama_variant(tokenizer)
    before = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    plain = StaticCacheBackend().generate(base, tokenizer, prompts, 1, greedy(12, eos_token_ids=[-1]))
    model = add_lora(base, rank=4, alpha=8, dropout=0.0)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    model.eval()
    assert supports(model)
    batch = StaticCacheBackend().generate(model, tokenizer, prompts, 1, greedy(12, eos_token_ids=[-1]))
    assert completions(batch) == hf_greedy(model, tokenizer, prompts, 12, [-1])
    assert completions(batch) != completions(plain)          # the adapter really changes the policy
    with model.disable_adapter():
        disabled = StaticCacheBackend().generate(model, tokenizer, prompts, 1, greedy(12, eos_token_ids=[-1]))
    assert completions(disabled) == completions(plain)
    after = model.get_base_model().state_dict()
    for name, tensor in before.items():
        key = next(k for k in after if k.replace(".base_layer", "") == name)
        assert torch.equal(after[key], tensor), name
    assert not any(getattr(module, "merged", False) for module in model.modules())


def test_unsupported_models_fall_back_to_transformers_generate(tokenizer, prompts, caplog):
    model = make_llama_variant(tokenizer, rope_parameters={"rope_type": "dynamic", "rope_theta": 1000.0,
                                                           "factor": 2.0})
    assert not supports(model) and "dynamic" in unsupported_reason(model)
    with caplog.at_level(logging.WARNING, logger="alignkit.rollout.static"):
        batch = StaticCacheBackend().generate(model, tokenizer, prompts, 1, greedy(8, eos_token_ids=[-1]))
    assert any("falling back to transformers.generate" in record.message for record in caplog.records)
    assert completions(batch) == hf_greedy(model, tokenizer, prompts, 8, [-1])


def test_invalid_requests_are_refused(tokenizer, llama):
    backend = StaticCacheBackend()
    with pytest.raises(ValueError, match="at least one token"):
        backend.generate(llama, tokenizer, [[]], 1, greedy())
    with pytest.raises(ValueError, match="top_p"):
        backend.generate(llama, tokenizer, [[5]], 1, SamplingParams(top_p=0.0))


def test_same_batch_as_the_hf_backend(tokenizer, prompts):
    """Switching backends must not change where rows stop, what the texts are, or the log-probs."""
    hf = pytest.importorskip("alignkit.rollout.hf")
    model = make_qwen2(tokenizer)
    free = StaticCacheBackend().generate(model, tokenizer, prompts, 1, greedy(14, eos_token_ids=[-1]))
    text = free.texts[1]
    start = next(i for i in range(3, len(text) - 1) if text[i:i + 2].isascii() and text[i:i + 2].isalpha())
    params = greedy(14, eos_token_ids=[free.completion_ids[2, 5].item()], stop_strings=[text[start:start + 2]])
    ours = StaticCacheBackend().generate(model, tokenizer, prompts, 2, params)
    theirs = hf.HFGenerateBackend().generate(model, tokenizer, prompts, 2, params)
    assert completions(ours) == completions(theirs)
    assert ours.texts == theirs.texts
    assert torch.equal(ours.truncated, theirs.truncated) and not ours.truncated.all()
    for row, completion in enumerate(completions(ours)):
        torch.testing.assert_close(ours.sampling_logprobs[row, :len(completion)],
                                   theirs.sampling_logprobs[row, :len(completion)], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("max_new_tokens", [2, 9])
def test_graph_capture_sequence_leaves_no_trace(max_new_tokens, tokenizer, prompts):
    """The CUDA path warms up and captures before prefill; its reset is checked here on CPU by running
    the same sequence with an eager stand-in for the graph."""
    model = make_qwen2(tokenizer)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, top_k=40, seed=4,
                            stop_strings=["zz"])
    plain = StaticCacheBackend().generate(model, tokenizer, prompts, 2, params)
    emulated_backend = StaticCacheBackend(sync_every=4)
    emulated_backend._emulate_graph = True
    emulated = emulated_backend.generate(model, tokenizer, prompts, 2, params)
    assert emulated_backend.last_stats["graph_emulated"]
    for field in ("completion_ids", "completion_mask", "sampling_logprobs", "truncated"):
        assert torch.equal(getattr(plain, field), getattr(emulated, field)), field
