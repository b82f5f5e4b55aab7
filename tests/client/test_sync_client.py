"""The blocking client against a real server on loopback: every method, both weight forms,
every way to give an optimizer, and the client itself (headers, keep-alive, lifecycle,
threads). Its retries: ``test_retries.py``.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import httpx
import numpy as np
import pytest

from paramserver.client import (
    Client,
    InvalidRequest,
    Session,
    SessionExists,
    SessionInfo,
    SessionNotFound,
    SessionState,
    optimizers,
    wire,
)
from paramserver.client._base import session_path
from tests.harness.faults import FAST, FaultyTransport
from tests.harness.models import sgd_step, small_gradients, small_weights


@pytest.fixture
def client(base_url: str) -> Iterator[Client]:
    with Client(base_url, retries=FAST) as c:
        yield c


# --- every method, dict form ------------------------------------------------------------------


def test_dict_form_push_pull(client: Client) -> None:
    session = client.create_session(small_weights(), optimizers.SGD(lr=0.1))
    assert isinstance(session, Session)
    assert session.names == ("kernel", "bias")
    assert not session.as_list
    assert session.last_iterations == 0

    weights = session.push(small_gradients())
    assert isinstance(weights, dict)
    assert list(weights) == ["kernel", "bias"]
    expected = sgd_step(small_weights(), small_gradients())
    for name, value in expected.items():
        assert weights[name].dtype == value.dtype
        np.testing.assert_allclose(weights[name], value, rtol=1e-6)
    assert session.last_iterations == 1

    assert session.push(small_gradients(), return_weights=False) == 2
    pulled = session.pull()
    assert isinstance(pulled, dict)
    np.testing.assert_allclose(pulled["bias"], sgd_step(expected, small_gradients())["bias"])
    session.delete()


def test_returned_arrays_are_writable(client: Client) -> None:
    session = client.create_session(small_weights(), "sgd")
    weights = session.push(small_gradients())
    assert isinstance(weights, dict)
    for value in [*weights.values(), *session.pull().values()]:
        assert value.flags.writeable
        value += 1.0  # in place, as a worker might
    state = session.state()
    assert all(a.flags.writeable for a in state.weights.values())
    session.delete()


def test_info(client: Client) -> None:
    session = client.create_session(small_weights(), optimizers.Adam(amsgrad=True, clipnorm=1.0))
    session.push(small_gradients())
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
    session = client.create_session(small_weights(), optimizers.Nadam())
    session.push(small_gradients())
    state = session.state()
    assert isinstance(state, SessionState)
    assert state.iterations == 1
    assert state.optimizer.class_name == "Nadam"
    assert set(state.weights) == {"kernel", "bias"}
    assert state.slots and all(set(per) == {"kernel", "bias"} for per in state.slots.values())
    assert "m_schedule" in state.scalars
    after_one = session.push(small_gradients())

    session.push(small_gradients())
    session.push(small_gradients())
    info = session.load_state(state)
    assert info.iterations == 1
    assert session.push(small_gradients(), return_weights=False) == 2
    # Continues bit for bit as the exported session did.
    again = client.restore_session(state)
    redone = again.push(small_gradients())
    assert isinstance(redone, dict) and isinstance(after_one, dict)
    for name in after_one:
        np.testing.assert_array_equal(redone[name], after_one[name])

    copy = SessionState.from_bytes(bytearray(state.to_bytes()))
    assert copy.iterations == state.iterations and copy.optimizer == state.optimizer
    np.testing.assert_array_equal(copy.weights["kernel"], state.weights["kernel"])
    session.delete()
    again.delete()


def test_restore_session_creates_or_replaces(client: Client) -> None:
    source = client.create_session(small_weights(), "rmsprop")
    source.push(small_gradients())
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
    restored.push(small_gradients())
    assert client.restore_session(state, sid).info().iterations == 1
    restored.delete()
    # load_state on a deleted session recreates it.
    source.delete()
    assert source.load_state(state).iterations == 1
    source.delete()


def test_sessions_and_attach(client: Client) -> None:
    a = client.create_session(small_weights(), "adagrad")
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
    session = client.create_session(small_weights(), "sgd")
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
    session = client.create_session(small_weights(), "sgd", session_id=sid)
    assert session.id == sid
    with pytest.raises(SessionExists) as err:
        client.create_session(small_weights(), "sgd", session_id=sid)
    assert err.value.code == "session_exists"
    session.delete()


@pytest.mark.parametrize("sid", ["...", ".a", "a.b-c_D"])
def test_session_ids_that_look_like_paths(client: Client, sid: str) -> None:
    session = client.create_session(small_weights(), "sgd", session_id=sid)
    assert session.info().session_id == sid
    assert session.push(small_gradients(), return_weights=False) == 1
    assert session.state().iterations == 1
    session.delete()
    assert sid not in {s.session_id for s in client.sessions()}


@pytest.mark.parametrize("sid", [".", ".."])
def test_dot_session_ids_are_refused(client: Client, sid: str) -> None:
    # /sessions/.. would be normalised to another route by URL handling: the server refuses it.
    with pytest.raises(InvalidRequest) as err:
        client.create_session(small_weights(), "sgd", session_id=sid)
    assert err.value.code == "invalid_session_id"


def test_health(client: Client) -> None:
    assert client.health() == {"status": "ok"}


# --- list form --------------------------------------------------------------------------------


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


# --- optimizers -------------------------------------------------------------------------------


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
    session = client.create_session(small_weights(), optimizer)
    assert session.info().optimizer == optimizer.to_dict()
    assert session.push(small_gradients(), return_weights=False) == 1
    session.delete()


@pytest.mark.parametrize("name", ["sgd", "Adam", "NADAM", "rmsprop"])
def test_optimizer_by_name_takes_defaults(client: Client, name: str) -> None:
    session = client.create_session(small_weights(), name)
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
    session = client.create_session(small_weights(), config)
    assert session.info().optimizer == optimizers.deserialize(config).to_dict()
    session.delete()


def test_invalid_optimizers_are_refused_before_sending(client: Client) -> None:
    before = len(client.sessions())
    with pytest.raises(optimizers.UnknownOptimizer, match="valid names"):
        client.create_session(small_weights(), "adamw")
    with pytest.raises(optimizers.InvalidOptimizerConfig, match="'lr'"):
        client.create_session(small_weights(), {"class_name": "SGD", "config": {"lr": -1}})
    with pytest.raises(optimizers.InvalidOptimizerConfig):
        client.create_session(small_weights(), 3)  # type: ignore[call-overload]
    with pytest.raises(wire.TensorError, match="int64 cannot travel"):
        client.create_session({"w": np.arange(3)}, "sgd")
    with pytest.raises(TypeError, match="dict of name -> array or a list"):
        client.create_session(np.ones(3), "sgd")  # type: ignore[call-overload]
    assert len(client.sessions()) == before


# --- the client itself ------------------------------------------------------------------------


def recording_client(base_url: str, **kwargs: Any) -> tuple[Client, FaultyTransport]:
    transport = FaultyTransport(lambda r: False, [])
    return Client(base_url, transport=transport, retries=FAST, **kwargs), transport


def test_headers(base_url: str) -> None:
    c, transport = recording_client(base_url, token="s3cret", headers={"X-Worker": "7"})
    with c:
        session = c.create_session(small_weights(), "sgd")
        session.push(small_gradients())
        session.push(small_gradients(), return_weights=False)
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
        session = c.create_session(small_weights(), "sgd")
        for _ in range(10):
            session.push(small_gradients())
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
    session = client.create_session(small_weights(), optimizers.SGD(lr=0.001))
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(20):
                session.push(small_gradients(), return_weights=False)
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


def test_token_is_sent(server_factory: Callable[..., Any]) -> None:
    srv = server_factory(tokens="writer,reader:ro")
    with Client(srv.url, token="writer", retries=FAST) as c:
        session = c.create_session(small_weights(), "sgd")
        session.push(small_gradients())
        with Client(srv.url, token="reader", retries=FAST) as ro:
            assert ro.session(session.id).pull()
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


def test_session_path_escapes_ids() -> None:
    assert session_path("abc", "state") == "/sessions/abc/state"
    assert session_path("..") == "/sessions/%2E%2E"
    assert session_path("a/b") == "/sessions/a%2Fb"
    with pytest.raises(ValueError):
        session_path("")
