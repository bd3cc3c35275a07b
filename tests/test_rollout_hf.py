"""The transformers-generate rollout backend: layout, EOS / stop strings, truncation, log-probs."""
import pytest
import torch

from alignkit.data import tokenize_prompt
from alignkit.model.forward import left_pad
from alignkit.rollout import SamplingParams, get_backend
from alignkit.rollout.hf import HFGenerateBackend, build_rollout_batch


def prompts_for(tokenizer, texts):
    return [tokenize_prompt(tokenizer, [{"role": "user", "content": t}]) for t in texts]


def test_sampling_logprobs_equal_generates_own_logits(tiny_model, tiny_tokenizer):
    prompts = prompts_for(tiny_tokenizer, ["hello the cat", "what is one plus two please answer"])
    params = SamplingParams(max_new_tokens=10, temperature=0.7, seed=3)
    batch = HFGenerateBackend().generate(tiny_model, tiny_tokenizer, prompts, 3, params)
    assert batch.completion_ids.shape[0] == 6 and batch.group_size == 3
    assert batch.prompt_ids[0] == batch.prompt_ids[2] == prompts[0] and batch.prompt_ids[3] == prompts[1]
    # The same draw through generate itself, asking for its (temperature-scaled) logits.
    ids, attention = left_pad([p for p in prompts for _ in range(3)], tiny_tokenizer.pad_token_id)
    torch.manual_seed(3)
    out = tiny_model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=10, do_sample=True,
                              temperature=0.7, top_k=0, top_p=1.0, eos_token_id=[tiny_tokenizer.eos_token_id],
                              pad_token_id=tiny_tokenizer.pad_token_id, output_logits=True,
                              return_dict_in_generate=True)
    sampled = out.sequences[:, ids.shape[1]:]
    width = batch.completion_ids.shape[1]
    assert torch.equal(sampled[:, :width], batch.completion_ids)
    expected = (torch.stack(out.logits, 1).float() / 0.7).log_softmax(-1)
    expected = expected.gather(-1, sampled[..., None]).squeeze(-1)[:, :width]
    mask = batch.completion_mask
    assert torch.allclose(expected * mask, batch.sampling_logprobs, atol=1e-4)
    assert (batch.sampling_logprobs[mask == 0] == 0).all()


def test_seed_reproduces_and_greedy_is_deterministic(tiny_model, tiny_tokenizer):
    prompts = prompts_for(tiny_tokenizer, ["red green blue"])
    backend = HFGenerateBackend(compute_logprobs=False)
    a = backend.generate(tiny_model, tiny_tokenizer, prompts, 4, SamplingParams(max_new_tokens=6, seed=11))
    b = backend.generate(tiny_model, tiny_tokenizer, prompts, 4, SamplingParams(max_new_tokens=6, seed=11))
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.isnan(a.sampling_logprobs).all()  # not computed when asked not to
    greedy = backend.generate(tiny_model, tiny_tokenizer, prompts, 3, SamplingParams(max_new_tokens=6, temperature=0))
    assert (greedy.completion_ids == greedy.completion_ids[0]).all()
    # no EOS drawn in 6 tokens from this model -> all cut off by the length limit
    assert greedy.truncated.all() and greedy.completion_mask.sum() == 18


def test_eos_ends_completions(tiny_model, tiny_tokenizer):
    prompts = prompts_for(tiny_tokenizer, ["cat", "dog"])
    every_token = list(range(len(tiny_tokenizer)))
    batch = HFGenerateBackend().generate(tiny_model, tiny_tokenizer, prompts, 2,
                                         SamplingParams(max_new_tokens=5, eos_token_ids=every_token, seed=0))
    assert batch.completion_ids.shape == (4, 1)  # the first token is an EOS: kept, in the mask
    assert batch.completion_mask.sum() == 4 and not batch.truncated.any()
    assert torch.isfinite(batch.sampling_logprobs).all() and (batch.sampling_logprobs < 0).all()


def test_cut_mask_and_truncation_flags(tiny_model, tiny_tokenizer):
    tok = tiny_tokenizer
    eos = tok.eos_token_id
    yes, cat, dog = (tok.convert_tokens_to_ids(t) for t in ("Ġyes", "Ġc", "Ġd"))
    assert tok.unk_token_id not in (yes, cat, dog)
    prompt = prompts_for(tok, ["hi"])[0]
    sampled = [[yes, eos, cat, cat],            # EOS at 1: keep 2 tokens (the stop string after EOS is ignored)
               [dog, dog, dog, dog],            # no EOS, no stop string: truncated
               [dog, cat, dog, eos]]            # stop string "c" completed by token 1
    params = SamplingParams(max_new_tokens=4, stop_strings=["c"])
    batch = build_rollout_batch(tiny_model, tok, [prompt] * 3, sampled, 3, params, [eos], tok.pad_token_id)
    assert batch.completion_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch.truncated.tolist() == [False, True, False]
    assert batch.completion_ids[0, :2].tolist() == [yes, eos] and batch.completion_ids[2, :2].tolist() == [dog, cat]
    assert batch.texts[0] == " yes" and batch.texts[2] == " d "  # stop string cut from the text
    assert (batch.sampling_logprobs[batch.completion_mask == 0] == 0).all()


def test_stop_strings_end_generation(tiny_model, tiny_tokenizer):
    prompts = prompts_for(tiny_tokenizer, ["one two three"])
    free = HFGenerateBackend().generate(tiny_model, tiny_tokenizer, prompts, 4, SamplingParams(max_new_tokens=12, seed=5))
    # pick a character that the free run produced, and stop on it
    text = free.texts[0]
    stop = next(ch for ch in text if ch.strip())
    stopped = HFGenerateBackend().generate(tiny_model, tiny_tokenizer, prompts, 4,
                                           SamplingParams(max_new_tokens=12, seed=5, stop_strings=[stop]))
    assert not stopped.truncated[0] and stop not in stopped.texts[0]
    assert stopped.completion_mask[0].sum() <= free.completion_mask[0].sum()
    assert text.startswith(stopped.texts[0])


def test_get_backend():
    assert get_backend("hf").name == "hf"
    assert get_backend("auto", model=None).name == "hf"  # no CUDA here: auto is the transformers backend
    assert get_backend("hf", max_batch_size=4).max_batch_size == 4
    with pytest.raises(ValueError, match="unknown rollout backend"):
        get_backend("nope")


def test_shared_prompt_prefill_and_grouped_forward_match_per_row(tiny_model, tiny_tokenizer):
    from alignkit.model.forward import (
        completion_layout,
        completion_logprobs,
        grouped_completion_logprobs,
    )

    prompts = prompts_for(tiny_tokenizer, ["hello the cat", "what is one plus two please answer"])
    params = SamplingParams(max_new_tokens=7, seed=2, stop_strings=["e"])
    shared = HFGenerateBackend(share_prefix=True).generate(tiny_model, tiny_tokenizer, prompts, 3, params)
    plain = HFGenerateBackend(share_prefix=False).generate(tiny_model, tiny_tokenizer, prompts, 3, params)
    assert torch.equal(shared.completion_ids, plain.completion_ids)
    assert torch.allclose(shared.sampling_logprobs, plain.sampling_logprobs, atol=1e-5)
    assert len(set(shared.completion_mask.sum(-1).tolist())) > 1  # ragged lengths are covered

    pad = tiny_tokenizer.pad_token_id
    layout = completion_layout(shared.prompt_ids, shared.completion_ids, shared.completion_mask, pad)
    length = shared.completion_ids.shape[1]
    weights = torch.randn(shared.completion_ids.shape) * shared.completion_mask

    def gradient(fn):
        tiny_model.zero_grad()
        logps = fn()
        (logps * weights).sum().backward()
        return logps.detach(), torch.cat([p.grad.flatten() for p in tiny_model.parameters() if p.grad is not None])

    per_row, per_row_grad = gradient(lambda: completion_logprobs(
        tiny_model, layout["input_ids"], layout["attention_mask"], layout["position_ids"], layout["prompt_width"],
        length, temperature=0.8))
    prompt_ids, prompt_attention = left_pad(prompts, pad)
    grouped, grouped_grad = gradient(lambda: grouped_completion_logprobs(
        tiny_model, prompt_ids, prompt_attention, shared.completion_ids, shared.completion_mask, 3, temperature=0.8))
    mask = shared.completion_mask.bool()
    assert torch.allclose(per_row[mask], grouped[mask], atol=1e-5)
    assert torch.allclose(per_row_grad, grouped_grad, atol=1e-5, rtol=1e-4)


def test_every_sampler_shares_one_stop_rule(tiny_model, tiny_tokenizer):
    """The static engine's finishing and plain chat generation use the same stop ids and cuts as "hf"."""
    from alignkit.generation import generate_ids
    from alignkit.rollout.static import finish_batch
    from alignkit.rollout.stops import stop_string_end, stop_token_ids

    tok = tiny_tokenizer
    eos = tok.eos_token_id
    ids = stop_token_ids(tok, tiny_model)
    assert eos in ids and tok.convert_tokens_to_ids("<|im_end|>") in ids
    yes, cat, dog = (tok.convert_tokens_to_ids(t) for t in ("Ġyes", "Ġc", "Ġd"))
    assert stop_string_end(tok, [dog, dog, cat, dog], ["c"]) == 3      # the first prefix holding "c"
    assert stop_string_end(tok, [dog, dog], ["c"]) is None
    sampled = [[yes, eos, cat, cat], [dog, dog, dog, dog], [dog, cat, dog, eos]]
    params = SamplingParams(max_new_tokens=4, stop_strings=["c"])
    prompt = prompts_for(tok, ["hi"])[0]
    hf = build_rollout_batch(tiny_model, tok, [prompt] * 3, sampled, 3, params, [eos], tok.pad_token_id)
    static = finish_batch(tok, torch.tensor(sampled), torch.zeros(3, 4), [prompt], 3, params, [eos],
                          tok.pad_token_id, 0.0)
    assert torch.equal(static.completion_mask, hf.completion_mask)
    assert torch.equal(static.completion_ids, hf.completion_ids)
    assert static.texts == hf.texts and torch.equal(static.truncated, hf.truncated)
    # plain chat generation stops at the same ids (every id a stop: nothing is returned)
    every = list(range(len(tok)))
    tiny_model.generation_config.eos_token_id = every
    try:
        assert generate_ids(tiny_model, tok, [prompt], max_new_tokens=3) == [[]]
    finally:
        tiny_model.generation_config.eos_token_id = eos


def test_vllm_is_started_from_a_folder_it_can_read(tmp_path, tiny_model, tiny_tokenizer, monkeypatch):
    """alignkit's names (the embedded alias, an adapter folder) are resolved to a model folder for vLLM."""
    from peft import LoraConfig, get_peft_model

    import alignkit.rollout.vllm as vllm_backend
    from alignkit.rollout.vllm import vllm_model_source

    base = tmp_path / "base"
    tiny_model.save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    adapter = tmp_path / "adapter"
    tiny_model.name_or_path = str(base)    # what from_pretrained(base) would have recorded
    get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    assert vllm_model_source(str(adapter)) == str(base.resolve())
    assert vllm_model_source(str(base)) == str(base.resolve())
    monkeypatch.setattr(vllm_backend, "ensure_embedded_model", lambda: base)
    assert vllm_model_source("smollm2-135m-instruct") == str(base)
    assert vllm_model_source("some-org/some-model") == "some-org/some-model"
