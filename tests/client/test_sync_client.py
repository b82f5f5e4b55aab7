"""The blocking client against a real server on loopback: every method, both weight forms,
and the retry policy (faults injected by a transport wrapped around the real one)."""

from __future__ import annotations

import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any

import httpx
import numpy as np
import pytest
from paramserver.client import (
    Client,
    InvalidRequest,
    RetryPolicy,
    ServiceUnavailable,
    Session,
    SessionExists,
    SessionInfo,
    SessionNotFound,
    SessionState,
    TransportError,
    optimizers,
    wire,
)
from paramserver.client._base import session_path
from paramserver.client.errors import parse_retry_after

FAST = RetryPolicy(retries=3, backoff_base=0.001, backoff_cap=0.01)


def w0() -> dict[str, np.ndarray]:
    return {
        "kernel": np.arange(6, dtype=np.float32).reshape(2, 3),
        "bias": np.array([0.5, -0.5, 1.0], dtype=np.float64),
    }


def g0() -> dict[str, np.ndarray]:
    return {"kernel": np.ones((2, 3), dtype=np.float32), "bias": np.full(3, 2.0)}


def sgd_step(
    weights: dict[str, np.ndarray], grads: dict[str, np.ndarray], lr: float = 0.1
) -> dict[str, np.ndarray]:
    return {k: (v - np.asarray(lr, v.dtype) * grads[k].astype(v.dtype)) for k, v in weights.items()}


@pytest.fixture
def client(base_url: str) -> Iterator[Client]:
    with Client(base_url, retries=FAST) as c:
        yield c


class FaultyTransport(httpx.BaseTransport):
    """Forwards to a real transport, but for requests matching ``match`` plays ``faults``:

    ``"refuse"`` raises ConnectError without sending; ``"503"`` answers 503 without sending;
    ``"drop"`` sends the request (the server processes it) and then raises ReadError.
    """

    def __init__(self, match: Callable[[httpx.Request], bool], faults: list[str]) -> None:
        self.inner = httpx.HTTPTransport()
        self.match = match
        self.faults = list(faults)
        self.requests: list[httpx.Request] = []
        self.responses: list[httpx.Response] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        fault = self.faults.pop(0) if self.match(request) and self.faults else None
        if fault == "refuse":
            raise httpx.ConnectError("connection refused (injected)", request=request)
        if fault == "503":
            return httpx.Response(
                503,
                headers={"Retry-After": "0"},
                json={"error": {"code": "service_unavailable", "message": "busy (injected)"}},
            )
        response = self.inner.handle_request(request)
        if fault == "drop":
            response.read()
            response.close()
            raise httpx.ReadError("connection dropped (injected)", request=request)
        self.responses.append(response)
        return response

    def close(self) -> None:
        self.inner.close()


def is_push(request: httpx.Request) -> bool:
    return request.method == "POST" and request.url.path.endswith("/gradients")


# --- every method, dict form --------------------------------------------------------------


def test_dict_form_push_pull(client: Client) -> None:
    session = client.create_session(w0(), optimizers.SGD(lr=0.1))
    assert isinstance(session, Session)
    assert session.names == ("kernel", "bias")
    assert not session.as_list
    assert session.last_iterations == 0

    weights = session.push(g0())
    assert isinstance(weights, dict)
    assert list(weights) == ["kernel", "bias"]
    expected = sgd_step(w0(), g0())
    for name, value in expected.items():
        assert weights[name].dtype == value.dtype
        np.testing.assert_allclose(weights[name], value, rtol=1e-6)
    assert session.last_iterations == 1

    assert session.push(g0(), return_weights=False) == 2
    pulled = session.pull()
    assert isinstance(pulled, dict)
    np.testing.assert_allclose(pulled["bias"], sgd_step(expected, g0())["bias"])
    session.delete()


def test_returned_arrays_are_writable(client: Client) -> None:
    session = client.create_session(w0(), "sgd")
    weights = session.push(g0())
    assert isinstance(weights, dict)
    for value in [*weights.values(), *session.pull().values()]:
        assert value.flags.writeable
        value += 1.0  # in place, as a worker might
    state = session.state()
    assert all(a.flags.writeable for a in state.weights.values())
    session.delete()


def test_info(client: Client) -> None:
    session = client.create_session(w0(), optimizers.Adam(amsgrad=True, clipnorm=1.0))
    session.push(g0())
    info = session.info()
    assert isinstance(info, SessionInfo)
    assert info.session_id == session.id
    assert info.iterations == 1
    assert info.optimizer == optimizers.Adam(amsgrad=True, clipnorm=1.0).to_dict()
    assert list(info.parameters) == ["kernel", "bias"]
    assert info.parameters["kernel"].dtype == "float32"
    assert info.parameters["kernel"].shape == (2, 3)
    assert info.parameters["bias"] == ("float64", (3,))
    assert isinstance(info.created_at, datetime) and info.created_at.tzinfo is not None
    assert info.updated_at is not None and info.updated_at >= info.created_at
    session.delete()


def test_state_round_trip(client: Client) -> None:
    session = client.create_session(w0(), optimizers.Nadam())
    session.push(g0())
    state = session.state()
    assert isinstance(state, SessionState)
    assert state.iterations == 1
    assert state.optimizer["class_name"] == "Nadam"
    assert set(state.weights) == {"kernel", "bias"}
    assert state.slots and all(set(per) == {"kernel", "bias"} for per in state.slots.values())
    assert "m_schedule" in state.scalars
    after_one = session.push(g0())

    session.push(g0())
    session.push(g0())
    info = session.load_state(state)
    assert info.iterations == 1
    assert session.push(g0(), return_weights=False) == 2
    # Continues bit for bit as the exported session did.
    again = client.restore_session(state)
    redone = again.push(g0())
    assert isinstance(redone, dict) and isinstance(after_one, dict)
    for name in after_one:
        np.testing.assert_array_equal(redone[name], after_one[name])

    copy = SessionState.from_bytes(bytearray(state.to_bytes()))
    assert copy.iterations == state.iterations and copy.optimizer == state.optimizer
    np.testing.assert_array_equal(copy.weights["kernel"], state.weights["kernel"])
    session.delete()
    again.delete()


def test_restore_session_creates_or_replaces(client: Client) -> None:
    source = client.create_session(w0(), "rmsprop")
    source.push(g0())
    state = source.state()
    sid = f"restored-{uuid.uuid4().hex[:8]}"
    restored = client.restore_session(state, sid, as_list=True)
    assert restored.id == sid and restored.as_list
    assert restored.names == ("kernel", "bias")
    assert restored.last_iterations == 1
    pulled = restored.pull()
    assert isinstance(pulled, list)
    np.testing.assert_array_equal(pulled[0], state.weights["kernel"])
    # Same id again: replaces (PUT is create-or-replace).
    restored.push(g0())
    assert client.restore_session(state, sid).info().iterations == 1
    restored.delete()
    # load_state on a deleted session recreates it.
    source.delete()
    assert source.load_state(state).iterations == 1
    source.delete()


def test_sessions_and_attach(client: Client) -> None:
    a = client.create_session(w0(), "adagrad")
    b = client.create_session([np.zeros(2), np.ones(3, np.float32)], "adadelta")
    listed = {info.session_id: info for info in client.sessions()}
    assert {a.id, b.id} <= set(listed)
    assert listed[b.id].names == ("0", "1")

    attached = client.session(a.id)
    assert attached.names == a.names and not attached.as_list
    assert isinstance(attached.pull(), dict)
    attached_list = client.session(b.id, as_list=True)
    assert attached_list.as_list
    pulled = attached_list.pull()
    assert isinstance(pulled, list) and [p.shape for p in pulled] == [(2,), (3,)]
    a.delete()
    b.delete()
    assert {a.id, b.id}.isdisjoint(s.session_id for s in client.sessions())


def test_delete(client: Client) -> None:
    session = client.create_session(w0(), "sgd")
    session.delete()
    with pytest.raises(SessionNotFound):
        session.pull()
    with pytest.raises(SessionNotFound):
        session.delete()
    session.delete(missing_ok=True)
    with pytest.raises(SessionNotFound):
        client.session(session.id)


def test_create_with_session_id(client: Client) -> None:
    sid = f"named-{uuid.uuid4().hex[:8]}"
    session = client.create_session(w0(), "sgd", session_id=sid)
    assert session.id == sid
    with pytest.raises(SessionExists) as err:
        client.create_session(w0(), "sgd", session_id=sid)
    assert err.value.code == "session_exists"
    session.delete()


@pytest.mark.parametrize("sid", ["...", ".a", "a.b-c_D"])
def test_session_ids_that_look_like_paths(client: Client, sid: str) -> None:
    session = client.create_session(w0(), "sgd", session_id=sid)
    assert session.info().session_id == sid
    assert session.push(g0(), return_weights=False) == 1
    assert session.state().iterations == 1
    session.delete()
    assert sid not in {s.session_id for s in client.sessions()}


@pytest.mark.parametrize("sid", [".", ".."])
def test_dot_session_ids_are_refused(client: Client, sid: str) -> None:
    # /sessions/.. would be normalised to another route by URL handling: the server refuses it.
    with pytest.raises(InvalidRequest) as err:
        client.create_session(w0(), "sgd", session_id=sid)
    assert err.value.code == "invalid_session_id"


def test_health(client: Client) -> None:
    assert client.health() == {"status": "ok"}


# --- list form ----------------------------------------------------------------------------


def test_list_form(client: Client) -> None:
    initial = [np.ones((3, 2), np.float32), np.zeros(2, np.float32)]
    session = client.create_session(initial, optimizers.SGD(lr=0.1))
    assert session.as_list and session.names == ("0", "1")
    grads = [np.ones((3, 2), np.float32), np.ones(2, np.float32)]
    weights = session.push(grads)
    assert isinstance(weights, list) and len(weights) == 2
    np.testing.assert_allclose(weights[0], np.full((3, 2), 0.9, np.float32))
    np.testing.assert_allclose(weights[1], np.full(2, -0.1, np.float32))
    # A dict push is accepted too; the answer keeps the session's form.
    assert isinstance(session.push({"0": grads[0], "1": grads[1]}), list)
    assert isinstance(session.pull(), list)
    assert session.push(tuple(grads), return_weights=False) == 3
    assert session.info().names == ("0", "1")
    session.delete()


def test_list_form_wrong_length_is_refused_before_sending(client: Client) -> None:
    session = client.create_session([np.ones(2), np.ones(3)], "sgd")
    with pytest.raises(ValueError, match="list of 1 arrays; the session has 2 parameters"):
        session.push([np.ones(2)])
    assert session.info().iterations == 0
    session.delete()


def test_array_likes_are_accepted(client: Client) -> None:
    session = client.create_session({"w": [1.0, 2.0]}, "sgd")  # lists become float64 arrays
    assert session.info().parameters["w"] == ("float64", (2,))
    weights = session.push({"w": np.float64(1.0) * np.ones(2)})
    assert isinstance(weights, dict)
    np.testing.assert_allclose(weights["w"], [0.99, 1.99])
    session.delete()


# --- optimizers ---------------------------------------------------------------------------

KERAS = [
    optimizers.SGD(lr=0.01, decay=1e-6, momentum=0.9, nesterov=True),
    optimizers.RMSprop(lr=0.002, rho=0.8),
    optimizers.Adagrad(epsilon=1e-6),
    optimizers.Adadelta(lr=0.5),
    optimizers.Adam(amsgrad=True, clipnorm=1.0),
    optimizers.Adamax(clipvalue=0.5),
    optimizers.Nadam(schedule_decay=0.004),
]


@pytest.mark.parametrize("optimizer", KERAS, ids=lambda o: o.class_name)
def test_every_optimizer_object(client: Client, optimizer: optimizers.Optimizer) -> None:
    session = client.create_session(w0(), optimizer)
    assert session.info().optimizer == optimizer.to_dict()
    assert session.push(g0(), return_weights=False) == 1
    session.delete()


@pytest.mark.parametrize("name", ["sgd", "Adam", "NADAM", "rmsprop"])
def test_optimizer_by_name_takes_defaults(client: Client, name: str) -> None:
    session = client.create_session(w0(), name)
    assert session.info().optimizer == optimizers.get(name).to_dict()
    session.delete()


@pytest.mark.tensorflow
def test_tf_optimizer(client: Client) -> None:
    pytest.importorskip("tensorflow")
    optimizer = optimizers.TFOptimizer("AdamOptimizer", learning_rate=0.01)
    session = client.create_session([np.ones(3, np.float32)], optimizer)
    assert session.info().optimizer == optimizer.to_dict()
    weights = session.push([np.ones(3, np.float32)])
    assert isinstance(weights, list)
    np.testing.assert_allclose(weights[0], np.full(3, 0.99, np.float32), rtol=1e-5)
    copy = client.restore_session(session.state(), as_list=True)
    assert copy.push([np.ones(3, np.float32)], return_weights=False) == 2
    copy.delete()
    session.delete()


def test_optimizer_as_keras_config(client: Client) -> None:
    config = {"class_name": "Adam", "config": {"lr": 0.01, "beta_1": 0.8}}
    session = client.create_session(w0(), config)
    assert session.info().optimizer == optimizers.deserialize(config).to_dict()
    session.delete()


def test_invalid_optimizers_are_refused_before_sending(client: Client) -> None:
    before = len(client.sessions())
    with pytest.raises(optimizers.UnknownOptimizer, match="valid names"):
        client.create_session(w0(), "adamw")
    with pytest.raises(optimizers.InvalidOptimizerConfig, match="'lr'"):
        client.create_session(w0(), {"class_name": "SGD", "config": {"lr": -1}})
    with pytest.raises(optimizers.InvalidOptimizerConfig):
        client.create_session(w0(), 3)  # type: ignore[call-overload]
    with pytest.raises(wire.TensorError, match="int64 cannot travel"):
        client.create_session({"w": np.arange(3)}, "sgd")
    with pytest.raises(TypeError, match="dict of name -> array or a list"):
        client.create_session(np.ones(3), "sgd")  # type: ignore[call-overload]
    assert len(client.sessions()) == before


# --- the client itself --------------------------------------------------------------------


def recording_client(base_url: str, **kwargs: Any) -> tuple[Client, FaultyTransport]:
    transport = FaultyTransport(lambda r: False, [])
    return Client(base_url, transport=transport, retries=FAST, **kwargs), transport


def test_headers(base_url: str) -> None:
    c, transport = recording_client(base_url, token="s3cret", headers={"X-Worker": "7"})
    with c:
        session = c.create_session(w0(), "sgd")
        session.push(g0())
        session.push(g0(), return_weights=False)
        session.pull()
    create, push1, push2, pull = transport.requests
    for request in transport.requests:
        assert request.headers["authorization"] == "Bearer s3cret"
        assert request.headers["x-worker"] == "7"
        assert "application/msgpack" in request.headers["accept"]
    assert create.headers["content-type"] == "application/msgpack"
    assert "idempotency-key" not in create.headers
    assert push1.headers["content-type"] == "application/msgpack"
    keys = [push1.headers["idempotency-key"], push2.headers["idempotency-key"]]
    assert keys[0] != keys[1] and all(len(k) == 32 for k in keys)
    assert push2.url.params["return_weights"] == "false"
    assert "idempotency-key" not in pull.headers
    assert "s3cret" not in repr(c)


def test_keep_alive_reuses_one_connection(base_url: str) -> None:
    with Client(base_url) as c:
        session = c.create_session(w0(), "sgd")
        for _ in range(10):
            session.push(g0())
        session.delete()
        pool = c._http._transport._pool  # type: ignore[attr-defined]
        assert len(pool.connections) == 1


def test_close(base_url: str) -> None:
    c = Client(base_url)
    with c:
        assert not c.closed
    assert c.closed
    with pytest.raises(RuntimeError):
        c.health()


def test_threads_share_one_client(client: Client) -> None:
    session = client.create_session(w0(), optimizers.SGD(lr=0.001))
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(20):
                session.push(g0(), return_weights=False)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert session.info().iterations == 120
    session.delete()


def test_invalid_client_arguments() -> None:
    with pytest.raises(ValueError, match="http"):
        Client("ftp://example.org")
    with pytest.raises(ValueError, match="token"):
        Client("http://127.0.0.1:1", token="a\nb")
    with pytest.raises(ValueError, match="retries"):
        Client("http://127.0.0.1:1", retries=-1)


def test_answers_are_not_held_to_the_request_body_limits() -> None:
    """A server configured for 110k tensors answers more map entries than the decoder's
    defaults for untrusted request bodies allow (100k per map); the client reads it."""
    many = {str(i): np.ones(1, np.float32) for i in range(110_000)}
    summary = {
        "session_id": "big",
        "optimizer": {"class_name": "SGD", "config": {}},
        "iterations": 0,
        "parameters": {name: {"dtype": "float32", "shape": [1]} for name in many},
    }
    pull = wire.pack({"iterations": 0, "weights": many})

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/sessions/big":
            return httpx.Response(200, json=summary)
        return httpx.Response(200, content=pull, headers={"content-type": "application/msgpack"})

    with Client("http://paramserver.test", transport=httpx.MockTransport(answer)) as c:
        weights = c.session("big", as_list=True).pull()
    assert len(weights) == 110_000 and weights[-1].shape == (1,)


# --- retries ------------------------------------------------------------------------------


def test_push_is_retried_with_the_same_key_after_a_dropped_answer(base_url: str) -> None:
    transport = FaultyTransport(is_push, ["drop"])
    with Client(base_url, transport=transport, retries=FAST) as c:
        session = c.create_session(w0(), optimizers.SGD(lr=0.1))
        weights = session.push(g0())
        pushes = [r for r in transport.requests if is_push(r)]
        assert len(pushes) == 2
        assert pushes[0].headers["idempotency-key"] == pushes[1].headers["idempotency-key"]
        assert pushes[0].content == pushes[1].content
        # The server applied the first push (its answer was dropped) and replayed it for the
        # retry: one step, and the weights of that step.
        assert transport.responses[-1].headers["idempotent-replayed"] == "true"
        assert session.info().iterations == 1
        assert session.last_iterations == 1
        session.delete()
    assert isinstance(weights, dict)
    for name, value in sgd_step(w0(), g0()).items():
        np.testing.assert_allclose(weights[name], value, rtol=1e-6)


def test_replay_without_weights_pulls_them(server_factory: Callable[..., Any]) -> None:
    # The server keeps no answer bytes: a replay says only {"iterations": N}.
    srv = server_factory(idempotency_max_bytes=0)
    transport = FaultyTransport(is_push, ["drop"])
    with Client(srv.url, transport=transport, retries=FAST) as c:
        session = c.create_session(w0(), optimizers.SGD(lr=0.1))
        weights = session.push(g0())
        assert [r.method for r in transport.requests[-3:]] == ["POST", "POST", "GET"]
        assert transport.responses[-2].headers["idempotent-replayed"] == "true"
        assert session.info().iterations == 1
        assert isinstance(weights, dict)
        np.testing.assert_allclose(weights["kernel"], sgd_step(w0(), g0())["kernel"])
        # Without weights wanted, the replay's iteration count is the answer.
        transport.faults = ["drop"]
        assert session.push(g0(), return_weights=False) == 2
        session.delete()


def test_token_is_sent(server_factory: Callable[..., Any]) -> None:
    srv = server_factory(tokens="writer,reader:ro")
    with Client(srv.url, token="writer", retries=FAST) as c:
        session = c.create_session(w0(), "sgd")
        session.push(g0())
        with Client(srv.url, token="reader", retries=FAST) as ro:
            assert ro.session(session.id).pull()
        session.delete()


def test_busy_server_is_waited_for(server_factory: Callable[..., Any]) -> None:
    """A real 503 from the server's concurrency limit, retried after its Retry-After."""
    srv = server_factory(limit_concurrency=1)
    with Client(srv.url, retries=RetryPolicy(3, 0.001, 0.001)) as c:
        session = c.create_session(w0(), "sgd")
        with hold_a_request(srv.url, session.id) as release:
            timer = threading.Timer(0.3, release)
            timer.start()
            start = time.monotonic()
            assert session.push(g0(), return_weights=False) == 1
            assert time.monotonic() - start >= 0.9  # the server's Retry-After: 1
            timer.join()
        session.delete()


def test_push_retried_after_exhaustion_with_the_given_key(base_url: str) -> None:
    transport = FaultyTransport(is_push, ["drop"] * 4)
    with Client(base_url, transport=transport, retries=FAST) as c:
        session = c.create_session(w0(), "sgd")
        with pytest.raises(TransportError, match="may or may not have been applied") as err:
            session.push(g0())
        assert err.value.attempts == 4
        key = err.value.idempotency_key
        assert key is not None and isinstance(err.value.__cause__, httpx.ReadError)
        session.push(g0(), idempotency_key=key)
        keys = {r.headers["idempotency-key"] for r in transport.requests if is_push(r)}
        assert keys == {key}
        session.delete()


@pytest.mark.parametrize("fault", ["refuse", "503"])
def test_every_call_is_retried_when_nothing_was_processed(base_url: str, fault: str) -> None:
    transport = FaultyTransport(lambda r: True, [])
    with Client(base_url, transport=transport, retries=FAST) as c:
        calls: list[Callable[[], Any]] = []
        transport.faults = [fault, fault]
        session = c.create_session(w0(), "sgd")
        state = session.state()
        calls = [
            lambda: session.push(g0()),
            session.pull,
            session.info,
            session.state,
            lambda: session.load_state(state),
            c.sessions,
            lambda: c.session(session.id),
            c.health,
            session.delete,
        ]
        for call in calls:
            transport.faults = [fault, fault]
            before = len(transport.requests)
            call()
            assert len(transport.requests) - before == 3
            assert not transport.faults


def test_503_retries_run_out(base_url: str) -> None:
    transport = FaultyTransport(lambda r: True, ["503"] * 10)
    with Client(base_url, transport=transport, retries=RetryPolicy(2, 0.001, 0.001)) as c:
        with pytest.raises(ServiceUnavailable) as err:
            c.health()
    assert len(transport.requests) == 3
    assert err.value.retry_after == 0.0
    assert err.value.code == "service_unavailable"


def test_retry_after_is_honoured(base_url: str) -> None:
    calls: list[float] = []

    class Busy(httpx.BaseTransport):
        def __init__(self, retry_after: str) -> None:
            self.retry_after = retry_after

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            calls.append(0.0)
            return httpx.Response(503, headers={"Retry-After": self.retry_after}, json={})

    with Client(base_url, transport=Busy("0.05"), retries=RetryPolicy(1, 0.0, 0.0)) as c:
        start = time.monotonic()
        with pytest.raises(ServiceUnavailable):
            c.health()
        assert time.monotonic() - start >= 0.05
    assert len(calls) == 2
    calls.clear()
    # Longer than max_retry_after: not retried at all.
    with Client(base_url, transport=Busy("3600"), retries=FAST) as c:
        with pytest.raises(ServiceUnavailable) as err:
            c.health()
    assert len(calls) == 1 and err.value.retry_after == 3600.0


def test_create_is_not_retried_once_sent(base_url: str) -> None:
    def is_create(r: httpx.Request) -> bool:
        return r.method == "POST" and r.url.path == "/sessions"

    transport = FaultyTransport(is_create, ["drop"])
    sid = f"dropped-{uuid.uuid4().hex[:8]}"
    with Client(base_url, transport=transport, retries=FAST) as c:
        with pytest.raises(TransportError, match="the session may exist") as err:
            c.create_session(w0(), "sgd", session_id=sid)
        assert err.value.attempts == 1 and err.value.idempotency_key is None
        assert len(transport.requests) == 1
        # It was in fact created: the client said so instead of retrying into a 409.
        c.session(sid).delete()


def test_create_is_retried_when_the_connection_failed(base_url: str) -> None:
    transport = FaultyTransport(lambda r: r.url.path == "/sessions", ["refuse", "refuse"])
    with Client(base_url, transport=transport, retries=FAST) as c:
        session = c.create_session(w0(), "sgd")
        assert len(transport.requests) == 3
        session.delete()


@pytest.mark.parametrize("method", ["GET", "PUT"])
def test_reads_and_state_import_are_retried_after_a_dropped_answer(
    base_url: str, method: str
) -> None:
    transport = FaultyTransport(lambda r: False, [])
    with Client(base_url, transport=transport, retries=FAST) as c:
        session = c.create_session(w0(), "sgd")
        state = session.state()
        transport.match = lambda r: r.method == method
        transport.faults = ["drop"]
        result = session.pull() if method == "GET" else session.load_state(state)
        assert result is not None and not transport.faults
        session.delete()


def test_delete_retried_after_a_lost_answer_sees_404(base_url: str) -> None:
    transport = FaultyTransport(lambda r: r.method == "DELETE", ["drop", "drop"])
    with Client(base_url, transport=transport, retries=FAST) as c:
        session = c.create_session(w0(), "sgd")
        with pytest.raises(SessionNotFound):
            session.delete()
        other = c.create_session(w0(), "sgd")
        other.delete(missing_ok=True)
        assert other.id not in {s.session_id for s in c.sessions()}


def test_connection_refused() -> None:
    with socket_closed_port() as url:
        with Client(url, retries=RetryPolicy(2, 0.001, 0.001)) as c:
            with pytest.raises(TransportError) as err:
                c.health()
    assert err.value.attempts == 3
    assert isinstance(err.value.__cause__, httpx.ConnectError)


def test_no_retries_when_turned_off(base_url: str) -> None:
    transport = FaultyTransport(lambda r: True, ["503", "503"])
    with Client(base_url, transport=transport, retries=0) as c:
        with pytest.raises(ServiceUnavailable):
            c.health()
    assert len(transport.requests) == 1


def test_local_mistakes_are_not_retried(base_url: str) -> None:
    class Broken(httpx.BaseTransport):
        count = 0

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            Broken.count += 1
            raise httpx.UnsupportedProtocol("nope", request=request)

    with Client(base_url, transport=Broken(), retries=FAST) as c:
        with pytest.raises(TransportError, match="not retried"):
            c.health()
    assert Broken.count == 1


# --- the retry policy itself --------------------------------------------------------------


def test_backoff_is_full_jitter_within_the_cap() -> None:
    policy = RetryPolicy(retries=10, backoff_base=0.1, backoff_cap=1.0)
    rng = random.Random(1)
    for retry, ceiling in [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (9, 1.0)]:
        delays = [policy.delay(retry, rng=rng) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > 0.8 * ceiling  # spread over the whole range
    assert policy.delay(0, 2.5, rng=rng) == 2.5  # Retry-After wins when longer
    assert policy.delay(60_000, rng=rng) <= 1.0


def test_retry_policy_defaults_and_validation() -> None:
    assert RetryPolicy() == RetryPolicy(3, 0.1, 5.0, 60.0)
    assert RetryPolicy.of(5) == RetryPolicy(retries=5)
    bads: list[dict[str, Any]] = [
        {"retries": True},
        {"backoff_base": -1},
        {"backoff_cap": float("inf")},
    ]
    for bad in bads:
        with pytest.raises(ValueError):
            RetryPolicy(**bad)


def test_parse_retry_after() -> None:
    now = datetime(2030, 1, 1, tzinfo=timezone.utc)
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after(format_datetime(now + timedelta(seconds=30)), now=now) == 30.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=30)), now=now) == 0.0
    for bad in [None, "", "soon", "-1", "nan", "inf"]:
        assert parse_retry_after(bad) is None


def test_session_path_escapes_ids() -> None:
    assert session_path("abc", "state") == "/sessions/abc/state"
    assert session_path("..") == "/sessions/%2E%2E"
    assert session_path("a/b") == "/sessions/a%2Fb"
    with pytest.raises(ValueError):
        session_path("")


# --- helpers ------------------------------------------------------------------------------


@contextmanager
def socket_closed_port() -> Iterator[str]:
    """A loopback URL on which nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    yield f"http://127.0.0.1:{port}"


@contextmanager
def hold_a_request(url: str, session_id: str) -> Iterator[Callable[[], None]]:
    """Keep one request in progress on the server (a push whose body never ends)."""
    host, port = httpx.URL(url).host, httpx.URL(url).port
    sock = socket.create_connection((host, port))
    head = (
        f"POST /sessions/{session_id}/gradients HTTP/1.1\r\nHost: {host}\r\n"
        "Content-Type: application/msgpack\r\nContent-Length: 1000\r\n\r\n"
    )
    sock.sendall(head.encode() + b"\x81")
    time.sleep(0.1)  # let the server take it in

    def release() -> None:
        sock.close()

    try:
        yield release
    finally:
        sock.close()
