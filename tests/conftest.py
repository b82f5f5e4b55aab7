"""Shared fixtures: a real uvicorn server on a free loopback port, and its base URL.

``server_factory(**settings)`` starts an app built by ``create_app(Settings(...))`` under
uvicorn in a background thread, waits for ``/health`` and stops it at teardown. Tests talk to
it over real HTTP on 127.0.0.1.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn

from paramserver.server.main import create_app
from paramserver.server.settings import Settings


@dataclass
class RunningServer:
    url: str
    app: Any
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(**overrides: Any) -> RunningServer:
    """Start a uvicorn server in a thread; ``overrides`` are :class:`Settings` fields."""
    overrides.setdefault("warm_up_kernels", False)
    settings = Settings(**overrides)
    app = create_app(settings)
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.started:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return RunningServer(url, app, server, thread)
            except httpx.TransportError:
                pass
        if not thread.is_alive():
            break
        time.sleep(0.02)
    server.should_exit = True
    raise RuntimeError("the test server did not start")


@pytest.fixture
def server_factory() -> Iterator[Callable[..., RunningServer]]:
    started: list[RunningServer] = []

    def make(**overrides: Any) -> RunningServer:
        srv = start_server(**overrides)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    """One default server shared by a test module."""
    srv = start_server()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def base_url(server: RunningServer) -> str:
    return server.url
