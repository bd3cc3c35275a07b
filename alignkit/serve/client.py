"""A served reward model as a reward function: scores come from ``POST {base_url}/score``.

    rewards:
      - name: alignkit.serve.client:remote_reward_model
        kwargs: {base_url: "http://127.0.0.1:8000/v1", model: rm}

Same signature as every reward function (`alignkit.rewards`): ``(prompts, completions, **fields)
-> list[float]``. When the caller passes ``prompt_messages`` (GRPO and PPO do) the full prompt
conversation is sent, else each prompt as one user turn, exactly as the local ``reward_model``
reward does. The API key is read from the environment variable ``api_key_env`` (unset: no key).
Any HTTP or connection error raises with the server's message; retries are the caller's policy.
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any


def score_remote(base_url: str, model: str, items: list[dict], api_key_env: str = "ALIGNKIT_API_KEY",
                 timeout: float = 120.0) -> list[float]:
    """``POST {base_url}/score`` with ``{"model", "input": items}``; the scores in order."""
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(api_key_env) if api_key_env else None
    if key:
        headers["Authorization"] = f"Bearer {key}"
    url = f"{base_url.rstrip('/')}/score"
    request = urllib.request.Request(url, data=json.dumps({"model": model, "input": items}).encode(),
                                     headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as error:
        try:
            detail = json.loads(error.read().decode("utf-8", "replace"))["error"]["message"]
        except Exception:  # noqa: BLE001 - the status line is still worth showing
            detail = str(error.reason)
        raise RuntimeError(f"{url}: HTTP {error.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as error:
        raise RuntimeError(f"{url}: {getattr(error, 'reason', error)}") from None
    data = sorted(payload["data"], key=lambda item: item["index"])
    if len(data) != len(items):
        raise RuntimeError(f"{url}: {len(data)} scores for {len(items)} items")
    return [float(item["score"]) for item in data]


def remote_reward_model(prompts: list[str], completions: list[str], base_url: str = "http://127.0.0.1:8000/v1",
                        model: str = "rm", api_key_env: str = "ALIGNKIT_API_KEY", timeout: float = 120.0,
                        prompt_messages: list | None = None, **fields: Any) -> list[float]:
    """Rewards from a reward model served by ``alignkit serve --reward-model NAME=PATH``."""
    items = []
    for index, (prompt, completion) in enumerate(zip(prompts, completions)):
        messages = prompt_messages[index] if prompt_messages is not None else [{"role": "user", "content": prompt}]
        items.append({"prompt": messages, "response": completion})
    return score_remote(base_url, model, items, api_key_env, timeout) if items else []
