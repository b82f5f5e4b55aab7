"""The fixtures of the whole suite: the app under uvicorn in a thread, on a free loopback port.

``server_factory(**settings)`` starts an app built by ``create_app(Settings(...))`` (see
:func:`tests.harness.servers.start_server_thread`) and stops it at teardown; ``server`` is one
default server shared by a test module and ``base_url`` its URL. Tests talk to it over real
HTTP on 127.0.0.1, with ``api`` (a keep-alive client of it: requests take paths) or ``http``
(one for full URLs, of any server). ``adam_session`` is a session of that server to aim refused
requests at (:mod:`tests.harness.refusals`); ``durable_services`` makes services without HTTP,
durable on a directory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness.http_api import MSGPACK, create_body, new_id
from tests.harness.refusals import VALID_PUSH, WEIGHTS
from tests.harness.servers import ServerThread, start_server_thread
from tests.harness.service import DurableService, opened_services


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


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    """One keep-alive client for a module's requests to any server: they take full URLs."""
    with httpx.Client(timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def api(base_url: str) -> Iterator[httpx.Client]:
    """A keep-alive client of the module's server: requests take paths (``/sessions``)."""
    with httpx.Client(base_url=base_url, timeout=120) as client:
        yield client


@pytest.fixture
def adam_session(api: httpx.Client) -> str:
    """A new Adam session (w: float32[2,3], b: float32[3]) one step in, so its slots are set."""
    sid = new_id("e")
    r = api.post("/sessions", content=create_body(sid, "adam", WEIGHTS), headers=MSGPACK)
    assert r.status_code == 201, r.text
    r = api.post(f"/sessions/{sid}/gradients", content=VALID_PUSH, headers=MSGPACK)
    assert r.status_code == 200, r.text
    return sid


@pytest.fixture
def durable_services(tmp_path: Path) -> Iterator[Callable[..., DurableService]]:
    """A factory of in-process services durable on ``tmp_path / "snapshots"`` (by default),
    closed at teardown unless the test closed or crashed them (:mod:`tests.harness.service`)."""
    with opened_services(tmp_path) as make:
        yield make
