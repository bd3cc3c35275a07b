"""SFT on a tiny random model: the loss is the masked cross-entropy, training memorises, resume is exact."""
import json
import math

import pytest
import torch

from alignkit.data import ChatExample
from alignkit.methods import load_job
from alignkit.methods.sft import SFTRecipe
from tests.helpers import make_tiny_model, make_tiny_tokenizer

ROWS = [
    [{"role": "user", "content": "what is the capital of france?"}, {"role": "assistant", "content": "paris"}],
    [{"role": "user", "content": "what is the capital of italy?"}, {"role": "assistant", "content": "rome"}],
    [{"role": "system", "content": "answer with one word"}, {"role": "user", "content": "a red fruit?"},
     {"role": "assistant", "content": "cherry"}, {"role": "user", "content": "a yellow one?"},
     {"role": "assistant", "content": "lemon"}],
    [{"role": "user", "content": "two plus two"}, {"role": "assistant", "content": "four"}],
]


def examples():
    return [ChatExample(messages=m, source=f"mem:{i}") for i, m in enumerate(ROWS)]


def job(tmp_path, *overrides):
    base = [f"training.output_dir={tmp_path}", "training.progress=false", "training.tensorboard=false",
            "training.batch_size=2", "training.learning_rate=0.01", "training.lr_scheduler=constant",
            "data.max_length=160", "training.eval_at_start=false"]
    return load_job("sft", None, base + list(overrides))


def recipe(tmp_path, *overrides, model=None, tokenizer=None, train=None):
    tokenizer = tokenizer or make_tiny_tokenizer()
    model = model or make_tiny_model(tokenizer)
    return SFTRecipe(job(tmp_path, *overrides), model=model, tokenizer=tokenizer,
                     train=train or examples(), validation=examples()[:2])


def test_loss_equals_hand_computed_masked_cross_entropy(tmp_path):
    r = recipe(tmp_path)
    batch = r.collate(r.train_rows[:3])
    loss, metrics = r.loss(batch)
    logits = r.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = (batch["loss_mask"][:, 1:] & batch["attention_mask"][:, 1:].bool()).float()
    expected = -(logps * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert r.loss_weight(batch) == mask.sum().item()  # the engine weighs the loss by its token count
    hits = (logits[:, :-1].argmax(-1) == batch["input_ids"][:, 1:]).float()
    assert metrics["token_accuracy"] == pytest.approx(float((hits * mask).sum() / mask.sum()))
    # the mask holds exactly the assistant answers and their end-of-turn markers
    tok = r.tokenizer
    picked = [tok.decode([t for t, m in zip(row.input_ids, row.loss_mask) if m]) for row in r.train_rows[:3]]
    assert picked == ["paris<|im_end|>", "rome<|im_end|>", "cherry<|im_end|>lemon<|im_end|>"]


def test_all_tokens_loss_switch_covers_more_tokens(tmp_path):
    only = recipe(tmp_path / "a")
    every = recipe(tmp_path / "b", "completion_only_loss=false")
    assert sum(map(sum, (r.loss_mask for r in every.train_rows))) > 3 * sum(map(sum, (r.loss_mask for r in only.train_rows)))


def test_training_memorises_rows_and_lowers_validation_loss(tmp_path):
    r = recipe(tmp_path, "training.max_steps=40", "training.eval_steps=40")
    before = r.evaluate()
    from alignkit.engine import Engine

    result = Engine(r.job.training, r, tmp_path).train()
    first = result["history"][0]["loss"]
    last = sum(h["loss"] for h in result["history"][-4:]) / 4
    assert last < 0.2 * first, (first, last)
    after = result["eval_history"][-1]
    assert after["eval/loss"] < 0.3 * before["loss"]
    assert after["eval/perplexity"] == pytest.approx(math.exp(after["eval/loss"]), rel=1e-6)


def test_packing_gives_the_same_loss_as_padding(tmp_path):
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(tokenizer)
    padded = recipe(tmp_path / "a", "training.batch_size=4", model=model, tokenizer=tokenizer)
    packed = recipe(tmp_path / "b", "packing=true", "data.max_length=512", model=model, tokenizer=tokenizer)
    assert len(packed.train_rows) == 1
    with torch.no_grad():
        loss_padded, _ = padded.loss(padded.collate(padded.train_rows))
        loss_packed, _ = packed.loss(packed.collate(packed.train_rows))
    torch.testing.assert_close(loss_packed, loss_padded, atol=1e-5, rtol=1e-5)


def test_resume_with_lora_matches_uninterrupted_run(tmp_path):
    def run(folder, *extra):
        tokenizer = make_tiny_tokenizer()
        from alignkit.model import add_lora

        model = add_lora(make_tiny_model(tokenizer), rank=4, alpha=8, dropout=0.1)
        r = recipe(folder, "training.max_steps=6", "training.save_steps=3", "training.save_total_limit=5",
                   "lora.rank=4", *extra, model=model, tokenizer=tokenizer)
        from alignkit.engine import Engine

        return Engine(r.job.training, r, folder).train()

    full = run(tmp_path / "full")
    run(tmp_path / "cut", "training.max_steps=3")
    resumed = run(tmp_path / "cut", "training.resume=true")
    assert [h["step"] for h in resumed["history"]] == [4, 5, 6]
    for a, b in zip(resumed["history"], full["history"][3:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_rows_whose_answer_is_truncated_away_are_reported_not_trained(tmp_path):
    long_prompt = " ".join(["what is the capital"] * 40)
    train = examples() + [ChatExample(messages=[{"role": "user", "content": long_prompt},
                                                {"role": "assistant", "content": "paris"}], source="mem:long")]
    r = recipe(tmp_path, train=train)
    assert len(r.train_rows) == len(ROWS)
    assert any("1" in note and "mem:long" in note or "dropped" in note for note in r.notes), r.notes


def test_cli_sft_run_writes_run_folder(tmp_path, monkeypatch):
    """`alignkit sft` on a tiny local model folder: config, metrics, checkpoint, final adapter, report."""
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(tokenizer)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in ROWS * 3))
    from alignkit.cli import main

    code = main(["sft", "--set", f"model.name_or_path={tmp_path / 'tiny'}", "--set", f"data.train={data}",
                 "--set", "lora.rank=4", "--set", f"training.output_dir={tmp_path / 'run'}",
                 "--set", "training.max_steps=4", "--set", "training.save_steps=2", "--set", "training.eval_steps=2",
                 "--set", "training.progress=false", "--set", "data.validation_fraction=0.25"])
    assert code == 0
    run = tmp_path / "run"
    assert (run / "config.yaml").exists() and (run / "report.md").exists()
    assert (run / "final" / "adapter_config.json").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/perplexity" in line for line in lines)
    assert max(line["step"] for line in lines) == 4


def test_cli_reports_bad_config_key_without_traceback(tmp_path, capsys):
    from alignkit.cli import main

    code = main(["sft", "--set", "training.learnin_rate=0.1"])
    assert code == 2
    assert "did you mean 'training.learning_rate'" in capsys.readouterr().err
