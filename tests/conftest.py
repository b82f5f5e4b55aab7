"""The fixtures of the whole suite: the app under uvicorn in a thread, on a free loopback port.

``server_factory(**settings)`` starts an app built by ``create_app(Settings(...))`` (see
:func:`tests.harness.servers.start_server_thread`) and stops it at teardown; ``server`` is one
default server shared by a test module, and ``base_url`` its URL. Tests talk to it over real
HTTP on 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.harness.servers import ServerThread, start_server_thread


@pytest.fixture
def server_factory() -> Iterator[Callable[..., ServerThread]]:
    started: list[ServerThread] = []

    def make(**overrides: Any) -> ServerThread:
        srv = start_server_thread(**overrides)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    """One default server shared by a test module."""
    srv = start_server_thread()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def base_url(server: ServerThread) -> str:
    return server.url
