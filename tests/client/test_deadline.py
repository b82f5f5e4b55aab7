"""Every call has an overall deadline that covers its attempts, the waits between them and the
reading of the answer: a server that trickles its answer or never answers cannot hold a
worker for the read timeout times the attempts."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from paramserver import AsyncClient, Client, DeadlineExceeded, ServiceUnavailable, TransportError
from paramserver.client import RetryPolicy

SUMMARY = (
    b'{"session_id":"s","optimizer":{"class_name":"SGD","config":{}},"iterations":0,'
    b'"parameters":{"w":{"dtype":"float32","shape":[2]}}}'
)


class MisbehavingServer:
    """A loopback HTTP server that misbehaves in one of three ways, every connection:

    * ``trickle``: answers headers announcing a long body, then one byte every 50 ms;
    * ``silent``: reads the request and never answers;
    * ``busy``: answers 503 with ``Retry-After: 0.2`` (the summary of a session for ``GET``s
      of ``/sessions/s``, so that a session handle can be made first).
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests = 0
        self.stopping = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            try:
                while not self.stopping.is_set():
                    head = b""
                    while b"\r\n\r\n" not in head:
                        chunk = conn.recv(65536)
                        if not chunk:
                            return
                        head += chunk
                    header, _, rest = head.partition(b"\r\n\r\n")
                    length = 0
                    for line in header.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                    while len(rest) < length:
                        rest += conn.recv(65536)
                    self.requests += 1
                    if header.startswith(b"GET /sessions/s "):
                        conn.sendall(
                            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                            b"content-length: %d\r\n\r\n%s" % (len(SUMMARY), SUMMARY)
                        )
                    elif self.mode == "busy":
                        body = b'{"error":{"code":"session_busy","message":"busy"}}'
                        conn.sendall(
                            b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 0.2\r\n"
                            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                            % (len(body), body)
                        )
                    elif self.mode == "trickle":
                        conn.sendall(
                            b"HTTP/1.1 200 OK\r\ncontent-type: application/msgpack\r\n"
                            b"content-length: 100000\r\n\r\n"
                        )
                        while not self.stopping.is_set():
                            conn.sendall(b"\x00")
                            time.sleep(0.05)
                        return
                    else:  # silent
                        self.stopping.wait()
                        return
            except OSError:
                return

    def close(self) -> None:
        self.stopping.set()
        self.sock.close()


@pytest.fixture(params=["trickle", "silent", "busy"])
def server(request: pytest.FixtureRequest) -> Iterator[MisbehavingServer]:
    srv = MisbehavingServer(request.param)
    yield srv
    srv.close()


GRADS = {"w": np.ones(2, np.float32)}


def test_a_push_ends_at_its_deadline(server: MisbehavingServer) -> None:
    with Client(server.url, deadline=1.0, retries=RetryPolicy(retries=50)) as client:
        session = client.session("s")
        if server.mode == "busy":
            # 503s are retried while time is left; the last one is the answer.
            with pytest.raises(ServiceUnavailable):
                session.push(GRADS)
            assert server.requests > 2
            return
        with pytest.raises(DeadlineExceeded) as err:
            session.push(GRADS, idempotency_key="k-1")
    assert isinstance(err.value, TransportError)
    assert err.value.idempotency_key == "k-1"
    assert "deadline of 1 s" in str(err.value) and "idempotency_key='k-1'" in str(err.value)


def test_the_async_client_has_the_same_deadline(server: MisbehavingServer) -> None:
    async def run() -> None:
        async with AsyncClient(server.url, deadline=1.0) as client:
            session = await client.session("s")
            if server.mode == "busy":
                with pytest.raises(ServiceUnavailable):
                    await session.push(GRADS)
                return
            with pytest.raises(DeadlineExceeded):
                await session.pull()

    asyncio.run(run())


def test_the_deadline_is_finite_by_default_and_validated() -> None:
    with Client("http://127.0.0.1:9") as client:
        assert client.deadline == 300.0
    with Client("http://127.0.0.1:9", deadline=None) as client:
        assert client.deadline is None
    for bad in (0, -1, float("inf"), float("nan"), True, "10"):
        with pytest.raises(ValueError, match="deadline"):
            Client("http://127.0.0.1:9", deadline=bad)  # type: ignore[arg-type]


def test_an_attempts_timeouts_are_capped_to_what_is_left_of_the_deadline() -> None:
    """Capped when a timeout would outlast the deadline by more than the slack; else the
    client's own timeouts, unchanged (a pooled socket keeps its timeout call after call)."""
    from paramserver.client import _base

    call = _base.Call("POST", "/x", lambda reply: reply)
    policy = _base.RetryPolicy.of(0)
    rng = random.Random(0)
    own = httpx.Timeout(300.0, connect=10.0, pool=60.0)
    same = _base.Attempts(call, policy, rng, deadline=300.0, timeout=own)
    assert same.timeout() is own  # the defaults: 300 s each, a deadline of 300 s
    short = _base.Attempts(call, policy, rng, deadline=2.0, timeout=own)
    capped = short.timeout()
    assert capped.read is not None and capped.read <= 2.0
    assert capped.write is not None and capped.write <= 2.0
    assert capped.connect is not None and capped.connect <= 2.0
    assert capped.pool is not None and capped.pool <= 2.0
    none = _base.Attempts(call, policy, rng, deadline=5.0, timeout=httpx.Timeout(None))
    assert none.timeout().read is not None and none.timeout().read <= 5.0
    unbounded = _base.Attempts(call, policy, rng, deadline=None, timeout=own)
    assert unbounded.timeout() is own
