"""Small pushes per second from concurrent connections, against a bare FastAPI echo.

A small model (one float32 parameter of ``elements`` elements, 10 by default) is pushed over
``connections`` keep-alive connections at once, each sending its next push as soon as the
previous answer is in, for ``seconds`` per round. The reference is
:mod:`benchmarks.echo_app`'s ``POST /echo`` answering the same body, served by uvicorn the
same way (one process each, same ``uvicorn.Config`` arguments, so the same loop and HTTP
implementation). Rounds alternate between the two servers so that a change of machine load
hits both alike; each figure is the median of its rounds' rates.

``sessions="shared"`` pushes every connection to one session (many workers training one
model: the session's pushes are applied one at a time); ``sessions="per_connection"`` gives
each connection its own session.

The load comes from this process: one asyncio loop (uvloop when installed) with a minimal
HTTP/1.1 protocol that writes prebuilt requests and counts answers, so that the client costs
far less per request than either server.

Run ``python -m benchmarks.throughput`` (``--help`` for options); ``run()`` returns the rows.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from paramserver.client import Client, wire

from .push import HOST, ServerProcess, format_table

__all__ = ["COLUMNS", "GOAL_VS_ECHO", "main", "run"]

#: Goal of the performance issue: our pushes per second over the echo's.
GOAL_VS_ECHO = 0.85

#: Seconds an answer may take before the benchmark gives up (it never waits forever).
REQUEST_TIMEOUT = 60.0


class _HTTPClientProtocol(asyncio.Protocol):
    """One keep-alive connection: send a prebuilt request, wait for its whole answer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.need = -1
        self.status = 0
        self.waiter: asyncio.Future[int] | None = None
        self.lost = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("the server closed the connection"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.need < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).decode("latin-1").lower()
            self.status = int(head[9:12])
            length = 0
            for line in head.split("\r\n")[1:]:
                if line.startswith("content-length:"):
                    length = int(line[15:])
            self.need = end + 4 + length
        if len(self.buf) >= self.need:
            del self.buf[: self.need]
            self.need = -1
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(self.status)

    async def request(self, payload: bytes) -> int:
        if self.transport is None or self.lost:
            raise ConnectionError("the connection is closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        return await asyncio.wait_for(self.waiter, REQUEST_TIMEOUT)


def _request_bytes(port: int, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Content-Type: application/msgpack\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


async def _open(port: int, n: int) -> list[_HTTPClientProtocol]:
    loop = asyncio.get_running_loop()
    conns = []
    for _ in range(n):
        _, proto = await loop.create_connection(_HTTPClientProtocol, HOST, port)
        conns.append(proto)
    return conns


async def _close(conns: Sequence[_HTTPClientProtocol]) -> None:
    opened = [c for c in conns if c.transport is not None]
    for c in opened:
        c.transport.close()  # type: ignore[union-attr]
    await asyncio.wait_for(asyncio.gather(*(c.closed for c in opened)), REQUEST_TIMEOUT)


async def _burst(
    conns: Sequence[_HTTPClientProtocol], payloads: Sequence[bytes], seconds: float
) -> tuple[float, int]:
    """Pushes per second over all connections for ``seconds``, and the non-200 answers."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    done = 0
    failed = 0

    async def worker(conn: _HTTPClientProtocol, payload: bytes) -> None:
        nonlocal done, failed
        while loop.time() < deadline:
            status = await conn.request(payload)
            done += 1
            if status != 200:
                failed += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(c, p) for c, p in zip(conns, payloads, strict=True)))
    return done / (time.perf_counter() - t0), failed


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - depends on the environment
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run(
    *,
    connections: int = 16,
    elements: int = 10,
    seconds: float = 2.0,
    rounds: int = 5,
    optimizer: str = "adam",
    sessions: Sequence[str] = ("shared", "per_connection"),
) -> list[dict[str, Any]]:
    """One row per session mode: median pushes/s of ours and of the echo, and their ratio."""
    rng = np.random.default_rng(0)
    weights = rng.standard_normal(elements, dtype=np.float32)
    grads = {"w": rng.standard_normal(elements, dtype=np.float32) * np.float32(1e-3)}
    body = wire.pack({"gradients": grads})
    rows: list[dict[str, Any]] = []
    with ServerProcess.paramserver() as ours, ServerProcess.echo_http() as echo:
        libraries = {"ours": ours.libraries(), "echo": echo.libraries()}
        for mode in sessions:
            with Client(ours.url) as client:
                count = 1 if mode == "shared" else connections
                handles = [client.create_session({"w": weights}, optimizer) for _ in range(count)]
                ids = [handles[i % count].id for i in range(connections)]
                try:
                    rates = _measure(
                        ours.port, echo.port, ids, body, connections, seconds, max(1, rounds)
                    )
                finally:
                    for h in handles:
                        h.delete(missing_ok=True)
            ours_rate = statistics.median(rates["ours"])
            echo_rate = statistics.median(rates["echo"])
            rows.append(
                {
                    "benchmark": "throughput",
                    "sessions": mode,
                    "connections": connections,
                    "elements": elements,
                    "optimizer": optimizer,
                    "request_bytes": len(body),
                    "seconds_per_round": seconds,
                    "rounds": rounds,
                    "ours_per_s": ours_rate,
                    "echo_per_s": echo_rate,
                    "ours_rounds_per_s": rates["ours"],
                    "echo_rounds_per_s": rates["echo"],
                    "ours_failed": rates["ours_failed"],
                    "echo_failed": rates["echo_failed"],
                    "ratio": ours_rate / echo_rate,
                    "goal_ratio": GOAL_VS_ECHO,
                    "server_libraries": libraries,
                }
            )
    return rows


def _measure(
    ours_port: int,
    echo_port: int,
    session_ids: Sequence[str],
    body: bytes,
    connections: int,
    seconds: float,
    rounds: int,
) -> dict[str, Any]:
    ours_payloads = [
        _request_bytes(ours_port, f"/sessions/{sid}/gradients", body) for sid in session_ids
    ]
    echo_payloads = [_request_bytes(echo_port, "/echo", body)] * connections

    async def burst(port: int, payloads: Sequence[bytes]) -> tuple[float, int]:
        # Fresh connections for every burst: an idle keep-alive connection would be closed
        # by the server while the other server is measured.
        conns = await _open(port, connections)
        try:
            return await _burst(conns, payloads, seconds)
        finally:
            await _close(conns)

    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {"ours": [], "echo": [], "ours_failed": 0, "echo_failed": 0}
        targets = [("ours", ours_port, ours_payloads), ("echo", echo_port, echo_payloads)]
        # Warm both up: first requests, lazily built routes, the worker threads.
        for _, port, payloads in targets:
            await burst(port, payloads)
        for r in range(rounds):
            # Alternate which goes first, so that neither always follows the other.
            for name, port, payloads in targets if r % 2 == 0 else targets[::-1]:
                rate, failed = await burst(port, payloads)
                out[name].append(rate)
                out[f"{name}_failed"] += failed
        return out

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(main())


COLUMNS = [
    ("sessions", "sessions", "{}"),
    ("connections", "conns", "{}"),
    ("elements", "elements", "{}"),
    ("ours_per_s", "ours/s", "{:.0f}"),
    ("echo_per_s", "echo/s", "{:.0f}"),
    ("ratio", "ours/echo", "{:.2f}"),
    ("ours_failed", "failed", "{}"),
]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--elements", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument(
        "--sessions", default="shared,per_connection", help="shared, per_connection or both"
    )
    args = parser.parse_args(argv)
    rows = run(
        connections=args.connections,
        elements=args.elements,
        seconds=args.seconds,
        rounds=args.rounds,
        optimizer=args.optimizer,
        sessions=[s.strip() for s in args.sessions.split(",")],
    )
    print("small pushes per second (median of rounds)")
    print(format_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
