"""Bodies over ``max_body_bytes`` get 413, declared or streamed, and change nothing.

The boundary is exact (a body of the limit is taken, one byte more is not), chunked bodies are
cut off as soon as they pass it, and the answer comes before the rest of the body is sent.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlparse

import httpx
import msgpack
import numpy as np
import pytest

from paramserver import wire
from tests.harness.hostile_bodies import STRUCTURAL
from tests.harness.http_api import (
    MSGPACK,
    MSGPACK_TYPE,
    assert_error,
    create_body,
    gradients_body,
    new_id,
    packb,
    tensor,
)
from tests.harness.refusals import assert_absent
from tests.harness.servers import ServerThread

LIMIT = 4096


def _exact_body() -> tuple[str, int]:
    """A parameter name and size whose push body is exactly LIMIT bytes."""
    for n in range(900, 1100):
        for length in range(1, 257):
            name = "p" * length
            if len(gradients_body({name: np.zeros(n, np.float32)})) == LIMIT:
                return name, n
    raise AssertionError("no exact body size found")


@pytest.fixture
def small(server_factory: Callable[..., Any]) -> Any:
    """A server whose body limit is LIMIT bytes."""
    return server_factory(max_body_bytes=LIMIT)


@pytest.fixture
def small_session(small: Any) -> Iterator[tuple[httpx.Client, str, str, int]]:
    name, n = _exact_body()
    sid = new_id()
    with httpx.Client(base_url=small.url, timeout=60) as client:
        body = {
            "session_id": sid,
            "optimizer": "sgd",
            "weights": {name: {"dtype": "float32", "shape": [n], "data": [0] * n}},
        }
        r = client.post("/sessions", json=body)
        assert r.status_code == 201, r.text
        yield client, sid, name, n


def small_snapshot(client: httpx.Client, sid: str) -> tuple[bytes, dict[str, Any]]:
    return client.get(f"/sessions/{sid}/weights").content, client.get(f"/sessions/{sid}").json()


def test_413_boundary_is_exact(small_session: tuple[httpx.Client, str, str, int]) -> None:
    client, sid, name, n = small_session
    body = gradients_body({name: np.ones(n, np.float32)})
    assert len(body) == LIMIT
    r = client.post(f"/sessions/{sid}/gradients", content=body, headers=MSGPACK)
    assert r.status_code == 200, r.text
    before = small_snapshot(client, sid)
    r = client.post(f"/sessions/{sid}/gradients", content=body + b"\xc0", headers=MSGPACK)
    assert_error(r, 413, "payload_too_large")
    assert small_snapshot(client, sid) == before
    # The same boundary for a chunked body.
    r = client.post(f"/sessions/{sid}/gradients", content=_chunks(body + b"\xc0"), headers=MSGPACK)
    assert_error(r, 413, "payload_too_large")
    assert small_snapshot(client, sid) == before
    r = client.post(f"/sessions/{sid}/gradients", content=_chunks(body), headers=MSGPACK)
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert r.status_code == 200, r.text
    assert msgpack.unpackb(r.content)["iterations"] == 2


def test_413_declared_content_length(small_session: tuple[httpx.Client, str, str, int]) -> None:
    client, sid, name, n = small_session
    before = small_snapshot(client, sid)
    body = gradients_body({name: np.ones(n, np.float32), "extra": np.ones(4 * n, np.float32)})
    assert len(body) > LIMIT
    r = client.post(f"/sessions/{sid}/gradients", content=body, headers=MSGPACK)
    assert r.request.headers["content-length"] == str(len(body))
    assert_error(r, 413, "payload_too_large")
    assert small_snapshot(client, sid) == before
    # A big declared body too (larger than the socket buffers).
    r = client.post(f"/sessions/{sid}/gradients", content=bytes(8 << 20), headers=MSGPACK)
    assert_error(r, 413, "payload_too_large")
    assert small_snapshot(client, sid) == before


def _chunks(body: bytes, size: int = 512) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def test_413_chunked_body_without_content_length(
    small_session: tuple[httpx.Client, str, str, int],
) -> None:
    client, sid, name, n = small_session
    before = small_snapshot(client, sid)
    body = gradients_body({name: np.ones(n, np.float32), "extra": np.ones(4 * n, np.float32)})
    r = client.post(f"/sessions/{sid}/gradients", content=_chunks(body), headers=MSGPACK)
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in r.request.headers
    assert_error(r, 413, "payload_too_large")
    assert small_snapshot(client, sid) == before
    # Many megabytes, streamed: refused as soon as the limit is passed.
    r = client.post(
        f"/sessions/{sid}/gradients",
        content=_chunks(bytes(8 << 20), 65536),
        headers=MSGPACK,
    )
    assert_error(r, 413, "payload_too_large")
    assert small_snapshot(client, sid) == before


def test_chunked_body_under_the_limit_is_accepted(
    small_session: tuple[httpx.Client, str, str, int],
) -> None:
    client, sid, name, n = small_session
    body = gradients_body({name: np.ones(n, np.float32)})
    r = client.post(f"/sessions/{sid}/gradients", content=_chunks(body, 100), headers=MSGPACK)
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert r.status_code == 200, r.text
    assert msgpack.unpackb(r.content)["iterations"] == 1


def _raw_response(url: str, head: bytes, body: bytes) -> bytes:
    """Send ``head`` and part of a body, then read the answer without sending the rest."""
    parsed = urlparse(url)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=10) as sock:
        sock.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data or not data.endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_413_is_answered_before_the_body_arrives(
    small: Any, small_session: tuple[httpx.Client, str, str, int]
) -> None:
    client, sid, _, _ = small_session
    before = small_snapshot(client, sid)
    # Declares a gigabyte, sends 100 bytes, then waits: the answer must not wait for the rest.
    head = (
        f"POST /sessions/{sid}/gradients HTTP/1.1\r\nHost: test\r\n"
        f"Content-Type: {MSGPACK_TYPE}\r\nContent-Length: {1 << 30}\r\n\r\n"
    ).encode()
    answer = _raw_response(small.url, head, bytes(100))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"payload_too_large"' in answer
    # Chunked: 5 KiB in chunks, no final chunk; refused once the limit is passed.
    head = (
        f"POST /sessions/{sid}/gradients HTTP/1.1\r\nHost: test\r\n"
        f"Content-Type: {MSGPACK_TYPE}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunks = (b"400\r\n" + bytes(1024) + b"\r\n") * 5
    answer = _raw_response(small.url, head, chunks)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert small_snapshot(client, sid) == before


def test_413_on_create_and_put_state(
    small: Any, small_session: tuple[httpx.Client, str, str, int]
) -> None:
    client, sid, _, _ = small_session
    before = small_snapshot(client, sid)
    big = {"w": np.zeros(2 * LIMIT, np.float32)}
    body = create_body("too-big", "sgd", big)
    assert_error(client.post("/sessions", content=body, headers=MSGPACK), 413, "payload_too_large")
    r = client.post("/sessions", content=_chunks(body), headers=MSGPACK)
    assert_error(r, 413, "payload_too_large")
    json_body = json.dumps(
        {
            "optimizer": "sgd",
            "weights": {"w": {"dtype": "float32", "shape": [3000], "data": [0] * 3000}},
        }
    )
    r = client.post("/sessions", content=json_body, headers={"Content-Type": "application/json"})
    assert_error(r, 413, "payload_too_large")
    assert_absent(client, "too-big")
    state = packb(
        {
            "iterations": 0,
            "optimizer": "sgd",
            "weights": {"w": tensor(big["w"])},
            "slots": {},
            "scalars": {},
        }
    )
    for target in (sid, "too-big"):
        r = client.put(f"/sessions/{target}/state", content=state, headers=MSGPACK)
        assert_error(r, 413, "payload_too_large")
        r = client.put(f"/sessions/{target}/state", content=_chunks(state), headers=MSGPACK)
        assert_error(r, 413, "payload_too_large")
    assert_absent(client, "too-big")
    assert small_snapshot(client, sid) == before


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


def test_json_bodies_have_their_own_smaller_limit(
    server_factory: Callable[..., ServerThread],
) -> None:
    srv = server_factory(max_json_body_bytes=4096)
    data = [0.0] * 2000
    body = json.dumps(
        {"optimizer": "sgd", "weights": {"w": {"dtype": "float32", "shape": [2000], "data": data}}}
    )
    r = httpx.post(
        f"{srv.url}/sessions", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413, r.text
    # the same model in msgpack is well within the (larger) general limit
    r = httpx.post(
        f"{srv.url}/sessions",
        content=wire.pack({"optimizer": "sgd", "weights": {"w": np.zeros(2000, np.float32)}}),
        headers=MSGPACK,
    )
    assert r.status_code == 201, r.text
