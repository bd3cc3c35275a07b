"""Reward and judge failures stay contained: a dead endpoint costs one round of retries per step, a
function that keeps failing is not called for the rest of the batch, a batch where every item failed
stops the run with one line, and the counts reach the report."""
import socket
import time

import pytest

from alignkit.judges import EndpointDown, OpenAICompatibleBackend, llm_judge_reward
from alignkit.rewards import CombinedReward, RewardFunctionError
from tests.test_judges import _FakeOpenAI, server  # noqa: F401 - the fixture

PROMPTS = [f"question {i}" for i in range(16)]
COMPLETIONS = [f"answer {i}" for i in range(16)]


def dead_url() -> str:
    """An address on this machine where nothing listens (connections are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def judge_reward(url, **options):
    backend = OpenAICompatibleBackend(url, "judge", timeout=2, max_retries=2, backoff_s=0.05, max_workers=4,
                                      **options)
    return backend, {"name": llm_judge_reward(backend=backend, max_retries=0), "label": "judge"}


def test_a_dead_judge_endpoint_is_retried_once_per_step_then_the_run_stops_saying_so():
    backend, term = judge_reward(dead_url())
    combined = CombinedReward([term, {"name": "exact_match", "label": "exact"}], on_error="zero")
    started = time.perf_counter()
    with pytest.raises(RewardFunctionError) as stopped:
        combined(PROMPTS, COMPLETIONS, answer=COMPLETIONS)
    seconds = time.perf_counter() - started
    message = str(stopped.value)
    assert message.splitlines()[0].startswith("reward function 'judge' failed on every one of the 16 completions")
    assert f"{backend.base_url}/chat/completions" in message and "the run stops" in message
    # the three failed requests that opened the circuit and at most three more already in flight,
    # three attempts each; nothing after that (without the breaker: 16 x 3 for the batch, 16 x 3 again
    # item by item)
    assert backend.calls <= (3 + 3) * 3 and backend.circuit_opened == 1
    assert backend.skipped_requests >= 3  # the item-by-item pass was refused without a request
    assert seconds < 5
    lines = combined.report_lines()
    assert len(lines) == 1 and lines[0].startswith("reward judge: 16 of 16 items failed in 1 batches")
    assert "down 1 times" in lines[0]


def test_the_endpoint_is_tried_again_next_step_and_scores_when_it_is_back(server):  # noqa: F811
    _FakeOpenAI.fail_first = 10_000  # 503 "busy" until further notice
    backend, term = judge_reward(server)
    combined = CombinedReward([term], on_error="zero")
    with pytest.raises(RewardFunctionError, match="every one of the 4 completions"):
        combined(PROMPTS[:4], COMPLETIONS[:4])
    refused = backend.calls
    with pytest.raises(EndpointDown):  # still down within the step
        backend.complete([[{"role": "user", "content": "x"}]])
    assert backend.calls == refused
    _FakeOpenAI.fail_first = 0
    result = combined(PROMPTS[:4], COMPLETIONS[:4])  # the next step resets the circuit
    assert result.per_function["judge"] == pytest.approx([5 / 9] * 4)  # "Score: 6" on 1..10
    assert result.errors == 0 and backend.circuit_opened == 1


def test_a_function_failing_in_a_row_is_not_called_for_the_rest_of_the_batch():
    seen = []

    def brittle(prompts, completions, **fields):
        seen.extend(completions)
        if any("boom" in c for c in completions):
            raise ConnectionError("scoring service unreachable")
        return [1.0] * len(completions)

    combined = CombinedReward([brittle], on_error="zero", max_consecutive_failures=3)
    completions = ["ok", "boom", "boom", "boom", "fine", "good"]
    result = combined(["q"] * 6, completions)
    assert result.per_function["brittle"] == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert seen == completions + ["ok", "boom", "boom", "boom"]  # the batch once, then items until 3 in a row
    assert result.errors == 5 and result.skipped == 2
    assert "not called: it failed on 3 items in a row" in "\n".join(result.error_messages)
    assert combined.stats["brittle"] == {"batches": 1, "items": 6, "errors": 5, "skipped": 2}


def test_one_failing_item_of_many_is_still_scored_zero_and_counted():
    def picky(prompts, completions, **fields):
        return [None if c == "bad" else 1.0 for c in completions]

    combined = CombinedReward([picky], on_error="zero")
    result = combined(["q"] * 3, ["a", "bad", "b"])
    assert result.per_function["picky"] == [1.0, 0.0, 1.0] and result.errors == 1
    with pytest.raises(RewardFunctionError, match="every one of the 2 completions"):
        combined(["q"] * 2, ["bad", "bad"])
    assert combined(["q"], ["bad"]).errors == 1  # a batch of one is not a verdict on the function
