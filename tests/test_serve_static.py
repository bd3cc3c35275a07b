"""`alignkit serve --engine static`: the static-cache engine in the server's decoding path.

The slot cache's logits equal the transformers model's (with the row's own adapter) through prefill,
decoding, rows joining mid-decode and rows leaving (eagerly, and the bucketed step that CUDA graphs
replay, run eagerly on CPU); served greedy replies for the base and two adapters, sent concurrently
and joining a running batch, equal offline generation token for token; what the engine cannot run
is refused with the reason, at start-up and at run-time adapter loads, and the server keeps serving.
"""
from __future__ import annotations

import concurrent.futures
import contextlib

import httpx
import openai
import pytest
import torch

from alignkit.errors import UsageError
from alignkit.model import add_lora, load_model_and_tokenizer, save_model
from alignkit.serve import BackgroundServer, build_state
from alignkit.serve.static_engine import StaticSlotCache
from tests.helpers import make_tiny_model, make_tiny_tokenizer
from tests.test_serve import CONVERSATION, _offline, _random_adapter


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-static")
    tokenizer = make_tiny_tokenizer()
    base = save_model(make_tiny_model(tokenizer, seed=0), tokenizer, root / "base")
    adapters = root / "adapters"
    paths = {"one": _random_adapter(base, adapters / "one", 1), "two": _random_adapter(base, adapters / "two", 2)}
    model, tokenizer = load_model_and_tokenizer(str(base), device="cpu")
    head_lora = add_lora(model, rank=4, dropout=0.0, target_modules=["q_proj", "lm_head"])
    with torch.no_grad():
        for name, parameter in head_lora.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.3)
    paths["head"] = save_model(head_lora, tokenizer, adapters / "head")
    return {"root": root, "base": base, "adapters": adapters, "tokenizer": tokenizer, **paths}


def _reference_logits(model, sequence: list[int], adapter: str | None) -> torch.Tensor:
    ids = torch.tensor([sequence])
    if adapter is None:
        with model.disable_adapter():
            return model(input_ids=ids).logits[0, -1].float()
    model.set_adapter(adapter)
    return model(input_ids=ids).logits[0, -1].float()


def _walk_through_joins_and_departures(state, pad: int, emulate_graph: bool, names: list[str | None]):
    """Prefill two rows, decode, let two rows join (n=2 of one shorter prompt), decode four rows of
    three adapters at once, let rows 0 and 2 finish (row 3 moves down a slot), decode on; every
    logit vector must equal the transformers model's on the full sequence with the row's adapter."""
    registry = state.registry
    cache = StaticSlotCache(registry, 4, torch.device("cpu"), emulate_graph=emulate_graph)
    model = registry.model
    sequences = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18]]
    adapters = [names[0], names[1]]

    def slot(name):
        return registry.slots[name] if name else 0

    def check(logits, rows):
        assert logits.shape[0] == len(rows)
        for row, values in zip(rows, logits):
            torch.testing.assert_close(values, _reference_logits(model, sequences[row], adapters[row]),
                                       atol=1e-4, rtol=1e-4)  # float32 rounding; a wrong cache row is off by O(1)

    def advance(logits, rows):
        tokens = logits.argmax(-1).tolist()
        for row, token in zip(rows, tokens):
            sequences[row].append(token)
        return tokens

    with torch.no_grad():
        logits = cache.prefill([list(s) for s in sequences], [slot(a) for a in adapters], [0, 1], pad, needed=24)
        check(logits, [0, 1])
        for _ in range(3):
            logits = cache.decode(advance(logits, [0, 1]))
            check(logits, [0, 1])
        tokens = advance(logits, [0, 1])
        sequences += [[20, 21, 22], [20, 21, 22]]
        adapters += [names[2], names[2]]
        joined = cache.prefill([[20, 21, 22]], [slot(names[2])], [0, 0], pad, needed=24)
        check(joined, [2, 3])
        logits = cache.decode(tokens + advance(joined, [2, 3]))
        check(logits, [0, 1, 2, 3])
        for _ in range(3):
            logits = cache.decode(advance(logits, [0, 1, 2, 3]))
            check(logits, [0, 1, 2, 3])
        tokens = advance(logits, [0, 1, 2, 3])
        cache.keep([1, 3])
        logits = cache.decode([tokens[1], tokens[3]])
        check(logits, [1, 3])
        for _ in range(3):
            logits = cache.decode(advance(logits, [1, 3]))
            check(logits, [1, 3])
    assert cache.host_lengths == [len(sequences[1]), len(sequences[3])]
    assert cache.counters["cache_allocations"] == 1
    return cache


@pytest.mark.parametrize("emulate_graph", [False, True], ids=["eager", "graph-step"])
def test_slot_cache_logits_equal_the_model_through_joins_and_departures(files, emulate_graph):
    state = build_state(str(files["base"]), adapters=[("one", str(files["one"])), ("two", str(files["two"]))],
                        device="cpu", served_model_name="base", engine="static")
    cache = _walk_through_joins_and_departures(state, files["tokenizer"].pad_token_id, emulate_graph,
                                               ["one", None, "two"])
    if emulate_graph:  # buckets 2 and 4 were used (2 rows, 4 rows)
        assert sorted(cache.graphs) == [2, 4] and cache.counters["graph_captures"] == 2


def test_a_failed_graph_capture_falls_back_to_eager_steps(files, monkeypatch):
    def fail(self, bucket):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(StaticSlotCache, "_capture", fail)
    state = build_state(str(files["base"]), adapters=[("one", str(files["one"])), ("two", str(files["two"]))],
                        device="cpu", served_model_name="base", engine="static")
    cache = _walk_through_joins_and_departures(state, files["tokenizer"].pad_token_id, True, ["one", None, "two"])
    assert cache.counters["graph_capture_failures"] == 1 and not cache.use_graph and not cache.graphs


@pytest.mark.parametrize("family", ["qwen2-lora", "mistral-window"])
def test_slot_cache_on_qwen2_biases_and_a_mistral_sliding_window(files, tmp_path, family):
    """Qwen2 (q/k/v biases) with two adapters; Mistral with a 6-token window that the 17-token
    sequences outgrow, in prefill and in decoding."""
    from tests.test_rollout_static import make_mistral, make_qwen2

    tokenizer = files["tokenizer"]
    model = make_qwen2(tokenizer) if family == "qwen2-lora" else make_mistral(tokenizer, window=6)
    base = save_model(model, tokenizer, tmp_path / "base")
    if family == "qwen2-lora":
        adapters = [(name, str(_random_adapter(base, tmp_path / name, seed))) for name, seed in (("a", 1), ("b", 2))]
        names = ["a", None, "b"]
    else:
        adapters, names = [], [None, None, None]
    state = build_state(str(base), adapters=adapters, device="cpu", served_model_name="base", engine="static")
    if not adapters:  # _reference_logits switches adapters off through PEFT; a plain model has none
        state.registry.model.disable_adapter = contextlib.nullcontext
    for emulate_graph in (False, True):
        _walk_through_joins_and_departures(state, tokenizer.pad_token_id, emulate_graph, names)


def test_served_greedy_replies_with_the_static_engine_equal_offline(files):
    state = build_state(str(files["base"]), adapters=[("one", str(files["one"])), ("two", str(files["two"]))],
                        device="cpu", max_wait_ms=200, served_model_name="base", engine="static",
                        lora_root=str(files["adapters"]))
    with BackgroundServer(state) as running:
        client = openai.OpenAI(base_url=running.base_url, api_key="x", max_retries=0, timeout=60)

        def ask(name):
            return client.chat.completions.create(model=name, messages=CONVERSATION, temperature=0, max_tokens=24,
                                                  logprobs=True, extra_body={"return_tokens_as_token_ids": True})

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            replies = dict(zip(["base", "one", "two"], pool.map(ask, ["base", "one", "two"])))
        stats = httpx.get(f"{running.url}/stats").json()
        assert stats["engine"] == "static" and stats["max_adapters_in_forward"] == 3
        texts = {}
        for name, reply in replies.items():
            ids, text = _offline(files, None if name == "base" else name)
            served = [int(item.token.removeprefix("token_id:")) for item in reply.choices[0].logprobs.content]
            assert served == ids, name
            assert reply.choices[0].message.content.strip() == text, name
            texts[name] = text
        assert len(set(texts.values())) == 3, "the adapters must change the replies, or this test shows nothing"

        # requests joining a running batch (other adapters, other prompt lengths) still equal offline
        long_prompt = [{"role": "user", "content": "please answer the question about the capital city of france"}]
        first = client.chat.completions.create(model="one", messages=long_prompt, temperature=0, max_tokens=60,
                                               stream=True, extra_body={"ignore_eos": True})
        chunks = iter(first)
        received = [next(chunks), next(chunks)]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            later = {name: pool.submit(client.chat.completions.create, model=name, messages=CONVERSATION,
                                       temperature=0, max_tokens=24) for name in ("two", "base")}
            received += list(chunks)
            joined = {name: future.result().choices[0].message.content for name, future in later.items()}
        assert httpx.get(f"{running.url}/stats").json().get("rows_joined_running_batch", 0) >= 1
        for name, text in joined.items():
            assert text == replies[name].choices[0].message.content, name
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in received if chunk.choices)
        whole = client.chat.completions.create(model="one", messages=long_prompt, temperature=0, max_tokens=60,
                                               extra_body={"ignore_eos": True}).choices[0].message.content
        assert streamed == whole

        # an adapter the static engine cannot run (LoRA on lm_head) is refused; the others keep serving
        refused = httpx.post(f"{running.base_url}/load_lora_adapter",
                             json={"lora_name": "head", "lora_path": str(files["head"])})
        assert refused.status_code == 400 and "lm_head" in refused.json()["error"]["message"]
        assert "head" not in {m.id for m in client.models.list().data}
        assert ask("two").choices[0].message.content == replies["two"].choices[0].message.content

        # loads and unloads at run time: the engine reads the new stacked weights and keeps serving
        before = httpx.get(f"{running.url}/stats").json()
        loaded = httpx.post(f"{running.base_url}/load_lora_adapter",
                            json={"lora_name": "two-again", "lora_path": str(files["two"])})
        assert loaded.status_code == 200, loaded.text
        assert ask("two-again").choices[0].message.content == replies["two"].choices[0].message.content
        assert httpx.post(f"{running.base_url}/unload_lora_adapter", json={"lora_name": "one"}).status_code == 200
        assert ask("two").choices[0].message.content == replies["two"].choices[0].message.content
        assert ask("base").choices[0].message.content == replies["base"].choices[0].message.content
        after = httpx.get(f"{running.url}/stats").json()
        assert after["engine"] == "static" and after.get("finished_error", 0) == before.get("finished_error", 0)


def test_what_the_static_engine_cannot_run_is_refused_at_start(files, capsys):
    from alignkit.cli import main

    assert main(["serve", "--model", str(files["base"]), "--device", "cpu", "--engine", "static",
                 "--adapter", f"head={files['head']}"]) == 2
    message = capsys.readouterr().err.strip()
    assert "--engine static cannot serve this model" in message and "lm_head" in message
    assert "use --engine dynamic" in message and "Traceback" not in message
    with pytest.raises(UsageError, match="swap"):
        build_state(str(files["base"]), adapters=[("one", str(files["one"]))], device="cpu", engine="static",
                    mode="swap")
    # auto on CPU is the dynamic engine; the lm_head adapter serves there
    state = build_state(str(files["base"]), adapters=[("head", str(files["head"]))], device="cpu")
    assert state.scheduler.engine == "dynamic"
