"""`alignkit eval` metrics and report: accuracy/pass@k, text overlap, drift, perplexity interval, the report
files, and the command end to end on tiny models."""
from __future__ import annotations

import json

import pytest

from alignkit.evaluate import metrics
from alignkit.evaluate.metrics import run_metrics
from alignkit.evaluate.stats import pass_at_k, wilson_interval




def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return str(path)


def good_field(prompts, completions, good, **fields):
    """A reward that reads the answer key from the row: tests that fields stay aligned with completions."""
    return [1.0 if g else 0.0 for g in good]


@pytest.fixture
def graded(tmp_path):
    flags = [True, False, True, True, False]
    return write_jsonl(tmp_path / "graded.jsonl", [{"prompt": f"hello {i}", "good": g} for i, g in enumerate(flags)])


def test_accuracy_counts_and_wilson_interval(tiny_model, tiny_tokenizer, graded):
    result = run_metrics(tiny_model, tiny_tokenizer, ["accuracy"], data=graded, reward=good_field,
                         max_new_tokens=3)["accuracy"]
    assert result["accuracy"] == pytest.approx(3 / 5) and result["correct"] == 3 and result["n"] == 5
    assert result["accuracy_interval"] == pytest.approx(list(wilson_interval(3, 5)))
    assert result["temperature"] == 0.0 and "pass@1" not in result
    assert [e["reward"] for e in result["examples"]] == [1.0, 0.0, 1.0, 1.0, 0.0]


def test_pass_at_k_with_several_samples(tiny_model, tiny_tokenizer, graded):
    result = run_metrics(tiny_model, tiny_tokenizer, ["accuracy"], data=graded, reward=good_field, samples=4,
                         k=[1, 2, 4], max_new_tokens=3)["accuracy"]
    assert result["temperature"] == 1.0 and result["completions"] == 20 and result["correct"] == 12
    assert "pass@1" not in result                              # pass@1 is `accuracy`
    for k in ("accuracy", "pass@2", "pass@4"):
        assert result[k] == pytest.approx(3 / 5)
        low, high = result[f"{k}_interval"]
        assert 0.0 <= low < 3 / 5 < high <= 1.0


def test_pass_at_k_uses_the_unbiased_estimator(tiny_model, tiny_tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello"}, {"prompt": "hi"}])

    def half_right(prompts, completions, **fields):
        # prompt 0: samples 0 and 1 right (c = 2 of 4); prompt 1: none right
        return [1.0 if i in (0, 1) else 0.0 for i in range(len(completions))]

    result = metrics.accuracy(tiny_model, tiny_tokenizer, data, reward=half_right, samples=4, k=[1, 2, 3],
                              max_new_tokens=2)
    assert result["accuracy"] == pytest.approx((pass_at_k(4, 2, 1) + 0.0) / 2)
    for k in (2, 3):
        assert result[f"pass@{k}"] == pytest.approx((pass_at_k(4, 2, k) + 0.0) / 2)


def test_sampling_is_seeded_and_greedy_needs_no_seed(tiny_model, tiny_tokenizer, graded):
    def run(seed):
        cache = {}
        metrics.accuracy(tiny_model, tiny_tokenizer, graded, reward=good_field, samples=3, max_new_tokens=5,
                         seed=seed, _cache=cache)
        return list(cache.values())[0][1]

    assert run(1) == run(1)
    assert run(1) != run(2)
    with pytest.raises(ValueError, match="pass@k needs sampling"):
        metrics.accuracy(tiny_model, tiny_tokenizer, graded, reward=good_field, samples=3, temperature=0.0)
    with pytest.raises(ValueError, match="1 <= k <= samples"):
        metrics.accuracy(tiny_model, tiny_tokenizer, graded, reward=good_field, samples=2, k=[3], max_new_tokens=2)


def test_accuracy_with_a_registry_reward(tiny_model, tiny_tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "one plus one", "answer": "so #### 2"}])
    result = metrics.accuracy(tiny_model, tiny_tokenizer, data, reward="numeric_match", max_new_tokens=3)
    assert result["accuracy"] in (0.0, 1.0) and result["reward"] == "numeric_match"
    bad = write_jsonl(tmp_path / "noref.jsonl", [{"prompt": "hello"}])
    with pytest.raises(ValueError, match="cannot score"):
        metrics.accuracy(tiny_model, tiny_tokenizer, bad, reward="numeric_match", max_new_tokens=2)


def test_text_overlap_against_references(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    pytest.importorskip("sacrebleu")
    pytest.importorskip("rouge_score")
    references = ["the cat is on the red mat today", "a dog and a bird are in the city", "one two three four five"]
    data = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": f"p{i}", "completion": r} for i, r in enumerate(references)])
    monkeypatch.setattr(metrics, "_responses", lambda *args, **kwargs: list(references))
    perfect = metrics.text_overlap(tiny_model, tiny_tokenizer, data, n_resamples=50)
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["rouge1"] == pytest.approx(1.0)
    assert perfect["rougeL_interval"] == pytest.approx([1.0, 1.0])
    monkeypatch.setattr(metrics, "_responses", lambda *args, **kwargs: ["zebra"] * 3)
    none = metrics.text_overlap(tiny_model, tiny_tokenizer, data, n_resamples=50)
    assert none["bleu"] == pytest.approx(0.0) and none["rouge1"] == 0.0
    import sacrebleu

    partial = ["the cat is on a mat", "a dog is in the city", "one two six"]
    monkeypatch.setattr(metrics, "_responses", lambda *args, **kwargs: list(partial))
    some = metrics.text_overlap(tiny_model, tiny_tokenizer, data, n_resamples=50)
    assert some["bleu"] == pytest.approx(sacrebleu.corpus_bleu(partial, [references]).score)
    assert 0.0 < some["rouge1"] < 1.0 and some["bleu_interval"][0] <= some["bleu"] <= some["bleu_interval"][1]


def test_drift_same_model_is_zero_and_thresholds_warn(tiny_model, tiny_tokenizer, tmp_path):
    from tests.helpers import make_tiny_model

    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"hello {w}"} for w in ["cat", "dog", "red"]])
    same = metrics.drift(tiny_model, tiny_tokenizer, data, reference_model=(tiny_model, tiny_tokenizer, "same"),
                         max_new_tokens=6)
    assert same["policy"]["kl"]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert same["policy"]["kl"]["kl_k3"] == pytest.approx(0.0, abs=1e-5)
    assert same["warnings"] == []
    assert same["policy"]["entropy"] == pytest.approx(same["reference"]["entropy"], rel=1e-5)

    other = make_tiny_model(tiny_tokenizer, seed=7)
    different = metrics.drift(tiny_model, tiny_tokenizer, data, reference_model=(other, tiny_tokenizer, "other"),
                              max_new_tokens=6, drift_thresholds={"kl": -1.0}, refusal_patterns=[r"\bcat\b"])
    assert different["policy"]["kl"]["kl_k3"] > 0
    assert any("KL to the reference" in w for w in different["warnings"])
    assert 0.0 <= different["policy"]["refusal_rate"] <= 1.0


def test_drift_needs_a_reference(tiny_model, tiny_tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hello"}])
    with pytest.raises(ValueError, match="reference model"):
        metrics.drift(tiny_model, tiny_tokenizer, data)


def test_drift_with_lora_uses_the_base_model(tiny_model, tiny_tokenizer, tmp_path):
    from alignkit.model import add_lora

    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hello"}, {"prompt": "hi"}])
    policy = add_lora(tiny_model, rank=2, alpha=4, dropout=0.0)   # B = 0 at init: identical to the base
    result = metrics.drift(policy, tiny_tokenizer, data, max_new_tokens=4)
    assert "adapter disabled" in result["reference_model"]
    assert result["policy"]["kl"]["kl"] == pytest.approx(0.0, abs=1e-5)


def test_perplexity_has_an_interval(tiny_model, tiny_tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": f"hello {i}", "completion": "the answer is yes " * (i + 1)}
                                                  for i in range(6)])
    result = run_metrics(tiny_model, tiny_tokenizer, ["perplexity"], data=data)["perplexity"]
    low, high = result["perplexity_interval"]
    assert low <= result["perplexity"] <= high and low < high
    assert result["seconds"] >= 0


def test_data_per_metric_and_errors(tiny_model, tiny_tokenizer, graded):
    with pytest.raises(ValueError, match="needs data"):
        run_metrics(tiny_model, tiny_tokenizer, ["perplexity"], data={"accuracy": graded})
    with pytest.raises(ValueError, match="unknown metric"):
        run_metrics(tiny_model, tiny_tokenizer, ["nope"], data=graded)
    with pytest.raises(ValueError, match="--model-b"):
        run_metrics(tiny_model, tiny_tokenizer, ["win_rate"], data={"*": graded})


# ------------------------------------------------------------------------------------------------ report

def synthetic_results():
    return {
        "win_rate": {"win_rate": 0.62, "win_rate_interval": [0.52, 0.71], "p_value": 0.01, "n": 100, "wins": 55,
                     "losses": 31, "ties": 14, "model_a": "dpo", "model_b": "base", "judge": "rm"},
        "reward_accuracy": {"accuracy": 0.9, "accuracy_interval": [0.8, 0.95], "mean_margin": 1.5,
                            "mean_margin_interval": [1.2, 1.8], "n": 50},      # the shape alignkit rm's metric returns
        "format_accuracy": {"format_accuracy": 0.7, "n": 50},                    # no interval: the report adds one
        "elo": {"ratings": {"dpo": {"rating": 1040.0, "interval": [1010.0, 1070.0]},
                            "base": {"rating": 960.0, "interval": [930.0, 990.0]}},
                "pairs": [], "method": "bradley_terry", "n": 100},
        "drift": {"policy": {"kl": {"kl": 12.0, "kl_k3": 11.0}, "kl_interval": [10.0, 14.0], "entropy": 1.0,
                             "entropy_interval": [0.9, 1.1], "length": {"mean": 90.0}, "length_interval": [80, 100],
                             "distinct_2": 0.5, "refusal_rate": 0.1, "refusal_rate_interval": [0.05, 0.2]},
                  "reference": {"entropy": 2.0, "length": {"mean": 40.0}, "distinct_2": 0.7, "refusal_rate": 0.0},
                  "warnings": ["Mean length grew"], "n": 20, "reference_model": "base"},
    }


def test_report_files_headline_and_warnings(tmp_path):
    pytest.importorskip("matplotlib")
    from alignkit.evaluate.report import headline_rows, write_report

    results = synthetic_results()
    rows = {(r["metric"], r["name"]): r for r in headline_rows(results)}
    assert rows[("win_rate", "win_rate")]["low"] == 0.52 and "p = 0.01" in rows[("win_rate", "win_rate")]["note"]
    added = rows[("format_accuracy", "format_accuracy")]
    assert (added["low"], added["high"]) == pytest.approx(wilson_interval(35, 50)) and "Wilson" in added["note"]
    assert rows[("reward_accuracy", "accuracy")]["low"] == 0.8
    assert rows[("reward_accuracy", "mean_margin")]["high"] == 1.8
    assert rows[("elo", "rating: dpo")]["value"] == 1040.0
    assert rows[("drift", "KL to reference (nats/seq)")]["value"] == 12.0

    paths = write_report(results, tmp_path / "first", {"model": "dpo"})
    report = json.loads(paths["json"].read_text())
    assert report["warnings"] == ["drift: Mean length grew"]
    assert paths["png"].stat().st_size > 10_000 and paths["png"].read_bytes()[:4] == b"\x89PNG"
    page = paths["markdown"].read_text()
    assert "| format_accuracy | 0.7 |" in page and "| reward_accuracy / accuracy | 0.9 | [0.8, 0.95] |" in page
    assert "**WARNING** drift: Mean length grew" in page
    assert "![report](report.png)" in page

    results["format_accuracy"]["format_accuracy"] = 0.8
    second = write_report(results, tmp_path / "second", {"model": "dpo-2"}, baseline=tmp_path / "first")
    assert "| baseline |" in second["markdown"].read_text()
    assert json.loads(second["json"].read_text())["baseline"]["meta"]["model"] == "dpo"


# ------------------------------------------------------------------------------------------------ command

def test_eval_command_end_to_end(tiny_tokenizer, tmp_path, capsys):
    for package in ("matplotlib", "sacrebleu", "rouge_score"):   # the `eval` extra
        pytest.importorskip(package)
    from alignkit.cli import main
    from alignkit.model import save_model
    from alignkit.model.heads import ScalarHeadModel
    from tests.helpers import make_tiny_model

    save_model(make_tiny_model(tiny_tokenizer, seed=0), tiny_tokenizer, tmp_path / "a")
    save_model(make_tiny_model(tiny_tokenizer, seed=1), tiny_tokenizer, tmp_path / "b")
    ScalarHeadModel(make_tiny_model(tiny_tokenizer, seed=2)).save(tmp_path / "rm", tiny_tokenizer)
    prompts = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": f"hello {w}", "completion": f"the {w} is red"}
                                                  for w in ["cat", "dog", "bird"]])
    questions = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"{i} plus {i}", "answer": f"#### {2 * i}"}
                                                    for i in range(3)])
    choices = write_jsonl(tmp_path / "mc.jsonl", [{"question": "the capital of france", "choices": ["paris", "rome"],
                                                   "answer": "A"}])
    report_dir = tmp_path / "report"
    code = main(["eval", "--model", str(tmp_path / "a"), "--data", prompts, "--data", f"accuracy={questions}",
                 "--data", f"multiple_choice={choices}",
                 "--metrics", "perplexity,accuracy,multiple_choice,text_overlap,win_rate,elo,drift",
                 "--model-b", str(tmp_path / "b"), "--models", str(tmp_path / "b"),
                 "--judge", f"reward-model:{tmp_path / 'rm'}", "--reference-model", str(tmp_path / "b"),
                 "--max-new-tokens", "4", "--samples", "2", "--bootstrap", "50", "--drift-threshold", "kl=none",
                 "--report-dir", str(report_dir)])
    assert code == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert list(report["metrics"]) == ["perplexity", "accuracy", "multiple_choice", "text_overlap", "win_rate",
                                       "elo", "drift"]
    assert report["metrics"]["win_rate"]["n"] == 3 and report["metrics"]["accuracy"]["samples_per_prompt"] == 2
    assert (report_dir / "report.png").exists() and (report_dir / "report.md").exists()
    out = capsys.readouterr().out
    assert "win_rate" in out and "report.md" in out

    assert main(["eval", "--model", str(tmp_path / "a"), "--data", prompts, "--metrics", "win_rate",
                 "--report-dir", str(tmp_path / "x")]) == 2
    assert "--model-b" in capsys.readouterr().err
