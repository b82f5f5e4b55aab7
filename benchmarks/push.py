"""Push round trip over loopback: our server against a raw TCP echo of the same bytes.

For each model size (one float32 parameter ``w`` of ``n`` elements, Adam by default) this
times one push, request out and answer back, in four ways, sampled in turn:

* ``echo``: :mod:`benchmarks.echo_app`'s raw TCP echo, sent the push's body size and
  answering the push's answer size: moving the same bytes both ways, nothing else;
* ``uvicorn``: the same raw-socket client against :mod:`benchmarks.echo_app`'s bare ASGI
  echo under the same uvicorn (no FastAPI), answering as many bytes as our server does: what
  the HTTP stack alone costs to move the push's bytes (information: no goal is set on it);
* ``raw``: a minimal HTTP/1.1 client on a blocking socket (:class:`RawHTTPConnection`) that
  sends a body encoded once beforehand and reads the answer into a reused buffer. Against
  ``echo`` it measures the server: HTTP, reading the body, decoding, the optimizer step,
  encoding the weights, sending them;
* ``client``: ``client.Client``'s ``session.push``: encoding the gradients, httpx, decoding
  the answer (and the fresh ``Idempotency-Key`` of every push). Against ``raw`` it measures
  the client library.

Every server is a subprocess (``python -m paramserver serve``, ``python -m benchmarks.echo_app tcp``
and ``... asgi``) so that the benchmark does not share a GIL with it. Figures are
per-request latencies in milliseconds: p50 and p99 over all samples of a method.

This module also holds what the other benchmarks share: :class:`ServerProcess` (the tests'
server subprocess, :class:`tests.harness.servers.ServerProcess`, with its resident memory from
``/proc``) and :class:`RawHTTPConnection`.

Run ``python -m benchmarks.push`` (``--help`` for options); ``run()`` returns the rows.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from paramserver.client import Client, wire
from tests.harness import servers as harness
from tests.harness.servers import HOST, free_port

from .echo_app import ECHO_HEADER

__all__ = [
    "GOAL_CLIENT_VS_RAW",
    "GOAL_RAW_VS_ECHO",
    "HOST",
    "EchoConnection",
    "RawHTTPConnection",
    "ServerProcess",
    "default_samples",
    "format_table",
    "free_port",
    "main",
    "percentile",
    "run",
]

#: Goals of the performance issue, on p50 at 1e6 parameters.
GOAL_RAW_VS_ECHO = 1.5
GOAL_CLIENT_VS_RAW = 2.0


# --- servers as subprocesses --------------------------------------------------------------


def _kib_field(status: str, name: str) -> int | None:
    for line in status.splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    return None


class ServerProcess(harness.ServerProcess):
    """The tests' server subprocess (:class:`tests.harness.servers.ServerProcess`: a free port
    of 127.0.0.1, waited for, stopped by SIGTERM then SIGKILL, and SIGTERMed if the benchmark
    dies), plus the reference echo servers and the server's memory, read from ``/proc``."""

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
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._head = bytearray(65536)
        self._body = bytearray(65536)

    def __enter__(self) -> RawHTTPConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

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
        return status, out[:length]


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


def _timed(fn: Any, n: int, out: list[float]) -> None:
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
def _session(url: str, n: int, optimizer: str) -> Iterator[tuple[Client, Any]]:
    rng = np.random.default_rng(0)
    with Client(url) as client:
        session = client.create_session({"w": rng.standard_normal(n, dtype=np.float32)}, optimizer)
        try:
            yield client, session
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
    """One row per size: p50/p99 (ms) of echo, raw and client pushes, and their ratios.

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
    body = wire.pack({"gradients": grads})
    with (
        _session(server.url, n, optimizer) as (_client, session),
        RawHTTPConnection(server.port) as raw,
        RawHTTPConnection(bare.port) as stack,
        EchoConnection(echo.port) as tcp,
    ):
        path = f"/sessions/{session.id}/gradients"

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

        def client_push() -> None:
            session.push(grads)

        methods = {
            "echo": echo_push,
            "uvicorn": uvicorn_push,
            "raw": raw_push,
            "client": client_push,
        }
        times: dict[str, list[float]] = {name: [] for name in methods}
        for fn in methods.values():
            fn()
            fn()
        per_round = [count // rounds + (1 if r < count % rounds else 0) for r in range(rounds)]
        for k in per_round:
            for name, fn in methods.items():
                _timed(fn, k, times[name])
    row: dict[str, Any] = {
        "benchmark": "push",
        "parameters": n,
        "optimizer": optimizer,
        "request_bytes": len(body),
        "response_bytes": n_out,
        "samples": count,
        "rounds": rounds,
    }
    for name, ts in times.items():
        row[f"{name}_p50_ms"] = percentile(ts, 50)
        row[f"{name}_p99_ms"] = percentile(ts, 99)
        row[f"{name}_min_ms"] = min(ts)
    for q in ("p50", "p99"):
        row[f"raw_vs_echo_{q}"] = row[f"raw_{q}_ms"] / row[f"echo_{q}_ms"]
        row[f"uvicorn_vs_echo_{q}"] = row[f"uvicorn_{q}_ms"] / row[f"echo_{q}_ms"]
        row[f"raw_vs_uvicorn_{q}"] = row[f"raw_{q}_ms"] / row[f"uvicorn_{q}_ms"]
        row[f"client_vs_raw_{q}"] = row[f"client_{q}_ms"] / row[f"raw_{q}_ms"]
    row["goal_raw_vs_echo_p50"] = GOAL_RAW_VS_ECHO
    row["goal_client_vs_raw_p50"] = GOAL_CLIENT_VS_RAW
    return row


_COLUMNS = [
    ("parameters", "params", "{:.0e}"),
    ("samples", "n", "{}"),
    ("echo_p50_ms", "echo p50", "{:.2f}"),
    ("uvicorn_p50_ms", "uvicorn p50", "{:.2f}"),
    ("raw_p50_ms", "raw p50", "{:.2f}"),
    ("client_p50_ms", "client p50", "{:.2f}"),
    ("echo_p99_ms", "echo p99", "{:.2f}"),
    ("raw_p99_ms", "raw p99", "{:.2f}"),
    ("client_p99_ms", "client p99", "{:.2f}"),
    ("raw_vs_echo_p50", "raw/echo p50", "{:.2f}"),
    ("uvicorn_vs_echo_p50", "uvicorn/echo p50", "{:.2f}"),
    ("client_vs_raw_p50", "client/raw p50", "{:.2f}"),
    ("raw_vs_echo_p99", "raw/echo p99", "{:.2f}"),
    ("client_vs_raw_p99", "client/raw p99", "{:.2f}"),
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
    print(f"push round trip over loopback, ms ({args.optimizer}, float32)")
    print(format_table(rows))


if __name__ == "__main__":
    main()
