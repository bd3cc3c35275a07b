"""Build a server from options (`build_state`) and run it: in the foreground (`run_server`, what
``alignkit serve`` does) or on a background thread bound to a free local port (`BackgroundServer`,
for tests, benchmarks and notebooks)."""
from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from alignkit.errors import UsageError
from alignkit.model import ModelLoadError, load_model_and_tokenizer, resolve_model
from alignkit.model.heads import load_scalar_model
from alignkit.serve.adapters import NAME_PATTERN, AdapterError, AdapterRegistry
from alignkit.serve.app import RewardModel, ServerState, create_app
from alignkit.serve.engine import BatchScheduler

logger = logging.getLogger(__name__)


def parse_named_paths(items: Iterable[str], option: str) -> list[tuple[str, str]]:
    """``["NAME=PATH", ...]`` -> ``[(NAME, PATH)]``; a bare PATH is named after its run folder."""
    pairs = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            path = item
            folder = Path(item).expanduser()
            name = folder.parent.name if folder.name == "final" else folder.name
        if not path:
            raise UsageError(f"{option} expects NAME=PATH, got {item!r}")
        pairs.append((name.strip(), path.strip()))
    return pairs


def build_state(model: str = "smollm2-135m-instruct", adapters: Iterable[tuple[str, str]] = (),
                reward_models: Iterable[tuple[str, str]] = (), served_model_name: str | None = None,
                device: str | None = None, dtype: str | None = None, max_batch: int = 32,
                max_wait_ms: float = 10.0, max_queue: int = 256, max_model_len: int | None = None,
                default_max_tokens: int = 512, request_timeout: float = 600.0, api_key: str | None = None,
                lora_root: str | None = None, allow_other_base: bool = False, mode: str = "mixed",
                loaded: tuple | None = None, engine: str = "auto") -> ServerState:
    """Load the base model, its adapters and reward models; return the routes' `ServerState`.

    ``model`` may be a run's adapter folder: its base is served and the adapter is added under its
    run's name. ``loaded=(model, tokenizer)`` serves a model already in memory (tests) whose origin
    is ``model``. A bad adapter stops start-up with its name and why (at start-up nothing is
    served yet, so failing loudly is the useful thing to do).
    """
    adapters = list(adapters)
    source = resolve_model(model)
    if source.kind == "adapter":
        folder = Path(source.location)
        adapters.insert(0, (folder.parent.name if folder.name == "final" else folder.name, source.location))
        model, source = source.base, resolve_model(source.base)
    if loaded is not None:
        base, tokenizer = loaded
    else:
        base, tokenizer = load_model_and_tokenizer(model, device=device, dtype=dtype)
    base.eval()
    registry = AdapterRegistry(base, tokenizer, served_model_name or model, source, allow_other_base)
    for name, path in adapters:
        try:
            registry.load(name, path, int(time.time()))
        except AdapterError as error:
            raise UsageError(f"--adapter {name}={path}: {error}") from None
    context = getattr(base.config, "max_position_embeddings", None) or 2048
    if max_model_len is not None:
        if max_model_len < 2:
            raise UsageError(f"--max-model-len must be at least 2, got {max_model_len}")
        context = min(context, max_model_len)
    scheduler = BatchScheduler(registry, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, mode=mode,
                               engine=engine)
    rewards = {}
    for name, path in reward_models:
        if not NAME_PATTERN.match(name) or name in registry.model_names() or name in rewards:
            raise UsageError(f"--reward-model {name}={path}: the name is not allowed or already taken")
        try:
            reward, reward_tokenizer = load_scalar_model(path, device=device, dtype=dtype)
        except (FileNotFoundError, ModelLoadError) as error:
            raise UsageError(f"--reward-model {name}={path}: {error}") from None
        rewards[name] = RewardModel(name, str(Path(path).resolve()), reward, reward_tokenizer)
    if lora_root is not None and not Path(lora_root).is_dir():
        raise UsageError(f"--lora-root {lora_root}: no such folder")
    return ServerState(registry=registry, scheduler=scheduler, max_model_len=int(context),
                       default_max_tokens=default_max_tokens, request_timeout=request_timeout, api_key=api_key,
                       lora_root=str(Path(lora_root).resolve()) if lora_root else None, reward_models=rewards)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def run_server(state: ServerState, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM), then stop the worker."""
    import uvicorn

    state.scheduler.start()
    try:
        uvicorn.run(create_app(state), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        state.scheduler.stop()


class BackgroundServer:
    """``with BackgroundServer(state) as server: server.base_url`` -> ``http://127.0.0.1:PORT/v1``.

    Binds 127.0.0.1 on a free port before starting (no race for the port), runs uvicorn on a thread,
    and on exit stops uvicorn and the scheduler's worker.
    """

    def __init__(self, state: ServerState, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.state = state
        self.socket = _bind(host, port)
        self.host, self.port = self.socket.getsockname()[:2]
        config = uvicorn.Config(create_app(state), log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       name="alignkit-serve-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def start(self) -> BackgroundServer:
        self.state.scheduler.start()
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.state.scheduler.stop()
        self.socket.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
