"""The blocking client's retries, against a real server with faults injected by a transport
wrapped around the real one (:class:`tests.harness.faults.FaultyTransport`): what is retried,
with which idempotency key, after which wait, and the retry policy itself.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any

import httpx
import numpy as np
import pytest

from paramserver.client import (
    Client,
    RetryPolicy,
    ServiceUnavailable,
    SessionNotFound,
    TransportError,
    optimizers,
)
from paramserver.client.errors import parse_retry_after
from tests.harness.faults import (
    FAST,
    FaultyTransport,
    closed_port_url,
    hold_a_request,
    is_create,
    is_push,
)
from tests.harness.models import sgd_step, small_gradients, small_weights

# --- retries ----------------------------------------------------------------------------------


def test_push_is_retried_with_the_same_key_after_a_dropped_answer(base_url: str) -> None:
    transport = FaultyTransport(is_push, ["drop"])
    with Client(base_url, transport=transport, retries=FAST) as c:
        session = c.create_session(small_weights(), optimizers.SGD(lr=0.1))
        weights = session.push(small_gradients())
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
    for name, value in sgd_step(small_weights(), small_gradients()).items():
        np.testing.assert_allclose(weights[name], value, rtol=1e-6)


def test_replay_without_weights_pulls_them(server_factory: Callable[..., Any]) -> None:
    # The server keeps no answer bytes: a replay says only {"iterations": N}.
    srv = server_factory(idempotency_max_bytes=0)
    transport = FaultyTransport(is_push, ["drop"])
    with Client(srv.url, transport=transport, retries=FAST) as c:
        session = c.create_session(small_weights(), optimizers.SGD(lr=0.1))
        weights = session.push(small_gradients())
        assert [r.method for r in transport.requests[-3:]] == ["POST", "POST", "GET"]
        assert transport.responses[-2].headers["idempotent-replayed"] == "true"
        assert session.info().iterations == 1
        assert isinstance(weights, dict)
        np.testing.assert_allclose(
            weights["kernel"], sgd_step(small_weights(), small_gradients())["kernel"]
        )
        # Without weights wanted, the replay's iteration count is the answer.
        transport.faults = ["drop"]
        assert session.push(small_gradients(), return_weights=False) == 2
        session.delete()


def test_busy_server_is_waited_for(server_factory: Callable[..., Any]) -> None:
    """A real 503 from the server's concurrency limit, retried after its Retry-After."""
    srv = server_factory(limit_concurrency=1)
    with Client(srv.url, retries=RetryPolicy(3, 0.001, 0.001)) as c:
        session = c.create_session(small_weights(), "sgd")
        with hold_a_request(srv.url, session.id) as release:
            timer = threading.Timer(0.3, release)
            timer.start()
            start = time.monotonic()
            assert session.push(small_gradients(), return_weights=False) == 1
            assert time.monotonic() - start >= 0.9  # the server's Retry-After: 1
            timer.join()
        session.delete()


def test_push_retried_after_exhaustion_with_the_given_key(base_url: str) -> None:
    transport = FaultyTransport(is_push, ["drop"] * 4)
    with Client(base_url, transport=transport, retries=FAST) as c:
        session = c.create_session(small_weights(), "sgd")
        with pytest.raises(TransportError, match="may or may not have been applied") as err:
            session.push(small_gradients())
        assert err.value.attempts == 4
        key = err.value.idempotency_key
        assert key is not None and isinstance(err.value.__cause__, httpx.ReadError)
        session.push(small_gradients(), idempotency_key=key)
        keys = {r.headers["idempotency-key"] for r in transport.requests if is_push(r)}
        assert keys == {key}
        session.delete()


@pytest.mark.parametrize("fault", ["refuse", "503"])
def test_every_call_is_retried_when_nothing_was_processed(base_url: str, fault: str) -> None:
    transport = FaultyTransport(lambda r: True, [])
    with Client(base_url, transport=transport, retries=FAST) as c:
        calls: list[Callable[[], Any]] = []
        transport.faults = [fault, fault]
        session = c.create_session(small_weights(), "sgd")
        state = session.state()
        calls = [
            lambda: session.push(small_gradients()),
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
    transport = FaultyTransport(is_create, ["drop"])
    sid = f"dropped-{uuid.uuid4().hex[:8]}"
    with Client(base_url, transport=transport, retries=FAST) as c:
        with pytest.raises(TransportError, match="the session may exist") as err:
            c.create_session(small_weights(), "sgd", session_id=sid)
        assert err.value.attempts == 1 and err.value.idempotency_key is None
        assert len(transport.requests) == 1
        # It was in fact created: the client said so instead of retrying into a 409.
        c.session(sid).delete()


def test_create_is_retried_when_the_connection_failed(base_url: str) -> None:
    transport = FaultyTransport(lambda r: r.url.path == "/sessions", ["refuse", "refuse"])
    with Client(base_url, transport=transport, retries=FAST) as c:
        session = c.create_session(small_weights(), "sgd")
        assert len(transport.requests) == 3
        session.delete()


@pytest.mark.parametrize("method", ["GET", "PUT"])
def test_reads_and_state_import_are_retried_after_a_dropped_answer(
    base_url: str, method: str
) -> None:
    transport = FaultyTransport(lambda r: False, [])
    with Client(base_url, transport=transport, retries=FAST) as c:
        session = c.create_session(small_weights(), "sgd")
        state = session.state()
        transport.match = lambda r: r.method == method
        transport.faults = ["drop"]
        result = session.pull() if method == "GET" else session.load_state(state)
        assert result is not None and not transport.faults
        session.delete()


def test_delete_retried_after_a_lost_answer_sees_404(base_url: str) -> None:
    transport = FaultyTransport(lambda r: r.method == "DELETE", ["drop", "drop"])
    with Client(base_url, transport=transport, retries=FAST) as c:
        session = c.create_session(small_weights(), "sgd")
        with pytest.raises(SessionNotFound):
            session.delete()
        other = c.create_session(small_weights(), "sgd")
        other.delete(missing_ok=True)
        assert other.id not in {s.session_id for s in c.sessions()}


def test_connection_refused() -> None:
    with closed_port_url() as url:
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


# --- the retry policy itself ------------------------------------------------------------------


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
