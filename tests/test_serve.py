"""`alignkit serve`: a real server on 127.0.0.1 (free port), talked to with the `openai` client.

Served greedy replies for the base and two adapters, sent concurrently, equal offline generation
token for token, and all three shared one forward pass; streams join to the same text; adapters
load and unload at run time; the error cases answer with OpenAI-shaped bodies and the server
keeps serving; a client that goes away or runs out of time frees its slot; reward models score
through /v1/score; the LLM judge, best-of-N and `alignkit eval --metrics win_rate` run against it.
"""
from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import openai
import pytest
import torch

from alignkit.generation import chat_generate, generate_ids
from alignkit.model import add_lora, load_model_and_tokenizer, save_model
from alignkit.serve import BackgroundServer, build_state
from tests.helpers import make_tiny_model, make_tiny_tokenizer

CONVERSATION = [{"role": "user", "content": "hello what is the capital of france"}]


def _random_adapter(base_dir, out_dir, seed: int, rank: int = 4):
    base, tokenizer = load_model_and_tokenizer(str(base_dir), device="cpu")
    model = add_lora(base, rank=rank, dropout=0.0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: give the adapter a real effect
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    save_model(model, tokenizer, out_dir)
    return out_dir


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    tokenizer = make_tiny_tokenizer()
    base = save_model(make_tiny_model(tokenizer, seed=0), tokenizer, root / "base")
    other_base = save_model(make_tiny_model(tokenizer, seed=5), tokenizer, root / "other-base")
    adapters = root / "adapters"
    paths = {"one": _random_adapter(base, adapters / "one", 1), "two": _random_adapter(base, adapters / "two", 2),
             "three": _random_adapter(base, adapters / "three", 3),
             "foreign": _random_adapter(other_base, adapters / "foreign", 4)}
    broken = adapters / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((paths["one"] / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    from alignkit.model.heads import ScalarHeadModel

    reward = ScalarHeadModel(make_tiny_model(tokenizer, seed=7))
    with torch.no_grad():
        reward.head.bias.fill_(0.5)
    reward.save(root / "rm", tokenizer)
    long_context = save_model(_long_context_model(tokenizer), tokenizer, root / "long")
    return {"root": root, "base": base, "adapters": adapters, "rm": root / "rm", "long": long_context, **paths}


def _long_context_model(tokenizer, hidden: int = 32):
    """A tiny random Llama with 4096 positions: long generations (ignore_eos) that outlast a test's steps."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id)).eval()


@pytest.fixture(scope="module")
def server(files):
    state = build_state(str(files["base"]), adapters=[("one", str(files["one"])), ("two", str(files["two"]))],
                        reward_models=[("rm", str(files["rm"]))], device="cpu", max_wait_ms=200,
                        lora_root=str(files["adapters"]), served_model_name="base")
    with BackgroundServer(state) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def _offline(files, adapter: str | None, conversation=CONVERSATION, max_new_tokens: int = 24):
    model, tokenizer = load_model_and_tokenizer(str(files["base"]), device="cpu",
                                                adapter=str(files[adapter]) if adapter else None)
    from alignkit.generation import render_prompts

    ids = generate_ids(model, tokenizer, render_prompts(tokenizer, [conversation]), max_new_tokens=max_new_tokens)[0]
    return ids, chat_generate(model, tokenizer, [conversation], max_new_tokens=max_new_tokens)[0]


def _stats(server) -> dict:
    return httpx.get(f"{server.url}/stats").json()


def test_models_lists_the_base_and_its_adapters(client, files):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"base", "one", "two", "rm"}
    assert models["one"].parent == "base" and models["two"].parent == "base"
    assert models["base"].parent is None and models["base"].root == str(files["base"].resolve())
    assert models["one"].root == str(files["one"].resolve())
    assert httpx.get(f"{client.base_url}".replace("/v1/", "/health")).json()["status"] == "ok"


def test_concurrent_greedy_replies_equal_offline_generation(client, server, files, capsys):
    before = _stats(server)

    def ask(name):
        return client.chat.completions.create(model=name, messages=CONVERSATION, temperature=0, max_tokens=24,
                                              logprobs=True, extra_body={"return_tokens_as_token_ids": True})

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        replies = dict(zip(["base", "one", "two"], pool.map(ask, ["base", "one", "two"])))
    after = _stats(server)
    texts = {}
    for name, reply in replies.items():
        ids, text = _offline(files, None if name == "base" else name)
        served_ids = [int(item.token.removeprefix("token_id:")) for item in reply.choices[0].logprobs.content]
        assert served_ids == ids, name                                   # token for token
        assert reply.choices[0].message.content.strip() == text, name
        assert reply.usage.completion_tokens == len(ids) + (reply.choices[0].finish_reason == "stop")
        texts[name] = text
    assert len(set(texts.values())) == 3, "the adapters must change the replies, or this test shows nothing"
    # the three requests shared forward passes: one prefill and the decode steps held all three
    assert after["max_adapters_in_forward"] == 3
    assert after["mixed_adapter_forwards"] - before.get("mixed_adapter_forwards", 0) >= 20

    from alignkit.cli import main

    capsys.readouterr()
    assert main(["generate", "--model", str(files["base"]), "--adapter", str(files["two"]), "--device", "cpu",
                 "--prompt", CONVERSATION[0]["content"], "--max-new-tokens", "24"]) == 0
    from alignkit.commands.generate import cut_off_mark

    printed = capsys.readouterr().out.strip().removesuffix(cut_off_mark(24)).strip()
    assert printed.splitlines()[-1] == texts["two"].splitlines()[-1]


def test_streamed_chunks_join_to_the_same_text(client):
    whole = client.chat.completions.create(model="one", messages=CONVERSATION, temperature=0, max_tokens=24)
    stream = client.chat.completions.create(model="one", messages=CONVERSATION, temperature=0, max_tokens=24,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # a stop string taken from the middle of the reply: both cut just before it
    full = whole.choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = client.chat.completions.create(model="one", messages=CONVERSATION, temperature=0, max_tokens=24, stop=[stop])
    assert cut.choices[0].message.content == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="one", messages=CONVERSATION, temperature=0, max_tokens=24,
                                              stop=[stop], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut.choices[0].message.content


def test_completions_with_token_ids_and_logprobs(client, files):
    model, tokenizer = load_model_and_tokenizer(str(files["base"]), device="cpu", adapter=str(files["one"]))
    prompt = tokenizer.encode("the cat is on the")
    reply = client.completions.create(model="one", prompt=prompt, temperature=0, max_tokens=8, logprobs=3,
                                      extra_body={"ignore_eos": True})
    expected = generate_ids(model, tokenizer, [prompt], max_new_tokens=8)[0]
    assert reply.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    with torch.no_grad():
        first = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1].float(), -1)
    logprobs = reply.choices[0].logprobs
    assert logprobs.token_logprobs[0] == pytest.approx(float(first[expected[0]]), abs=1e-4)
    assert max(logprobs.top_logprobs[0].values()) == pytest.approx(float(first.max()), abs=1e-4)
    assert reply.usage.prompt_tokens == len(prompt)
    # text prompts (a batch of two) are tokenized as the tokenizer does
    texts = client.completions.create(model="base", prompt=["the cat is on the", "hello"], temperature=0, max_tokens=4)
    assert [c.index for c in texts.choices] == [0, 1]


def test_seeded_sampling_repeats_and_n_gives_distinct_choices(client):
    def sample(**extra):
        return client.chat.completions.create(model="two", messages=CONVERSATION, temperature=1.0, max_tokens=12,
                                              seed=11, **extra)

    one, again = sample(n=3), sample(n=3)
    assert [c.message.content for c in one.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in one.choices}) > 1
    # the same seed in a batch with other requests draws the same tokens
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(sample, n=3)] + [pool.submit(client.chat.completions.create, model="base",
                                                            messages=CONVERSATION, temperature=0.7, max_tokens=12)
                                                for _ in range(2)]
        crowded = futures[0].result()
    assert [c.message.content for c in crowded.choices] == [c.message.content for c in one.choices]


def test_adapters_load_and_unload_at_run_time(client, server, files):
    post = httpx.post
    loaded = post(f"{server.base_url}/load_lora_adapter", json={"lora_name": "three", "lora_path": "three"})
    assert loaded.status_code == 200, loaded.text
    assert "three" in {m.id for m in client.models.list().data}
    ids, text = _offline(files, "three")
    assert client.chat.completions.create(model="three", messages=CONVERSATION, temperature=0,
                                          max_tokens=24).choices[0].message.content.strip() == text
    unloaded = post(f"{server.base_url}/unload_lora_adapter", json={"lora_name": "three"})
    assert unloaded.status_code == 200, unloaded.text
    assert "three" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="three", messages=CONVERSATION, max_tokens=2)

    reference = client.chat.completions.create(model="one", messages=CONVERSATION, temperature=0, max_tokens=16)
    outside = post(f"{server.base_url}/load_lora_adapter", json={"lora_name": "x", "lora_path": str(files["base"])})
    assert outside.status_code == 403 and "outside the allowed adapter root" in outside.json()["error"]["message"]
    escape = post(f"{server.base_url}/load_lora_adapter", json={"lora_name": "x", "lora_path": "../base"})
    assert escape.status_code == 403
    foreign = post(f"{server.base_url}/load_lora_adapter", json={"lora_name": "foreign", "lora_path": "foreign"})
    assert foreign.status_code == 400 and "was trained on base model" in foreign.json()["error"]["message"]
    broken = post(f"{server.base_url}/load_lora_adapter", json={"lora_name": "broken", "lora_path": "broken"})
    assert broken.status_code == 400 and "could not be loaded" in broken.json()["error"]["message"]
    bad_name = post(f"{server.base_url}/load_lora_adapter", json={"lora_name": "../x", "lora_path": "three"})
    assert bad_name.status_code == 400
    taken = post(f"{server.base_url}/load_lora_adapter", json={"lora_name": "one", "lora_path": "three"})
    assert taken.status_code == 400 and "already loaded" in taken.json()["error"]["message"]
    # after every refusal the other adapters serve exactly as before
    assert {m.id for m in client.models.list().data} == {"base", "one", "two", "rm"}
    again = client.chat.completions.create(model="one", messages=CONVERSATION, temperature=0, max_tokens=16)
    assert again.choices[0].message.content == reference.choices[0].message.content


def test_bad_requests_get_openai_shaped_errors(client, server):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=CONVERSATION)
    assert missing.value.body["type"] == "not_found_error" and "nope" in missing.value.body["message"]
    cases = [dict(temperature=5), dict(n=0), dict(max_tokens=100000), dict(top_p=0),
             dict(extra_body={"tools": [{"type": "function", "function": {"name": "f"}}]}),
             dict(presence_penalty=0.5), dict(stop=[""])]
    for case in cases:
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model="base", messages=CONVERSATION, **case)
        assert bad.value.body["message"], case
    with pytest.raises(openai.BadRequestError, match="reward model"):
        client.chat.completions.create(model="rm", messages=CONVERSATION)
    raw = httpx.post(f"{server.base_url}/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["code"] == 400
    no_messages = httpx.post(f"{server.base_url}/chat/completions", json={"model": "base"})
    assert no_messages.status_code == 400 and no_messages.json()["error"]["param"] == "messages"
    assert httpx.get(f"{server.url}/nowhere").json()["error"]["code"] == 404
    assert client.chat.completions.create(model="base", messages=CONVERSATION, max_tokens=2).choices


def test_reward_model_scores_through_the_server(server, files):
    from alignkit.model.heads import score_responses
    from alignkit.model.heads import load_scalar_model
    from alignkit.serve.client import remote_reward_model

    model, tokenizer = load_scalar_model(files["rm"])
    prompts, responses = ["hello", "what is two plus two"], ["hi there", "four"]
    expected = score_responses(model, tokenizer, [([{"role": "user", "content": p}], r) for p, r in zip(prompts, responses)],
                               8, 1024, None)
    reply = httpx.post(f"{server.base_url}/score", json={"model": "rm", "input": [
        {"prompt": p, "response": r} for p, r in zip(prompts, responses)]})
    assert [item["score"] for item in reply.json()["data"]] == pytest.approx(expected, abs=1e-5)
    assert remote_reward_model(prompts, responses, base_url=server.base_url, model="rm") == pytest.approx(expected,
                                                                                                        abs=1e-5)
    from alignkit.rewards import get_reward_function

    reward = get_reward_function("alignkit.serve.client:remote_reward_model", base_url=server.base_url, model="rm")
    assert reward(prompts, responses) == pytest.approx(expected, abs=1e-5)
    assert httpx.post(f"{server.base_url}/score", json={"model": "one", "input": []}).status_code == 400
    assert httpx.post(f"{server.base_url}/score", json={"model": "rm", "prompt": "x"}).status_code == 400


def test_api_key_is_required_when_set(files):
    state = build_state(str(files["base"]), device="cpu", api_key="sesame", served_model_name="base")
    with BackgroundServer(state) as running:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=running.base_url, api_key="wrong", max_retries=0).models.list()
        assert httpx.get(f"{running.base_url}/models").status_code == 401
        good = openai.OpenAI(base_url=running.base_url, api_key="sesame", max_retries=0)
        assert [m.id for m in good.models.list().data] == ["base"]
        assert httpx.get(f"{running.url}/health").status_code == 200
        # run-time loading is off unless --lora-root is given
        off = httpx.post(f"{running.base_url}/load_lora_adapter", headers={"Authorization": "Bearer sesame"},
                         json={"lora_name": "one", "lora_path": str(files["one"])})
        assert off.status_code == 403 and "--lora-root" in off.json()["error"]["message"]


def _wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


LONG = dict(model="base", messages=CONVERSATION, temperature=0, max_tokens=4000, extra_body={"ignore_eos": True})


def test_queue_full_timeouts_and_disconnects_free_slots(files):
    state = build_state(str(files["long"]), device="cpu", max_batch=1, max_queue=1, max_wait_ms=0,
                        served_model_name="base", request_timeout=30)
    with BackgroundServer(state) as running:
        client = openai.OpenAI(base_url=running.base_url, api_key="x", max_retries=0)
        first = client.chat.completions.create(stream=True, **LONG)
        next(iter(first))                                               # running now
        assert _wait_for(lambda: _stats(running)["running"] == 1)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            second = pool.submit(lambda: client.chat.completions.create(**{**LONG, "max_tokens": 4}))
            assert _wait_for(lambda: _stats(running)["waiting"] == 1)
            with pytest.raises(openai.RateLimitError) as full:          # one running, one waiting: full
                client.chat.completions.create(**LONG)
            assert full.value.body["type"] == "rate_limit_error"
            first.close()                                                # the client goes away mid-stream
            assert second.result(timeout=30).choices                    # ... so the waiting one gets its turn
        assert _wait_for(lambda: _stats(running).get("finished_cancelled", 0) == 1)
        assert _stats(running)["running"] == 0
    state = build_state(str(files["long"]), device="cpu", served_model_name="base", request_timeout=0.2)
    with BackgroundServer(state) as running:
        client = openai.OpenAI(base_url=running.base_url, api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as late:
            client.chat.completions.create(**LONG)
        assert late.value.status_code == 408
        assert _wait_for(lambda: _stats(running).get("finished_timeout", 0) == 1 and _stats(running)["running"] == 0)
        assert client.chat.completions.create(model="base", messages=CONVERSATION, max_tokens=2).choices


# --------------------------------------------------------------------------- a locally served judge

JUDGE_ANSWER = "Verdict: A\nScore: 7"


def _train_judge(tokenizer, steps: int = 60, hidden: int = 64, lr: float = 3e-3):
    """A tiny model trained to answer every judge prompt with ``JUDGE_ANSWER`` (long context)."""
    from alignkit.data import tokenize_chat
    from alignkit.judges import (
        DEFAULT_CRITERIA,
        DEFAULT_RUBRIC,
        PAIRWISE_TEMPLATE_FILE,
        POINTWISE_TEMPLATE_FILE,
        load_template,
    )

    model = _long_context_model(tokenizer, hidden)
    words = ["cat", "dog", "hello", "two plus two", "the capital of france", "acme refund policy"]
    rows = []
    for i, template in enumerate([PAIRWISE_TEMPLATE_FILE, POINTWISE_TEMPLATE_FILE] * 3):
        messages = load_template(None, template).render({
            "prompt": words[i], "response_a": words[(i + 1) % 6] * (i + 1), "response_b": words[(i + 2) % 6],
            "response": words[(i + 3) % 6] * i, "criteria": DEFAULT_CRITERIA, "rubric": DEFAULT_RUBRIC,
            "low": "1", "high": "10"})
        rows.append(tokenize_chat(tokenizer, messages + [{"role": "assistant", "content": JUDGE_ANSWER}]))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        row = rows[step % len(rows)]
        ids = torch.tensor([row.input_ids])
        labels = torch.tensor([[t if m else -100 for t, m in zip(row.input_ids, row.loss_mask)]])
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def judge_server(files):
    tokenizer = make_tiny_tokenizer()
    judge_dir = save_model(_train_judge(tokenizer), tokenizer, files["root"] / "judge")
    state = build_state(str(judge_dir), device="cpu", served_model_name="judge", max_wait_ms=5)
    with BackgroundServer(state) as running:
        yield running


def test_judge_best_of_n_and_win_rate_against_the_served_judge(judge_server, files, tmp_path):
    from alignkit.judges import OpenAICompatibleBackend, PairwiseJudge, PointwiseJudge

    backend = OpenAICompatibleBackend(judge_server.base_url, "judge", max_retries=0)
    pairwise = PairwiseJudge(backend, max_retries=0)
    assert pairwise.compare(["hello"], ["a cat"], ["a dog"]) == ["A"]
    assert pairwise.stats.parsed == 1 and backend.calls == 1
    pointwise = PointwiseJudge(backend, max_retries=0)
    assert pointwise.score(["hello", "what"], ["hi", "yes"]) == [7.0, 7.0]

    from alignkit.cli import main

    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p}) for p in ["hello", "the cat is", "two plus two"]) + "\n")
    # best-of-N with the served judge as the scorer: every candidate scores 7, so no pair has a winner
    assert main(["best-of-n", "--model", str(files["base"]), "--device", "cpu", "--data", str(data), "--n", "2",
                 "--max-new-tokens", "4", "--scorer", "judge", "--judge-base-url", judge_server.base_url,
                 "--judge-model", "judge", "--judge-max-retries", "0", "--no-cache", "--out", str(tmp_path / "bon")]) == 0
    summary = json.loads((tmp_path / "bon" / "summary.json").read_text())
    assert summary["mean_best"] == 7.0 and summary["unscored_completions"] == 0
    assert summary["pairs"] == 0 and summary["sft_rows"] == summary["ties_skipped"] > 0
    report = tmp_path / "report"
    code = main(["eval", "--model", str(files["base"]), "--adapter", str(files["one"]), "--device", "cpu",
                 "--data", str(data), "--metrics", "win_rate", "--model-b", str(files["base"]),
                 "--judge", f"llm:judge@{judge_server.base_url}", "--max-new-tokens", "6", "--report-dir", str(report)])
    assert code == 0
    win_rate = json.loads((report / "report.json").read_text())["metrics"]["win_rate"]
    # a judge that always answers "A" in both orders cancels out: every item a tie, win rate one half
    assert win_rate["ties"] == 3 and win_rate["win_rate"] == 0.5 and win_rate["invalid"] == 0
    judged = summary["candidates"] - summary["empty_completions"]
    assert httpx.get(f"{judge_server.url}/stats").json()["rows_submitted"] == 1 + 2 + judged + 2 * 3


# ------------------------------------------------------------------------------- pieces on their own


def test_text_stream_holds_back_a_possible_stop_string(tiny_tokenizer):
    from alignkit.rollout.stops import cut_text_at_stop
    from alignkit.serve.protocol import TextStream, held_back

    assert held_back("the ca", ["cab"]) == 2 and held_back("the cat", ["dog"]) == 0
    assert held_back("ab", ["abc", "b"]) == 2
    tokens = tiny_tokenizer.encode("the cat is on the red apple")
    stream = TextStream(tiny_tokenizer, ["red"])
    pieces = [stream.push(token, set()) for token in tokens]
    text = cut_text_at_stop(tiny_tokenizer.decode(tokens), ["red"])
    assert text == "the cat is on the "
    assert "".join(pieces) + stream.finish(text) == text
    assert "red" not in "".join(pieces)


def test_vllm_command_line(files, monkeypatch):
    from alignkit.serve import vllm

    monkeypatch.setattr(vllm.shutil, "which", lambda name: "/usr/bin/vllm")
    argv, environment = vllm.vllm_command(str(files["base"]), [("one", str(files["one"]))], "127.0.0.1", 8001,
                                          served_model_name="base", api_key="k", lora_root=str(files["adapters"]))
    assert argv[:3] == ["/usr/bin/vllm", "serve", str(files["base"].resolve())]
    assert argv[argv.index("--lora-modules") + 1] == f"one={files['one'].resolve()}"
    assert argv[argv.index("--max-lora-rank") + 1] == "8"          # rank 4 rounded up to vLLM's smallest choice
    assert "--enable-lora" in argv and argv[argv.index("--api-key") + 1] == "k"
    assert environment == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    with pytest.raises(ValueError, match="adapter folder"):
        vllm.vllm_command(str(files["one"]), [], "127.0.0.1", 8001)


def test_cli_refuses_bad_adapters_with_one_line(files, capsys):
    from alignkit.cli import main

    assert main(["serve", "--model", str(files["base"]), "--device", "cpu",
                 "--adapter", f"foreign={files['foreign']}"]) == 2
    message = capsys.readouterr().err
    assert "--adapter foreign=" in message and "was trained on base model" in message
    assert main(["serve", "--model", str(files["base"]), "--adapter", f"x={files['rm']}"]) == 2
    assert "reward model" in capsys.readouterr().err


def test_mixed_lora_kernel_equals_peft_adapter_names(files):
    from peft import LoraConfig, PeftModel

    from alignkit.serve import mixed_lora

    base, _ = load_model_and_tokenizer(str(files["base"]), device="cpu")
    model = PeftModel.from_pretrained(base, str(files["one"]), adapter_name="one")
    model.load_adapter(str(files["two"]), adapter_name="two")
    # another rank, on one layer's q/v only: its rows get zeros where it has no weights
    model.add_adapter("small", LoraConfig(r=2, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                          layers_to_transform=[1]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B.small" in name:
                parameter.normal_(std=0.5)
    model.eval()
    ids = torch.tensor([[5, 6, 7, 8]] * 5)
    with torch.no_grad():
        expected = model(input_ids=ids, adapter_names=["one", "__base__", "two", "one", "small"]).logits
        slots = {"one": 2, "two": 1, "small": 3}
        assert mixed_lora.supports(model) and mixed_lora.install(model, slots) > 0
        with mixed_lora.mixed_batch(["one", None, "two", "one", "small"], slots, "cpu"):
            mixed = model.get_base_model()(input_ids=ids).logits
        with mixed_lora.mixed_batch(["two"] * 5, slots, "cpu"):    # one adapter for every row
            only_two = model.get_base_model()(input_ids=ids).logits
        outside = model(input_ids=ids).logits                       # no batch active: PEFT's own forward
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(only_two[2], expected[2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected[0], expected[1], atol=1e-3)   # the adapters do change the logits
    assert not torch.allclose(expected[4], expected[1], atol=1e-3)
    torch.testing.assert_close(outside[0], expected[0], atol=1e-5, rtol=1e-5)   # active adapter "one"


def test_requests_joining_a_running_batch_still_equal_offline(files):
    """Rows that join mid-decode (other prompt lengths, other adapters) get their cache appended to the
    running batch's; each reply must still be what offline generation gives."""
    conversations = {"one": [{"role": "user", "content": "please answer the question about the capital city of "
                                                         "france and then say thanks"}],
                     "two": [{"role": "user", "content": "hi"}],
                     None: [{"role": "user", "content": "what is two plus two"}]}
    state = build_state(str(files["base"]), adapters=[("one", str(files["one"])), ("two", str(files["two"]))],
                        device="cpu", max_wait_ms=0, served_model_name="base")
    with BackgroundServer(state) as running:
        client = openai.OpenAI(base_url=running.base_url, api_key="x", max_retries=0)
        first = client.chat.completions.create(model="one", messages=conversations["one"], temperature=0,
                                               max_tokens=120, stream=True, logprobs=True,
                                               extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
        chunks = iter(first)
        received = [next(chunks), next(chunks)]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            later = {name: pool.submit(client.chat.completions.create, model=name or "base",
                                       messages=conversations[name], temperature=0, max_tokens=24)
                     for name in ("two", None)}
            received += list(chunks)
            replies = {name: future.result().choices[0].message.content for name, future in later.items()}
        served_ids = [int(item.token.removeprefix("token_id:")) for chunk in received if chunk.choices
                      and chunk.choices[0].logprobs for item in chunk.choices[0].logprobs.content]
        stats = _stats(running)
    assert stats.get("rows_joined_running_batch", 0) >= 1 and stats["max_adapters_in_forward"] >= 2
    model, tokenizer = load_model_and_tokenizer(str(files["base"]), device="cpu", adapter=str(files["one"]))
    from alignkit.generation import render_prompts

    expected = generate_ids(model, tokenizer, render_prompts(tokenizer, [conversations["one"]]), max_new_tokens=120)[0]
    assert len(served_ids) == 120 and served_ids[:len(expected)] == expected  # offline stops at its first EOS
    for name in ("two", None):
        assert replies[name].strip() == _offline(files, name, conversations[name])[1], name


@pytest.mark.parametrize("mode", ["swap", "swap-per-request"])
def test_swap_modes_merge_one_adapter_at_a_time_and_give_the_same_replies(files, mode):
    state = build_state(str(files["base"]), adapters=[("one", str(files["one"])), ("two", str(files["two"]))],
                        device="cpu", max_wait_ms=100, served_model_name="base", mode=mode)
    with BackgroundServer(state) as running:
        client = openai.OpenAI(base_url=running.base_url, api_key="x", max_retries=0)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            replies = dict(zip(["base", "one", "two"], pool.map(
                lambda name: client.chat.completions.create(model=name, messages=CONVERSATION, temperature=0,
                                                            max_tokens=24).choices[0].message.content,
                ["base", "one", "two"])))
        stats = _stats(running)
        # a second request for the same adapter, after the first is done
        again = client.chat.completions.create(model="one", messages=CONVERSATION, temperature=0, max_tokens=24)
        assert again.choices[0].message.content == replies["one"]
        after = _stats(running)
    assert stats["max_adapters_in_forward"] == 1 and stats["adapter_merges"] >= 2
    if mode == "swap-per-request":
        # one request per merge, unmerged after each: "one" is merged again for the second request,
        # and no forward ever held rows of two requests
        assert stats["adapter_merges"] == 2 and stats["adapter_unmerges"] == 2
        assert after["adapter_merges"] == 3 and after["adapter_unmerges"] == 3
        assert after["max_rows_in_forward"] == 1
    for name, text in replies.items():
        assert text.strip() == _offline(files, None if name == "base" else name)[1], name
    # every merge was undone: the base weights are the base's again
    base, _ = load_model_and_tokenizer(str(files["base"]), device="cpu")
    served = state.registry.model.get_base_model()
    for (name, expected), (_, parameter) in zip(base.named_parameters(),
                                                ((n, p) for n, p in served.named_parameters() if "lora_" not in n)):
        torch.testing.assert_close(parameter, expected, atol=1e-6, rtol=0, msg=name)


def test_a_client_that_gives_up_on_a_whole_reply_frees_its_slot(files):
    state = build_state(str(files["long"]), device="cpu", served_model_name="base")
    with BackgroundServer(state) as running:
        body = {"model": "base", "messages": CONVERSATION, "temperature": 0, "max_tokens": 4000, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{running.base_url}/chat/completions", json=body, timeout=1.0)
        assert _wait_for(lambda: _stats(running).get("finished_cancelled", 0) == 1 and _stats(running)["running"] == 0)
        assert _stats(running).get("finished_length", 0) == 0   # dropped, not run to its 4000 tokens
