"""The data plane (paramserver.server.dataplane) spoken frame by frame, as a third party would.

Frames are built here with ``struct`` and the reference ``msgpack`` package (never with
:mod:`paramserver.frames`), against servers on loopback. What is checked: the same step as
REST, bit for bit; auth before any body byte; limits before the body is read; idempotency;
the header, idle and body timeouts; the connection cap; TLS.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest

from tests.harness.http_api import create_session, new_id, pull, push
from tests.harness.servers import HOST, ServerThread

PREFIX = struct.Struct("<4sBBHIIQ")


class Frames:
    """One data-plane connection: requests out, answers in."""

    def __init__(self, port: int, *, timeout: float = 10) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.next_id = 1

    def close(self) -> None:
        self.sock.close()

    def send(
        self, header: dict[str, Any], body: bytes = b"", *, body_len: int | None = None
    ) -> int:
        request_id = self.next_id
        self.next_id += 1
        head = msgpack.packb(header)
        size = len(body) if body_len is None else body_len
        self.sock.sendall(PREFIX.pack(b"PSDP", 1, 1, 0, request_id, len(head), size) + head + body)
        return request_id

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError(f"closed after {len(data)} of {n} bytes")
            data += chunk
        return data

    def answer(self) -> tuple[int, dict[str, Any], bytes]:
        magic, version, kind, _, request_id, header_len, body_len = PREFIX.unpack(
            self._exact(PREFIX.size)
        )
        assert (magic, version, kind) == (b"PSDP", 1, 2)
        header = msgpack.unpackb(self._exact(header_len))
        return request_id, header, self._exact(body_len)

    def call(self, header: dict[str, Any], body: bytes = b"") -> tuple[dict[str, Any], bytes]:
        request_id = self.send(header, body)
        answered, head, data = self.answer()
        assert answered == request_id
        return head, data

    def closed_within(self, seconds: float) -> bool:
        self.sock.settimeout(seconds)
        try:
            while self.sock.recv(65536):
                pass
        except TimeoutError:
            return False
        except ConnectionResetError:
            pass
        return True


def _plane_port(server: ServerThread, token: str | None = None) -> int:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    answer = httpx.get(f"{server.url}/data-plane", headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["version"] == 1 and body["tls"] is False
    return int(body["port"])


@pytest.fixture
def frames_to() -> Iterator[Any]:
    opened: list[Frames] = []

    def connect(port: int, **kw: Any) -> Frames:
        conn = Frames(port, **kw)
        opened.append(conn)
        return conn

    yield connect
    for conn in opened:
        conn.close()


def _push_header(session: str, grads: dict[str, np.ndarray], **extra: Any) -> dict[str, Any]:
    specs = [[name, str(a.dtype), list(a.shape)] for name, a in grads.items()]
    return {"op": "push", "session": session, "tensors": specs, **extra}


def _body(grads: dict[str, np.ndarray]) -> bytes:
    return b"".join(
        np.ascontiguousarray(a, a.dtype.newbyteorder("<")).tobytes() for a in grads.values()
    )


def _weights(header: dict[str, Any], body: bytes) -> dict[str, np.ndarray]:
    out, offset = {}, 0
    for name, dtype, shape in header["tensors"]:
        dt = np.dtype(dtype).newbyteorder("<")
        n = int(np.prod(shape)) * dt.itemsize
        out[name] = np.frombuffer(body[offset : offset + n], dt).reshape(shape)
        offset += n
    assert offset == len(body)
    return out


WEIGHTS = {
    "kernel": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
    "bias": np.zeros(4, np.float32),
}


def _grads(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {name: rng.normal(size=w.shape).astype(np.float32) for name, w in WEIGHTS.items()}


def test_a_push_over_the_data_plane_is_the_rest_push_bit_for_bit(server_factory, frames_to):
    server = server_factory()
    over_rest, over_plane = new_id("rest"), new_id("plane")
    for sid in (over_rest, over_plane):
        create_session(
            server.url, {"class_name": "Adam", "config": {"amsgrad": True}}, WEIGHTS, session_id=sid
        )
    plane = frames_to(_plane_port(server))
    head, _ = plane.call({"op": "hello", "version": 1})
    assert head == {"status": 200, "version": 1}
    for step in range(5):
        grads = _grads(step)
        push(server.url, over_rest, grads)
        head, body = plane.call(_push_header(over_plane, grads, key=f"k{step}"), _body(grads))
        assert head["status"] == 200 and head["iterations"] == step + 1
        got = _weights(head, body)
    _, expected = pull(server.url, over_rest)
    for name in WEIGHTS:
        assert got[name].tobytes() == expected[name].tobytes()
    head, body = plane.call({"op": "pull", "session": over_plane})
    assert (
        head["iterations"] == 5
        and _weights(head, body)["kernel"].tobytes() == expected["kernel"].tobytes()
    )


def test_a_repeated_key_applies_once_and_a_reused_key_is_refused(server_factory, frames_to):
    server = server_factory()
    sid = new_id()
    create_session(server.url, "sgd", WEIGHTS, session_id=sid)
    plane = frames_to(_plane_port(server))
    plane.call({"op": "hello", "version": 1})
    grads = _grads(0)
    first, _ = plane.call(_push_header(sid, grads, key="once"), _body(grads))
    again, body = plane.call(_push_header(sid, grads, key="once"), _body(grads))
    assert first["iterations"] == 1
    assert again == {"status": 200, "iterations": 1, "replayed": True} and body == b""
    other = _grads(1)
    refused, _ = plane.call(_push_header(sid, other, key="once"), _body(other))
    assert refused["status"] == 422 and refused["error"]["code"] == "idempotency_key_reused"
    # the same key over REST is the same key
    answer = push(server.url, sid, grads, key="once")
    assert answer.headers["idempotent-replayed"] == "true"
    assert pull(server.url, sid)[0] == 1


def test_errors_answer_with_the_rest_codes_and_the_connection_goes_on(server_factory, frames_to):
    server = server_factory()
    sid = new_id()
    create_session(server.url, "sgd", WEIGHTS, session_id=sid)
    plane = frames_to(_plane_port(server))
    plane.call({"op": "hello", "version": 1})
    nan = {"kernel": np.full((3, 4), np.nan, np.float32), "bias": np.zeros(4, np.float32)}
    head, _ = plane.call(_push_header(sid, nan), _body(nan))
    assert head["error"]["code"] == "non_finite_gradient"
    head, _ = plane.call({"op": "pull", "session": "no-such-session"})
    assert head["status"] == 404 and head["error"]["code"] == "session_not_found"
    head, body = plane.call({"op": "pull", "session": sid})  # the same connection still serves
    assert head["status"] == 200 and head["iterations"] == 0 and len(body) == 64


@pytest.mark.parametrize(
    ("tensors", "code"),
    [
        ([["kernel", "int32", [3, 4]], ["bias", "float32", [4]]], "invalid_tensor"),
        ([["kernel", "float32", [3, 4]], ["kernel", "float32", [4]]], "invalid_tensor"),
        ([["kernel", "float32", [-3, 4]]], "invalid_tensor"),
        ([["kernel", "float32", [3, 4]]], "invalid_request"),  # the body is longer than that
        ("not a list", "invalid_tensor"),
    ],
)
def test_a_bad_layout_is_refused_before_the_body_and_the_connection_closes(
    server_factory, frames_to, tensors, code
):
    server = server_factory()
    sid = new_id()
    create_session(server.url, "sgd", WEIGHTS, session_id=sid)
    plane = frames_to(_plane_port(server))
    plane.call({"op": "hello", "version": 1})
    plane.send({"op": "push", "session": sid, "tensors": tensors}, body_len=64)  # no body sent
    _, head, _ = plane.answer()
    assert head["error"]["code"] == code, head
    assert plane.closed_within(5)
    assert pull(server.url, sid)[0] == 0


def test_a_body_over_the_limit_is_refused_before_a_byte_of_it_is_read(server_factory, frames_to):
    server = server_factory(max_body_bytes=1024)
    sid = new_id()
    create_session(server.url, "sgd", {"w": np.zeros(128, np.float32)}, session_id=sid)
    plane = frames_to(_plane_port(server))
    plane.call({"op": "hello", "version": 1})
    plane.send({"op": "push", "session": sid, "tensors": [["w", "float32", [2048]]]}, body_len=8192)
    _, head, _ = plane.answer()
    assert head["status"] == 413 and head["error"]["code"] == "payload_too_large"
    assert plane.closed_within(5)


def test_tokens_are_checked_in_the_hello_before_any_body(server_factory, frames_to):
    server = server_factory(tokens="writer,reader:ro")
    port = _plane_port(server, "reader")
    sid = new_id()
    with httpx.Client(base_url=server.url, headers={"Authorization": "Bearer writer"}) as http:
        create_session(http, "sgd", WEIGHTS, session_id=sid)
    anonymous = frames_to(port)
    anonymous.send({"op": "pull", "session": sid})
    assert anonymous.answer()[1]["status"] == 401 and anonymous.closed_within(5)
    wrong = frames_to(port)
    head, _ = wrong.call({"op": "hello", "version": 1, "token": "guess"})
    assert head["status"] == 401 and wrong.closed_within(5)
    reader = frames_to(port)
    assert reader.call({"op": "hello", "version": 1, "token": "reader"})[0]["status"] == 200
    assert reader.call({"op": "pull", "session": sid})[0]["status"] == 200
    grads = _grads(0)
    reader.send(_push_header(sid, grads), body_len=len(_body(grads)))  # the body never comes
    _, head, _ = reader.answer()
    assert head["status"] == 403 and head["error"]["code"] == "forbidden"
    assert reader.closed_within(5)
    writer = frames_to(port)
    writer.call({"op": "hello", "version": 1, "token": "writer"})
    assert writer.call(_push_header(sid, grads), _body(grads))[0]["iterations"] == 1


def test_before_its_hello_a_connection_receives_no_byte_beyond_a_header(
    server_factory, frames_to, monkeypatch
):
    """A push written whole, body and all, before any hello: when it is refused (401) the
    server has received its prefix and header only (the read-ahead waits for the hello)."""
    from paramserver.server import dataplane

    received: list[int] = []  # bytes held beyond the header when each request is handled
    handle = dataplane._Connection._handle

    def spy(self: Any, prefix: Any, header: Any, request_id: int) -> bool:
        received.append(self._end - self._start)
        return handle(self, prefix, header, request_id)

    monkeypatch.setattr(dataplane._Connection, "_handle", spy)
    server = server_factory(tokens="writer")
    port = _plane_port(server, "writer")
    grads = {"kernel": np.ones(4000, np.float32)}
    anonymous = frames_to(port)
    anonymous.send(_push_header(new_id(), grads), _body(grads))  # 16,000 bytes of body
    time.sleep(0.2)  # all of it on the server's side of the socket
    _, head, _ = anonymous.answer()
    assert head["status"] == 401 and anonymous.closed_within(5)
    assert received == [0]
    # after the hello, the same frame's first bytes of body come with its header
    writer = frames_to(port)
    writer.call({"op": "hello", "version": 1, "token": "writer"})
    sid = new_id()
    with httpx.Client(base_url=server.url, headers={"Authorization": "Bearer writer"}) as http:
        create_session(http, "sgd", grads, session_id=sid)
    header = msgpack.packb(_push_header(sid, grads))
    frame = PREFIX.pack(b"PSDP", 1, 1, 0, 9, len(header), 16000) + header + _body(grads)
    writer.sock.sendall(frame)
    _, head, _ = writer.answer()
    assert head["status"] == 200 and received[-1] > 0


def test_before_its_hello_a_header_longer_than_a_hello_is_refused_unread(server_factory, frames_to):
    """With tokens, a first frame whose header could not be a hello (over 8 KiB) is answered
    401 from its prefix alone: the server waits for none of the header's bytes."""
    server = server_factory(tokens="writer", header_timeout_seconds=30)
    port = _plane_port(server, "writer")
    anonymous = frames_to(port)
    anonymous.sock.sendall(PREFIX.pack(b"PSDP", 1, 1, 0, 3, 8 * 1024 + 1, 0))  # no header
    request_id, head, _ = anonymous.answer()
    assert (request_id, head["status"], head["error"]["code"]) == (3, 401, "unauthorized")
    assert anonymous.closed_within(5)
    # a hello with a token of 4,000 characters is read (and its token checked: unknown)
    hello = frames_to(port)
    head, _ = hello.call({"op": "hello", "version": 1, "token": "x" * 4000})
    assert (head["status"], head["error"]["message"]) == (
        401,
        "a valid bearer token is required in the hello",
    )
    header = msgpack.packb({"op": "hello", "version": 1, "token": "writer"})
    writer = frames_to(port)
    writer.sock.sendall(PREFIX.pack(b"PSDP", 1, 1, 0, 1, len(header), 0) + header)
    assert writer.answer()[1]["status"] == 200


def test_a_header_of_too_many_lists_is_refused_and_the_server_goes_on(server_factory, frames_to):
    """A 4 MiB header of empty lists (about 280 MB as Python objects) is refused once it
    holds more lists and maps than a push of max_tensors tensors (400, closed)."""
    server = server_factory()
    port = _plane_port(server)
    inner = b"\xdc" + (60_000).to_bytes(2, "big") + b"\x90" * 60_000
    count = (4 * 1024 * 1024 - 16) // len(inner)
    header = b"\xdc" + count.to_bytes(2, "big") + inner * count
    hostile = frames_to(port, timeout=60)
    hostile.call({"op": "hello", "version": 1})
    hostile.sock.sendall(PREFIX.pack(b"PSDP", 1, 1, 0, 5, len(header), 0) + header)
    _, head, _ = hostile.answer()
    assert head["status"] == 400 and "too many lists and maps" in head["error"]["message"]
    assert hostile.closed_within(5)
    sid = new_id()
    create_session(server.url, "sgd", WEIGHTS, session_id=sid)
    plane = frames_to(port)
    plane.call({"op": "hello", "version": 1})
    grads = _grads(0)
    assert plane.call(_push_header(sid, grads), _body(grads))[0]["iterations"] == 1


def test_half_sent_frames_are_answered_408_at_the_header_timeout(server_factory, frames_to):
    server = server_factory(header_timeout_seconds=0.5, idle_timeout_seconds=30)
    port = _plane_port(server)
    silent = frames_to(port)
    started = time.monotonic()
    assert silent.closed_within(10) and time.monotonic() - started < 5
    half = frames_to(port)
    half.sock.sendall(PREFIX.pack(b"PSDP", 1, 1, 0, 7, 100, 0))  # a header that never comes
    _, head, _ = half.answer()
    assert head["status"] == 408 and head["error"]["code"] == "request_timeout"


def test_a_connection_idle_past_the_idle_timeout_is_closed(server_factory, frames_to):
    server = server_factory(header_timeout_seconds=30, idle_timeout_seconds=0.5)
    plane = frames_to(_plane_port(server))
    plane.call({"op": "hello", "version": 1})
    time.sleep(0.2)
    assert plane.call({"op": "hello", "version": 1})[0]["status"] == 200
    assert plane.closed_within(5)


def test_a_body_that_stops_coming_is_answered_408(server_factory, frames_to):
    server = server_factory(request_timeout_seconds=0.5)
    sid = new_id()
    create_session(server.url, "sgd", WEIGHTS, session_id=sid)
    plane = frames_to(_plane_port(server))
    plane.call({"op": "hello", "version": 1})
    grads = _grads(0)
    plane.send(_push_header(sid, grads), _body(grads)[:10], body_len=len(_body(grads)))
    _, head, _ = plane.answer()
    assert head["status"] == 408 and plane.closed_within(5)
    assert pull(server.url, sid)[0] == 0


def test_at_the_cap_waiting_then_idle_connections_make_room_and_busy_ones_refuse(
    server_factory, frames_to
):
    server = server_factory(
        data_plane_max_connections=2, header_timeout_seconds=60, idle_timeout_seconds=60
    )
    port = _plane_port(server)
    idle = frames_to(port)
    idle.call({"op": "hello", "version": 1})
    waiting = frames_to(port)
    waiting.sock.sendall(b"PS")  # started, never finished
    time.sleep(0.2)
    newcomer = frames_to(port)
    assert newcomer.call({"op": "hello", "version": 1})[0]["status"] == 200
    assert waiting.closed_within(5)  # the waiting one went first
    third = frames_to(port)
    assert third.call({"op": "hello", "version": 1})[0]["status"] == 200
    assert idle.closed_within(5)  # no waiting one left: the oldest idle one
    assert newcomer.call({"op": "hello", "version": 1})[0]["status"] == 200


def test_without_a_data_plane_the_announcement_is_404(server_factory):
    server = server_factory(data_plane=False)
    answer = httpx.get(f"{server.url}/data-plane", timeout=10)
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    "header",
    [
        b"\x91" * 5000 + b"\xc0",  # 5,000 nested lists
        b"\xdd\xff\xff\xff\xff",  # a list that claims 4 billion items
        b"\xc7\x01\x05x",  # an extension type
        b"\xc4\x03abc",  # a bin
        b"\x81\x01\x02",  # a map with an integer key
        b"\xa2op",  # not a map
        b"\x81\xa2op\xa4push\xc0",  # trailing bytes
    ],
)
def test_a_hostile_frame_header_is_refused_and_the_connection_closed(
    server_factory, frames_to, header
):
    server = server_factory()
    plane = frames_to(_plane_port(server))
    plane.sock.sendall(PREFIX.pack(b"PSDP", 1, 1, 0, 3, len(header), 0) + header)
    _, head, _ = plane.answer()
    assert head["status"] in (400, 422), head
    assert plane.closed_within(5)  # a header it cannot read: the connection cannot go on
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_a_frame_of_another_protocol_is_refused(server_factory, frames_to):
    server = server_factory()
    plane = frames_to(_plane_port(server))
    plane.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    _, head, _ = plane.answer()
    assert (
        head["status"] == 400 and "not a paramserver data-plane frame" in head["error"]["message"]
    )
    assert plane.closed_within(5)


def test_a_taken_default_port_moves_the_data_plane_to_a_free_one(tmp_path):
    """The default data-plane port is the HTTP port + 1; when something holds it the server
    still starts, on a free port that GET /data-plane announces (an explicit one must be free)."""
    from tests.harness.servers import ServerProcess, free_port

    for _ in range(20):
        port = free_port()
        try:
            holder = socket.create_server((HOST, port + 1))
            break
        except OSError:
            continue
    try:
        server = ServerProcess(
            ["-m", "paramserver", "serve", "--port", str(port), "--no-warm-up-kernels"],
            log_dir=tmp_path,
        )
        server.launch()
        server.port, server.url = port, f"http://{HOST}:{port}"
        assert server.wait_ready()
        try:
            announced = httpx.get(f"{server.url}/data-plane", timeout=10).json()
            assert announced["port"] not in (port + 1, 0)
            assert "default port" in server.log and "is taken" in server.log
        finally:
            server.stop()
        explicit = ServerProcess.paramserver(
            "--data-plane-port", str(port + 1), log_dir=tmp_path, warm_up_kernels=False
        ).launch()
        assert explicit.wait_exit() == 3
        assert "cannot start the data plane" in explicit.log
        explicit.stop()
    finally:
        holder.close()


def test_a_push_whose_tensors_are_not_the_sessions_is_refused_before_its_body(
    server_factory, frames_to
):
    """What a connection receives is bounded by the session's own size: a layout with other
    names or shapes (here a body of 400 MB declared) is refused before a byte of it is read."""
    server = server_factory()
    sid = new_id()
    create_session(server.url, "sgd", WEIGHTS, session_id=sid)
    port = _plane_port(server)
    for tensors in (
        [["kernel", "float32", [10_000, 10_000]], ["bias", "float32", [4]]],
        [["kernel", "float32", [3, 4]], ["other", "float32", [4]]],
        [["kernel", "float32", [3, 4]]],
    ):
        plane = frames_to(port)
        plane.call({"op": "hello", "version": 1})
        size = sum(int(np.prod(shape)) * 4 for _, _, shape in tensors)
        plane.send({"op": "push", "session": sid, "tensors": tensors}, body_len=size)
        _, head, _ = plane.answer()
        assert head["status"] == 422 and head["error"]["code"] == "parameter_mismatch", head
        assert plane.closed_within(5)
    ok = frames_to(port)
    grads = {"kernel": np.ones((3, 4), np.float64), "bias": np.ones(4, np.float16)}  # other dtypes
    head, _ = ok.call(_push_header(sid, grads), _body(grads))
    assert head["status"] == 200 and head["iterations"] == 1


def test_requests_sent_back_to_back_in_one_write_are_answered_in_order(server_factory, frames_to):
    """A connection reads ahead of the request it serves (a small push comes in one
    receive): what it read of the next requests is theirs, in order, bit for bit as REST."""
    server = server_factory()
    over_rest, over_plane = new_id("rest"), new_id("plane")
    for sid in (over_rest, over_plane):
        create_session(server.url, "adam", WEIGHTS, session_id=sid)
    plane = frames_to(_plane_port(server))
    wire_bytes = b""
    headers: list[dict[str, Any]] = [{"op": "hello", "version": 1}]
    bodies = [b""]
    for step in range(4):
        grads = _grads(step)
        push(server.url, over_rest, grads)
        headers.append(_push_header(over_plane, grads, key=f"k{step}"))
        bodies.append(_body(grads))
    headers.append({"op": "pull", "session": over_plane})
    bodies.append(b"")
    for request_id, (header, body) in enumerate(zip(headers, bodies, strict=True), start=1):
        head = msgpack.packb(header)
        wire_bytes += PREFIX.pack(b"PSDP", 1, 1, 0, request_id, len(head), len(body)) + head + body
    plane.sock.sendall(wire_bytes)  # every request in one write
    answers = [plane.answer() for _ in headers]
    assert [request_id for request_id, _, _ in answers] == list(range(1, len(headers) + 1))
    assert [head.get("iterations") for _, head, _ in answers] == [None, 1, 2, 3, 4, 4]
    _, expected = pull(server.url, over_rest)
    for _, head, body in answers[-2:]:
        got = _weights(head, body)
        assert all(got[name].tobytes() == expected[name].tobytes() for name in WEIGHTS)


def _sgd_plane(server: ServerThread, frames_to: Any) -> tuple[str, Frames]:
    """A new sgd session of WEIGHTS and a data-plane connection that said hello."""
    sid = new_id()
    create_session(server.url, "sgd", WEIGHTS, session_id=sid)
    plane = frames_to(_plane_port(server))
    plane.call({"op": "hello", "version": 1})
    return sid, plane


def test_a_request_that_trickles_in_byte_by_byte_is_served(server_factory, frames_to):
    server = server_factory(header_timeout_seconds=10)
    sid, plane = _sgd_plane(server, frames_to)
    grads = _grads(0)
    head = msgpack.packb(_push_header(sid, grads, key="slow"))
    body = _body(grads)
    frame = PREFIX.pack(b"PSDP", 1, 1, 0, 7, len(head), len(body)) + head + body
    for i in range(0, len(frame), 9):  # prefix, header and body split at odd places
        plane.sock.sendall(frame[i : i + 9])
        time.sleep(0.002)
    request_id, answer, data = plane.answer()
    assert request_id == 7 and answer["status"] == 200 and answer["iterations"] == 1
    assert len(data) == 64


@pytest.mark.parametrize("shape", [[3.0, 4], [True, 4], [3, 4.0]])
def test_a_layout_seen_before_does_not_let_another_spelling_of_it_through(
    server_factory, frames_to, shape
):
    """The layouts a connection has read are remembered by their bytes: [3.0, 4] equals
    [3, 4] in Python but is refused the first time, so it is refused after [3, 4] too."""
    server = server_factory()
    sid, plane = _sgd_plane(server, frames_to)
    grads = _grads(0)
    for _ in range(2):
        head, _ = plane.call(_push_header(sid, grads), _body(grads))
        assert head["status"] == 200
    header = _push_header(sid, grads)
    header["tensors"][0][2] = shape
    plane.send(header, body_len=64)
    _, head, _ = plane.answer()
    assert head["status"] == 422 and head["error"]["code"] == "invalid_tensor", head
    assert plane.closed_within(5)
    assert pull(server.url, sid)[0] == 2


def test_a_header_longer_than_the_read_ahead_is_read_whole(server_factory, frames_to):
    """Long parameter names make a header of about 40 KiB, more than one read-ahead."""
    server = server_factory()
    sid = new_id()
    weights = {f"layer_{i:03d}/" + "k" * 180: np.full(2, i, np.float32) for i in range(200)}
    create_session(server.url, "sgd", weights, session_id=sid)
    plane = frames_to(_plane_port(server))
    plane.call({"op": "hello", "version": 1})
    grads = {name: np.ones(2, np.float32) for name in weights}
    header = _push_header(sid, grads, key="long")
    assert len(msgpack.packb(header)) > 32 * 1024
    for step in range(2):
        head, body = plane.call(header if step == 0 else _push_header(sid, grads), _body(grads))
        assert head["status"] == 200 and head["iterations"] == step + 1
    got = _weights(head, body)
    name = next(iter(weights))
    lr = np.float32(0.01)  # sgd's default: two steps of lr * 1 from zero
    assert got[name].tobytes() == np.full(2, (np.float32(0) - lr) - lr, np.float32).tobytes()


# A model of several tensors: a large one (800 KB), a float64 one, one without elements, a
# small one.
MIXED = {
    "kernel": np.linspace(-1, 1, 5 * 40001, dtype=np.float32).reshape(-1, 5),
    "wide": np.linspace(2, 3, 70001, dtype=np.float64),
    "empty": np.zeros((0, 3), np.float32),
    "bias": np.full(4, 0.5, np.float32),
}


def _mixed_grads(step: int, model: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + step)
    return {name: rng.normal(size=w.shape).astype(w.dtype) for name, w in model.items()}


@pytest.mark.parametrize(
    "optimizer",
    [
        "adam",
        "nadam",
        {"class_name": "SGD", "config": {"momentum": 0.9, "nesterov": True, "clipnorm": 1.0}},
    ],
    ids=["adam", "nadam", "sgd"],
)
def test_the_answer_of_a_model_of_several_dtypes_is_the_rest_answer_bit_for_bit(
    server_factory, frames_to, optimizer
):
    """A large model of mixed dtypes, a tensor without elements among them: the answer's
    weights, iterations and layout are those of the same step over REST, push after push."""
    server = server_factory()
    over_rest, over_plane = new_id("rest"), new_id("plane")
    for sid in (over_rest, over_plane):
        create_session(server.url, optimizer, MIXED, session_id=sid)
    plane = frames_to(_plane_port(server))
    plane.call({"op": "hello", "version": 1})
    for step in range(3):
        grads = _mixed_grads(step, MIXED)
        assert push(server.url, over_rest, grads).status_code == 200
        _, expected = pull(server.url, over_rest)
        key = f"k{step}" if step % 2 else None
        extra = {} if key is None else {"key": key}
        head, body = plane.call(_push_header(over_plane, grads, **extra), _body(grads))
        assert head["status"] == 200 and head["iterations"] == step + 1
        assert [name for name, _, _ in head["tensors"]] == list(MIXED)
        got = _weights(head, body)
        for name, weight in MIXED.items():
            assert got[name].shape == weight.shape
            assert got[name].tobytes() == expected[name].tobytes(), (step, name)


def test_a_worker_that_does_not_read_its_answer_does_not_hold_the_session(
    server_factory, frames_to
):
    """An answer larger than the sockets' buffers, not read: the rest of it is copied once
    the step is done and the session goes on (another worker's push is answered); read
    later, it holds the weights of its own step, not of the steps after it."""
    model = {"big": np.zeros(6 * 1024 * 1024, np.float32), "bias": np.zeros(3, np.float32)}
    server = server_factory()
    sid, twin = new_id("slow"), new_id("twin")
    for session in (sid, twin):
        create_session(server.url, "adam", model, session_id=session)
    slow = frames_to(_plane_port(server), timeout=30)
    slow.call({"op": "hello", "version": 1})
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    other = frames_to(_plane_port(server), timeout=30)
    other.call({"op": "hello", "version": 1})
    first, second = _mixed_grads(0, model), _mixed_grads(1, model)
    slow.send(_push_header(sid, first, key="first"), _body(first))  # its answer waits
    head, body = other.call(_push_header(sid, second, key="second"), _body(second))
    assert head["status"] == 200 and head["iterations"] == 2
    assert push(server.url, twin, first).status_code == 200
    _, after_first = pull(server.url, twin)
    assert push(server.url, twin, second).status_code == 200
    _, after_second = pull(server.url, twin)
    assert _weights(head, body)["big"].tobytes() == after_second["big"].tobytes()
    _, head, body = slow.answer()
    assert head["status"] == 200 and head["iterations"] == 1
    got = _weights(head, body)
    assert got["big"].tobytes() == after_first["big"].tobytes()
    assert got["bias"].tobytes() == after_first["bias"].tobytes()


def test_a_large_keyed_push_is_applied_once_and_its_key_refused_for_another_body(
    server_factory, frames_to
):
    """Over 64 KiB, a push's digest is computed after its answer has left: a retry on
    another connection still replays it, another body with its key is still refused."""
    model = {"big": np.zeros(50_000, np.float32)}
    server = server_factory()
    sid = new_id()
    create_session(server.url, "sgd", model, session_id=sid)
    first, second = frames_to(_plane_port(server)), frames_to(_plane_port(server))
    for conn in (first, second):
        conn.call({"op": "hello", "version": 1})
    grads = {"big": np.ones(50_000, np.float32)}
    head, body = first.call(_push_header(sid, grads, key="big-k"), _body(grads))
    assert head["status"] == 200 and head["iterations"] == 1
    head, _ = second.call(_push_header(sid, grads, key="big-k"), _body(grads))
    assert head == {"status": 200, "iterations": 1, "replayed": True}
    other = {"big": np.full(50_000, 2.0, np.float32)}
    head, _ = first.call(_push_header(sid, other, key="big-k"), _body(other))
    assert head["status"] == 422 and head["error"]["code"] == "idempotency_key_reused"
    assert pull(server.url, sid)[0] == 1
