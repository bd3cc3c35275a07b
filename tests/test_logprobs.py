"""Chunked log-probs against the naive full-logits computation (values, gradients, models, memory)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from alignkit.logprobs import token_logprobs, token_logprobs_and_entropy
from alignkit.model.forward import (
    decoder_hidden_states,
    model_token_logprobs,
    output_weight,
    sequence_logprob_sums,
)


def naive_logprobs(hidden, weight, targets, temperature=1.0, bias=None, softcap=None):
    """Reference: full float32 logits, log_softmax, gather (what we must never do at scale)."""
    logits = hidden.float() @ weight.float().T
    if bias is not None:
        logits = logits + bias.float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits / temperature
    return torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1), logits


def make_inputs(dtype=torch.float32, batch=3, seq=5, hidden_size=16, vocab=37, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, hidden_size, generator=generator).to(dtype).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, generator=generator) * 0.5).to(dtype).requires_grad_(True)
    targets = torch.randint(0, vocab, (batch, seq), generator=generator)
    targets[0, -2:] = -100  # padding labels
    targets[2, 0] = -100
    return hidden, weight, targets


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_values_and_gradients_match_naive(chunk_size, dtype):
    hidden, weight, targets = make_inputs(dtype)
    upstream = torch.randn(targets.shape, generator=torch.Generator().manual_seed(1))

    logps = token_logprobs(hidden, weight, targets, chunk_size=chunk_size, temperature=0.7)
    assert logps.dtype == torch.float32 and logps.shape == targets.shape
    grad_hidden, grad_weight = torch.autograd.grad((logps * upstream).sum(), [hidden, weight])

    expected, _ = naive_logprobs(hidden, weight, targets, temperature=0.7)
    exp_hidden, exp_weight = torch.autograd.grad((expected * upstream).sum(), [hidden, weight])

    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)
    assert grad_hidden.dtype == dtype and grad_weight.dtype == dtype
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad_hidden, exp_hidden, **tol)
    torch.testing.assert_close(grad_weight, exp_weight, **tol)


def test_padding_targets_do_not_fail_and_equal_target_zero():
    hidden, weight, targets = make_inputs()
    logps = token_logprobs(hidden, weight, targets, chunk_size=4)
    zero_targets = targets.clamp(min=0)
    assert torch.equal(logps, token_logprobs(hidden, weight, zero_targets, chunk_size=4))
    # Log-probs of a real distribution: finite, <= 0, and probabilities over all ids sum to one.
    assert torch.isfinite(logps).all() and (logps <= 0).all()
    row = hidden[:1, :1].expand(1, weight.shape[0], -1)
    every_id = torch.arange(weight.shape[0])[None]
    total = token_logprobs(row, weight, every_id).exp().sum()
    assert abs(total.item() - 1.0) < 1e-5


def test_bias_softcap_and_frozen_weight():
    hidden, weight, targets = make_inputs()
    bias = torch.randn(weight.shape[0], requires_grad=True)
    frozen = weight.detach()  # LoRA: the lm_head is frozen
    logps = token_logprobs(hidden, frozen, targets, chunk_size=4, temperature=1.3, bias=bias, softcap=2.0)
    grad_hidden, grad_bias = torch.autograd.grad(logps.sum(), [hidden, bias])
    expected, _ = naive_logprobs(hidden, frozen, targets, temperature=1.3, bias=bias, softcap=2.0)
    exp_hidden, exp_bias = torch.autograd.grad(expected.sum(), [hidden, bias])
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_hidden, exp_hidden, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_bias, exp_bias, rtol=1e-4, atol=1e-5)
    # Softcapping really changes the values (the test above is not vacuous).
    uncapped, _ = naive_logprobs(hidden, frozen, targets, temperature=1.3, bias=bias)
    assert (uncapped - expected).abs().max() > 1e-2


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_entropy_matches_naive(chunk_size):
    hidden, weight, targets = make_inputs()
    logps, entropy = token_logprobs_and_entropy(hidden, weight, targets, chunk_size=chunk_size,
                                                temperature=0.9)
    expected_logps, logits = naive_logprobs(hidden, weight, targets, temperature=0.9)
    probs = torch.softmax(logits, -1)
    expected_entropy = -(probs * torch.log(probs)).sum(-1)
    torch.testing.assert_close(logps, expected_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, expected_entropy, rtol=1e-5, atol=1e-5)
    assert not entropy.requires_grad and logps.requires_grad
    # Uniform distribution (zero weight) has entropy log V.
    _, uniform = token_logprobs_and_entropy(hidden, torch.zeros_like(weight), targets)
    torch.testing.assert_close(uniform, torch.full_like(uniform, torch.log(torch.tensor(37.0)).item()))


def test_sequence_logprob_sums():
    logps = torch.tensor([[-1.0, -2.0, float("-inf")], [-0.5, float("nan"), -3.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    sums, counts = sequence_logprob_sums(logps, mask)
    torch.testing.assert_close(sums, torch.tensor([-3.0, -3.5]))
    torch.testing.assert_close(counts, torch.tensor([2.0, 2.0]))


# ---------------------------------------------------------------------------------------------
# Memory: nothing of size N*V is saved for backward or created during forward + backward.
# ---------------------------------------------------------------------------------------------

class LargestTensor(TorchDispatchMode):
    """Records the numel of the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.largest = max(self.largest, leaf.numel())
        return out


def saved_tensor_sizes(fn):
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return out, sizes


def test_memory_never_holds_full_logits():
    rows, vocab, hidden_size, chunk = 2048, 32768, 16, 256
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, hidden_size, generator=generator, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, generator=generator, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,), generator=generator)

    tracker = LargestTensor()
    with tracker:
        logps, sizes = saved_tensor_sizes(lambda: token_logprobs(hidden, weight, targets, chunk_size=chunk))
        logps.sum().backward()
    full = rows * vocab
    assert max(sizes) <= max(rows * hidden_size, vocab * hidden_size)
    # Largest live intermediate is one chunk of logits (or the [V, H] weight gradient).
    assert tracker.largest <= max(chunk * vocab, vocab * hidden_size) < full // 4
    assert hidden.grad is not None and weight.grad is not None

    # The same probes flag the naive computation (so the assertions above can fail).
    small_hidden, small_weight = hidden[:64].detach().requires_grad_(), weight[:512].detach().requires_grad_()
    small_targets = targets[:64] % 512
    naive_tracker = LargestTensor()
    with naive_tracker:
        _, naive_sizes = saved_tensor_sizes(lambda: naive_logprobs(small_hidden, small_weight, small_targets)[0])
    assert max(naive_sizes) >= 64 * 512 and naive_tracker.largest >= 64 * 512


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

def padded_batch(tokenizer):
    texts = ["hello the cat is red and the dog is blue", "what is two plus two"]
    encoded = [tokenizer(text)["input_ids"] for text in texts]
    length = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), length), tokenizer.pad_token_id)
    attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
    assert attention_mask[1].sum() < length  # really padded
    return input_ids, attention_mask


def full_logits_logprobs(model, input_ids, attention_mask):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1), logits


def test_model_token_logprobs_matches_full_forward(tiny_tokenizer, tiny_model):
    input_ids, attention_mask = padded_batch(tiny_tokenizer)
    valid = attention_mask[:, 1:].bool()
    logps, entropy = model_token_logprobs(tiny_model, input_ids, attention_mask, chunk_size=5,
                                          with_entropy=True)
    expected, logits = full_logits_logprobs(tiny_model, input_ids, attention_mask)
    assert logps.shape == (input_ids.shape[0], input_ids.shape[1] - 1)
    torch.testing.assert_close(logps[valid], expected[valid], rtol=1e-4, atol=1e-5)
    probs = torch.softmax(logits[:, :-1], -1)
    expected_entropy = -(probs * torch.log_softmax(logits[:, :-1], -1)).sum(-1)
    torch.testing.assert_close(entropy[valid], expected_entropy[valid], rtol=1e-4, atol=1e-5)
    assert output_weight(tiny_model) is tiny_model.lm_head.weight

    # Gradients reach the decoder parameters and the lm_head like the full forward's.
    tiny_model.zero_grad()
    (logps * valid).sum().backward()
    ours = {name: p.grad.clone() for name, p in tiny_model.named_parameters() if p.grad is not None}
    tiny_model.zero_grad()
    (full_logits_logprobs(tiny_model, input_ids, attention_mask)[0] * valid).sum().backward()
    for name, p in tiny_model.named_parameters():
        if p.grad is None or not p.grad.abs().sum():
            continue
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-3, atol=1e-5, msg=name)
    assert "lm_head.weight" in ours and "model.layers.0.self_attn.q_proj.weight" in ours


def test_peft_lora_adapters_are_applied_and_can_be_disabled(tiny_tokenizer, tiny_model):
    peft = pytest.importorskip("peft")
    input_ids, attention_mask = padded_batch(tiny_tokenizer)
    with torch.no_grad():
        base_hidden = decoder_hidden_states(tiny_model, input_ids, attention_mask)
    model = peft.get_peft_model(tiny_model, peft.LoraConfig(r=4, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        adapted = decoder_hidden_states(model, input_ids, attention_mask)
        with model.disable_adapter():
            disabled = decoder_hidden_states(model, input_ids, attention_mask)
            disabled_logps = model_token_logprobs(model, input_ids, attention_mask)
            disabled_expected, _ = full_logits_logprobs(model, input_ids, attention_mask)
        logps = model_token_logprobs(model, input_ids, attention_mask, chunk_size=3)
        expected, _ = full_logits_logprobs(model, input_ids, attention_mask)
    valid = attention_mask[:, 1:].bool()
    assert (adapted - base_hidden).abs().max() > 1e-3
    torch.testing.assert_close(disabled, base_hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logps[valid], expected[valid], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(disabled_logps[valid], disabled_expected[valid], rtol=1e-4, atol=1e-5)
    assert output_weight(model) is tiny_model.lm_head.weight

    # Gradients reach the LoRA parameters.
    logps = model_token_logprobs(model, input_ids, attention_mask)
    (logps * valid).sum().backward()
    lora_grads = [p.grad for name, p in model.named_parameters() if "lora_A" in name]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)


def test_lora_on_lm_head_is_refused(tiny_tokenizer, tiny_model):
    peft = pytest.importorskip("peft")
    input_ids, attention_mask = padded_batch(tiny_tokenizer)
    model = peft.get_peft_model(tiny_model, peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(NotImplementedError, match="lm_head"):
        model_token_logprobs(model, input_ids, attention_mask)
    with model.disable_adapter():
        assert model_token_logprobs(model, input_ids, attention_mask).shape == (2, input_ids.shape[1] - 1)


def _tiny_config(kind, tokenizer):
    import transformers

    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  pad_token_id=tokenizer.pad_token_id)
    if kind == "gemma2":
        return transformers.Gemma2ForCausalLM, transformers.Gemma2Config(
            head_dim=8, final_logit_softcapping=1.5, **common)
    if kind == "granite":
        return transformers.GraniteForCausalLM, transformers.GraniteConfig(logits_scaling=4.0, **common)
    return transformers.CohereForCausalLM, transformers.CohereConfig(logit_scale=0.25, **common)


@pytest.mark.parametrize("kind", ["gemma2", "granite", "cohere"])
def test_architecture_logit_transforms(kind, tiny_tokenizer):
    model_class, config = _tiny_config(kind, tiny_tokenizer)
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # large logits, so the transform matters
    input_ids, attention_mask = padded_batch(tiny_tokenizer)
    valid = attention_mask[:, 1:].bool()
    with torch.no_grad():
        logps = model_token_logprobs(model, input_ids, attention_mask, chunk_size=4, temperature=0.8)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()[:, :-1] / 0.8
    expected = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(logps[valid], expected[valid], rtol=1e-4, atol=1e-4)
