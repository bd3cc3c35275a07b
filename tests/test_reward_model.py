"""Reward model: pair data shapes, bad rows, learning a preference, saving, scoring, reward_accuracy."""
import json

import pytest
import torch

from alignkit.data import DataError
from alignkit.data.pairs import collate_pairs, tokenize_pairs, truncate_pair
from alignkit.methods import build_job
from alignkit.methods.preference import load_preference_data
from alignkit.methods.reward import RewardRecipe
from alignkit.model.heads import load_scalar_model, pair_scores

WORDS = "cat dog bird fish red green blue one two three apple banana cherry grape lemon".split()


def synthetic_pairs(count, seed=0):
    """Chosen = rejected's text + ' yes'; rejected = the same text + ' no': learnable from one token."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(count):
        pick = torch.randint(0, len(WORDS), (7,), generator=generator).tolist()
        prompt = " ".join(WORDS[j] for j in pick[:4])
        body = " ".join(WORDS[j] for j in pick[4:])
        rows.append({"prompt": prompt, "chosen": f"{body} yes", "rejected": f"{body} no"})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def rm_job(tmp_path, train, **overrides):
    config = {"data": {"train": str(train), "validation_fraction": 0.25, "max_length": 64},
              "training": {"output_dir": str(tmp_path / "run"), "max_steps": 12, "batch_size": 8,
                           "learning_rate": 3e-3, "lr_scheduler": "constant", "eval_steps": 12,
                           "progress": False, "tensorboard": False}}
    for key, value in overrides.items():
        config[key] = value
    return build_job("rm", config)


def test_rm_cli_learns_a_preference_then_score_and_eval_use_the_saved_model(tmp_path, tiny_model, tiny_tokenizer):
    """`alignkit rm` -> `alignkit score` -> `alignkit eval --metrics reward_accuracy`, on a tiny model."""
    from alignkit.cli import main

    tiny_model.save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    train = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(48))
    config = tmp_path / "rm.yaml"
    config.write_text(f"""method: rm
model: {{name_or_path: {tmp_path / 'base'}, dtype: float32, device: cpu}}
data: {{train: {train}, validation_fraction: 0.25, max_length: 64}}
training: {{output_dir: {tmp_path / 'run'}, max_steps: 12, batch_size: 8, learning_rate: 3.0e-3,
           lr_scheduler: constant, eval_steps: 12, progress: false, tensorboard: false}}
""")
    assert main(["rm", "--config", str(config)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    first, last = summary["first_eval"], summary["last_eval"]
    assert first["eval/accuracy"] <= 0.6 and last["eval/accuracy"] >= 0.9
    assert last["eval/loss"] < first["eval/loss"] and last["eval/margin"] > first["eval/margin"]
    assert {"eval/reward_mean", "eval/reward_std"} <= set(last)
    final = tmp_path / "run" / "final"

    rows = [{"prompt": "cat dog", "chosen": "red blue yes", "rejected": "red blue no"},
            {"prompt": "cat dog", "completion": "red blue yes"},
            {"prompt": "cat dog", "responses": ["red blue yes", "red blue no", "red blue no no"]},
            {"prompt": "cat dog", "chosen": "same", "rejected": "same"}]
    data = write_jsonl(tmp_path / "to_score.jsonl", rows)
    out = tmp_path / "scored.jsonl"
    assert main(["score", "--model", str(final), "--data", str(data), "--output", str(out), "--on-error", "skip"]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(scored) == 4 and "identical" in scored[3]["error"]
    assert scored[0]["chosen_reward"] > scored[0]["rejected_reward"]
    assert scored[1]["reward"] == pytest.approx(scored[0]["chosen_reward"], abs=1e-5)
    assert scored[2]["rewards"][0] == pytest.approx(scored[0]["chosen_reward"], abs=1e-5) and len(scored[2]["rewards"]) == 3
    loaded, tokenizer = load_scalar_model(final)
    batch = collate_pairs(tokenize_pairs(tokenizer, load_preference_data(
        build_job("rm", {"data": {"train": str(data), "validation_fraction": 0, "on_error": "skip"}}))[0][:1],
        64)[0], tokenizer.pad_token_id)
    with torch.no_grad():
        direct = loaded.sequence_scores(batch["input_ids"], batch["attention_mask"])
    assert direct.tolist() == pytest.approx([scored[0]["chosen_reward"], scored[0]["rejected_reward"]], abs=1e-5)

    report = tmp_path / "eval.json"
    assert main(["eval", "--model", str(final), "--data", str(train), "--metrics", "reward_accuracy",
                 "--max-length", "64", "--report-dir", str(tmp_path / "eval"), "--output", str(report)]) == 0
    result = json.loads(report.read_text())["metrics"]["reward_accuracy"]
    assert result["accuracy"] >= 0.9 and result["n"] == 48 and result["mean_margin"] > 0
    assert result["accuracy_interval"][0] < result["accuracy"] <= result["accuracy_interval"][1]


def test_margin_and_centering_enter_the_loss(tmp_path, tiny_model, tiny_tokenizer):
    rows = synthetic_pairs(4)
    for row in rows:
        row["margin"] = 2.0
    train = write_jsonl(tmp_path / "pairs.jsonl", rows)
    job = rm_job(tmp_path, train, center_rewards_coefficient=0.5)
    recipe = RewardRecipe(job, model=tiny_model, tokenizer=tiny_tokenizer, train=None)
    batch = recipe.collate(recipe.train_pairs)
    assert batch["margin"].tolist() == [2.0] * len(recipe.train_pairs)
    with torch.no_grad():
        chosen, rejected = recipe.rewards(batch)
        loss, _ = recipe.loss(batch)
    expected = (-torch.nn.functional.logsigmoid(chosen - rejected - 2.0).mean()
                + 0.5 * (chosen + rejected).square().mean())
    torch.testing.assert_close(loss, expected)
    job.use_margin = False
    with torch.no_grad():
        no_margin, _ = recipe.loss(batch)
    assert no_margin < loss


def test_reward_is_read_at_the_last_real_token_with_padding(tmp_path, tiny_model, tiny_tokenizer):
    train = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(6))
    recipe = RewardRecipe(rm_job(tmp_path, train), model=tiny_model, tokenizer=tiny_tokenizer)
    pairs = recipe.train_pairs[:3]
    order = [0, 2, 4, 1, 3, 5]  # alone is (c0, r0, c1, r1, ...); together is (c0, c1, c2, r0, r1, r2)
    with torch.no_grad():
        alone = torch.cat([recipe.model(torch.tensor([ids]))
                           for pair in pairs for ids in (pair.chosen_ids, pair.rejected_ids)])
        for share, free in ((False, False), (True, False), (True, True), (False, True)):
            recipe.job.share_prompt, recipe.job.padding_free = share, free
            together = torch.cat(recipe.rewards(recipe.collate(pairs)))
            torch.testing.assert_close(together, alone[order], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- data shapes and bad rows

def test_hh_dialogues_and_rankings_become_pairs(tmp_path):
    rows = [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me\n\nAssistant: sure, here is how",
         "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me\n\nAssistant: no"},
        {"prompt": [{"role": "user", "content": "name a fruit"}], "responses": ["apple", "a red fruit", "car"]},
        {"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": "c"},
    ]
    train = write_jsonl(tmp_path / "mixed.jsonl", rows)
    for ranking, expected in (("all", 1 + 3 + 1), ("adjacent", 1 + 2 + 1)):
        job = build_job("rm", {"ranking_pairs": ranking, "data": {"train": str(train), "validation_fraction": 0}})
        examples, _, _ = load_preference_data(job)
        assert len(examples) == expected
    hh = examples[0]
    assert [m["role"] for m in hh.prompt] == ["user", "assistant", "user"]
    assert (hh.chosen, hh.rejected) == ("sure, here is how", "no")
    assert [(e.chosen, e.rejected) for e in examples[1:3]] == [("apple", "a red fruit"), ("a red fruit", "car")]


def test_validation_split_keeps_a_ranking_on_one_side(tmp_path):
    rows = [{"prompt": f"p{i}", "responses": ["a", "b", "c", "d"]} for i in range(10)]
    job = build_job("rm", {"data": {"train": str(write_jsonl(tmp_path / "r.jsonl", rows)),
                                    "validation_fraction": 0.3}})
    train, validation, _ = load_preference_data(job)
    assert len(train) + len(validation) == 60 and len(validation) == 18
    assert not {e.source for e in train} & {e.source for e in validation}


BAD_ROWS = [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "chosen and rejected are identical"),
    ({"prompt": "q", "chosen": "   ", "rejected": "no"}, "field 'chosen': empty text"),
    ({"chosen": "yes", "rejected": "no"}, "field 'prompt': missing field"),
]


@pytest.mark.parametrize("row,message", BAD_ROWS)
def test_bad_pair_rows_fail_with_their_specific_error(tmp_path, row, message):
    train = write_jsonl(tmp_path / "bad.jsonl", synthetic_pairs(3) + [row])
    job = build_job("rm", {"data": {"train": str(train)}})
    with pytest.raises(DataError, match=message) as error:
        load_preference_data(job)
    assert "bad.jsonl:4" in str(error.value)


def test_bad_pair_rows_are_skipped_and_counted_when_asked(tmp_path, tiny_model, tiny_tokenizer):
    train = write_jsonl(tmp_path / "bad.jsonl", synthetic_pairs(8) + [row for row, _ in BAD_ROWS])
    job = rm_job(tmp_path, train)
    job.data.on_error = "skip"
    recipe = RewardRecipe(job, model=tiny_model, tokenizer=tiny_tokenizer)
    assert any("read 11 rows, kept 8, skipped 3" in note for note in recipe.notes)
    assert len(recipe.train_pairs) + len(recipe.validation_pairs) == 8


def test_truncation_keeps_one_prompt_for_both_responses_and_drops_spoiled_pairs(tiny_tokenizer):
    prompt, (chosen, rejected), cut = truncate_pair(list(range(10)), [[20, 21, 22], [30]], 8, 6)
    assert cut and prompt == [4, 5, 6, 7, 8, 9] and chosen == [20, 21] and rejected == [30]
    from alignkit.data.types import PreferenceExample

    same_start = PreferenceExample(prompt=[{"role": "user", "content": "hello"}],
                                   chosen="one two three four five six", rejected="one two three four five cat")
    pairs, report = tokenize_pairs(tiny_tokenizer, [same_start], max_length=None)
    assert len(pairs) == 1 and pairs[0].chosen_ids[:pairs[0].chosen_start] == pairs[0].rejected_ids[:pairs[0].rejected_start]
    length = pairs[0].chosen_start + 3  # both responses cut to their identical first tokens
    pairs, report = tokenize_pairs(tiny_tokenizer, [same_start], max_length=length, max_prompt_length=None)
    assert not pairs and report.dropped_identical == 1


def test_lora_reward_model_saves_adapter_and_head_and_loads_by_path(tmp_path, tiny_model, tiny_tokenizer):
    tiny_model.save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    train = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(8))
    job = build_job("rm", {"model": {"name_or_path": str(tmp_path / "base"), "device": "cpu"},
                           "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
                           "data": {"train": str(train), "validation_fraction": 0}})
    recipe = RewardRecipe(job)
    with torch.no_grad():
        recipe.model.head.bias.fill_(0.5)
        next(p for n, p in recipe.model.named_parameters() if "lora_B" in n).fill_(0.1)
    recipe.save_final(tmp_path / "rm")
    assert (tmp_path / "rm" / "adapter_config.json").exists() and (tmp_path / "rm" / "head.safetensors").exists()
    loaded, _ = load_scalar_model(tmp_path / "rm")
    batch = recipe.collate(recipe.train_pairs)
    with torch.no_grad():
        torch.testing.assert_close(pair_scores(loaded, batch), torch.cat(recipe.rewards(batch)), atol=1e-5, rtol=1e-5)
    # An adapter folder as the starting model (an SFT run's output): that adapter is trained further.
    again = RewardRecipe(build_job("rm", {"model": {"name_or_path": str(tmp_path / "rm"), "device": "cpu"},
                                          "lora": {"rank": 4}, "data": {"train": str(train)}}))
    names = [n for n, p in again.model.named_parameters() if p.requires_grad]
    assert names and all(n.count("base_model.model") == 1 for n in names if "lora_" in n)
    assert list(again.model.backbone.peft_config) == ["default"]


def test_a_reward_model_scores_texts_cut_the_way_it_was_trained(tmp_path, tiny_model, tiny_tokenizer):
    """`alignkit rm` keeps data.max_length / max_prompt_length in head.json; the `reward_model` reward (PPO,
    GRPO) and `score_responses` then cut a long conversation the same way, unless told otherwise."""
    from alignkit.model.heads import score_responses
    from alignkit.rewards import get_reward_function, load_reward_plugins

    tiny_model.save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    train = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(8))
    job = build_job("rm", {"model": {"name_or_path": str(tmp_path / "base"), "device": "cpu"},
                           "data": {"train": str(train), "validation_fraction": 0, "max_length": 40,
                                    "max_prompt_length": 12}})
    RewardRecipe(job).save_final(tmp_path / "rm")
    meta = json.loads((tmp_path / "rm" / "head.json").read_text())
    assert (meta["max_length"], meta["max_prompt_length"]) == (40, 12)
    model, tokenizer = load_scalar_model(tmp_path / "rm")
    long_prompt = [{"role": "user", "content": " ".join(WORDS * 6)}]
    items = [(long_prompt, "red blue yes"), ([{"role": "user", "content": "cat"}], "dog")]
    trained_cut = score_responses(model, tokenizer, items, max_length=40, max_prompt_length=12)
    uncut = score_responses(model, tokenizer, items, max_length=1024, max_prompt_length=512)
    assert abs(trained_cut[0] - uncut[0]) > 1e-4  # the cut matters for the long prompt ...
    assert trained_cut[1] == pytest.approx(uncut[1], abs=1e-6)  # ... and not for the short one
    assert score_responses(model, tokenizer, items) == pytest.approx(trained_cut, abs=1e-6)
    load_reward_plugins()
    reward = get_reward_function("reward_model", path=str(tmp_path / "rm"))
    assert reward(["x", "cat"], ["red blue yes", "dog"], prompt_messages=[items[0][0], items[1][0]]) == \
        pytest.approx(trained_cut, abs=1e-6)
    explicit = get_reward_function("reward_model", path=str(tmp_path / "rm"), max_length=1024, max_prompt_length=512)
    assert explicit(["x"], ["red blue yes"], prompt_messages=[items[0][0]]) == pytest.approx(uncut[:1], abs=1e-6)
