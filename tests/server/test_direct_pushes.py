"""Small pushes answered by the HTTP connection itself (:class:`fastpath.DirectPushes`).

uvicorn's protocol (``connections.GuardedConnection``) hands a small push whose body is in to
the direct server, which answers it whole without the ASGI app; anything it cannot serve that
way goes to the app with its body. Everything here runs against a real server on loopback,
over raw sockets, so that what is on the wire (fields, order of pipelined answers, closes,
timeouts) is what is checked. That the answers are the route's is checked, for every body, by
``test_small_pushes.py``, whose server serves them the same way.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from paramserver import wire
from paramserver.server.api import fastpath
from tests.harness.http_api import MSGPACK, create_body, gradients_body, new_id, unpackb
from tests.harness.servers import ServerThread, start_server_thread, warm_kernels

WEIGHTS = {"w": np.linspace(-1, 1, 10, dtype=np.float32)}
GRADS = {"w": np.full(10, 0.5, dtype=np.float32)}


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerThread]:
    warm_kernels()  # the direct path serves only once every kernel is loaded
    server = start_server_thread(header_timeout_seconds=1.0, idle_timeout_seconds=30.0)
    yield server
    server.stop()


@pytest.fixture
def routed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The session id of every push the ASGI app's small-push middleware served (a direct
    push never reaches it)."""
    seen: list[str] = []
    original = fastpath.SmallPushes._push

    async def spy(self: Any, scope: Any, *args: Any, **kwargs: Any) -> None:
        seen.append(scope["path"])
        await original(self, scope, *args, **kwargs)

    monkeypatch.setattr(fastpath.SmallPushes, "_push", spy)
    return seen


def _session(url: str, headers: dict[str, str] | None = None) -> str:
    sid = new_id("dp")
    r = httpx.post(
        f"{url}/sessions",
        content=create_body(sid, "adam", WEIGHTS),
        headers={**MSGPACK, **(headers or {})},
    )
    assert r.status_code == 201, r.text
    return sid


def _iterations(url: str, sid: str) -> int:
    return int(httpx.get(f"{url}/sessions/{sid}").json()["iterations"])


def _push_request(sid: str, body: bytes, *extra: str, version: str = "1.1") -> bytes:
    head = [
        f"POST /sessions/{sid}/gradients HTTP/{version}",
        "Host: x",
        "Content-Type: application/msgpack",
        f"Content-Length: {len(body)}",
        *extra,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class Answers:
    """Reads HTTP answers off a raw socket, one at a time (Content-Length framed)."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _more(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def next(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            if not self._more():
                raise ConnectionError(f"closed before an answer; got {self.buffer!r}")
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            assert name.lower() not in fields, f"{name} twice in {lines}"
            fields[name.lower()] = value.strip()
        size = int(fields["content-length"])
        while len(rest) < size:
            if not self._more():
                raise ConnectionError("closed inside an answer")
            rest = self.buffer.partition(b"\r\n\r\n")[2]
        self.buffer = rest[size:]
        return int(lines[0].split()[1]), fields, rest[:size]

    def closed(self) -> bool:
        """Whether the server closes the connection (nothing more comes)."""
        try:
            return not self._more()
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def conn(srv: ServerThread) -> Iterator[Answers]:
    answers = Answers(srv.url)
    yield answers
    answers.close()


def test_a_direct_push_is_answered_whole_with_the_routes_fields(
    srv: ServerThread, conn: Answers, routed: list[str]
) -> None:
    sid, twin = _session(srv.url), _session(srv.url)
    body = gradients_body(GRADS)
    conn.send(_push_request(sid, body))
    status, fields, content = conn.next()
    route = httpx.post(
        f"{srv.url}/sessions/{twin}/gradients?return_weights=True", content=body, headers=MSGPACK
    )
    assert status == 200 and route.status_code == 200
    assert content == route.content
    assert fields["content-type"] == route.headers["content-type"] == "application/msgpack"
    assert fields["content-length"] == str(len(content))
    assert fields["server"] == "uvicorn" and "date" in fields  # uvicorn's default fields
    assert len(fields["x-request-id"]) == 32 and int(fields["x-request-id"], 16) >= 0
    assert "connection" not in fields  # kept alive
    assert routed == [], "the push went through the ASGI app"
    assert unpackb(content)["iterations"] == 1 == _iterations(srv.url, sid)
    # the same connection goes on serving: a second push, then a read through the app
    conn.send(_push_request(sid, body))
    assert conn.next()[0] == 200
    conn.send(f"GET /sessions/{sid} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    status, _, content = conn.next()
    assert status == 200 and json.loads(content)["iterations"] == 2


def test_request_ids_are_taken_when_valid_and_new_and_distinct_otherwise(
    srv: ServerThread, conn: Answers
) -> None:
    sid = _session(srv.url)
    body = gradients_body(GRADS)
    conn.send(_push_request(sid, body, "X-Request-ID: job-7.step:3"))
    assert conn.next()[1]["x-request-id"] == "job-7.step:3"
    ids = set()
    for header in ("X-Request-ID: bad id!", "X-Request-ID: " + "a" * 129, "Accept: */*"):
        conn.send(_push_request(sid, body, header))
        ids.add(conn.next()[1]["x-request-id"])
    assert len(ids) == 3 and all(len(i) == 32 for i in ids)


def test_pipelined_requests_are_answered_in_order(srv: ServerThread, conn: Answers) -> None:
    sid = _session(srv.url)
    body = gradients_body(GRADS)
    read = f"GET /sessions/{sid} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    conn.send(_push_request(sid, body) + _push_request(sid, body) + read + _push_request(sid, body))
    answers = [conn.next() for _ in range(4)]
    assert [a[0] for a in answers] == [200, 200, 200, 200]
    assert [unpackb(answers[i][2])["iterations"] for i in (0, 1, 3)] == [1, 2, 3]
    assert json.loads(answers[2][2])["iterations"] == 2


def test_a_push_pipelined_behind_a_waiting_pull_waits_for_it(
    srv: ServerThread, conn: Answers, routed: list[str]
) -> None:
    """The pull waits for an iteration only the push behind it would make: HTTP/1.1 answers
    in order, so the pull answers after its wait with what it has, then the push."""
    sid = _session(srv.url)
    pull = (
        f"GET /sessions/{sid}/weights?min_iterations=1&wait_seconds=1 HTTP/1.1\r\nHost: x\r\n\r\n"
    ).encode()
    started = time.monotonic()
    conn.send(pull + _push_request(sid, gradients_body(GRADS)))
    status, _, content = conn.next()
    assert status == 200 and unpackb(content)["iterations"] == 0
    assert time.monotonic() - started >= 0.9
    status, _, content = conn.next()
    assert status == 200 and unpackb(content)["iterations"] == 1
    assert len(routed) == 1  # queued behind another request: the ASGI way


def test_half_a_request_behind_a_direct_push_gets_the_header_timeout(
    srv: ServerThread, conn: Answers
) -> None:
    """The next request begun in the read that carried the push: its head is timed from
    there by the header timeout (1 s here: 408), not left idle for the idle timeout (30 s)."""
    sid = _session(srv.url)
    started = time.monotonic()
    conn.send(_push_request(sid, gradients_body(GRADS)) + b"GET /sessions HTTP/1.1\r\nHo")
    assert conn.next()[0] == 200
    status, fields, content = conn.next()
    assert status == 408 and fields["connection"] == "close"
    assert json.loads(content)["error"]["code"] == "request_timeout"
    assert 0.9 <= time.monotonic() - started < 10
    assert conn.closed()


@pytest.mark.parametrize("kind", ["Connection: close", "HTTP/1.0"])
def test_a_push_that_asks_for_a_close_is_answered_then_closed(
    srv: ServerThread, conn: Answers, kind: str
) -> None:
    sid = _session(srv.url)
    body = gradients_body(GRADS)
    if kind == "HTTP/1.0":
        request = _push_request(sid, body, version="1.0")
    else:
        request = _push_request(sid, body, kind)
    conn.send(request)
    status, fields, content = conn.next()
    assert status == 200 and fields["connection"] == "close"
    assert unpackb(content)["iterations"] == 1
    assert conn.closed()


def test_a_body_in_parts_is_served_once_whole(srv: ServerThread, conn: Answers) -> None:
    sid = _session(srv.url)
    request = _push_request(sid, gradients_body(GRADS))
    cut = request.index(b"\r\n\r\n") + 10
    for part in (request[:cut], request[cut : cut + 7], request[cut + 7 :]):
        conn.send(part)
        time.sleep(0.1)
    status, _, content = conn.next()
    assert status == 200 and unpackb(content)["iterations"] == 1


def test_a_body_that_stops_coming_gets_408_and_nothing_is_applied() -> None:
    server = start_server_thread(request_timeout_seconds=1.0)
    answers = Answers(server.url)
    try:
        sid = _session(server.url)
        request = _push_request(sid, gradients_body(GRADS))
        started = time.monotonic()
        answers.send(request[:-5])
        status, fields, content = answers.next()
        assert 0.9 <= time.monotonic() - started < 10
        assert status == 408 and fields["connection"] == "close"
        assert json.loads(content)["error"]["code"] == "request_timeout"
        assert "x-request-id" in fields
        assert answers.closed()
        assert _iterations(server.url, sid) == 0
        metrics = httpx.get(f"{server.url}/metrics").text
        assert (
            'paramserver_http_requests_total{method="POST",'
            'route="/sessions/{session_id}/gradients",status="408"} 1.0'
        ) in metrics
        assert 'paramserver_refusals_total{status="408"} 1.0' in metrics
    finally:
        answers.close()
        server.stop()


def test_a_state_put_while_the_body_arrives_sends_the_push_the_apps_way(
    srv: ServerThread, conn: Answers, routed: list[str]
) -> None:
    """The plan was made for the session's trainer then; a state put replaced it before the
    body was in: the push goes to the app (which checks it again) and steps the new one."""
    sid = _session(srv.url)
    state = httpx.get(f"{srv.url}/sessions/{sid}/state", headers={"Accept": "application/msgpack"})
    assert state.status_code == 200
    exported = unpackb(state.content)
    exported["iterations"] = 41
    request = _push_request(sid, gradients_body(GRADS))
    conn.send(request[:-3])
    time.sleep(0.2)
    put = httpx.put(f"{srv.url}/sessions/{sid}/state", content=wire.pack(exported), headers=MSGPACK)
    assert put.status_code == 200, put.text
    conn.send(request[-3:])
    status, _, content = conn.next()
    assert status == 200 and unpackb(content)["iterations"] == 42
    assert len(routed) == 1


def test_a_push_while_another_thread_holds_the_session_goes_the_apps_way(
    srv: ServerThread, conn: Answers, routed: list[str]
) -> None:
    sid = _session(srv.url)
    session = srv.app.state.service.store.get(sid)
    with session.lock:
        conn.send(_push_request(sid, gradients_body(GRADS)))
        time.sleep(0.3)
        assert routed == [f"/sessions/{sid}/gradients"]  # waiting in a worker thread
        # the loop serves others meanwhile
        assert httpx.get(f"{srv.url}/sessions", timeout=10).status_code == 200
    status, _, content = conn.next()
    assert status == 200 and unpackb(content)["iterations"] == 1


def test_the_json_access_log_has_a_line_per_direct_push(caplog: pytest.LogCaptureFixture) -> None:
    warm_kernels()
    server = start_server_thread(log_format="json")
    answers = Answers(server.url)
    try:
        sid = _session(server.url)
        with caplog.at_level(logging.INFO, logger="paramserver.access"):
            answers.send(_push_request(sid, gradients_body(GRADS), "X-Request-ID: logged-1"))
            assert answers.next()[0] == 200
            answers.send(_push_request(sid, b"\xc1"))
            assert answers.next()[0] == 400
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and len(_access(caplog, sid)) < 2:
                time.sleep(0.05)
        lines = _access(caplog, sid)
        assert [(r["status"], r["method"], r["session_id"]) for r in lines] == [
            (200, "POST", sid),
            (400, "POST", sid),
        ]
        assert lines[0]["request_id"] == "logged-1"
        assert lines[0]["path"] == f"/sessions/{sid}/gradients"
        assert lines[0]["bytes"] > 0 and lines[0]["duration_ms"] >= 0
    finally:
        answers.close()
        server.stop()


def _access(caplog: pytest.LogCaptureFixture, sid: str) -> list[dict[str, Any]]:
    return [
        r.request  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "paramserver.access" and r.request.get("session_id") == sid  # type: ignore[attr-defined]
    ]


def test_with_a_concurrency_limit_pushes_go_the_apps_way(routed: list[str]) -> None:
    """A request counts against --limit-concurrency while its body arrives, which only the
    app's middleware does: with a limit, nothing is served directly."""
    server = start_server_thread(limit_concurrency=8)
    answers = Answers(server.url)
    try:
        sid = _session(server.url)
        answers.send(_push_request(sid, gradients_body(GRADS)))
        assert answers.next()[0] == 200
        assert routed == [f"/sessions/{sid}/gradients"]
    finally:
        answers.close()
        server.stop()


def test_tokens_are_checked_as_the_apps_middleware_checks_them(routed: list[str]) -> None:
    """With tokens, a push with a token that may write is served directly; any other is left
    to the app, whose middleware answers 401 or 403 before a byte of it is applied. The first
    ``Authorization`` field counts, as in the middleware."""
    warm_kernels()
    server = start_server_thread(tokens="writer:rw,reader:ro")
    answers = Answers(server.url)
    writer = {"Authorization": "Bearer writer"}
    try:
        sid = _session(server.url, writer)
        body = gradients_body(GRADS)
        refused = {
            "Authorization: Bearer reader": (403, "forbidden"),
            "Authorization: Bearer nobody": (401, "unauthorized"),
            "Authorization: Basic d3JpdGVyOg==": (401, "unauthorized"),
            "Authorization: Bearer ": (401, "unauthorized"),
            "Accept: */*": (401, "unauthorized"),
            "Authorization: Bearer reader\r\nAuthorization: Bearer writer": (403, "forbidden"),
        }
        for extra, (expected, code) in refused.items():
            answers.send(_push_request(sid, body, extra))
            status, _, content = answers.next()
            assert (status, json.loads(content)["error"]["code"]) == (expected, code), extra
        answers.send(_push_request(sid, body, "Authorization: bearer  writer "))
        status, _, content = answers.next()
        assert status == 200 and unpackb(content)["iterations"] == 1
        assert routed == [], "the push with a writing token went through the ASGI app"
        r = httpx.get(f"{server.url}/sessions/{sid}", headers=writer)
        assert r.json()["iterations"] == 1  # none of the refused pushes was applied
    finally:
        answers.close()
        server.stop()


def test_many_connections_pushing_at_once_lose_no_step(srv: ServerThread) -> None:
    sid = _session(srv.url)
    body = gradients_body(GRADS)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            answers = Answers(srv.url)
            for _ in range(25):
                answers.send(_push_request(sid, body) * 2)  # two at a time, pipelined
                assert [answers.next()[0] for _ in range(2)] == [200, 200]
            answers.close()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    workers = [threading.Thread(target=worker) for _ in range(8)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(60)
    assert not errors, errors
    assert _iterations(srv.url, sid) == 8 * 25 * 2
