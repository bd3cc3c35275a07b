"""Padding, length buckets, packing (checked against separate forwards of a tiny Llama), preparation."""
import pytest
import torch

from alignkit.data import (
    ChatExample,
    PreferenceExample,
    TokenizedRow,
    block_diagonal_attention_mask,
    deduplicate,
    filter_by_length,
    length_bucketed_batches,
    pack_rows,
    pad_batch,
    tokenize_chat,
    train_validation_split,
)


def rows_of(*lengths):
    return [TokenizedRow(list(range(10, 10 + n)), [i % 2 == 1 for i in range(n)], source=f"r{k}")
            for k, n in enumerate(lengths)]


# ---------------------------------------------------------------------------------------- padding
def test_pad_batch_right_and_left():
    rows = rows_of(3, 1)
    right = pad_batch(rows, pad_token_id=0)
    assert right["input_ids"].tolist() == [[10, 11, 12], [10, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["loss_mask"].dtype == torch.bool
    assert right["loss_mask"].tolist() == [[False, True, False], [False, False, False]]
    left = pad_batch(rows, pad_token_id=0, side="left")
    assert left["input_ids"].tolist() == [[10, 11, 12], [0, 0, 10]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pad_batch(rows, 0, pad_to_multiple_of=4)["input_ids"].shape == (2, 4)
    assert "position_ids" not in right
    dicts = pad_batch([{"input_ids": [5, 6], "position_ids": [0, 1]}, {"input_ids": [7], "position_ids": [0]}], 0)
    assert dicts["position_ids"].tolist() == [[0, 1], [0, 0]] and not dicts["loss_mask"].any()


# ---------------------------------------------------------------------------------------- buckets
def test_length_bucketed_batches_cover_every_index_once_and_group_lengths():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 500, (1037,), generator=generator).tolist()
    batches = length_bucketed_batches(lengths, 8, torch.Generator().manual_seed(1))
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(1037)) and len(flat) == 1037
    assert sorted(len(batch) for batch in batches) == [1037 % 8] + [8] * (len(batches) - 1)
    again = length_bucketed_batches(lengths, 8, torch.Generator().manual_seed(1))
    other = length_bucketed_batches(lengths, 8, torch.Generator().manual_seed(2))
    assert again == batches and other != batches

    def padding(batch_list):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batch_list)

    random_order = torch.randperm(1037, generator=torch.Generator().manual_seed(3)).tolist()
    random_batches = [random_order[i:i + 8] for i in range(0, 1037, 8)]
    assert padding(batches) < padding(random_batches) / 5
    ordered = length_bucketed_batches([3, 9, 1, 7], 2, shuffle=False)
    assert ordered == [[1, 3], [0, 2]]
    assert length_bucketed_batches([], 4) == []


# ---------------------------------------------------------------------------------------- packing
def test_pack_rows_first_fit():
    rows = rows_of(6, 5, 4, 3, 2)
    packed = pack_rows(rows, max_length=8)
    assert all(len(p["input_ids"]) <= 8 for p in packed)
    assert sorted(n for p in packed for n in p["sequence_lengths"]) == [2, 3, 4, 5, 6]
    assert [p["sequence_lengths"] for p in packed] == [[6, 2], [5, 3], [4]]
    assert packed[0]["position_ids"] == [0, 1, 2, 3, 4, 5, 0, 1]
    assert packed[0]["sources"] == ["r0", "r4"]
    assert packed[0]["input_ids"] == list(range(10, 16)) + [10, 11]
    # the loss mask is kept, except on each sequence's first token (never a target of its own sequence)
    assert packed[0]["loss_mask"] == [False, True, False, True, False, True, False, True]
    with pytest.raises(ValueError, match="r0: 6 tokens do not fit max_length=5"):
        pack_rows(rows, max_length=5)


def test_block_diagonal_attention_mask():
    mask = block_diagonal_attention_mask([[2, 1]], length=4)
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_packed_forward_equals_separate_forwards(tiny_tokenizer, implementation):
    from tests.helpers import make_tiny_model

    model = make_tiny_model(tiny_tokenizer)
    model.config._attn_implementation = implementation
    conversations = [
        [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there, how can I help?"}],
        [{"role": "user", "content": "two plus two"}, {"role": "assistant", "content": "four"}],
        [{"role": "user", "content": "the capital of italy"}, {"role": "assistant", "content": "rome"}],
    ]
    rows = [tokenize_chat(tiny_tokenizer, c, max_length=64, source=str(i)) for i, c in enumerate(conversations)]
    [packed] = pack_rows(rows, max_length=256)
    input_ids = torch.tensor([packed["input_ids"]])
    position_ids = torch.tensor([packed["position_ids"]])
    with torch.no_grad():
        separate = {r.source: model(torch.tensor([r.input_ids])).logits[0] for r in rows}
        by_positions = model(input_ids, position_ids=position_ids, attention_mask=None, use_cache=False).logits[0]
        mask = block_diagonal_attention_mask([packed["sequence_lengths"]], dtype=torch.float32)
        by_mask = model(input_ids, position_ids=position_ids, attention_mask=mask, use_cache=False).logits[0]
        # The pitfall documented in alignkit/data/collate.py: with the cache on, transformers skips the
        # packed-sequence detection and the sequences attend to each other.
        with_cache = model(input_ids, position_ids=position_ids, attention_mask=None).logits[0]
    begin = 0
    leaked = False
    assert len(packed["sequence_lengths"]) == 3
    for length, source in zip(packed["sequence_lengths"], packed["sources"]):
        expected = separate[source]
        torch.testing.assert_close(by_positions[begin:begin + length], expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(by_mask[begin:begin + length], expected, atol=1e-5, rtol=1e-4)
        leaked |= not torch.allclose(with_cache[begin:begin + length], expected, atol=1e-5, rtol=1e-4)
        begin += length
    assert leaked, "transformers now detects packing with the cache on: update the collate.py docstring"


# ---------------------------------------------------------------------------------------- prepare
def test_deduplicate_exact_and_normalized():
    def chat(text):
        return ChatExample([{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}], "s")

    examples = [chat("Hello, world!"), chat("hello world"), chat("Hello, world!"), chat("Hello   WORLD."),
                chat("goodbye")]
    kept, removed = deduplicate(examples)
    assert removed == 1 and [e.messages[0]["content"] for e in kept] == [
        "Hello, world!", "hello world", "Hello   WORLD.", "goodbye"]
    kept, removed = deduplicate(examples, mode="normalized")
    assert removed == 3 and [e.messages[0]["content"] for e in kept] == ["Hello, world!", "goodbye"]
    pairs = [PreferenceExample([{"role": "user", "content": "p"}], "a", "b"),
             PreferenceExample([{"role": "user", "content": "p"}], "a", "c")]
    assert deduplicate(pairs)[1] == 0
    assert deduplicate(["x", "X!", "y"], mode="normalized") == (["x", "y"], 1)
    assert deduplicate([{"q": 1}, {"q": 1}], key=lambda row: str(row["q"])) == ([{"q": 1}], 1)


def test_filter_by_length():
    rows = rows_of(1, 5, 9)
    kept, removed = filter_by_length(rows, min_tokens=2, max_tokens=8)
    assert [len(r) for r in kept] == [5] and removed == 2
    assert filter_by_length([[1, 2], [1]], max_tokens=1) == ([[1]], 1)


def test_train_validation_split_is_deterministic_and_never_empty():
    items = list(range(100))
    train, validation = train_validation_split(items, 0.1, seed=3)
    assert len(validation) == 10 and len(train) == 90 and sorted(train + validation) == items
    assert train_validation_split(items, 0.1, seed=3) == (train, validation)
    assert train_validation_split(items, 0.1, seed=4)[1] != validation
    assert train == sorted(train) and validation == sorted(validation)  # input order kept
    assert [len(part) for part in train_validation_split([1, 2], 0.01, seed=0)] == [1, 1]
    assert [len(part) for part in train_validation_split(items, validation_size=7)] == [93, 7]
    assert train_validation_split([1], 0.5) == ([1], [])
    assert train_validation_split(items, 0)[1] == []
    with pytest.raises(ValueError):
        train_validation_split(items, 1.5)
