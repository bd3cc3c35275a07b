"""LLM judges: strict parsing, retries then counting, the on-disk cache (checked against a real HTTP
server on 127.0.0.1), templates, label log-probs on a tiny model, agreement, the llm_judge reward."""
from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from alignkit.judges import (
    JudgeCache,
    JudgeError,
    LocalChatBackend,
    OpenAICompatibleBackend,
    PairwiseJudge,
    PointwiseJudge,
    Template,
    agreement,
    parse_score,
    parse_verdict,
)


class ScriptedBackend:
    """A ChatBackend whose answers come from a function of the conversation; counts every call."""

    identity = "scripted:v1"

    def __init__(self, answer):
        self.answer = answer
        self.calls = 0
        self.seen = []

    def complete(self, conversations, temperature=0.0, max_tokens=512):
        self.calls += len(conversations)
        self.seen.extend(conversations)
        return [self.answer(c) for c in conversations]


# -- parsing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("A is clearer.\nVerdict: A", "A"),
    ("reasoning\n**Verdict: B**", "B"),
    ("verdict: TIE.", "tie"),
    ("Both fine.\nVerdict: tie\n", "tie"),
    ("Verdict: A\nOn reflection the same.\nVerdict: A", "A"),
])
def test_parse_verdict_accepts_the_format(text, expected):
    assert parse_verdict(text) == (expected, None)


@pytest.mark.parametrize("text", [
    "I prefer A.",                          # no verdict line
    "Verdict: A is better",                 # extra words on the verdict line
    "Verdict: A\nVerdict: B",               # conflicting lines
    "Verdict: C",                           # not a label
    "",
])
def test_parse_verdict_never_guesses(text):
    verdict, reason = parse_verdict(text)
    assert verdict is None and reason


def test_parse_score():
    assert parse_score("good\nScore: 7", (1, 10)) == (7.0, None)
    assert parse_score("Score: 8/10", (1, 10)) == (8.0, None)
    assert parse_score("**Score:** 3", (1, 5)) == (3.0, None)
    for text in ["Score: 11", "Score: 7/5", "Score: seven", "I'd say 7", "Score: 2\nScore: 9", "Score: 0"]:
        value, reason = parse_score(text, (1, 10))
        assert value is None and reason, text


# -- retries and counting ----------------------------------------------------------------------------


def test_malformed_answers_are_retried_with_a_reminder_then_counted():
    def answer(conversation):
        request = conversation[1]["content"] if conversation[0]["role"] == "system" else conversation[0]["content"]
        if "fixable" in request:  # malformed first, well-formed after the reminder
            return "Verdict: B" if len(conversation) > 2 else "I like B more"
        if "hopeless" in request:
            return "no idea"
        return "Verdict: A"

    backend = ScriptedBackend(answer)
    judge = PairwiseJudge(backend, max_retries=2)
    verdicts = judge.compare(["fine", "fixable", "hopeless"], ["x", "x", "x"], ["y", "y", "y"])
    assert verdicts == ["A", "B", None]
    stats = judge.stats
    assert stats.items == 3 and stats.parsed == 2 and stats.malformed == 1
    assert stats.retries == 1 + 2  # "fixable" once, "hopeless" twice
    assert backend.calls == 3 + 1 + 2
    assert stats.malformed_reasons == {"no 'Verdict:' line": 1}
    retry = [c for c in backend.seen if len(c) > 2][0]
    assert retry[-2] == {"role": "assistant", "content": "I like B more"}
    assert "Verdict: A" in retry[-1]["content"] and retry[-1]["role"] == "user"
    detailed = judge.compare_detailed(["hopeless"], ["x"], ["y"])[0]
    assert detailed.value is None and detailed.answers == ["no idea"] * 3


def test_zero_retries_means_one_attempt():
    backend = ScriptedBackend(lambda c: "Score: 99")
    judge = PointwiseJudge(backend, max_retries=0)
    assert judge.score(["q"], ["r"]) == [None]
    assert backend.calls == 1 and judge.stats.malformed == 1
    assert "outside the scale" in next(iter(judge.stats.malformed_reasons))


def test_pointwise_scale_rubric_and_normalisation():
    backend = ScriptedBackend(lambda c: "Solid.\nScore: 4")
    judge = PointwiseJudge(backend, scale=(1, 5), rubric="Is it polite?")
    assert judge.score([[{"role": "user", "content": "hi"}]], ["hello"]) == [4.0]
    request = backend.seen[0][-1]["content"]
    assert "Is it polite?" in request and "from 1 to 5" in request and "hello" in request
    assert judge.normalize(4.0) == 0.75 and judge.normalize(None) is None


# -- templates -------------------------------------------------------------------------------------------


def test_template_file_override_and_placeholder_checks(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("[system]\nBe terse. JSON like {\"a\": 1} stays.\n[user]\nQ={prompt} R={response} ({low}-{high})")
    backend = ScriptedBackend(lambda c: "Score: 2")
    judge = PointwiseJudge(backend, str(path), scale=(1, 3))
    judge.score(["why"], ["because"])
    system, user = backend.seen[0]
    assert system == {"role": "system", "content": "Be terse. JSON like {\"a\": 1} stays."}
    assert user["content"] == "Q=why R=because (1-3)"
    with pytest.raises(ValueError, match=r"lacks the placeholder\(s\) \{response_b\}"):
        PairwiseJudge(backend, "Compare {prompt}: {response_a}")
    with pytest.raises(ValueError, match=r"unknown placeholder\(s\) \{answer\}"):
        PointwiseJudge(backend, "{prompt} {response} {answer}")
    with pytest.raises(FileNotFoundError):
        PointwiseJudge(backend, str(tmp_path / "missing.txt"))
    assert Template.parse("just {prompt}").system == ""


# -- cache + HTTP ------------------------------------------------------------------------------------------


class _FakeOpenAI(BaseHTTPRequestHandler):
    calls = 0
    fail_first = 0
    seen_auth: list = []
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802 - http.server's name
        with _FakeOpenAI.lock:
            _FakeOpenAI.calls += 1
            fail = _FakeOpenAI.fail_first > 0
            _FakeOpenAI.fail_first -= 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _FakeOpenAI.seen_auth.append(self.headers.get("Authorization"))
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": {"message": "no such route"}})
        if body["model"] == "forbidden":
            return self._send(401, {"error": {"message": "bad key"}})
        if fail:
            return self._send(503, {"error": {"message": "busy"}})
        text = body["messages"][-1]["content"]
        answer = "Looks right.\nVerdict: A" if "<reply_A>" in text else "Score: 6"
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": answer}}]})

    def _send(self, code, payload):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _FakeOpenAI.calls, _FakeOpenAI.fail_first, _FakeOpenAI.seen_auth = 0, 0, []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def test_http_judge_cache_second_run_makes_no_calls(server, tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_TEST_KEY", "sk-test")
    prompts, a, b = ["p1", "p2", "p3"], ["a1", "a2", "a3"], ["b1", "b2", "b3"]

    def run():
        backend = OpenAICompatibleBackend(server, "judge-model", api_key_env="ALIGNKIT_TEST_KEY", timeout=5)
        judge = PairwiseJudge(backend, cache=JudgeCache(tmp_path / "cache"))
        scorer = PointwiseJudge(backend, cache=tmp_path / "cache")
        return judge.compare(prompts, a, b), scorer.score(prompts, a), backend, judge

    first, scores, backend, judge = run()
    assert first == ["A", "A", "A"] and scores == [6.0, 6.0, 6.0]
    assert _FakeOpenAI.calls == 6 and backend.calls == 6 and judge.stats.cache_hits == 0
    assert set(_FakeOpenAI.seen_auth) == {"Bearer sk-test"}

    again, scores_again, backend, judge = run()
    assert (again, scores_again) == (first, scores)
    assert _FakeOpenAI.calls == 6, "the rerun reached the server"
    assert backend.calls == 0 and judge.stats.cache_hits == 3 and judge.stats.backend_calls == 0

    # anything that changes the question misses the cache: one new item, a new rubric, a new model
    PairwiseJudge(OpenAICompatibleBackend(server, "judge-model", timeout=5), cache=tmp_path / "cache").compare(
        ["p1", "p4"], ["a1", "a4"], ["b1", "b4"])
    assert _FakeOpenAI.calls == 7
    PointwiseJudge(OpenAICompatibleBackend(server, "judge-model", timeout=5), cache=tmp_path / "cache",
                   rubric="other").score(["p1"], ["a1"])
    PointwiseJudge(OpenAICompatibleBackend(server, "other-model", timeout=5), cache=tmp_path / "cache").score(
        ["p1"], ["a1"])
    assert _FakeOpenAI.calls == 9
    assert len(JudgeCache(tmp_path / "cache")) == 9


def test_malformed_results_are_cached_too(tmp_path):
    backend = ScriptedBackend(lambda c: "no format")
    for _ in range(2):
        judge = PairwiseJudge(backend, max_retries=1, cache=tmp_path / "c.sqlite")
        assert judge.compare(["q"], ["a"], ["b"]) == [None]
    assert backend.calls == 2 and judge.stats.malformed == 0 and judge.stats.cache_hits == 1
    judge = PairwiseJudge(backend, max_retries=1, cache=tmp_path / "c.sqlite", refresh=True)
    judge.compare(["q"], ["a"], ["b"])
    assert backend.calls == 4


def test_http_backend_retries_server_errors_and_fails_clearly(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    _FakeOpenAI.fail_first = 2
    backend = OpenAICompatibleBackend(server, "m", timeout=5, max_retries=3, backoff_s=0.01)
    assert backend.complete([[{"role": "user", "content": "x"}]]) == ["Score: 6"]
    assert backend.calls == 3 and _FakeOpenAI.seen_auth[-1] is None
    with pytest.raises(JudgeError, match="HTTP 401: bad key"):
        OpenAICompatibleBackend(server, "forbidden", timeout=5).complete([[{"role": "user", "content": "x"}]])
    with pytest.raises(JudgeError, match="failed after 2 attempts"):
        OpenAICompatibleBackend("http://127.0.0.1:9/v1", "m", timeout=2, max_retries=1,
                                backoff_s=0.01).complete([[{"role": "user", "content": "x"}]])
    with pytest.raises(ValueError, match="http"):
        OpenAICompatibleBackend("localhost:8000", "m")


# -- local model: generation and label log-probs --------------------------------------------------------------


def test_local_label_logprobs_match_full_sequence_scoring(tiny_model, tiny_tokenizer):
    import torch

    from alignkit.data import tokenize_prompt

    backend = LocalChatBackend(tiny_model, tiny_tokenizer, batch_size=3)
    conversations = [[{"role": "user", "content": "is the cat red"}],
                     [{"role": "system", "content": "be good"}, {"role": "user", "content": "two plus two"}]]
    labels = ["1", "2", "10", "tie"]
    table = backend.label_logprobs(conversations, "Score:", labels)
    assert backend.calls == 2
    for conversation, row in zip(conversations, table):
        start = tokenize_prompt(tiny_tokenizer, conversation) + tiny_tokenizer.encode("Score:", add_special_tokens=False)
        for label, value in zip(labels, row):
            ids = tiny_tokenizer.encode("Score: " + label, add_special_tokens=False)[
                len(tiny_tokenizer.encode("Score:", add_special_tokens=False)):]
            full = torch.tensor([start + ids])
            with torch.no_grad():
                logp = torch.log_softmax(tiny_model(full).logits[0].float(), -1)
            expected = sum(float(logp[len(start) - 1 + k, token]) for k, token in enumerate(ids))
            assert value == pytest.approx(expected, abs=1e-4), label


def test_logprob_judges_on_a_tiny_model(tiny_model, tiny_tokenizer, tmp_path):
    backend = LocalChatBackend(tiny_model, tiny_tokenizer)
    assert backend.identity.startswith("local:")
    pairwise = PairwiseJudge(backend, method="logprobs", cache=tmp_path)
    results = pairwise.compare_detailed(["q", "r"], ["a", "b"], ["c", "d"])
    assert all(r.value in ("A", "B", "tie") for r in results)
    assert all(r.value == max(r.label_logprobs, key=r.label_logprobs.get) for r in results)
    both = pairwise.compare_both_orders(["q"], ["a"], ["c"])[0]
    assert both["margin"] == pytest.approx(
        (both["first"].label_logprobs["A"] - both["first"].label_logprobs["B"])
        - (both["second"].label_logprobs["A"] - both["second"].label_logprobs["B"]))
    pointwise = PointwiseJudge(backend, method="logprobs", scale=(1, 5))
    scores = pointwise.score(["q", "r"], ["a", "b"])
    assert all(1 <= s <= 5 for s in scores)
    calls = backend.calls
    assert PairwiseJudge(backend, method="logprobs", cache=tmp_path).compare(["q", "r"], ["a", "b"], ["c", "d"]) == \
        [r.value for r in results]
    assert backend.calls == calls, "cached logprob judgments re-ran the model"
    with pytest.raises(ValueError, match="logprobs"):
        PairwiseJudge(ScriptedBackend(lambda c: ""), method="logprobs")


def test_local_backend_generates(tiny_model, tiny_tokenizer):
    backend = LocalChatBackend(tiny_model, tiny_tokenizer)
    texts = backend.complete([[{"role": "user", "content": "hi"}]] * 2, max_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts) and backend.calls == 2


def test_both_orders_requires_consistency_in_generate_mode():
    def answer(conversation):
        text = conversation[-1]["content"]
        first_shown = text.split("<reply_A>")[1].split("</reply_A>")[0].strip()
        if "biased" in text:
            return "Verdict: A"  # always the first position
        return "Verdict: A" if first_shown == "good" else "Verdict: B"

    judge = PairwiseJudge(ScriptedBackend(answer))
    out = judge.compare_both_orders(["fair", "biased"], ["good", "good"], ["bad", "bad"])
    assert [o["verdict"] for o in out] == ["A", None]
    assert out[1]["reason"] == "inconsistent"
    out = judge.compare_both_orders(["fair"], ["bad"], ["good"])
    assert out[0]["verdict"] == "B"


# -- agreement ----------------------------------------------------------------------------------------------


def test_agreement_drops_missing_labels_and_uses_kappa():
    from alignkit.evaluate.stats import cohen_kappa

    judge = ["A", "B", "A", None, "tie", "A"]
    human = ["A", "B", "B", "A", "tie", None]
    result = agreement(judge, human)
    assert result["items"] == 6 and result["compared"] == 4 and result["missing"] == 2
    assert result["percent_agreement"] == 0.75
    assert result["cohen_kappa"] == pytest.approx(cohen_kappa(["A", "B", "A", "tie"], ["A", "B", "B", "tie"]))
    assert agreement([None], ["A"])["cohen_kappa"] is None
    with pytest.raises(ValueError):
        agreement(["A"], ["A", "B"])


# -- reward factory -----------------------------------------------------------------------------------------------


def test_llm_judge_reward_in_the_registry():
    from alignkit.rewards import CombinedReward, get_reward_function

    def answer(conversation):
        return "Score: 10" if "great" in conversation[-1]["content"] else (
            "Score: 1" if "awful" in conversation[-1]["content"] else "hmm")

    reward = get_reward_function("llm_judge", backend=ScriptedBackend(answer), max_retries=0)
    values = reward(["q", "q", "q"], ["great", "awful", "meh"])
    assert values[:2] == [1.0, 0.0] and values[2] is None
    assert reward.judge.stats.malformed == 1
    combined = CombinedReward([{"name": "llm_judge", "kwargs": {"backend": ScriptedBackend(answer), "max_retries": 0}}],
                              on_error="zero")
    result = combined(["q", "q"], ["great", "meh"])
    assert result.total == [1.0, 0.0] and result.errors == 1
    assert not math.isnan(result.total[1])


# -- the command ----------------------------------------------------------------------------------------------------


def test_cli_judge_pairwise_on_preference_rows_reports_agreement(server, tmp_path, capsys):
    from alignkit.cli import main

    data = tmp_path / "prefs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"})
                              for i in range(8)) + "\n")
    out = tmp_path / "judged.jsonl"
    args = ["judge", "--mode", "pairwise", "--data", str(data), "--judge-base-url", server, "--judge-model", "m",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["verdict"] for r in rows] == ["A"] * 8  # the fake server always answers A
    labels = [r["label"] for r in rows]
    assert set(labels) == {"A", "B"}  # chosen shown first or second, seeded
    assert summary["agreement"]["percent_agreement"] == labels.count("A") / 8
    assert summary["judge"]["items"] == 8 and _FakeOpenAI.calls == 8
    assert main(args) == 0  # the rerun is answered from the cache
    assert _FakeOpenAI.calls == 8 and json.loads(capsys.readouterr().out)["judge"]["cache_hits"] == 8


def test_cli_judge_pointwise_with_labels(server, tmp_path, capsys):
    from alignkit.cli import main

    data = tmp_path / "replies.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"q{i}", "completion": f"r{i}", "human": h})
                              for i, h in enumerate([6, 6, 3])) + "\n")
    assert main(["judge", "--mode", "pointwise", "--data", str(data), "--judge-base-url", server, "--judge-model", "m",
                 "--labels-field", "human", "--no-cache"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["agreement"]["compared"] == 3 and summary["agreement"]["percent_agreement"] == pytest.approx(2 / 3)
