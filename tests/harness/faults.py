"""Faults injected between a client and a real server.

:class:`FaultyTransport` and :class:`AsyncFaultyTransport` wrap httpx's real transports and, for
the requests a predicate picks, play a list of faults; :func:`hold_a_request` keeps one request
in progress on a server; :func:`closed_port_url` is an address where nothing listens.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx

from paramserver.client import RetryPolicy
from tests.harness.servers import free_port

__all__ = [
    "FAST",
    "AsyncFaultyTransport",
    "FaultyTransport",
    "closed_port_url",
    "hold_a_request",
    "is_create",
    "is_push",
]

#: Retries that wait milliseconds, not seconds.
FAST = RetryPolicy(retries=3, backoff_base=0.001, backoff_cap=0.01)

INJECTED_503 = {"error": {"code": "service_unavailable", "message": "busy (injected)"}}


def is_push(request: httpx.Request) -> bool:
    return request.method == "POST" and request.url.path.endswith("/gradients")


def is_create(request: httpx.Request) -> bool:
    return request.method == "POST" and request.url.path == "/sessions"


class FaultyTransport(httpx.BaseTransport):
    """Forwards to a real transport, but for requests matching ``match`` plays ``faults``:

    ``"refuse"`` raises ConnectError without sending; ``"503"`` answers 503 without sending;
    ``"drop"`` sends the request (the server processes it) and then raises ReadError.
    Every request is recorded in ``requests``, every answer passed on in ``responses``.
    """

    def __init__(self, match: Callable[[httpx.Request], bool], faults: list[str]) -> None:
        self.inner = httpx.HTTPTransport()
        self.match = match
        self.faults = list(faults)
        self.requests: list[httpx.Request] = []
        self.responses: list[httpx.Response] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        fault = self.faults.pop(0) if self.match(request) and self.faults else None
        if fault == "refuse":
            raise httpx.ConnectError("connection refused (injected)", request=request)
        if fault == "503":
            return httpx.Response(503, headers={"Retry-After": "0"}, json=INJECTED_503)
        response = self.inner.handle_request(request)
        if fault == "drop":
            response.read()
            response.close()
            raise httpx.ReadError("connection dropped (injected)", request=request)
        self.responses.append(response)
        return response

    def close(self) -> None:
        self.inner.close()


class AsyncFaultyTransport(httpx.AsyncBaseTransport):
    """:class:`FaultyTransport` for ``httpx.AsyncClient``."""

    def __init__(self, match: Callable[[httpx.Request], bool], faults: list[str]) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.match = match
        self.faults = list(faults)
        self.requests: list[httpx.Request] = []
        self.responses: list[httpx.Response] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        fault = self.faults.pop(0) if self.match(request) and self.faults else None
        if fault == "refuse":
            raise httpx.ConnectError("connection refused (injected)", request=request)
        if fault == "503":
            return httpx.Response(503, headers={"Retry-After": "0"}, json=INJECTED_503)
        response = await self.inner.handle_async_request(request)
        if fault == "drop":
            await response.aread()
            await response.aclose()
            raise httpx.ReadError("connection dropped (injected)", request=request)
        self.responses.append(response)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


@contextmanager
def hold_a_request(url: str, session_id: str) -> Iterator[Callable[[], None]]:
    """Keep one request in progress on the server (a push whose body never ends) until the
    block ends or the ``release`` it yields is called."""
    host, port = httpx.URL(url).host, httpx.URL(url).port
    sock = socket.create_connection((host, port))
    head = (
        f"POST /sessions/{session_id}/gradients HTTP/1.1\r\nHost: {host}\r\n"
        "Content-Type: application/msgpack\r\nContent-Length: 1000\r\n\r\n"
    )
    sock.sendall(head.encode() + b"\x81")
    time.sleep(0.1)  # let the server take it in

    def release() -> None:
        sock.close()

    try:
        yield release
    finally:
        sock.close()


@contextmanager
def closed_port_url() -> Iterator[str]:
    """A loopback URL on which nothing listens."""
    yield f"http://127.0.0.1:{free_port()}"
