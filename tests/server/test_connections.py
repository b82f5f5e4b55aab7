"""Header-read and idle timeouts and the connection cap (paramserver.server.connections).

The attack these guard against: connections that never finish their headers, each holding a
file descriptor, until no client (not even ``/health``) gets in. The servers here run on
loopback (in a thread with small timeouts, or as a process with a low file-descriptor limit)
and are driven with raw sockets, so that every byte the attacker sends is ours to choose.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator

import numpy as np
import pytest

from paramserver.client import Client
from paramserver.server.connections import ConnectionGuard
from tests.harness.servers import HOST, ServerThread, start_paramserver

HALF_HEADERS = b"POST /sessions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
HEALTH = b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n"


def _port(server: ServerThread) -> int:
    return int(server.url.rsplit(":", 1)[1])


def _connect(port: int, first: bytes = b"") -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=10)
    if first:
        sock.sendall(first)
    return sock


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One whole HTTP response (Content-Length framed) from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response; got {data!r}"
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed in the middle of a body"
        rest += chunk
    return int(lines[0].split()[1]), headers, rest[:length]


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closes ``sock`` within ``seconds``, and what it sent before."""
    sock.settimeout(0.1)
    received = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True, received
        if not chunk:
            return True, received
        received += chunk
    return False, received


def _is_open(sock: socket.socket) -> bool:
    closed, _ = _closed_within(sock, 0.3)
    return not closed


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


# --- timeouts ---------------------------------------------------------------------------------


def test_half_sent_headers_are_answered_408_and_closed_at_the_header_timeout(
    server_factory, sockets
):
    port = _port(server_factory(header_timeout_seconds=0.5, idle_timeout_seconds=30))
    sock = _connect(port, HALF_HEADERS)
    sockets.append(sock)
    started = time.monotonic()
    closed, received = _closed_within(sock, 10)
    assert closed and time.monotonic() - started < 5
    assert received.startswith(b"HTTP/1.1 408 ")
    body = json.loads(received.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "request_timeout"
    assert "headers did not arrive within 0.5 s" in body["error"]["message"]


@pytest.mark.parametrize(
    "flood",
    [b"a:\r\n" * 300, b"x-big: " + b"v" * (70 * 1024) + b"\r\n"],
    ids=["300 empty fields", "one 70 KiB field"],
)
def test_headers_past_their_bound_are_answered_400_and_closed(server_factory, sockets, flood):
    """An empty header field is four bytes on the wire and ~100 bytes of Python objects:
    past 256 fields or 64 KiB of line and fields, 400 and closed, the route never run."""
    port = _port(server_factory(header_timeout_seconds=30))
    sock = _connect(port, b"GET /health HTTP/1.1\r\nHost: test\r\n")
    sockets.append(sock)
    for start in range(0, len(flood), 8 * 1024):  # as an attacker streams it, piece by piece
        time.sleep(0.02)
        if select.select([sock], [], [], 0)[0]:
            break  # answered: the rest would only meet a reset
        try:
            sock.sendall(flood[start : start + 8 * 1024])
        except (BrokenPipeError, ConnectionResetError):
            break  # refused already
    closed, received = _closed_within(sock, 10)
    assert closed and received.startswith(b"HTTP/1.1 400 ")
    body = json.loads(received.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "bad_request"
    assert "exceed 65536 bytes or 256 fields" in body["error"]["message"]
    # within the bounds: a 60 KiB field and 250 fields are served, and the connection goes on
    ok = _connect(port)
    sockets.append(ok)
    fields = b"".join(b"x-%d: 1\r\n" % i for i in range(248))
    for head in (b"x-big: " + b"v" * (60 * 1024) + b"\r\n", fields):
        ok.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n" + head + b"\r\n")
        status, _, _ = _read_response(ok)
        assert status == 200


def test_the_header_timeout_runs_from_the_accept_even_while_bytes_trickle_in(
    server_factory, sockets
):
    port = _port(server_factory(header_timeout_seconds=1.0, idle_timeout_seconds=30))
    sock = _connect(port)
    sockets.append(sock)
    started = time.monotonic()
    closed = False
    for byte in (HALF_HEADERS * 10)[:80]:  # one byte every 0.1 s: 8 s of headers
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
        time.sleep(0.1)
        closed, _ = _closed_within(sock, 0.01)
        if closed:
            break
    assert closed, "a connection sending a byte at a time stayed open past its header timeout"
    assert time.monotonic() - started < 4


def test_a_connection_that_sends_nothing_is_closed_at_the_header_timeout(server_factory, sockets):
    port = _port(server_factory(header_timeout_seconds=0.5, idle_timeout_seconds=30))
    sock = _connect(port)
    sockets.append(sock)
    closed, received = _closed_within(sock, 10)
    assert closed and received == b""  # no request begun: no answer, only the close


def test_a_kept_alive_connection_is_closed_after_the_idle_timeout(server_factory, sockets):
    port = _port(server_factory(header_timeout_seconds=30, idle_timeout_seconds=0.5))
    sock = _connect(port, HEALTH)
    sockets.append(sock)
    status, _, _ = _read_response(sock)
    assert status == 200
    started = time.monotonic()
    closed, received = _closed_within(sock, 10)
    assert closed and received == b"" and time.monotonic() - started < 5


def test_the_next_request_on_a_kept_alive_connection_gets_its_own_header_timeout(
    server_factory, sockets
):
    port = _port(server_factory(header_timeout_seconds=0.5, idle_timeout_seconds=30))
    sock = _connect(port, HEALTH)
    sockets.append(sock)
    assert _read_response(sock)[0] == 200
    time.sleep(1.0)  # idle longer than the header timeout: idle connections are not timed by it
    sock.sendall(HEALTH)
    assert _read_response(sock)[0] == 200
    sock.sendall(HALF_HEADERS)  # the next request stalls in its headers
    closed, received = _closed_within(sock, 10)
    assert closed and received.startswith(b"HTTP/1.1 408 ")


def test_a_request_begun_behind_a_complete_one_gets_the_header_timeouts_408(
    server_factory, sockets
):
    """Half a request pipelined in the same write as a whole one: once the first is answered
    the connection is not idle (closed without a word at the idle timeout) but waiting for
    headers, and answered 408 at the header timeout."""
    port = _port(server_factory(header_timeout_seconds=1.0, idle_timeout_seconds=0.3))
    sock = _connect(port, HEALTH + b"GET /hea")
    sockets.append(sock)
    assert _read_response(sock)[0] == 200
    started = time.monotonic()
    closed, received = _closed_within(sock, 10)
    assert closed and received.startswith(b"HTTP/1.1 408 "), received
    assert time.monotonic() - started > 0.5  # the header timeout (1 s), not the idle (0.3 s)
    # its rest coming later than the idle timeout but within the header timeout: answered
    sock = _connect(port, HEALTH + b"GET /hea")
    sockets.append(sock)
    assert _read_response(sock)[0] == 200
    time.sleep(0.6)
    sock.sendall(b"lth HTTP/1.1\r\nHost: test\r\n\r\n")
    assert _read_response(sock)[0] == 200


def test_a_slow_but_complete_request_is_not_cut_by_the_header_timeout(server_factory, sockets):
    port = _port(server_factory(header_timeout_seconds=1.0, idle_timeout_seconds=30))
    sock = _connect(port, HEALTH[:10])
    sockets.append(sock)
    time.sleep(0.5)
    sock.sendall(HEALTH[10:])
    assert _read_response(sock)[0] == 200
    time.sleep(1.5)  # past the header timeout, idle: still open
    assert _is_open(sock)


# --- the cap ----------------------------------------------------------------------------------


def _busy(port: int) -> socket.socket:
    """A connection whose headers are complete and whose body has not come: busy."""
    return _connect(
        port,
        b"POST /sessions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n",
    )


def _idle(port: int) -> socket.socket:
    sock = _connect(port, HEALTH)
    assert _read_response(sock)[0] == 200
    return sock


def test_at_the_cap_the_oldest_connection_still_sending_headers_is_closed_first(
    server_factory, sockets
):
    port = _port(
        server_factory(max_connections=3, header_timeout_seconds=60, idle_timeout_seconds=60)
    )
    idle = _idle(port)
    oldest = _connect(port, HALF_HEADERS)
    newer = _connect(port, HALF_HEADERS)
    sockets.extend([idle, oldest, newer])
    time.sleep(0.2)
    fresh = _connect(port, HEALTH)
    sockets.append(fresh)
    assert _read_response(fresh)[0] == 200
    assert not _is_open(oldest)
    assert _is_open(newer) and _is_open(idle)


def test_at_the_cap_idle_connections_are_closed_before_a_new_one_is_refused(
    server_factory, sockets
):
    port = _port(
        server_factory(
            max_connections=2,
            header_timeout_seconds=60,
            idle_timeout_seconds=60,
            request_timeout_seconds=60,
        )
    )
    idle = _idle(port)
    busy = _busy(port)
    sockets.extend([idle, busy])
    time.sleep(0.2)
    second_busy = _busy(port)  # closes the idle one to make room
    sockets.append(second_busy)
    time.sleep(0.2)
    assert not _is_open(idle)
    assert _is_open(busy) and _is_open(second_busy)
    refused = _connect(port, HEALTH)  # every connection busy: refused
    sockets.append(refused)
    status, headers, body = _read_response(refused)
    assert status == 503
    assert headers["retry-after"] == "1"
    assert json.loads(body)["error"]["code"] == "service_unavailable"
    assert _is_open(busy) and _is_open(second_busy)  # busy connections are never evicted


def test_half_open_connections_beyond_the_descriptor_limit_leave_health_and_pushes_answered(
    tmp_path, sockets
):
    """The reported attack: more half-open connections than the server has file descriptors
    (256 here), no token needed; ``/health`` and an authorized push still work."""
    token = "s3cret-token"
    with start_paramserver(tmp_path, nofile=256, tokens=token) as srv:
        assert "1256 lowered to 192" in srv.log
        for _ in range(400):
            sockets.append(_connect(srv.port, HALF_HEADERS))
        time.sleep(0.5)
        health = _connect(srv.port, HEALTH)
        sockets.append(health)
        assert _read_response(health)[0] == 200
        with Client(srv.url, token=token, retries=0) as client:
            session = client.create_session([np.zeros(4, np.float32)], "sgd")
            weights = session.push([np.ones(4, np.float32)])
            np.testing.assert_array_equal(weights[0], np.full(4, -0.01, np.float32))
        # The oldest attackers were closed to make room; the newest still wait.
        assert not _is_open(sockets[0])
        assert _is_open(sockets[399])


# --- the guard's bookkeeping, in process ------------------------------------------------------


class _Connection:
    def __init__(self) -> None:
        self.evicted = False

    def evict(self) -> None:
        self.evicted = True


def test_the_guard_evicts_waiting_then_idle_connections_oldest_first_and_never_busy_ones():
    guard = ConnectionGuard(max_connections=3, header_timeout=10)
    a, b, c, d, e, f = (_Connection() for _ in range(6))
    for conn in (a, b, c):
        assert guard.admit(conn)  # type: ignore[arg-type]
    guard.idle(a)  # type: ignore[arg-type]
    guard.busy(b)  # type: ignore[arg-type]
    assert guard.admit(d)  # type: ignore[arg-type]  # c: the oldest waiting one
    assert c.evicted and not a.evicted
    guard.busy(d)  # type: ignore[arg-type]
    assert guard.admit(e)  # type: ignore[arg-type]  # no waiting one: a, the oldest idle
    assert a.evicted
    guard.busy(e)  # type: ignore[arg-type]
    assert not guard.admit(f)  # type: ignore[arg-type]  # all busy
    assert not any(x.evicted for x in (b, d, e, f))
    assert guard.open_connections == 3
    guard.forget(b)  # type: ignore[arg-type]
    assert guard.admit(f)  # type: ignore[arg-type]


# --- answers a peer does not take -------------------------------------------------------------


def _big_session(server: ServerThread, elements: int) -> str:
    sid = f"big-{elements}"
    with Client(server.url, data_plane=False) as client:
        client.create_session({"w": np.zeros(elements, np.float32)}, "sgd", session_id=sid)
    return sid


def _ask_weights(port: int, sid: str, close: bool = False) -> socket.socket:
    """A connection with a small receive buffer that asks for the session's weights."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((HOST, port))
    connection = "Connection: close\r\n" if close else ""
    sock.sendall(f"GET /sessions/{sid}/weights HTTP/1.1\r\nHost: t\r\n{connection}\r\n".encode())
    return sock


def _wait_until(condition, seconds: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.parametrize("close", [False, True], ids=["kept-alive", "connection-close"])
def test_a_peer_that_never_reads_its_answer_is_cut_off_at_the_send_timeout(
    server_factory, sockets, close
):
    """The answer (24 MB) is handed to the transport whole: without the send timeout a peer
    that never reads it held the connection and the answer's memory for good (the idle
    timeout's close, like Connection: close, waits for the buffer to drain)."""
    server = server_factory(
        request_timeout_seconds=1.0, idle_timeout_seconds=0.5, header_timeout_seconds=30
    )
    guard = server.server.connection_guard  # type: ignore[attr-defined]
    sid = _big_session(server, 6_000_000)
    sock = _ask_weights(_port(server), sid, close)
    sockets.append(sock)
    assert _wait_until(lambda: guard.open_connections == 1, 10)
    started = time.monotonic()
    assert _wait_until(lambda: guard.open_connections == 0, 20), "the connection stayed open"
    assert time.monotonic() - started >= 0.5  # not at once: after a second without progress
    received = 0  # what the kernel's buffers still held; the rest of the answer was dropped
    try:
        while chunk := sock.recv(1 << 20):
            received += len(chunk)
    except ConnectionResetError:
        pass
    assert received < 6_000_000 * 4 // 2, received
    health = _connect(_port(server), HEALTH)
    sockets.append(health)
    assert _read_response(health)[0] == 200


def test_a_peer_that_reads_slowly_gets_its_whole_answer_past_the_send_timeout(
    server_factory, sockets
):
    """Only an answer of which nothing leaves for the send timeout is cut: one read in bursts
    with pauses shorter than the timeout, taking longer than it in all, arrives whole."""
    server = server_factory(
        request_timeout_seconds=1.0, idle_timeout_seconds=0.5, header_timeout_seconds=30
    )
    sid = _big_session(server, 4_000_000)
    sock = socket.create_connection((HOST, _port(server)), timeout=10)
    sockets.append(sock)
    sock.sendall(f"GET /sessions/{sid}/weights HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    received = bytearray()
    started = time.monotonic()
    while len(received) < 12_000_000:  # of 16 MB
        time.sleep(0.5)  # a pause shorter than the send timeout, then 2 MB
        burst = len(received) + 2_000_000
        while len(received) < burst:
            chunk = sock.recv(1 << 20)
            assert chunk, f"closed after {len(received)} bytes"
            received += chunk
    elapsed = time.monotonic() - started
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    length = int(
        next(
            v
            for k, v in (h.split(b":", 1) for h in head.split(b"\r\n")[1:])
            if k.lower() == b"content-length"
        )
    )
    while len(body) < length:
        chunk = sock.recv(1 << 20)
        assert chunk, f"closed {length - len(body)} bytes before the end"
        body += chunk
    assert len(body) == length
    assert elapsed > 2.0, f"read in {elapsed:.2f} s: not slower than the send timeout"
