"""Waiting pulls: ``GET /sessions/{id}/weights?min_iterations=K&wait_seconds=S`` (and the data
plane's ``pull`` with the same fields) answer once the session reaches iteration K, or after S
seconds with what it has; a waiting pull holds no worker thread."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import numpy as np
import pytest

from paramserver.client import AsyncClient, Client, errors

WEIGHTS = {"w": np.zeros(4, np.float32)}
GRADS = {"w": np.ones(4, np.float32)}


def _push_later(url: str, session_id: str, delay: float, count: int = 1) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        with Client(url) as client:
            session = client.session(session_id)
            for _ in range(count):
                session.push(GRADS)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("data_plane", [False, True])
def test_a_pull_waits_for_the_iteration_it_asks_for(server_factory, data_plane):
    server = server_factory()
    with Client(server.url, data_plane=data_plane) as client:
        session = client.create_session(WEIGHTS, "sgd")
        pusher = _push_later(server.url, session.id, 0.3, count=2)
        started = time.monotonic()
        weights = session.pull(min_iterations=2, wait=20)
        waited = time.monotonic() - started
        pusher.join()
        assert session.last_iterations == 2
        np.testing.assert_allclose(weights["w"], np.full(4, -0.02, np.float32), rtol=1e-6)
        assert 0.25 < waited < 10


@pytest.mark.parametrize("data_plane", [False, True])
def test_a_pull_that_waits_in_vain_answers_what_it_has_after_its_wait(server_factory, data_plane):
    server = server_factory()
    with Client(server.url, data_plane=data_plane) as client:
        session = client.create_session(WEIGHTS, "sgd")
        started = time.monotonic()
        session.pull(min_iterations=5, wait=0.5)
        assert 0.45 < time.monotonic() - started < 5
        assert session.last_iterations == 0
        started = time.monotonic()
        session.pull(min_iterations=0, wait=30)  # reached already: at once
        assert time.monotonic() - started < 2


def test_a_wait_longer_than_the_request_timeout_is_refused(server_factory):
    server = server_factory(request_timeout_seconds=5)
    with Client(server.url) as lean, Client(server.url, data_plane=False) as plain:
        session = lean.create_session(WEIGHTS, "sgd")
        for client in (lean, plain):
            with pytest.raises(errors.InvalidRequest, match="wait_seconds must be in"):
                client.session(session.id).pull(min_iterations=1, wait=6)
    answer = httpx.get(
        f"{server.url}/sessions/{session.id}/weights", params={"min_iterations": -1}, timeout=10
    )
    assert answer.status_code == 422


def test_a_session_deleted_while_a_pull_waits_answers_404(server_factory):
    server = server_factory()
    with Client(server.url, data_plane=False) as client:
        session = client.create_session(WEIGHTS, "sgd")

        def delete_later() -> None:
            time.sleep(0.3)
            with Client(server.url) as other:
                other.session(session.id).delete()

        threading.Thread(target=delete_later, daemon=True).start()
        started = time.monotonic()
        with pytest.raises(errors.SessionNotFound):
            session.pull(min_iterations=1, wait=20)
        assert time.monotonic() - started < 10


def test_waiting_pulls_hold_no_thread(server_factory):
    """More waiting pulls than the worker threads (anyio's 40): a push still gets through and
    wakes them all."""
    server = server_factory()

    async def run() -> None:
        async with AsyncClient(server.url, data_plane=False) as client:
            session = await client.create_session(WEIGHTS, "sgd")
            waiting = [
                asyncio.ensure_future(client._run(session._pull_call(min_iterations=1, wait=30)))
                for _ in range(60)
            ]
            await asyncio.sleep(0.5)
            assert not any(task.done() for task in waiting)
            started = time.monotonic()
            await session.push(GRADS)
            results = await asyncio.gather(*waiting)
            assert time.monotonic() - started < 10
            assert all(r["w"][0] == np.float32(-0.01) for r in results)

    asyncio.run(run())
