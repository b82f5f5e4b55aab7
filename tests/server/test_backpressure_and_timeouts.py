"""Back-pressure and timeouts over real HTTP: 503 with ``Retry-After``, 408, and a busy session.

Over ``limit_concurrency`` requests in progress, every route but ``/health`` gets 503
``service_unavailable`` with ``Retry-After`` and applies nothing; a body that does not arrive
within ``request_timeout_seconds`` gets 408 and the connection is closed; a push that waits
that long for its session's turn gets 503 ``session_busy`` while other sessions are served.
Timing bounds are generous: this is a test, not a benchmark.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.harness.http_api import (
    MSGPACK,
    assert_error,
    create_session,
    gradients_body,
    new_id,
    observed,
)
from tests.harness.models import ones, zeros
from tests.harness.servers import ServerThread


class HeldUpload:
    """A push whose chunked body stalls after its first chunk until ``release()``."""

    def __init__(self, url: str, session_id: str) -> None:
        self._gate = threading.Event()
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None
        body = gradients_body(ones())
        self._parts = (body[:5], body[5:])
        self._thread = threading.Thread(
            target=self._run, args=(f"{url}/sessions/{session_id}/gradients",), daemon=True
        )
        self._thread.start()

    def _body(self) -> Iterator[bytes]:
        yield self._parts[0]
        self._gate.wait(60)
        yield self._parts[1]

    def _run(self, url: str) -> None:
        try:
            with httpx.Client(timeout=60) as own:
                self.response = own.post(url, content=self._body(), headers=MSGPACK)
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def release(self) -> None:
        self._gate.set()

    def finish(self) -> httpx.Response:
        self.release()
        self._thread.join(timeout=60)
        assert self.error is None, self.error
        assert self.response is not None
        return self.response


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def in_flight_counter(app: Any) -> Callable[[], int]:
    """Read the concurrency limiter's count of requests in progress (built on first request).

    The test waits on it instead of probing: a probe is itself a request in progress and could
    push a held upload out of the limit.
    """
    layer = app.middleware_stack
    while layer is not None:
        if hasattr(layer, "in_flight") and hasattr(layer, "limit"):
            return lambda: int(layer.in_flight)
        layer = getattr(layer, "app", None)
    raise AssertionError("no concurrency limiter in the middleware stack")


def test_over_the_concurrency_limit_gets_503_with_retry_after(
    server_factory: Callable[..., ServerThread], http: httpx.Client
) -> None:
    srv = server_factory(limit_concurrency=2)
    url = srv.url
    sid = new_id()
    create_session(url, "sgd", zeros(), session_id=sid)
    in_flight = in_flight_counter(srv.app)
    held = [HeldUpload(url, sid), HeldUpload(url, sid)]
    try:
        wait_for(lambda: in_flight() == 2)
        refused = http.get(f"{url}/sessions")
        assert_error(refused, 503, "service_unavailable")
        assert int(refused.headers["retry-after"]) >= 1
        push = http.post(
            f"{url}/sessions/{sid}/gradients", content=gradients_body(ones()), headers=MSGPACK
        )
        assert_error(push, 503, "service_unavailable")
        assert "retry-after" in push.headers
        assert http.get(f"{url}/health").status_code == 200  # never refused
    finally:
        answers = [h.finish() for h in held]
    assert [a.status_code for a in answers] == [200, 200]
    wait_for(lambda: in_flight() == 0)
    assert http.get(f"{url}/sessions/{sid}").json()["iterations"] == 2  # the 503s applied nothing


def raw_exchange(url: str, head: bytes, body_part: bytes, timeout: float = 20.0) -> bytes:
    """Send a request head and part of its body, then read whatever answer comes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head + body_part)
        received = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            received += chunk
            if b"\r\n\r\n" in received:
                headers, _, content = received.partition(b"\r\n\r\n")
                for line in headers.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        if len(content) >= int(line.split(b":")[1]):
                            return received
        return received


def parse_raw(raw: bytes) -> httpx.Response:
    head, _, content = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = [tuple(line.split(":", 1)) for line in lines[1:]]
    return httpx.Response(
        status, headers=[(k.strip(), v.strip()) for k, v in headers], content=content
    )


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_that_does_not_arrive_gets_408(
    server_factory: Callable[..., ServerThread], http: httpx.Client, framing: str
) -> None:
    url = server_factory(request_timeout_seconds=0.5).url
    sid = new_id()
    create_session(url, "sgd", zeros(), session_id=sid)
    before = observed(url)
    body = gradients_body(ones())
    head = (
        f"POST /sessions/{sid}/gradients HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: application/msgpack\r\n"
    )
    if framing == "chunked":
        head += "Transfer-Encoding: chunked\r\n\r\n"
        part = f"{5:x}\r\n".encode() + body[:5] + b"\r\n"
    else:
        head += f"Content-Length: {len(body)}\r\n\r\n"
        part = body[:5]
    started = time.perf_counter()
    raw = raw_exchange(url, head.encode(), part)
    elapsed = time.perf_counter() - started
    print(f"408 after {elapsed:.3f} s")
    r = parse_raw(raw)
    assert_error(r, 408, "request_timeout")
    assert r.headers.get("connection") == "close"
    assert 0.3 < elapsed < 15
    assert observed(url) == before


def test_a_session_that_stays_busy_gets_503_session_busy(
    server_factory: Callable[..., ServerThread], http: httpx.Client
) -> None:
    srv = server_factory(request_timeout_seconds=0.5)
    url = srv.url
    sid = new_id()
    create_session(url, "sgd", zeros(), session_id=sid)
    session = srv.app.state.service.store.get(sid)
    session.lock.acquire()  # the next push takes the session's turn and waits for this lock
    first: list[httpx.Response] = []
    pusher = threading.Thread(
        target=lambda: first.append(
            httpx.post(
                f"{url}/sessions/{sid}/gradients",
                content=gradients_body(ones()),
                headers=MSGPACK,
                timeout=60,
            )
        )
    )
    try:
        pusher.start()
        wait_for(session.turn.locked)
        started = time.perf_counter()
        busy = http.post(
            f"{url}/sessions/{sid}/gradients", content=gradients_body(ones()), headers=MSGPACK
        )
        elapsed = time.perf_counter() - started
        assert_error(busy, 503, "session_busy")
        assert busy.headers["retry-after"] == "1"
        assert 0.3 < elapsed < 15
        assert_error(http.get(f"{url}/sessions/{sid}/weights"), 503, "session_busy")
        create_session(
            url, "sgd", zeros(), session_id="other"
        )  # other sessions are served meanwhile
        other = http.post(
            f"{url}/sessions/other/gradients", content=gradients_body(ones()), headers=MSGPACK
        )
        assert other.status_code == 200
    finally:
        session.lock.release()
        pusher.join(timeout=60)
    assert first[0].status_code == 200
    assert http.get(f"{url}/sessions/{sid}").json()["iterations"] == 1
