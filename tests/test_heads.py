"""Scalar head: the score is read at the last real token whatever the padding side; save/load."""
import torch

from alignkit.model.heads import ScalarHeadModel, last_token_index, load_scalar_model


def test_last_token_index_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert last_token_index(right, 4, "cpu").tolist() == [2, 3, 0]
    assert last_token_index(left, 4, "cpu").tolist() == [3, 3, 3]


def test_scores_equal_for_left_and_right_padding_and_unpadded(tiny_model, tiny_tokenizer, tmp_path):
    model = ScalarHeadModel(tiny_model)
    model.eval()
    short, long = [5, 6, 7], [8, 9, 10, 11, 12]
    pad = tiny_tokenizer.pad_token_id
    right = torch.tensor([short + [pad, pad], long])
    right_mask = torch.tensor([[1, 1, 1, 0, 0], [1] * 5])
    left = torch.tensor([[pad, pad] + short, long])
    left_mask = torch.tensor([[0, 0, 1, 1, 1], [1] * 5])
    with torch.no_grad():
        alone = torch.stack([model.sequence_scores(torch.tensor([short]))[0],
                             model.sequence_scores(torch.tensor([long]))[0]])
        torch.testing.assert_close(model.sequence_scores(right, right_mask), alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.sequence_scores(left, left_mask), alone, atol=1e-5, rtol=1e-5)
    # save and reload gives the same scores
    with torch.no_grad():
        model.head.bias.fill_(0.25)
    model.save(tmp_path / "rm", tiny_tokenizer)
    loaded, _ = load_scalar_model(tmp_path / "rm")
    with torch.no_grad():
        torch.testing.assert_close(loaded.sequence_scores(right, right_mask), model.sequence_scores(right, right_mask))
