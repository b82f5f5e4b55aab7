"""The client's side of training modes, on both transports (HTTP and the data plane), against
a real server: ``training=Sync(...)`` / ``Async(...)`` (or keyword arguments), the handle's
``base_iterations``, typed ``StaleGradient`` / ``RoundTimeout``, and a sync push's read
timeout and deadline growing by the round's timeout."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from paramserver.client import (
    Async,
    AsyncClient,
    Client,
    InvalidRequest,
    RoundTimeout,
    StaleGradient,
    Sync,
)

transports = pytest.mark.parametrize("data_plane", [False, True], ids=["http", "data-plane"])
W0 = {"w": np.zeros(3, np.float32)}


def _round(url: str, session_id: str, grads: list[dict[str, np.ndarray]], data_plane: bool):
    """Each gradient pushed by a worker of its own (joined by id, weights pulled first)."""
    answers: dict[int, object] = {}

    def worker(i: int) -> None:
        with Client(url, data_plane=data_plane) as client:
            handle = client.session(session_id)
            handle.pull()
            answers[i] = handle.push(grads[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(grads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return [answers[i] for i in range(len(grads))]


@transports
def test_a_sync_session_trains_in_rounds_and_refuses_stale_gradients(server, data_plane):
    with Client(server.url, data_plane=data_plane) as client:
        session = client.create_session(
            W0, "sgd", training=Sync(replicas_to_aggregate=3, total_num_replicas=4)
        )
        assert session.base_iterations == 0
        assert session.training == Sync(3, 4)
        info = session.info()
        assert info.training == Sync(3, 4) and info.round == {
            "received": 0,
            "needed": 3,
            "age_seconds": 0.0,
        }
        grads = [{"w": np.full(3, k, np.float32)} for k in (1.0, 2.0, 6.0)]
        answers = _round(server.url, session.id, grads, data_plane)
        expected = np.full(3, np.float32(-0.01) * np.float32(3.0), np.float32)
        for a in answers:
            np.testing.assert_array_equal(a["w"], expected)  # type: ignore[index]
        # this handle still holds the weights of iteration 0: the backup worker, late
        with pytest.raises(StaleGradient) as err:
            session.push({"w": np.ones(3, np.float32)})
        assert err.value.iterations == 1 and err.value.status == 409
        np.testing.assert_array_equal(session.pull()["w"], expected)
        assert session.base_iterations == 1


@transports
def test_the_handle_tracks_base_iterations_from_the_weights_it_receives(server, data_plane):
    with Client(server.url, data_plane=data_plane) as client:
        session = client.create_session(W0, "sgd", replicas_to_aggregate=1, total_num_replicas=4)
        assert session.training == Sync(1, 4)
        for step in range(3):
            session.push({"w": np.ones(3, np.float32)})
            assert session.base_iterations == step + 1
        assert session.push({"w": np.ones(3, np.float32)}, return_weights=False) == 4
        assert session.base_iterations == 3  # no weights came back: still those of 3
        with pytest.raises(StaleGradient):
            session.push({"w": np.ones(3, np.float32)})
        session.push({"w": np.ones(3, np.float32)}, base_iterations=4)  # said explicitly
        joined = client.session(session.id)
        assert joined.base_iterations is None  # holds no weights yet
        with pytest.raises(InvalidRequest) as err:
            joined.push({"w": np.ones(3, np.float32)})
        assert err.value.code == "missing_base_iterations"
        joined.pull()
        assert joined.base_iterations == 5
        with pytest.raises(ValueError):
            joined.push({"w": np.ones(3, np.float32)}, base_iterations=-1)


@transports
def test_max_staleness_through_the_client(server, data_plane):
    with Client(server.url, data_plane=data_plane) as client:
        fast = client.create_session(W0, "sgd", training=Async(max_staleness=1))
        assert fast.info().training == Async(max_staleness=1)
        slow = client.session(fast.id)
        slow.pull()
        fast.push({"w": np.ones(3, np.float32)})
        slow.push({"w": np.ones(3, np.float32)})  # 1 behind: taken
        fast.pull()
        fast.push({"w": np.ones(3, np.float32)})
        fast.push({"w": np.ones(3, np.float32)})
        with pytest.raises(StaleGradient) as err:
            slow.push({"w": np.ones(3, np.float32)})  # computed on 0, session at 4
        assert err.value.iterations == 4


@transports
def test_a_round_timeout_is_typed_and_not_retried(server, data_plane):
    with Client(server.url, data_plane=data_plane, retries=5) as client:
        session = client.create_session(
            W0,
            "sgd",
            training={"mode": "sync", "replicas_to_aggregate": 2, "round_timeout_seconds": 0.5},
        )
        started = time.monotonic()
        with pytest.raises(RoundTimeout) as err:
            session.push({"w": np.ones(3, np.float32)})
        assert 0.45 < time.monotonic() - started < 5  # one round's wait: not retried
        assert err.value.code == "round_timeout" and err.value.retry_after is not None
        assert session.info().iterations == 0


@transports
def test_a_sync_push_may_wait_longer_than_the_clients_read_timeout(server, data_plane):
    """timeout=0.5 s, deadline=1 s; the round fills after 1.5 s: the push still gets its
    answer, because a sync push's read timeout and deadline grow by the round timeout."""
    with Client(server.url, data_plane=data_plane, timeout=0.5, deadline=1.0) as client:
        session = client.create_session(
            W0, "sgd", training=Sync(replicas_to_aggregate=2, round_timeout_seconds=30)
        )

        def late() -> None:
            time.sleep(1.5)
            with Client(server.url) as other:
                handle = other.session(session.id)
                handle.pull()
                handle.push({"w": np.ones(3, np.float32)})

        thread = threading.Thread(target=late)
        thread.start()
        weights = session.push({"w": np.ones(3, np.float32)})
        thread.join()
        assert session.last_iterations == 1
        np.testing.assert_array_equal(weights["w"], np.full(3, -0.01, np.float32))


def test_keyword_and_object_forms_of_the_training_mode(server):
    class KerasStyle:
        def get_config(self):
            return {"mode": "sync", "replicas_to_aggregate": 2}

    with Client(server.url) as client:
        a = client.create_session(W0, "sgd", training=KerasStyle())
        assert a.info().training == Sync(2)
        b = client.create_session(W0, "sgd", max_staleness=3)
        assert b.info().training == Async(3)
        c = client.create_session(W0, "sgd", replicas_to_aggregate=2, total_num_replicas=3)
        assert c.info().training == Sync(2, 3)
        d = client.create_session(W0, "sgd")
        assert d.info().training == Async()
        with pytest.raises(TypeError):
            client.create_session(W0, "sgd", training=Sync(2), max_staleness=1)
        with pytest.raises(TypeError):
            client.create_session(W0, "sgd", replicas_to_aggregate=2, max_staleness=1)
        with pytest.raises(TypeError):
            client.create_session(W0, "sgd", replicas=2)
        with pytest.raises(ValueError):
            client.create_session(W0, "sgd", training=Sync(replicas_to_aggregate=0))


@pytest.mark.parametrize("data_plane", [False, True], ids=["http", "data-plane"])
def test_the_async_client_runs_a_round(server, data_plane):
    async def run() -> None:
        async with AsyncClient(server.url, data_plane=data_plane) as client:
            session = await client.create_session(W0, "adam", training=Sync(3, 4))
            handles = [await client.session(session.id) for _ in range(3)]
            for h in handles:
                await h.pull()
            grads = [{"w": np.full(3, k, np.float32)} for k in (1.0, -2.0, 4.0)]
            answers = await asyncio.gather(
                *(h.push(g) for h, g in zip(handles, grads, strict=True))
            )
            assert len({a["w"].tobytes() for a in answers}) == 1
            assert all(h.base_iterations == 1 for h in handles)
            with pytest.raises(StaleGradient):
                await session.push(grads[0])

    asyncio.run(run())


def test_pushes_fall_back_to_http_when_every_data_plane_connection_waits(server_factory):
    """data_plane_max_connections=2 and rounds of 3: two pushes wait on the data plane and hold
    both of its connections; the third worker's push goes over HTTP and completes the round
    (it was refused on the data plane and stuck until the round timed out)."""
    srv = server_factory(data_plane_max_connections=2)
    with Client(srv.url) as admin:
        session = admin.create_session(W0, "sgd", training=Sync(3, round_timeout_seconds=30))
    answers: dict[int, object] = {}

    def worker(i: int) -> None:
        with Client(srv.url) as client:
            handle = client.session(session.id)
            handle.pull()
            try:
                answers[i] = handle.push({"w": np.ones(3, np.float32)})
            except Exception as exc:  # reported below
                answers[i] = exc

    threads = []
    for i in range(3):
        threads.append(threading.Thread(target=worker, args=(i,)))
        threads[-1].start()
        time.sleep(0.3)
    for t in threads:
        t.join(60)
    assert all(isinstance(a, dict) for a in answers.values()), answers
    assert len({a["w"].tobytes() for a in answers.values()}) == 1  # type: ignore[index]
