"""Shared pieces of the `alignkit label` tests: task builders, a live server on a free loopback port."""
from __future__ import annotations

import contextlib
import socket
import threading
import time

from alignkit.label.tasks import Candidate, Task


def make_tasks(count: int, candidates: int = 2, models: tuple[str, ...] = ("model-x", "model-y"), prefix: str = "t"):
    """``count`` tasks whose candidate ``j`` comes from ``models[j % len(models)]``; texts are distinct."""
    return [Task(id=f"{prefix}{i}", prompt=[{"role": "user", "content": f"prompt number {i}"}],
                 candidates=[Candidate(f"answer {j} to prompt {i} from {models[j % len(models)]}",
                                       models[j % len(models)]) for j in range(candidates)])
            for i in range(count)]


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def free_port() -> int:
    with contextlib.closing(free_socket()) as sock:
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(app, timeout_s: float = 20.0):
    """Serve ``app`` with uvicorn in a thread on 127.0.0.1 and a free port; stops on exit. Yields the base URL."""
    import uvicorn

    sock = free_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + timeout_s
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()
        assert not thread.is_alive(), "the test server did not stop"
