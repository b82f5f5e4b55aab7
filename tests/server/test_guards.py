"""The guards that keep one server alive under hostile or excessive load, over real HTTP.

Back-pressure (503 + Retry-After), request timeouts (408 for a body that does not arrive, 503
for a session that stays busy), memory quotas (507), body size (413) and hostile msgpack
bodies (400/413/422, fast, with no memory growth beyond the body). Every error answer in this
module goes through :func:`assert_error`, which also checks that no traceback or internal
detail leaks into the body. Timing bounds are generous: this is a test, not a benchmark.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from paramserver.server.protocol import decode_limits
from paramserver.server.settings import Settings

from paramserver import wire
from tests.harness.servers import ServerThread, start_server_thread

MSGPACK = {"Content-Type": "application/msgpack"}
LEAKS = ("Traceback", 'File "', ".py", "/work/", "site-packages", "Error(", "0x7f")


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as client:
        yield client


def assert_no_leak(text: str) -> None:
    for marker in LEAKS:
        assert marker not in text, f"{marker!r} leaks into an error body: {text[:500]}"


def assert_error(r: httpx.Response, status: int | set[int], code: str | None = None) -> str:
    """``r`` is a protocol error body of ``status``, with no internal detail; returns its code."""
    statuses = {status} if isinstance(status, int) else status
    assert r.status_code in statuses, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    assert_no_leak(r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return str(body["error"]["code"])


def new_id() -> str:
    return f"guard-{uuid.uuid4().hex[:12]}"


def create_body(
    session_id: str, size: int = 4, optimizer: str = "sgd", dtype: type = np.float32
) -> bytes:
    return wire.pack(
        {"session_id": session_id, "optimizer": optimizer, "weights": {"w": np.zeros(size, dtype)}}
    )


def create(http: httpx.Client, url: str, session_id: str, size: int = 4, **kw: Any) -> None:
    r = http.post(f"{url}/sessions", content=create_body(session_id, size, **kw), headers=MSGPACK)
    assert r.status_code == 201, r.text


def push_body(size: int = 4, value: float = 1.0) -> bytes:
    return wire.pack({"gradients": {"w": np.full(size, value, np.float32)}})


def sgd_state(size: int, iterations: int = 0) -> bytes:
    w = np.linspace(-1, 1, size, dtype=np.float32)
    return wire.pack(
        {
            "iterations": iterations,
            "optimizer": {"class_name": "SGD", "config": {"lr": 0.01}},
            "weights": {"w": w},
            "slots": {"moment": {"w": np.zeros(size, np.float32)}},
            "scalars": {},
        }
    )


def observed(http: httpx.Client, url: str) -> dict[str, Any]:
    """Every session's id, iterations and weights: what a refused request must not change."""
    listing = http.get(f"{url}/sessions")
    assert listing.status_code == 200, listing.text
    out = {}
    for summary in listing.json()["sessions"]:
        sid = summary["session_id"]
        message = wire.unpack(http.get(f"{url}/sessions/{sid}/weights").content)
        out[sid] = (
            message["iterations"],
            {k: wire.decode_tensor(v).tobytes() for k, v in message["weights"].items()},
        )
    return out


# --- back-pressure --------------------------------------------------------------------------


class HeldUpload:
    """A push whose chunked body stalls after its first chunk until ``release()``."""

    def __init__(self, url: str, session_id: str) -> None:
        self._gate = threading.Event()
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None
        body = push_body()
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
    create(http, url, sid)
    in_flight = in_flight_counter(srv.app)
    held = [HeldUpload(url, sid), HeldUpload(url, sid)]
    try:
        wait_for(lambda: in_flight() == 2)
        refused = http.get(f"{url}/sessions")
        assert_error(refused, 503, "service_unavailable")
        assert int(refused.headers["retry-after"]) >= 1
        push = http.post(f"{url}/sessions/{sid}/gradients", content=push_body(), headers=MSGPACK)
        assert_error(push, 503, "service_unavailable")
        assert "retry-after" in push.headers
        assert http.get(f"{url}/health").status_code == 200  # never refused
    finally:
        answers = [h.finish() for h in held]
    assert [a.status_code for a in answers] == [200, 200]
    wait_for(lambda: in_flight() == 0)
    assert http.get(f"{url}/sessions/{sid}").json()["iterations"] == 2  # the 503s applied nothing


# --- timeouts -------------------------------------------------------------------------------


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
    create(http, url, sid)
    before = observed(http, url)
    body = push_body()
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
    assert observed(http, url) == before


def test_a_session_that_stays_busy_gets_503_session_busy(
    server_factory: Callable[..., ServerThread], http: httpx.Client
) -> None:
    srv = server_factory(request_timeout_seconds=0.5)
    url = srv.url
    sid = new_id()
    create(http, url, sid)
    session = srv.app.state.service.store.get(sid)
    session.lock.acquire()  # the next push takes the session's turn and waits for this lock
    first: list[httpx.Response] = []
    pusher = threading.Thread(
        target=lambda: first.append(
            httpx.post(
                f"{url}/sessions/{sid}/gradients", content=push_body(), headers=MSGPACK, timeout=60
            )
        )
    )
    try:
        pusher.start()
        wait_for(session.turn.locked)
        started = time.perf_counter()
        busy = http.post(f"{url}/sessions/{sid}/gradients", content=push_body(), headers=MSGPACK)
        elapsed = time.perf_counter() - started
        assert_error(busy, 503, "session_busy")
        assert busy.headers["retry-after"] == "1"
        assert 0.3 < elapsed < 15
        assert_error(http.get(f"{url}/sessions/{sid}/weights"), 503, "session_busy")
        create(http, url, "other")  # other sessions are served meanwhile
        other = http.post(f"{url}/sessions/other/gradients", content=push_body(), headers=MSGPACK)
        assert other.status_code == 200
    finally:
        session.lock.release()
        pusher.join(timeout=60)
    assert first[0].status_code == 200
    assert http.get(f"{url}/sessions/{sid}").json()["iterations"] == 1


# --- memory quotas --------------------------------------------------------------------------
# An SGD session of n float32 weights holds 8n bytes (weights and momentum); Adam holds 12n.


def test_per_session_quota_gets_507_and_changes_nothing(
    server_factory: Callable[..., ServerThread], http: httpx.Client
) -> None:
    url = server_factory(max_session_bytes=1000).url
    create(http, url, "small", size=100)  # 800 bytes
    push = http.post(f"{url}/sessions/small/gradients", content=push_body(100), headers=MSGPACK)
    assert push.status_code == 200
    before = observed(http, url)

    too_big = http.post(f"{url}/sessions", content=create_body("big", 200), headers=MSGPACK)
    message = assert_error(too_big, 507, "memory_quota_exceeded")
    assert "1000" in too_big.json()["error"]["message"], message
    adam = http.post(
        f"{url}/sessions", content=create_body("adam", 100, optimizer="adam"), headers=MSGPACK
    )
    assert_error(adam, 507, "memory_quota_exceeded")  # the optimizer's state counts
    replace = http.put(f"{url}/sessions/small/state", content=sgd_state(200), headers=MSGPACK)
    assert_error(replace, 507, "memory_quota_exceeded")
    fresh = http.put(f"{url}/sessions/fresh/state", content=sgd_state(200), headers=MSGPACK)
    assert_error(fresh, 507, "memory_quota_exceeded")

    assert observed(http, url) == before
    for sid in ("big", "adam", "fresh"):
        assert_error(http.get(f"{url}/sessions/{sid}"), 404, "session_not_found")
    create(http, url, "fits", size=125)  # exactly 1000 bytes


def test_global_quota_gets_507_and_changes_nothing(
    server_factory: Callable[..., ServerThread], http: httpx.Client
) -> None:
    url = server_factory(max_total_bytes=2000).url
    create(http, url, "a", size=100)
    create(http, url, "b", size=100)
    before = observed(http, url)
    refused = http.post(f"{url}/sessions", content=create_body("c", 100), headers=MSGPACK)
    assert_error(refused, 507, "memory_quota_exceeded")
    assert "2000" in refused.json()["error"]["message"]
    grow = http.put(f"{url}/sessions/b/state", content=sgd_state(200), headers=MSGPACK)
    assert_error(grow, 507, "memory_quota_exceeded")
    assert observed(http, url) == before

    # Replacing a session's state counts the new state instead of the old one.
    ok = http.put(f"{url}/sessions/b/state", content=sgd_state(150, iterations=7), headers=MSGPACK)
    assert ok.status_code == 200, ok.text
    assert ok.json()["iterations"] == 7
    # Deleting a session frees its bytes.
    assert http.delete(f"{url}/sessions/a").status_code == 204
    create(http, url, "c", size=50)


def test_too_many_sessions_gets_507(
    server_factory: Callable[..., ServerThread], http: httpx.Client
) -> None:
    url = server_factory(max_sessions=2).url
    create(http, url, "one")
    create(http, url, "two")
    r = http.post(f"{url}/sessions", content=create_body("three"), headers=MSGPACK)
    assert_error(r, 507, "too_many_sessions")
    assert sorted(observed(http, url)) == ["one", "two"]


# --- body size ------------------------------------------------------------------------------


def test_a_body_over_the_limit_gets_413(
    server_factory: Callable[..., ServerThread], http: httpx.Client
) -> None:
    url = server_factory(max_body_bytes=1024).url
    sid = new_id()
    create(http, url, sid)
    before = observed(http, url)
    big = push_body(1000)
    declared = http.post(f"{url}/sessions/{sid}/gradients", content=big, headers=MSGPACK)
    assert_error(declared, 413, "payload_too_large")

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(big), 256):
            yield big[i : i + 256]

    streamed = http.post(f"{url}/sessions/{sid}/gradients", content=chunks(), headers=MSGPACK)
    assert_error(streamed, 413, "payload_too_large")
    created = http.post(f"{url}/sessions", content=create_body("x", 1000), headers=MSGPACK)
    assert_error(created, 413, "payload_too_large")
    assert observed(http, url) == before


# --- hostile msgpack ------------------------------------------------------------------------


def _u16(n: int) -> bytes:
    return struct.pack(">H", n)


def _u32(n: int) -> bytes:
    return struct.pack(">I", n)


def _str(s: str) -> bytes:
    raw = s.encode()
    return (bytes((0xA0 | len(raw),)) if len(raw) < 32 else b"\xd9" + bytes((len(raw),))) + raw


def _array(n: int) -> bytes:
    return bytes((0x90 | n,)) if n < 16 else b"\xdc" + _u16(n)


def _map(n: int) -> bytes:
    return bytes((0x80 | n,)) if n < 16 else b"\xde" + _u16(n)


def _gradients(value: bytes) -> bytes:
    return _map(1) + _str("gradients") + value


def _tensor(data: bytes) -> bytes:
    return (
        _map(3)
        + _str("dtype")
        + _str("float32")
        + _str("shape")
        + _array(1)
        + b"\x04"
        + _str("data")
        + data
    )


def tiny_values(width: int = 64, levels: int = 3, outer: int = 4) -> bytes:
    """``outer`` x ``width``^``levels`` nils in nested arrays that each fit the item bound."""
    block = _array(width) + b"\xc0" * width
    for _ in range(levels - 1):
        block = _array(width) + block * width
    return _array(outer) + block * outer


def many_keys(maps: int, keys: int = 4096) -> bytes:
    """A map of ``maps`` maps, each of ``keys`` distinct short keys to nil."""
    out = [_map(maps)]
    for m in range(maps):
        out.append(_str(f"m{m}") + _map(keys))
        out.extend(_str(f"{m * keys + k:x}") + b"\xc0" for k in range(keys))
    return b"".join(out)


FIFTY_MB = 50 * 1024 * 1024
SMALL_MAP = _map(1) + _str("a") + b"\x01"

# Bodies the decoder refuses on structure alone, before building anything.
STRUCTURAL: dict[str, Callable[[], bytes]] = {
    "map32-header": lambda: b"\xdf\xff\xff\xff\xff" + b"\xc0" * 64,
    "array32-header": lambda: b"\xdd\xff\xff\xff\xff" + b"\xc0" * 64,
    "map16-header": lambda: _gradients(b"\xde\xff\xff" + b"\xc0" * 64),
    "nested-map-header": lambda: _gradients(_map(1) + _str("w") + b"\xdf\x7f\xff\xff\xff"),
    "deep-arrays": lambda: b"\x91" * 100_000 + b"\xc0",
    "deep-maps": lambda: (_map(1) + _str("a")) * 10_000 + b"\xc0",
    "ext-fixext1": lambda: _gradients(b"\xd4\x01\x00"),
    "ext-timestamp": lambda: _gradients(b"\xd6\xff\x00\x00\x00\x00"),
    "ext8": lambda: _gradients(b"\xc7\x05\x01" + b"\x00" * 5),
    "ext32-huge": lambda: _gradients(b"\xc9\xff\xff\xff\xff\x01" + b"\x00" * 16),
    "bin32-past-end": lambda: _gradients(
        _map(1) + _str("w") + _tensor(b"\xc6" + _u32(0xFFFFFFFF) + b"\x00" * 16)
    ),
    "str32-past-end": lambda: _gradients(b"\xdb" + _u32(0xFFFFFFFF) + b"a" * 16),
    "never-used-byte": lambda: _gradients(b"\xc1"),
    "50MB-repeated-maps": lambda: SMALL_MAP * (FIFTY_MB // len(SMALL_MAP)),
    "50MB-array-of-maps": lambda: b"\xdd" + _u32(FIFTY_MB // 4) + SMALL_MAP * (FIFTY_MB // 4),
    "50MB-map-of-maps": lambda: (
        b"\xdf" + _u32(FIFTY_MB // 8) + (_str("k") + SMALL_MAP) * (FIFTY_MB // 6)
    ),
}
# Bodies within the structural bounds that fill the decoder's object budget.
OBJECT_HEAVY: dict[str, Callable[[], bytes]] = {
    "1M-tiny-values": lambda: tiny_values(),
    "64-maps-of-4096-keys": lambda: many_keys(64),
}


@pytest.fixture(scope="module")
def hostile_server() -> Iterator[ServerThread]:
    srv = start_server_thread()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def victim(hostile_server: ServerThread) -> str:
    with httpx.Client() as client:
        create(client, hostile_server.url, "victim")
    return "victim"


@pytest.mark.parametrize("endpoint", ["push", "create", "state"])
@pytest.mark.parametrize("name", [*STRUCTURAL, *OBJECT_HEAVY])
def test_hostile_body_is_refused_quickly_and_changes_nothing(
    hostile_server: ServerThread, victim: str, http: httpx.Client, name: str, endpoint: str
) -> None:
    url = hostile_server.url
    body = {**STRUCTURAL, **OBJECT_HEAVY}[name]()
    target = {
        "push": ("POST", f"/sessions/{victim}/gradients"),
        "create": ("POST", "/sessions"),
        "state": ("PUT", f"/sessions/{victim}/state"),
    }[endpoint]
    before = observed(http, url)
    started = time.perf_counter()
    r = http.request(target[0], url + target[1], content=body, headers=MSGPACK)
    elapsed = time.perf_counter() - started
    ms = elapsed * 1000
    print(f"{endpoint:6s} {name:22s} {len(body):>10} bytes -> {r.status_code} in {ms:7.1f} ms")
    assert_error(r, {400, 413, 422})
    # 50 MB has to cross the socket first. The object-heavy bodies cost the pure-Python decoder
    # ~0.3-0.5 s on an idle machine (far from the 100 ms goal: reported), so their bound leaves
    # room for a loaded 2-core CI machine.
    limit = 5.0 if len(body) >= FIFTY_MB else 3.0 if name in OBJECT_HEAVY else 1.0
    assert elapsed < limit, f"{name}: {elapsed:.3f} s"
    assert observed(http, url) == before


def test_a_50mb_body_over_a_smaller_limit_is_refused_before_it_is_read(
    server_factory: Callable[..., ServerThread], http: httpx.Client
) -> None:
    url = server_factory(max_body_bytes=1024 * 1024).url
    body = STRUCTURAL["50MB-repeated-maps"]()
    started = time.perf_counter()
    r = http.post(f"{url}/sessions", content=body, headers=MSGPACK)
    elapsed = time.perf_counter() - started
    print(f"413 for 50 MB in {elapsed * 1000:.1f} ms")
    assert_error(r, 413, "payload_too_large")
    assert elapsed < 5.0


# --- the decoder in process: memory ---------------------------------------------------------

LIMITS = decode_limits(Settings())


def peak_while_unpacking(body: bytes) -> tuple[int, float, str]:
    """(tracemalloc peak in bytes, seconds, error) of ``wire.unpack(body, LIMITS)``."""
    tracemalloc.start()
    try:
        started = time.perf_counter()
        with pytest.raises(wire.MalformedBody) as refused:
            wire.unpack(body, LIMITS)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, elapsed, str(refused.value)


@pytest.mark.parametrize("name", list(STRUCTURAL))
def test_structurally_hostile_bodies_allocate_nothing_beyond_the_body(name: str) -> None:
    """Refused from headers and lengths alone: a few KiB of bookkeeping, whatever the size."""
    body = STRUCTURAL[name]()
    peak, elapsed, error = peak_while_unpacking(body)
    print(
        f"{name:22s} {len(body):>10} bytes: peak {peak:>8} B, {elapsed * 1000:.1f} ms: {error[:60]}"
    )
    assert peak < 64 * 1024
    assert_no_leak(error)


@pytest.mark.parametrize("name", list(OBJECT_HEAVY))
def test_object_heavy_bodies_stop_at_the_object_budget(name: str) -> None:
    """The decoder refuses them once they hold more values than a request may carry."""
    body = OBJECT_HEAVY[name]()
    if name == "64-maps-of-4096-keys":  # 262k entries fit the budget: make it overflow
        body = many_keys(100)
    started = time.perf_counter()
    with pytest.raises(wire.MalformedBody, match="more values|arrays may not hold"):
        wire.unpack(body, LIMITS)
    print(f"{name}: {len(body)} bytes refused in {(time.perf_counter() - started) * 1000:.1f} ms")


def test_nested_array_bombs_allocate_at_most_twice_the_body() -> None:
    # Arrays may hold only scalars: a nested-array bomb is refused at its first inner array.
    body = tiny_values(levels=2, outer=4)
    tracemalloc.start()
    try:
        with pytest.raises(wire.MalformedBody):
            wire.unpack(body, LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"tiny-values: {len(body)} bytes, peak {peak} B ({peak / len(body):.1f}x)")
    assert peak <= 2 * len(body) + 16 * 1024


def test_map_heavy_bodies_cost_at_most_the_object_budget() -> None:
    # Maps of many short keys build one Python object per value until the object budget
    # (max_objects) stops them: the growth is bounded by the budget, not by the body. At the
    # default limits that is ~66k values, a few MiB, whatever the body's size.
    body = many_keys(100)
    tracemalloc.start()
    try:
        with pytest.raises(wire.MalformedBody):
            wire.unpack(body, LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"many-keys: {len(body)} bytes, peak {peak} B, budget {LIMITS.max_objects} values")
    assert peak <= LIMITS.max_objects * 160


# --- no traceback in any error --------------------------------------------------------------


def test_no_error_body_carries_a_traceback(
    server_factory: Callable[..., ServerThread], http: httpx.Client
) -> None:
    srv = server_factory()
    url = srv.url
    create(http, url, "exists")
    cases: list[tuple[httpx.Response, int]] = [
        (http.get(f"{url}/no/such/route"), 404),
        (http.get(f"{url}/sessions/missing"), 404),
        (http.get(f"{url}/sessions/missing/weights"), 404),
        (http.post(f"{url}/sessions/missing/gradients", content=push_body(), headers=MSGPACK), 404),
        (http.delete(f"{url}/sessions/missing"), 404),
        (http.patch(f"{url}/sessions/exists"), 405),
        (http.post(f"{url}/sessions", content=b"{}", headers={"Content-Type": "text/plain"}), 415),
        (http.post(f"{url}/sessions/exists/gradients", content=push_body()), 415),
        (http.post(f"{url}/sessions", content=b"\xc1", headers=MSGPACK), 400),
        (
            http.post(
                f"{url}/sessions", content=b"{", headers={"Content-Type": "application/json"}
            ),
            400,
        ),
        (
            http.post(
                f"{url}/sessions",
                content=b"[" * 100_000,
                headers={"Content-Type": "application/json"},
            ),
            400,
        ),
        (http.post(f"{url}/sessions", content=create_body("exists"), headers=MSGPACK), 409),
        (http.post(f"{url}/sessions", content=create_body("bad id!"), headers=MSGPACK), 422),
        (
            http.post(
                f"{url}/sessions",
                content=wire.pack({"optimizer": "nope", "weights": {"w": np.zeros(2, np.float32)}}),
                headers=MSGPACK,
            ),
            422,
        ),
        (
            http.post(
                f"{url}/sessions",
                content=json.dumps(
                    {"optimizer": {"class_name": "Adam", "config": {"lr": "x"}}, "weights": {}}
                ),
                headers={"Content-Type": "application/json"},
            ),
            422,
        ),
        (http.post(f"{url}/sessions/exists/gradients", content=push_body(5), headers=MSGPACK), 422),
        (
            http.post(
                f"{url}/sessions/exists/gradients",
                params={"return_weights": "perhaps"},
                content=push_body(),
                headers=MSGPACK,
            ),
            422,
        ),
        (
            http.post(
                f"{url}/sessions/exists/gradients",
                content=wire.pack({"gradients": {"w": np.full(4, np.nan, np.float32)}}),
                headers=MSGPACK,
            ),
            422,
        ),
        (
            http.put(
                f"{url}/sessions/exists/state",
                content=wire.pack({"iterations": -1}),
                headers=MSGPACK,
            ),
            422,
        ),
    ]
    for r, status in cases:
        assert_error(r, status)

    def broken() -> None:
        raise RuntimeError(f"an internal detail at {__file__}")

    srv.app.state.service.list = broken  # this server only
    internal = http.get(f"{url}/sessions")
    assert assert_error(internal, 500, "internal_error")
    assert "internal detail" not in internal.text
