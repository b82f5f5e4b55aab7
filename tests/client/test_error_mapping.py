"""Every error status and code becomes the right exception, carrying the server's code,
message and headers: against a real server wherever the server can be made to answer it,
and for every row of the protocol's error table with a canned answer."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from paramserver.client import (
    BadRequest,
    Client,
    Conflict,
    Forbidden,
    InsufficientStorage,
    InternalServerError,
    InvalidRequest,
    NotFound,
    ParamServerError,
    PayloadTooLarge,
    ProtocolError,
    RequestTimeout,
    RetryPolicy,
    RoundAborted,
    RoundFull,
    RoundTimeout,
    ServerError,
    ServiceUnavailable,
    SessionExists,
    SessionNotFound,
    SessionState,
    StaleGradient,
    Unauthorized,
    UnsupportedMediaType,
    errors,
    optimizers,
    wire,
)
from paramserver.client._base import Call, Reply
from tests.harness.faults import hold_a_request

NO_RETRY = RetryPolicy(retries=0)


def w0() -> dict[str, np.ndarray]:
    return {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}


def g0() -> dict[str, np.ndarray]:
    return {"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)}


@pytest.fixture
def client(base_url: str) -> Iterator[Client]:
    with Client(base_url, retries=NO_RETRY) as c:
        yield c


def raw_post(client: Client, path: str, body: bytes | None) -> Any:
    """POST a hand-made body (the public methods only send valid ones)."""
    return client._run(Call("POST", path, lambda r: r, expect=frozenset({201}), body=body))


def check(exc: ServerError, cls: type[ServerError], status: int, code: str) -> None:
    assert type(exc) is cls
    assert isinstance(exc, ParamServerError)
    assert (exc.status, exc.code) == (status, code)
    assert exc.message and exc.message in str(exc)
    assert str(exc).startswith(f"{status} {code}: ")
    assert exc.response_headers["content-type"].startswith("application/json")


# --- a real server ------------------------------------------------------------------------


def test_400_bad_request(client: Client) -> None:
    with pytest.raises(BadRequest) as err:
        raw_post(client, "/sessions", b"\xc1")
    check(err.value, BadRequest, 400, "bad_request")
    assert "malformed msgpack" in err.value.message
    assert "(POST /sessions)" in str(err.value)


def test_401_unauthorized_and_403_forbidden(server_factory: Callable[..., Any]) -> None:
    srv = server_factory(tokens="writer,reader:ro")
    for token in (None, "wrong"):
        with Client(srv.url, token=token, retries=NO_RETRY) as c:
            with pytest.raises(Unauthorized) as err:
                c.sessions()
            check(err.value, Unauthorized, 401, "unauthorized")
            assert err.value.response_headers["www-authenticate"].startswith("Bearer")
            assert c.health() == {"status": "ok"}
    with Client(srv.url, token="reader", retries=NO_RETRY) as c:
        assert c.sessions() == []
        with pytest.raises(Forbidden) as forbidden:
            c.create_session(w0(), "sgd")
        check(forbidden.value, Forbidden, 403, "forbidden")


def test_404_session_not_found_and_not_found(client: Client, base_url: str) -> None:
    with pytest.raises(SessionNotFound) as err:
        client.session("no-such-session")
    check(err.value, SessionNotFound, 404, "session_not_found")
    assert isinstance(err.value, NotFound)
    with Client(f"{base_url}/wrong-prefix", retries=NO_RETRY) as wrong:
        with pytest.raises(NotFound) as route:
            wrong.sessions()
    check(route.value, NotFound, 404, "not_found")


def test_408_request_timeout(server_factory: Callable[..., Any]) -> None:
    srv = server_factory(request_timeout_seconds=0.3)

    class SlowBody(httpx.BaseTransport):
        """Sends the first byte of a body, then stalls past the server's timeout."""

        def __init__(self) -> None:
            self.inner = httpx.HTTPTransport()

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            body = request.read()

            def stream() -> Iterator[bytes]:
                yield body[:1]
                time.sleep(1.0)
                yield body[1:]

            slow = httpx.Request(
                request.method, request.url, headers=request.headers, content=stream()
            )
            return self.inner.handle_request(slow)

        def close(self) -> None:
            self.inner.close()

    with Client(srv.url, transport=SlowBody(), retries=NO_RETRY) as c:
        with pytest.raises(RequestTimeout) as err:
            c.create_session(w0(), "sgd")
    check(err.value, RequestTimeout, 408, "request_timeout")


def test_409_session_exists(client: Client) -> None:
    sid = f"taken-{uuid.uuid4().hex[:8]}"
    session = client.create_session(w0(), "sgd", session_id=sid)
    with pytest.raises(SessionExists) as err:
        client.create_session(w0(), "adam", session_id=sid)
    check(err.value, SessionExists, 409, "session_exists")
    session.delete()


@pytest.mark.parametrize("nbytes", [10_000, 20_000_000])
def test_413_payload_too_large(server_factory: Callable[..., Any], nbytes: int) -> None:
    srv = server_factory(max_body_bytes=4096)
    with Client(srv.url, retries=NO_RETRY) as c:
        with pytest.raises(PayloadTooLarge) as err:
            c.create_session({"w": np.zeros(nbytes // 4, np.float32)}, "sgd")
    check(err.value, PayloadTooLarge, 413, "payload_too_large")


def test_415_unsupported_media_type(client: Client) -> None:
    with pytest.raises(UnsupportedMediaType) as err:
        raw_post(client, "/sessions", None)  # no body, so no Content-Type
    check(err.value, UnsupportedMediaType, 415, "unsupported_media_type")


def create_body(**fields: Any) -> bytes:
    return wire.pack({"optimizer": "sgd", "weights": w0(), **fields})


def test_422_codes_from_create(client: Client) -> None:
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("invalid_request", lambda: raw_post(client, "/sessions", wire.pack({"optimizer": "sgd"}))),
        (
            "unknown_optimizer",
            lambda: raw_post(client, "/sessions", create_body(optimizer="adamw")),
        ),
        (
            "invalid_optimizer",
            lambda: raw_post(
                client,
                "/sessions",
                create_body(optimizer={"class_name": "SGD", "config": {"lr": -1.0}}),
            ),
        ),
        ("invalid_tensor", lambda: client.create_session({"x" * 300: np.ones(2)}, "sgd")),
        ("invalid_weights", lambda: client.create_session({"w": np.full(2, np.inf)}, "sgd")),
        ("invalid_weights", lambda: client.create_session({}, "sgd")),
        ("invalid_session_id", lambda: client.create_session(w0(), "sgd", session_id="bad id!")),
    ]
    for code, call in cases:
        with pytest.raises(InvalidRequest) as err:
            call()
        check(err.value, InvalidRequest, 422, code)


def test_422_codes_from_a_session(client: Client) -> None:
    session = client.create_session(w0(), optimizers.Adam())
    with pytest.raises(InvalidRequest) as err:
        session.push({"w": g0()["w"]})
    check(err.value, InvalidRequest, 422, "parameter_mismatch")
    with pytest.raises(InvalidRequest) as err:
        session.push({"w": np.ones((3, 2), np.float32), "b": g0()["b"]})
    check(err.value, InvalidRequest, 422, "parameter_mismatch")
    with pytest.raises(InvalidRequest) as err:
        session.push({"w": np.full((2, 3), np.nan, np.float32), "b": g0()["b"]})
    check(err.value, InvalidRequest, 422, "non_finite_gradient")
    with pytest.raises(InvalidRequest) as err:
        session.push(g0(), idempotency_key="x" * 300)
    check(err.value, InvalidRequest, 422, "invalid_idempotency_key")
    state = session.state()
    bad = SessionState(
        iterations=-1, optimizer=state.optimizer, weights=state.weights, slots=state.slots
    )
    with pytest.raises(InvalidRequest) as err:
        session.load_state(bad)
    check(err.value, InvalidRequest, 422, "invalid_state")
    without_slots = SessionState(iterations=1, optimizer=state.optimizer, weights=state.weights)
    with pytest.raises(InvalidRequest) as err:
        session.load_state(without_slots)
    check(err.value, InvalidRequest, 422, "invalid_state")
    assert session.info().iterations == 0  # no error changed anything
    session.delete()


def test_503_service_unavailable(server_factory: Callable[..., Any]) -> None:
    srv = server_factory(limit_concurrency=1)
    with Client(srv.url, retries=NO_RETRY) as c:
        session = c.create_session(w0(), "sgd")
        with hold_a_request(srv.url, session.id):
            with pytest.raises(ServiceUnavailable) as err:
                session.pull()
        check(err.value, ServiceUnavailable, 503, "service_unavailable")
        assert err.value.retry_after == 1.0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # until the server has seen the held one go
            try:
                session.pull()
                break
            except ServiceUnavailable:
                time.sleep(0.02)
        session.delete()


def test_507_quotas(server_factory: Callable[..., Any]) -> None:
    srv = server_factory(max_sessions=1, max_session_bytes=4096)
    with Client(srv.url, retries=NO_RETRY) as c:
        with pytest.raises(InsufficientStorage) as err:
            c.create_session({"w": np.zeros(2048, np.float32)}, "adam")
        check(err.value, InsufficientStorage, 507, "memory_quota_exceeded")
        first = c.create_session(w0(), "sgd")
        with pytest.raises(InsufficientStorage) as err:
            c.create_session(w0(), "sgd")
        check(err.value, InsufficientStorage, 507, "too_many_sessions")
        first.delete()


# --- every row of the error table, canned -------------------------------------------------

TABLE: list[tuple[int, str, type[ServerError]]] = [
    (400, "bad_request", BadRequest),
    (401, "unauthorized", Unauthorized),
    (403, "forbidden", Forbidden),
    (404, "session_not_found", SessionNotFound),
    (404, "not_found", NotFound),
    (408, "request_timeout", RequestTimeout),
    (409, "session_exists", SessionExists),
    # 409 and 503 are told apart by their code, not only by their status
    (409, "stale_gradient", StaleGradient),
    (409, "round_aborted", RoundAborted),
    (409, "snapshots_disabled", Conflict),
    (409, "iterations_exhausted", Conflict),
    (503, "round_timeout", RoundTimeout),
    (503, "round_full", RoundFull),
    (404, "session_exists", NotFound),  # a code under another status: the status decides
    (413, "payload_too_large", PayloadTooLarge),
    (415, "unsupported_media_type", UnsupportedMediaType),
    *(
        (422, code, InvalidRequest)
        for code in (
            "invalid_request",
            "unknown_optimizer",
            "invalid_optimizer",
            "invalid_tensor",
            "parameter_mismatch",
            "non_finite_gradient",
            "invalid_state",
            "invalid_weights",
            "invalid_session_id",
            "invalid_idempotency_key",
            "invalid_training",
            "missing_base_iterations",
            "invalid_base_iterations",
        )
    ),
    (500, "internal_error", InternalServerError),
    (503, "service_unavailable", ServiceUnavailable),
    (503, "session_busy", ServiceUnavailable),
    (507, "insufficient_storage", InsufficientStorage),
    (507, "too_many_sessions", InsufficientStorage),
    (507, "memory_quota_exceeded", InsufficientStorage),
    (405, "method_not_allowed", ServerError),  # no class of its own: the base, status kept
    (418, "teapot", ServerError),
]


def canned(status: int, content: bytes, headers: dict[str, str] | None = None) -> Client:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=content, headers=headers)

    return Client("http://paramserver.test", transport=httpx.MockTransport(answer), retries=0)


@pytest.mark.parametrize(("status", "code", "cls"), TABLE, ids=lambda x: str(x))
def test_error_table(status: int, code: str, cls: type[ServerError]) -> None:
    body = f'{{"error": {{"code": "{code}", "message": "what went wrong"}}}}'.encode()
    headers = {"content-type": "application/json", "Retry-After": "2", "X-Request-Id": "r1"}
    with canned(status, body, headers) as c:
        with pytest.raises(ServerError) as err:
            c.session("s1")
    exc = err.value
    assert type(exc) is cls
    assert (exc.status, exc.code, exc.message) == (status, code, "what went wrong")
    assert exc.response_headers["x-request-id"] == "r1"
    assert exc.request == "GET /sessions/s1"
    assert str(exc) == f"{status} {code}: what went wrong (GET /sessions/s1)"
    if issubclass(cls, ServiceUnavailable):
        assert exc.retry_after == 2.0  # type: ignore[attr-defined]


def test_an_answer_that_is_not_ours() -> None:
    with canned(502, b"<html>Bad Gateway</html>", {"content-type": "text/html"}) as c:
        with pytest.raises(ServerError) as err:
            c.sessions()
    assert type(err.value) is ServerError
    assert (err.value.status, err.value.code) == (502, "http_502")
    assert err.value.message == "<html>Bad Gateway</html>"
    with canned(404, b"") as c:
        with pytest.raises(NotFound) as missing:
            c.sessions()
    assert type(missing.value) is NotFound
    assert (missing.value.code, missing.value.message) == ("not_found", "Not Found")


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b'{"iterations": 1}'),  # a msgpack answer expected
        ("application/msgpack", b"\xc1"),  # malformed
        ("application/msgpack", wire.pack({"weights": {}})),  # no iterations
        ("application/msgpack", wire.pack({"iterations": 1, "weights": {"w": {"dtype": "int8"}}})),
    ],
)
def test_malformed_answers_are_protocol_errors(content_type: str, body: bytes) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/sessions/s1":
            summary = {
                "session_id": "s1",
                "optimizer": {"class_name": "SGD", "config": {}},
                "iterations": 0,
                "parameters": {"w": {"dtype": "float32", "shape": [2]}},
            }
            return httpx.Response(200, json=summary)
        return httpx.Response(200, content=body, headers={"content-type": content_type})

    with Client("http://paramserver.test", transport=httpx.MockTransport(answer)) as c:
        session = c.session("s1")
        with pytest.raises(ProtocolError, match="GET /sessions/s1/weights: unexpected answer"):
            session.pull()


def test_error_classes() -> None:
    assert errors.error_for_status(404, "session_not_found") is SessionNotFound
    assert errors.error_for_status(404, None) is NotFound
    assert errors.error_for_status(599, "x") is ServerError
    exc = InvalidRequest("m")
    assert (exc.status, exc.code) == (422, "invalid_request")
    assert ServerError("m", status=599).code == "http_599"
    assert issubclass(errors.TransportError, ParamServerError)
    assert not issubclass(errors.TransportError, ServerError)


def test_reply_without_json_error_fields() -> None:
    from paramserver.client._base import server_error

    reply = Reply(409, httpx.Headers({"content-type": "application/json"}), bytearray(b"[1]"))
    exc = server_error(reply, "POST /sessions")
    assert type(exc) is Conflict and exc.code == "http_409" and exc.message == "[1]"


def test_a_stale_gradient_carries_the_sessions_iterations() -> None:
    from paramserver.client._base import server_error

    body = b'{"error": {"code": "stale_gradient", "message": "m", "iterations": 41}}'
    reply = Reply(409, httpx.Headers({"content-type": "application/json"}), bytearray(body))
    exc = server_error(reply, "POST /sessions/s/gradients")
    assert type(exc) is StaleGradient and exc.iterations == 41 and exc.details == {"iterations": 41}
    assert isinstance(exc, Conflict) and not isinstance(exc, SessionExists)


@pytest.mark.parametrize("code", ["round_timeout", "round_full"])
def test_round_refusals_are_not_retried(code: str) -> None:
    calls = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        body = f'{{"error": {{"code": "{code}", "message": "m"}}}}'.encode()
        return httpx.Response(503, content=body, headers={"Retry-After": "0"})

    transport = httpx.MockTransport(answer)
    with Client("http://paramserver.test", transport=transport, retries=3) as c:
        with pytest.raises(ServiceUnavailable) as err:
            c.session("s1")
    assert err.value.code == code and len(calls) == 1


def test_an_undecodable_answer_is_a_protocol_error() -> None:
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    with canned(200, b"not gzip at all", headers) as c:
        with pytest.raises(ProtocolError, match="GET /sessions") as err:
            c.sessions()
    assert isinstance(err.value.__cause__, httpx.DecodingError)
