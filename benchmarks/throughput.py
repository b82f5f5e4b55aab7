"""Small pushes: per second from concurrent connections, and the latency of one connection,
against a bare FastAPI echo.

A small model (one float32 parameter of ``elements`` elements, 10 by default) is pushed over
``connections`` keep-alive connections at once, each sending its next push as soon as the
previous answer is in, for ``seconds`` per round. The reference is
:mod:`benchmarks.echo_app`'s ``POST /echo`` answering the same body, served by uvicorn the
same way (one process each, same ``uvicorn.Config`` arguments, so the same loop and HTTP
implementation, and the same log level, ``warning``: neither writes an access line per
request), over plain HTTP. Within a round every load and the echo take their turn, in
an order that rotates from round to round, so that a change of machine load hits all alike;
each figure is the median of its rounds' rates.

``sessions="shared"`` pushes every connection to one session (many workers training one
model: the session's pushes are applied one at a time); ``sessions="per_connection"`` gives
each connection its own session. The loads on our server:

* ``raw_http``: this process, one asyncio loop (uvloop when installed) with a minimal
  HTTP/1.1 protocol that writes prebuilt requests and counts answers: far cheaper per
  request than either server, so it measures the server's HTTP push. The echo is always
  driven this way;
* ``frames``: the same loop writing prebuilt data-plane frames (:mod:`paramserver.frames`,
  after a ``hello``) to the data plane's port: the server's data-plane push;
* ``client``: the project's client as workers use it: ``client_processes`` worker processes
  (:class:`benchmarks.workers.WorkerPool`), ``connections / client_processes`` threads each,
  every thread with its own ``client.Client`` (data plane by default), ``session.push``
  returning the new weights. Its rate includes the client's CPU, which shares the machine's
  CPUs with the server.

The ``latency`` row: one connection, one push at a time, ``latency_samples`` pushes per
method in rounds: our client's ``session.push`` (data plane) against the echo's round trip
over one keep-alive connection (:class:`benchmarks.push.RawHTTPConnection`), and, for
information, the raw HTTP and raw frame clients and our client over HTTP.

Run ``python -m benchmarks.throughput`` (``--help`` for options); ``run()`` returns the rows.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import numpy as np

from paramserver import frames
from paramserver.client import Client, wire

from .push import (
    HOST,
    RawFrameConnection,
    RawHTTPConnection,
    ServerProcess,
    format_table,
    percentile,
    transport_of,
)
from .workers import Job, WorkerPool, total_rate

__all__ = [
    "COLUMNS",
    "GOAL_LATENCY_VS_ECHO",
    "GOAL_VS_ECHO",
    "LATENCY_COLUMNS",
    "LOADS",
    "main",
    "run",
]

#: Goals of the performance issue: our pushes per second over the echo's, and our client's
#: one-connection p50 latency over the echo's.
GOAL_VS_ECHO = 0.85
GOAL_LATENCY_VS_ECHO = 1.2

#: The loads on our server (see the module's docstring).
LOADS = ("raw_http", "frames", "client")

#: Seconds an answer may take before the benchmark gives up (it never waits forever).
REQUEST_TIMEOUT = 60.0


class _ClientProtocol(asyncio.Protocol):
    """One keep-alive connection: send a prebuilt request, wait for its whole answer.

    :meth:`_answer_size` says how long an answer is once enough of it has arrived (HTTP:
    headers with ``Content-Length``; frames: the prefix), and :meth:`_status` its status.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.need = -1
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

    def _answer_size(self) -> int:
        raise NotImplementedError

    def _status(self, answer: bytearray) -> int:
        raise NotImplementedError

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.need < 0:
            self.need = self._answer_size()
            if self.need < 0:
                return
        if len(self.buf) >= self.need:
            status = self._status(self.buf)
            del self.buf[: self.need]
            self.need = -1
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(status)

    async def request(self, payload: bytes) -> int:
        if self.transport is None or self.lost:
            raise ConnectionError("the connection is closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        return await asyncio.wait_for(self.waiter, REQUEST_TIMEOUT)


class _HTTPClientProtocol(_ClientProtocol):
    """HTTP/1.1 answers with a ``Content-Length``."""

    status = 0

    def _answer_size(self) -> int:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return -1
        head = bytes(self.buf[:end]).decode("latin-1").lower()
        self.status = int(head[9:12])
        length = 0
        for line in head.split("\r\n")[1:]:
            if line.startswith("content-length:"):
                length = int(line[15:])
        return end + 4 + length

    def _status(self, answer: bytearray) -> int:
        return self.status


class _FrameClientProtocol(_ClientProtocol):
    """Data-plane answers: a prefix, a msgpack header holding ``status``, a body."""

    header_len = 0

    def _answer_size(self) -> int:
        if len(self.buf) < frames.PREFIX.size:
            return -1
        prefix = frames.unpack_prefix(self.buf[: frames.PREFIX.size], expect=frames.RESPONSE)
        self.header_len = prefix.header_len
        return frames.PREFIX.size + prefix.header_len + prefix.body_len

    def _status(self, answer: bytearray) -> int:
        start = frames.PREFIX.size
        header = msgpack.unpackb(bytes(answer[start : start + self.header_len]))
        return int(header.get("status", 0))


def _request_bytes(port: int, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Content-Type: application/msgpack\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def _frame_bytes(header: dict[str, Any], body: bytes = b"") -> bytes:
    head = msgpack.packb(header)
    return frames.pack_prefix(frames.REQUEST, 1, len(head), len(body)) + head + body


#: The data plane's hello (no token: the benchmark's servers have none).
_HELLO = _frame_bytes({"op": "hello", "version": frames.VERSION})


def _push_frame(session_id: str, grads: dict[str, np.ndarray]) -> bytes:
    header = {
        "op": "push",
        "session": session_id,
        "return_weights": True,
        "tensors": frames.specs_of(grads),
    }
    return _frame_bytes(header, b"".join(a.tobytes() for a in grads.values()))


async def _open(
    port: int, n: int, protocol: type[_ClientProtocol], hello: bytes | None
) -> list[_ClientProtocol]:
    loop = asyncio.get_running_loop()
    conns: list[_ClientProtocol] = []
    for _ in range(n):
        _, proto = await loop.create_connection(protocol, HOST, port)
        conns.append(proto)
        if hello is not None and await proto.request(hello) != 200:
            raise ConnectionError("the data plane refused the hello")
    return conns


async def _close(conns: Sequence[_ClientProtocol]) -> None:
    opened = [c for c in conns if c.transport is not None]
    for c in opened:
        c.transport.close()  # type: ignore[union-attr]
    await asyncio.wait_for(asyncio.gather(*(c.closed for c in opened)), REQUEST_TIMEOUT)


async def _burst(
    conns: Sequence[_ClientProtocol], payloads: Sequence[bytes], seconds: float
) -> tuple[float, int]:
    """Pushes per second over all connections for ``seconds``, and the non-200 answers."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    done = 0
    failed = 0

    async def worker(conn: _ClientProtocol, payload: bytes) -> None:
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


Burst = Callable[[float], tuple[float, int]]


def _async_load(
    port: int,
    payloads: Sequence[bytes],
    protocol: type[_ClientProtocol],
    hello: bytes | None = None,
) -> Burst:
    """A burst of this process's asyncio load: one connection per payload, opened afresh
    for every burst (an idle keep-alive connection would be closed by the server while the
    others are measured)."""

    async def burst(seconds: float) -> tuple[float, int]:
        conns = await _open(port, len(payloads), protocol, hello)
        try:
            return await _burst(conns, payloads, seconds)
        finally:
            await _close(conns)

    def run_burst(seconds: float) -> tuple[float, int]:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(burst(seconds))

    return run_burst


class _ClientLoad:
    """A burst of the worker pool: ``session_ids[i]`` for connection ``i``, the connections
    spread evenly over the processes; :attr:`transports` collects what the clients used."""

    def __init__(
        self, pool: WorkerPool, url: str, session_ids: Sequence[str], elements: int
    ) -> None:
        self.pool = pool
        per = len(session_ids) // pool.processes
        self.jobs = [
            Job(
                "client",
                threads=per,
                url=url,
                session_ids=tuple(session_ids[i * per : (i + 1) * per]),
                elements=elements,
            )
            for i in range(pool.processes)
        ]
        self.transports: set[str] = set()

    def __call__(self, seconds: float) -> tuple[float, int]:
        results = self.pool.burst(self.jobs, seconds)
        self.transports.update(r.transport for r in results)
        return total_rate(results), 0  # a failed push raises in the worker


def _alternate(
    bursts: dict[str, tuple[Burst, ServerProcess]], seconds: float, rounds: int
) -> dict[str, Any]:
    """Each burst's rates, ``rounds`` times, their order rotating every round; after a short
    unmeasured burst of each (first requests, lazily built routes, worker threads). Also the
    CPU time of the server each burst loads, per push (``{name}_server_cpu_us``, median:
    connecting and, for the client load, its warm-up pushes included)."""
    out: dict[str, Any] = {name: [] for name in bursts}
    out.update({f"{name}_failed": 0 for name in bursts})
    cpu: dict[str, list[float]] = {name: [] for name in bursts}
    for burst, _ in bursts.values():
        burst(min(seconds, 0.3))
    names = list(bursts)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            burst, server = bursts[name]
            cpu0 = server.cpu_seconds()
            rate, failed = burst(seconds)
            used = server.cpu_seconds() - cpu0
            out[name].append(rate)
            out[f"{name}_failed"] += failed
            cpu[name].append(1e6 * used / (rate * seconds) if rate > 0 else float("nan"))
    for name, values in cpu.items():
        out[f"{name}_server_cpu_us"] = statistics.median(values)
    return out


def run(
    *,
    connections: int = 16,
    elements: int = 10,
    seconds: float = 2.0,
    rounds: int = 5,
    optimizer: str = "adam",
    sessions: Sequence[str] = ("shared", "per_connection"),
    loads: Sequence[str] = LOADS,
    client_processes: int = 4,
    latency_samples: int = 1000,
) -> list[dict[str, Any]]:
    """One ``rate`` row per load and session mode (median pushes/s of ours and of the echo,
    and their ratio), then the ``latency`` row (unless ``latency_samples`` is 0)."""
    if "client" in loads and connections % client_processes:
        raise ValueError(f"{connections} connections do not spread over {client_processes}")
    rng = np.random.default_rng(0)
    weights = rng.standard_normal(elements, dtype=np.float32)
    grads = {"w": rng.standard_normal(elements, dtype=np.float32) * np.float32(1e-3)}
    body = wire.pack({"gradients": grads})
    rows: list[dict[str, Any]] = []
    with (
        # the echo's log level (echo_app.serve_http): no access line per request on either
        ServerProcess.paramserver(log_level="warning") as ours,
        ServerProcess.echo_http() as echo,
        WorkerPool(client_processes if "client" in loads else 0) as pool,
        Client(ours.url, data_plane=False) as client,
    ):
        libraries = {"ours": ours.libraries(), "echo": echo.libraries()}
        plane_port = ours.data_plane_port()
        echo_load = _async_load(
            echo.port, [_request_bytes(echo.port, "/echo", body)] * connections, _HTTPClientProtocol
        )
        for mode in sessions:
            count = 1 if mode == "shared" else connections
            handles = [client.create_session({"w": weights}, optimizer) for _ in range(count)]
            ids = [handles[i % count].id for i in range(connections)]
            try:
                bursts: dict[str, tuple[Burst, ServerProcess]] = {"echo": (echo_load, echo)}
                if "raw_http" in loads:
                    bursts["raw_http"] = (
                        _async_load(
                            ours.port,
                            [
                                _request_bytes(ours.port, f"/sessions/{sid}/gradients", body)
                                for sid in ids
                            ],
                            _HTTPClientProtocol,
                        ),
                        ours,
                    )
                if "frames" in loads:
                    bursts["frames"] = (
                        _async_load(
                            plane_port,
                            [_push_frame(sid, grads) for sid in ids],
                            _FrameClientProtocol,
                            hello=_HELLO,
                        ),
                        ours,
                    )
                if "client" in loads:
                    bursts["client"] = (_ClientLoad(pool, ours.url, ids, elements), ours)
                rates = _alternate(bursts, seconds, max(1, rounds))
            finally:
                for h in handles:
                    h.delete(missing_ok=True)
            echo_rate = statistics.median(rates["echo"])
            for load in (name for name in bursts if name != "echo"):
                ours_rate = statistics.median(rates[load])
                burst = bursts[load][0]
                transports = burst.transports if isinstance(burst, _ClientLoad) else None
                rows.append(
                    {
                        "benchmark": "throughput",
                        "figure": "rate",
                        "load": load,
                        "transport": (
                            "/".join(sorted(transports))
                            if transports
                            else ("http" if load == "raw_http" else "data plane")
                        ),
                        "sessions": mode,
                        "connections": connections,
                        "client_processes": client_processes if load == "client" else None,
                        "elements": elements,
                        "optimizer": optimizer,
                        "request_bytes": len(body),
                        "seconds_per_round": seconds,
                        "rounds": rounds,
                        "ours_per_s": ours_rate,
                        "echo_per_s": echo_rate,
                        "ours_rounds_per_s": rates[load],
                        "echo_rounds_per_s": rates["echo"],
                        "ours_failed": rates[f"{load}_failed"],
                        "echo_failed": rates["echo_failed"],
                        "ours_server_cpu_us": rates[f"{load}_server_cpu_us"],
                        "echo_server_cpu_us": rates["echo_server_cpu_us"],
                        "ratio": ours_rate / echo_rate,
                        "goal_ratio": GOAL_VS_ECHO if load != "frames" else None,
                        "server_libraries": libraries,
                    }
                )
        if latency_samples > 0:
            rows.append(
                _latency_row(
                    ours, echo, plane_port, weights, grads, body, latency_samples, rounds, optimizer
                )
            )
    return rows


def _latency_row(
    ours: ServerProcess,
    echo: ServerProcess,
    plane_port: int,
    weights: np.ndarray,
    grads: dict[str, np.ndarray],
    body: bytes,
    samples: int,
    rounds: int,
    optimizer: str,
) -> dict[str, Any]:
    """p50/p99 (us) of one push at a time over one connection, per method."""
    with (
        Client(ours.url) as client,
        Client(ours.url, data_plane=False) as http_client,
        RawHTTPConnection(ours.port) as raw,
        RawHTTPConnection(echo.port) as echo_conn,
        RawFrameConnection(plane_port) as plane,
    ):
        session = client.create_session({"w": weights}, optimizer)
        http_session = http_client.session(session.id)
        path = f"/sessions/{session.id}/gradients"

        def echo_push() -> None:
            status, answer = echo_conn.request("POST", "/echo", body)
            if status != 200:
                raise RuntimeError(f"the echo answered {status}")

        def raw_push() -> None:
            status, answer = raw.request("POST", path, body)
            if status != 200:
                raise RuntimeError(f"push answered {status}: {bytes(answer[:300])!r}")

        methods: dict[str, Callable[[], object]] = {
            "echo": echo_push,
            "client": lambda: session.push(grads),
            "frames": lambda: plane.push(session.id, grads),
            "raw_http": raw_push,
            "http_client": lambda: http_session.push(grads),
        }
        # what reopens a raw connection the server closed while idle (the clients do it)
        reopen: dict[str, Callable[[], None]] = {
            "echo": echo_conn.ensure_open,
            "frames": plane.ensure_open,
            "raw_http": raw.ensure_open,
        }
        times: dict[str, list[float]] = {name: [] for name in methods}
        try:
            for fn in methods.values():
                for _ in range(20):
                    fn()
            rounds = max(1, rounds)
            per_round = [samples // rounds + (r < samples % rounds) for r in range(rounds)]
            for k in per_round:
                for name, fn in methods.items():
                    if name in reopen:
                        reopen[name]()
                    ts = times[name]
                    for _ in range(k):
                        t0 = time.perf_counter_ns()
                        fn()
                        ts.append((time.perf_counter_ns() - t0) / 1e3)
            transport = transport_of(client)
        finally:
            session.delete(missing_ok=True)
    row: dict[str, Any] = {
        "benchmark": "throughput",
        "figure": "latency",
        "connections": 1,
        "elements": int(weights.size),
        "samples": samples,
        "rounds": rounds,
        "transport": transport,
    }
    for name, ts in times.items():
        row[f"{name}_p50_us"] = percentile(ts, 50)
        row[f"{name}_p99_us"] = percentile(ts, 99)
    for name in ("client", "frames", "raw_http", "http_client"):
        row[f"{name}_vs_echo_p50"] = row[f"{name}_p50_us"] / row["echo_p50_us"]
    row["ratio"] = row["client_vs_echo_p50"]
    row["goal_ratio"] = GOAL_LATENCY_VS_ECHO
    return row


COLUMNS = [
    ("load", "load", "{}"),
    ("transport", "transport", "{}"),
    ("sessions", "sessions", "{}"),
    ("connections", "conns", "{}"),
    ("elements", "elements", "{}"),
    ("ours_per_s", "ours/s", "{:.0f}"),
    ("echo_per_s", "echo/s", "{:.0f}"),
    ("ratio", "ours/echo", "{:.2f}"),
    ("ours_server_cpu_us", "server cpu/push us", "{:.0f}"),
    ("echo_server_cpu_us", "echo cpu/req us", "{:.0f}"),
    ("ours_failed", "failed", "{}"),
]

LATENCY_COLUMNS = [
    ("connections", "conns", "{}"),
    ("transport", "transport", "{}"),
    ("echo_p50_us", "echo p50 us", "{:.0f}"),
    ("client_p50_us", "client p50", "{:.0f}"),
    ("frames_p50_us", "frames p50", "{:.0f}"),
    ("raw_http_p50_us", "raw http p50", "{:.0f}"),
    ("http_client_p50_us", "http client p50", "{:.0f}"),
    ("echo_p99_us", "echo p99", "{:.0f}"),
    ("client_p99_us", "client p99", "{:.0f}"),
    ("client_vs_echo_p50", "client/echo p50", "{:.2f}"),
]


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """The rate rows and the latency row, as two plain-text tables."""
    rates = [r for r in rows if r.get("figure") == "rate"]
    latency = [r for r in rows if r.get("figure") == "latency"]
    parts = [format_table(rates, COLUMNS)] if rates else []
    if latency:
        parts.append(format_table(latency, LATENCY_COLUMNS))
    return "\n\n".join(parts)


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
    parser.add_argument("--loads", default=",".join(LOADS), help=f"of {', '.join(LOADS)}")
    parser.add_argument("--client-processes", type=int, default=4)
    parser.add_argument("--latency-samples", type=int, default=1000, help="0: no latency row")
    args = parser.parse_args(argv)
    rows = run(
        connections=args.connections,
        elements=args.elements,
        seconds=args.seconds,
        rounds=args.rounds,
        optimizer=args.optimizer,
        sessions=[s.strip() for s in args.sessions.split(",")],
        loads=[s.strip() for s in args.loads.split(",")],
        client_processes=args.client_processes,
        latency_samples=args.latency_samples,
    )
    print("small pushes per second (median of rounds), and one connection's latency")
    print(format_rows(rows))


if __name__ == "__main__":
    main()
