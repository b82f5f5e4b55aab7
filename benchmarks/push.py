"""Push round trip over loopback: our server and client against a raw TCP echo of the same bytes.

For each model size (one float32 parameter ``w`` of ``n`` elements, Adam by default) this
times one push, request out and answer back, in seven ways, sampled in turn:

* ``echo``: :mod:`benchmarks.echo_app`'s raw TCP echo, sent the push's body size and
  answering the push's answer size: moving the same bytes both ways, nothing else. The
  reference of the goals;
* ``client``: ``client.Client``'s ``session.push`` with its defaults: over the server's data
  plane (:mod:`paramserver.frames`, its own TCP port), a fresh ``Idempotency-Key`` per push,
  the new weights received and returned as new arrays. The headline: our client against the
  echo (the data plane's frames carry a few dozen bytes more than the HTTP bodies the echo
  is sized on: nothing at these sizes);
* ``client_out``: the same with ``out=`` (the new weights received straight into the
  caller's arrays);
* ``frames``: a minimal data-plane client (:class:`RawFrameConnection`): one frame of
  prebuilt header and the gradient's own memory, the answer read into a reused buffer, no
  key. Against ``echo`` it measures the server's data plane; ``client`` against it, the
  client library;
* ``http_client``: ``Client(url, data_plane=False)``: the same push over HTTP (httpx, msgpack
  bodies), the fallback path. Over HTTP the server keeps every keyed push's answer for
  replays, up to ``idempotency_max_bytes`` (256 MiB), and while that budget fills each
  answer is fresh memory; the steady state of a worker is after it, so enough unmeasured
  keyed pushes fill it first (at most 100; their p50 is in the row);
* ``raw``: a minimal HTTP/1.1 client on a blocking socket (:class:`RawHTTPConnection`) that
  sends a body encoded once beforehand and reads the answer into a reused buffer: the
  server's HTTP push (HTTP, reading the body, decoding, the step, encoding, sending);
* ``uvicorn``: the raw HTTP client against :mod:`benchmarks.echo_app`'s bare ASGI echo under
  the same uvicorn (no FastAPI), answering as many bytes as our server does: what the HTTP
  stack alone costs to move the push's bytes.

Besides the latencies (p50 and p99 over all samples of a method, milliseconds), each method's
CPU time is summed over its samples: the server process's (its whole thread group, read with
``clock_getcpuclockid``, or ``/proc/<pid>/stat`` where that is refused) and this process's
(``time.process_time``: the worker's side, which runs nothing else meanwhile), divided by the
samples. For ``echo`` that is the echo server's and the echo client's CPU: the CPU floor of
moving the same bytes.

Every server is a subprocess (``python -m paramserver serve``, ``python -m benchmarks.echo_app tcp``
and ``... asgi``) so that the benchmark does not share a GIL with it.

This module also holds what the other benchmarks share: :class:`ServerProcess` (the tests'
server subprocess, :class:`tests.harness.servers.ServerProcess`, with its resident memory and
CPU time from ``/proc``), :class:`RawHTTPConnection`, :class:`RawFrameConnection`,
:class:`EchoConnection` and :func:`transport_of`.

Run ``python -m benchmarks.push`` (``--help`` for options); ``run()`` returns the rows.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import select
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import msgpack
import numpy as np

from paramserver import frames
from paramserver.client import Client, wire
from tests.harness import servers as harness
from tests.harness.servers import HOST, free_port

from .echo_app import ECHO_HEADER

__all__ = [
    "GOAL_CLIENT_VS_ECHO_P50",
    "GOAL_CLIENT_VS_ECHO_P99",
    "GOAL_CPU_VS_ECHO",
    "GOAL_HTTP_CLIENT_VS_RAW",
    "HOST",
    "METHODS",
    "EchoConnection",
    "RawFrameConnection",
    "RawHTTPConnection",
    "ServerProcess",
    "default_samples",
    "format_table",
    "free_port",
    "main",
    "percentile",
    "process_cpu_seconds",
    "run",
    "transport_of",
]

#: Goals of the performance issue: our client's push against the TCP echo, p50 and p99 at
#: 1e6 and 1e7 parameters; CPU per push (server and worker) against the echo's two ends at
#: 1e6; and, kept from before the data plane, the HTTP client against the raw HTTP client
#: (p50 at 1e6).
GOAL_CLIENT_VS_ECHO_P50 = 1.5
GOAL_CLIENT_VS_ECHO_P99 = 2.5
GOAL_CPU_VS_ECHO = 2.0
GOAL_HTTP_CLIENT_VS_RAW = 2.0

#: The methods, in the order they are sampled within a round.
METHODS = ("echo", "uvicorn", "raw", "frames", "client", "client_out", "http_client")


# --- CPU time of a process ---------------------------------------------------------------

_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_clock(pid: int) -> int | None:
    """The CPU-time clock of process ``pid`` (``clock_getcpuclockid``), None if refused."""
    if _LIBC is None:
        return None
    clock = ctypes.c_int()
    if _LIBC.clock_getcpuclockid(pid, ctypes.byref(clock)) != 0:
        return None
    try:
        time.clock_gettime(clock.value)
    except OSError:
        return None
    return clock.value


def process_cpu_seconds(pid: int, clock: int | None = None) -> float:
    """User plus system CPU seconds of process ``pid``, every thread it has run included:
    from its CPU-time ``clock`` (nanoseconds) when given, else ``/proc/<pid>/stat`` (ticks of
    1/``SC_CLK_TCK`` s)."""
    if clock is not None:
        return time.clock_gettime(clock)
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


# --- servers as subprocesses --------------------------------------------------------------


def _kib_field(status: str, name: str) -> int | None:
    for line in status.splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    return None


class ServerProcess(harness.ServerProcess):
    """The tests' server subprocess (:class:`tests.harness.servers.ServerProcess`: a free port
    of 127.0.0.1, waited for, stopped by SIGTERM then SIGKILL, and SIGTERMed if the benchmark
    dies), plus the reference echo servers, the server's memory and CPU time, read from
    ``/proc``, and the port of its data plane. ``paramserver()`` servers get a data plane on
    a free port (``--data-plane-port 0``, from the harness)."""

    _clock: int | None = None
    _clock_pid: int | None = None

    @classmethod
    def paramserver(cls, *args: str, log_dir: Path | None = None, **settings: Any) -> ServerProcess:
        """``python -m paramserver serve`` on a free port, default settings but ``settings``
        (kernels warmed up, as in production); its log holds warnings only."""
        settings.setdefault("log_level", "warning")
        server = super().paramserver(*args, log_dir=log_dir, **settings)
        server.start_timeout = 180.0  # the kernels compile at start-up, on a loaded machine too
        return server

    @classmethod
    def echo_http(cls) -> ServerProcess:
        return cls(["-m", "benchmarks.echo_app", "http", "--port", "{port}"])

    @classmethod
    def echo_asgi(cls) -> ServerProcess:
        return cls(["-m", "benchmarks.echo_app", "asgi", "--port", "{port}"])

    @classmethod
    def echo_tcp(cls) -> ServerProcess:
        return cls(["-m", "benchmarks.echo_app", "tcp", "--port", "{port}"], http=False)

    def data_plane_port(self) -> int:
        """The port ``GET /data-plane`` announces (raises if the server has no data plane)."""
        response = httpx.get(f"{self.url}/data-plane", timeout=30)
        response.raise_for_status()
        return int(response.json()["port"])

    # --- CPU time ---

    def cpu_seconds(self) -> float:
        """CPU seconds (user + system, all threads) the process has used so far."""
        if self._clock_pid != self.pid:  # a restart on another port is another process
            self._clock_pid = self.pid
            self._clock = _cpu_clock(self.pid)
        return process_cpu_seconds(self.pid, self._clock)

    # --- memory, from /proc/<pid>/status ---

    def memory(self) -> dict[str, int]:
        """``{"rss", "hwm"}`` in bytes: resident now and its peak (since start or reset)."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        return {"rss": _kib_field(status, "VmRSS") or 0, "hwm": _kib_field(status, "VmHWM") or 0}

    def rss(self) -> int:
        return self.memory()["rss"]

    def reset_peak(self) -> bool:
        """Reset VmHWM to the current RSS (``clear_refs`` 5); False where that is refused."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def libraries(self) -> list[str]:
        """Which of uvloop and httptools the process has loaded (from its memory map).

        uvicorn's ``"auto"`` loop and HTTP implementation pick them when they are installed;
        without them it runs asyncio's loop and h11 (pure Python, not visible here).
        """
        maps = Path(f"/proc/{self.pid}/maps").read_text()
        return [name for name in ("uvloop", "httptools") if f"/{name}/" in maps]


def transport_of(client: Client) -> str:
    """Which transport ``client``'s pushes take now: ``"data plane"`` once it holds a usable
    data-plane channel (it asks ``GET /data-plane`` at its first push or pull), else
    ``"http"`` (``data_plane=False``, no data plane, or a fallback)."""
    from paramserver.client.dataplane import DataPlaneChannel

    plane = getattr(client, "_plane", None)
    if isinstance(plane, DataPlaneChannel) and plane.available:
        return "data plane"
    return "http"


# --- clients ---------------------------------------------------------------------------


class RawHTTPConnection:
    """A minimal HTTP/1.1 keep-alive client on one blocking socket.

    :meth:`request` sends the request line, a few headers and the body with ``sendall``, and
    reads an answer with a ``Content-Length`` into a buffer reused across requests. The body
    returned is a view of that buffer, valid until the next request.
    """

    def __init__(self, port: int, *, host: str = HOST, timeout: float | None = 300.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.sock = _connect(host, port, timeout)
        self._used = time.monotonic()
        self._head = bytearray(65536)
        self._body = bytearray(65536)

    def __enter__(self) -> RawHTTPConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def ensure_open(self) -> None:
        """Reconnect if the connection sat idle long enough for the server to close it (its
        idle timeout, 5 s by default): call it before a batch of requests, outside the
        timing."""
        if _stale(self.sock, self._used):
            self.sock.close()
            self.sock = _connect(self.host, self.port, self.timeout)
        self._used = time.monotonic()

    def request(
        self,
        method: str,
        path: str,
        body: bytes | bytearray | memoryview = b"",
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, memoryview]:
        """Send one request; return the status and the answer's body (a view)."""
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        if body or method in ("POST", "PUT"):
            lines.append("Content-Type: application/msgpack")
            lines.append(f"Content-Length: {len(body)}")
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if len(body) <= 65536:
            self.sock.sendall(head + bytes(body))
        else:
            self.sock.sendall(head)
            self.sock.sendall(body)
        return self._answer()

    def _answer(self) -> tuple[int, memoryview]:
        view = memoryview(self._head)
        got = 0
        while True:
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise ConnectionError("the server closed the connection")
            got += n
            end = self._head.find(b"\r\n\r\n", 0, got)
            if end >= 0:
                break
            if got == len(self._head):
                raise ConnectionError("answer headers longer than 64 KiB")
        lines = bytes(self._head[:end]).decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
            elif name.strip().lower() == "transfer-encoding":
                raise ConnectionError("chunked answers are not supported here")
        if len(self._body) < length:
            self._body = bytearray(length)
        out = memoryview(self._body)
        start = end + 4
        have = min(got - start, length)
        out[:have] = view[start : start + have]
        while have < length:
            n = self.sock.recv_into(out[have:length], length - have)
            if n == 0:
                raise ConnectionError("the server closed the connection mid-answer")
            have += n
        self._used = time.monotonic()
        return status, out[:length]


def _connect(host: str, port: int, timeout: float | None) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


#: A raw connection idle this long is reopened before its next batch: the servers close
#: idle keep-alive connections after 5 s by default.
MAX_IDLE_SECONDS = 4.0


def _stale(sock: socket.socket, used: float) -> bool:
    """Whether a connection last used at ``used`` (``time.monotonic``) may be closed by the
    server: idle for ``MAX_IDLE_SECONDS``, or readable (closed, or stray bytes)."""
    if time.monotonic() - used >= MAX_IDLE_SECONDS:
        return True
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    have = 0
    while have < len(view):
        n = sock.recv_into(view[have:])
        if n == 0:
            raise ConnectionError("the server closed the connection mid-answer")
        have += n


class RawFrameConnection:
    """A minimal client of the server's data plane (:mod:`paramserver.frames`) on one
    blocking socket: what moving a push as frames costs without the client library.

    :meth:`push` sends the frame prefix and a header encoded once per session and parameter
    layout, then the gradients' own memory (one ``sendmsg``), without an Idempotency-Key (as
    :class:`RawHTTPConnection` sends none), and reads the answer's body into a buffer reused
    across pushes. Its result is ``(iterations, body)``: a view, valid until the next push.
    """

    def __init__(self, port: int, *, host: str = HOST, timeout: float | None = 300.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._prefix = bytearray(frames.PREFIX.size)
        self._header = bytearray(4096)
        self._body = bytearray(0)
        self._heads: dict[tuple[str, tuple[tuple[str, str, tuple[int, ...]], ...]], bytes] = {}
        self._request_id = 0
        self._open()

    def _open(self) -> None:
        self.sock = _connect(self.host, self.port, self.timeout)
        header = self._exchange({"op": "hello", "version": frames.VERSION}, ())[0]
        if header.get("status") != 200:
            self.close()
            raise ConnectionError(f"the data plane refused the hello: {header}")

    def __enter__(self) -> RawFrameConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def ensure_open(self) -> None:
        """Reconnect (and say hello) if the connection sat idle long enough for the server
        to close it (its idle timeout, 5 s by default): call it before a batch, outside the
        timing."""
        if _stale(self.sock, self._used):
            self.sock.close()
            self._open()

    def push(self, session_id: str, gradients: Mapping[str, np.ndarray]) -> tuple[int, memoryview]:
        """One push; raises unless answered with status 200."""
        layout = tuple(
            (name, wire.dtype_name(a.dtype), tuple(a.shape)) for name, a in gradients.items()
        )
        key = (session_id, layout)
        head = self._heads.get(key)
        if head is None:
            head = self._heads[key] = msgpack.packb(
                {
                    "op": "push",
                    "session": session_id,
                    "return_weights": True,
                    "tensors": frames.specs_of(gradients),
                }
            )
        header, body = self._exchange(head, list(gradients.values()))
        if header.get("status") != 200:
            raise RuntimeError(f"data-plane push answered {header}")
        return int(header["iterations"]), body

    def _exchange(
        self, header: Mapping[str, Any] | bytes, tensors: Sequence[np.ndarray]
    ) -> tuple[dict[str, Any], memoryview]:
        head = header if isinstance(header, bytes) else msgpack.packb(dict(header))
        buffers = frames.buffers_of(tensors)
        self._request_id = (self._request_id + 1) & 0xFFFFFFFF
        prefix = frames.pack_prefix(
            frames.REQUEST, self._request_id, len(head), sum(len(b) for b in buffers)
        )
        frames.send_buffers(self.sock, [prefix + head, *buffers])
        _recv_exactly(self.sock, memoryview(self._prefix))
        answer = frames.unpack_prefix(self._prefix, expect=frames.RESPONSE)
        if len(self._header) < answer.header_len:
            self._header = bytearray(answer.header_len)
        _recv_exactly(self.sock, memoryview(self._header)[: answer.header_len])
        decoded = msgpack.unpackb(memoryview(self._header)[: answer.header_len])
        if len(self._body) < answer.body_len:
            self._body = bytearray(answer.body_len)
        body = memoryview(self._body)[: answer.body_len]
        _recv_exactly(self.sock, body)
        self._used = time.monotonic()
        return decoded, body


class EchoConnection:
    """A client of the TCP echo: send ``n_in`` bytes, receive ``n_out`` into a reused buffer."""

    def __init__(self, port: int, *, host: str = HOST) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._inbox = bytearray(0)

    def __enter__(self) -> EchoConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def round_trip(self, payload: bytes | bytearray | memoryview, n_out: int) -> None:
        head = ECHO_HEADER.pack(len(payload), n_out)
        if len(payload) <= 65536:
            self.sock.sendall(head + bytes(payload))
        else:
            self.sock.sendall(head)
            self.sock.sendall(payload)
        if len(self._inbox) < n_out:
            self._inbox = bytearray(n_out)
        view = memoryview(self._inbox)
        have = 0
        while have < n_out:
            n = self.sock.recv_into(view[have:n_out], n_out - have)
            if n == 0:
                raise ConnectionError("the echo server closed the connection")
            have += n


# --- the benchmark -----------------------------------------------------------------------


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linearly interpolated (numpy's default)."""
    return float(np.percentile(np.asarray(samples, dtype=np.float64), q))


def _timed(fn: Callable[[], object], n: int, out: list[float]) -> None:
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t0) / 1e6)


def default_samples(n: int, *, quick: bool) -> int:
    """Pushes per method for a model of ``n`` parameters: about 0.8 GB (quick: 0.2 GB) each
    way per method, at least 12 and at most 300."""
    per_gb = 2e8 if quick else 8e8
    return int(min(300, max(12, per_gb // max(4 * n, 1))))


@contextlib.contextmanager
def _session(url: str, n: int, optimizer: str) -> Iterator[Any]:
    rng = np.random.default_rng(0)
    with Client(url, data_plane=False) as client:
        session = client.create_session({"w": rng.standard_normal(n, dtype=np.float32)}, optimizer)
        try:
            yield session
        finally:
            session.delete(missing_ok=True)


def run(
    sizes: Sequence[int] = (10**6, 10**7),
    *,
    samples: int | Sequence[int] | None = None,
    rounds: int = 6,
    optimizer: str = "adam",
    quick: bool = False,
) -> list[dict[str, Any]]:
    """One row per size: p50/p99 (ms) and CPU per push of every method, and their ratios.

    ``samples`` is the number of pushes per method (one number, one per size, or None for
    :func:`default_samples`); they are taken in ``rounds`` rounds, the methods in turn within
    each round, after two unmeasured pushes of each.
    """
    rows: list[dict[str, Any]] = []
    with (
        ServerProcess.paramserver() as server,
        ServerProcess.echo_tcp() as echo,
        ServerProcess.echo_asgi() as bare,
    ):
        for i, n in enumerate(sizes):
            if samples is None:
                count = default_samples(n, quick=quick)
            elif isinstance(samples, int):
                count = samples
            else:
                count = samples[i]
            rows.append(_push_row(server, echo, bare, n, count, max(1, rounds), optimizer))
        libraries = server.libraries()
    for row in rows:
        row["server_libraries"] = libraries
    return rows


def _push_row(
    server: ServerProcess,
    echo: ServerProcess,
    bare: ServerProcess,
    n: int,
    count: int,
    rounds: int,
    optimizer: str,
) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    grads = {"w": rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3)}
    out = {"w": np.empty(n, dtype=np.float32)}
    body = wire.pack({"gradients": grads})
    with (
        _session(server.url, n, optimizer) as handle,
        Client(server.url) as client,
        Client(server.url, data_plane=False) as http_client,
        RawHTTPConnection(server.port) as raw,
        RawHTTPConnection(bare.port) as stack,
        RawFrameConnection(server.data_plane_port()) as plane,
        EchoConnection(echo.port) as tcp,
    ):
        path = f"/sessions/{handle.id}/gradients"
        session = client.session(handle.id)
        http_session = http_client.session(handle.id)

        def raw_push() -> None:
            status, answer = raw.request("POST", path, body)
            if status != 200:
                raise RuntimeError(f"push answered {status}: {bytes(answer[:300])!r}")

        raw_push()
        _, answer = raw.request("POST", path, body)
        n_out = len(answer)

        def echo_push() -> None:
            tcp.round_trip(body, n_out)

        def uvicorn_push() -> None:
            status, answer = stack.request("POST", f"/?answer={n_out}", body)
            if status != 200 or len(answer) != n_out:
                raise RuntimeError(f"the ASGI echo answered {status}, {len(answer)} bytes")

        def frames_push() -> None:
            plane.push(handle.id, grads)

        def client_push() -> None:
            session.push(grads)

        def client_out_push() -> None:
            session.push(grads, out=out)

        def http_client_push() -> None:
            http_session.push(grads)

        # Each method, the server process whose CPU time it costs, and what reopens its
        # connection if the server closed it while idle (the clients do that themselves).
        def nothing() -> None:
            return None

        methods: dict[str, tuple[Callable[[], None], ServerProcess, Callable[[], None]]] = {
            "echo": (echo_push, echo, nothing),
            "uvicorn": (uvicorn_push, bare, stack.ensure_open),
            "raw": (raw_push, server, raw.ensure_open),
            "frames": (frames_push, server, plane.ensure_open),
            "client": (client_push, server, nothing),
            "client_out": (client_out_push, server, nothing),
            "http_client": (http_client_push, server, nothing),
        }
        times: dict[str, list[float]] = {name: [] for name in methods}
        server_cpu = dict.fromkeys(methods, 0.0)
        worker_cpu = dict.fromkeys(methods, 0.0)
        for fn, _, ensure in methods.values():
            ensure()  # the warm-ups before this one may have kept it idle past the timeout
            fn()
            fn()
        # Keyed HTTP pushes: the server keeps each answer for replays until its budget is
        # full, and while it fills every answer is fresh memory (page faults on both sides:
        # 2-3x slower at 1e6). A worker lives in the steady state after it, so fill it first.
        filling: list[float] = []
        _timed(http_client_push, _filling_pushes(n_out), filling)
        transport = transport_of(client)
        per_round = [count // rounds + (1 if r < count % rounds else 0) for r in range(rounds)]
        for k in per_round:
            for name, (fn, process, reopen) in methods.items():
                reopen()
                s0, w0 = process.cpu_seconds(), time.process_time()
                _timed(fn, k, times[name])
                worker_cpu[name] += time.process_time() - w0
                server_cpu[name] += process.cpu_seconds() - s0
        transport_after = transport_of(client)
    row: dict[str, Any] = {
        "benchmark": "push",
        "parameters": n,
        "optimizer": optimizer,
        "request_bytes": len(body),
        "response_bytes": n_out,
        "samples": count,
        "rounds": rounds,
        # the transport our default client used: "data plane" unless it fell back to HTTP
        "client_transport": transport if transport == transport_after else "mixed",
        # the HTTP client's unmeasured pushes while the idempotency budget filled
        "http_client_filling_pushes": len(filling),
        "http_client_filling_p50_ms": percentile(filling, 50) if filling else None,
    }
    for name, ts in times.items():
        row[f"{name}_p50_ms"] = percentile(ts, 50)
        row[f"{name}_p99_ms"] = percentile(ts, 99)
        row[f"{name}_min_ms"] = min(ts)
        row[f"{name}_server_cpu_ms"] = 1e3 * server_cpu[name] / count
        row[f"{name}_worker_cpu_ms"] = 1e3 * worker_cpu[name] / count
        row[f"{name}_cpu_ms"] = row[f"{name}_server_cpu_ms"] + row[f"{name}_worker_cpu_ms"]
    for q in ("p50", "p99"):
        for name in ("client", "client_out", "frames", "http_client", "raw", "uvicorn"):
            row[f"{name}_vs_echo_{q}"] = row[f"{name}_{q}_ms"] / row[f"echo_{q}_ms"]
        row[f"raw_vs_uvicorn_{q}"] = row[f"raw_{q}_ms"] / row[f"uvicorn_{q}_ms"]
        row[f"client_vs_frames_{q}"] = row[f"client_{q}_ms"] / row[f"frames_{q}_ms"]
        row[f"http_client_vs_raw_{q}"] = row[f"http_client_{q}_ms"] / row[f"raw_{q}_ms"]
    for name in ("client", "client_out", "frames", "http_client", "raw"):
        row[f"{name}_cpu_vs_echo"] = _ratio(row[f"{name}_cpu_ms"], row["echo_cpu_ms"])
    row["client_server_cpu_vs_echo"] = _ratio(
        row["client_server_cpu_ms"], row["echo_server_cpu_ms"]
    )
    row["client_worker_cpu_vs_echo"] = _ratio(
        row["client_worker_cpu_ms"], row["echo_worker_cpu_ms"]
    )
    row["goal_client_vs_echo_p50"] = GOAL_CLIENT_VS_ECHO_P50
    row["goal_client_vs_echo_p99"] = GOAL_CLIENT_VS_ECHO_P99
    row["goal_cpu_vs_echo"] = GOAL_CPU_VS_ECHO
    row["goal_http_client_vs_raw_p50"] = GOAL_HTTP_CLIENT_VS_RAW
    return row


def _filling_pushes(answer_bytes: int, most: int = 100) -> int:
    """Keyed pushes of ``answer_bytes`` that fill the server's default budget of remembered
    answers (``idempotency_max_bytes``), at most ``most``."""
    from paramserver.server.settings import Settings

    budget = Settings.model_fields["idempotency_max_bytes"].default
    return min(most, budget // max(answer_bytes, 1) + 2)


def _ratio(ours: float, reference: float) -> float | None:
    """``ours / reference``, None where the reference is too small to divide by (CPU time of
    a tiny run can read 0 at the tick resolution of ``/proc``)."""
    return ours / reference if reference > 0 else None


_COLUMNS = [
    ("parameters", "params", "{:.0e}"),
    ("samples", "n", "{}"),
    ("echo_p50_ms", "echo p50", "{:.2f}"),
    ("client_p50_ms", "client p50", "{:.2f}"),
    ("client_out_p50_ms", "out= p50", "{:.2f}"),
    ("frames_p50_ms", "frames p50", "{:.2f}"),
    ("http_client_p50_ms", "http client p50", "{:.2f}"),
    ("raw_p50_ms", "raw http p50", "{:.2f}"),
    ("uvicorn_p50_ms", "uvicorn p50", "{:.2f}"),
    ("echo_p99_ms", "echo p99", "{:.2f}"),
    ("client_p99_ms", "client p99", "{:.2f}"),
    ("client_vs_echo_p50", "client/echo p50", "{:.2f}"),
    ("client_vs_echo_p99", "client/echo p99", "{:.2f}"),
    ("echo_cpu_ms", "echo cpu", "{:.2f}"),
    ("client_cpu_ms", "client cpu", "{:.2f}"),
    ("client_server_cpu_ms", "(server", "{:.2f}"),
    ("client_worker_cpu_ms", "worker)", "{:.2f}"),
    ("http_client_cpu_ms", "http cpu", "{:.2f}"),
    ("client_transport", "transport", "{}"),
]


def format_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]] = _COLUMNS
) -> str:
    """A plain-text table of ``rows`` ('-' where a value is missing)."""
    cells = [[title for _, title, _ in columns]]
    for row in rows:
        cells.append(["-" if row.get(k) is None else fmt.format(row[k]) for k, _, fmt in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in cells
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        type=lambda s: [int(float(x)) for x in s.split(",")],
        default=[10**6, 10**7],
    )
    parser.add_argument("--samples", type=int, default=None, help="pushes per method and size")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    rows = run(
        args.sizes,
        samples=args.samples,
        rounds=args.rounds,
        optimizer=args.optimizer,
        quick=args.quick,
    )
    print(f"push round trip over loopback, ms, and CPU ms per push ({args.optimizer}, float32)")
    print(format_table(rows))


if __name__ == "__main__":
    main()
