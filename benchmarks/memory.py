"""Server memory: resident size per session, and the peak during a large push.

Both figures are read from the server process's ``/proc/<pid>/status`` (``python -m paramserver
serve`` in a subprocess, default settings, a data plane on a free port):

* ``session_rss``: the resident size a session adds, against the bytes of its weights and
  optimizer slots. A warm-up session of the same size is created, pushed once and deleted
  first, so that the baseline already holds what any push of that size leaves behind (code,
  allocator pools). Then ``sessions`` sessions are created and each pushed once over HTTP
  (Adam's slots are zero pages until the first step writes them), and the RSS growth over the
  baseline is divided by their number. The weights and slots bytes come from the session's
  exported state. Pushes here carry no ``Idempotency-Key``; the ``idempotency_rss`` rows push
  each session once more through ``client.Client`` (which sends a key with every push) and
  report what the server keeps per push for replays: over HTTP (``data_plane=False``), where
  the server keeps the answer, then over the data plane (after one unmeasured push that gives
  its connection its buffers), where it keeps none.
* ``push_peak``: the extra resident memory while a push of ``peak_parameters`` parameters
  is served, against the request body's size: VmHWM reset to the current RSS just before
  the push (``clear_refs``), read after it, minus the RSS before; where resetting is refused
  the RSS is polled every millisecond instead. Median over ``pushes`` pushes, after two
  unmeasured ones, over HTTP (:class:`benchmarks.push.RawHTTPConnection`, one keep-alive
  connection). Over the data plane (:class:`benchmarks.push.RawFrameConnection`) the figure
  is the server's first data-plane push, on a new connection, after two HTTP pushes: a
  data-plane connection keeps its receive and answer buffers (a body's and the weights'
  size) for its next push, and memory freed by an earlier connection is reused by the next,
  so only the first push shows what those buffers cost. Later pushes on new and on warm
  connections are in the row for information.

Run ``python -m benchmarks.memory`` (``--help`` for options); ``run()`` returns the rows.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from paramserver.client import Client, wire

from .push import RawFrameConnection, RawHTTPConnection, ServerProcess, transport_of

__all__ = ["GOAL_PEAK_VS_BODY", "GOAL_SESSION_VS_BYTES", "main", "run"]

#: Goals of the performance issue.
GOAL_SESSION_VS_BYTES = 1.1
GOAL_PEAK_VS_BODY = 3.0

MiB = 1024 * 1024


def _model(n: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], bytes]:
    """Weights and a gradient of one float32 parameter ``w``, and the push body."""
    rng = np.random.default_rng(0)
    weights = {"w": rng.standard_normal(n, dtype=np.float32)}
    grads = {"w": rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3)}
    return weights, grads, wire.pack({"gradients": grads})


def _state_bytes(client: Client, session_id: str) -> tuple[int, int]:
    """Bytes of the weights and of the slots of a session, from its exported state."""
    state = client.session(session_id).state()
    weights = sum(a.nbytes for a in state.weights.values())
    slots = sum(a.nbytes for per in state.slots.values() for a in per.values())
    return weights, slots


def _push(conn: RawHTTPConnection, session_id: str, body: bytes) -> int:
    status, answer = conn.request("POST", f"/sessions/{session_id}/gradients", body)
    if status != 200:
        raise RuntimeError(f"push answered {status}: {bytes(answer[:300])!r}")
    return len(answer)


def _settle() -> None:
    """Give the server a moment to finish sending and free what a request held."""
    time.sleep(0.2)


def run(
    *,
    sessions: int = 8,
    parameters: int = 10**6,
    peak_parameters: int = 10**7,
    pushes: int = 5,
    optimizer: str = "adam",
) -> list[dict[str, Any]]:
    """Rows ``session_rss``, ``idempotency_rss`` (HTTP, data plane) and ``push_peak`` (HTTP,
    data plane): bytes, and ratios."""
    rows = _session_rows(sessions, parameters, optimizer)
    rows.append(_peak_row(peak_parameters, max(1, pushes), optimizer))
    rows.append(_plane_peak_row(peak_parameters, max(1, pushes), optimizer))
    return rows


def _session_rows(count: int, n: int, optimizer: str) -> list[dict[str, Any]]:
    weights, grads, body = _model(n)
    with ServerProcess.paramserver() as server, Client(server.url) as client:
        with RawHTTPConnection(server.port) as conn:
            warm = client.create_session(weights, optimizer)
            _push(conn, warm.id, body)
            _push(conn, warm.id, body)
            weights_bytes, slots_bytes = _state_bytes(client, warm.id)
            warm.delete()
            _settle()
            baseline = server.rss()
            ids = []
            for _ in range(count):
                session = client.create_session(weights, optimizer)
                _push(conn, session.id, body)
                ids.append(session.id)
            _settle()
            after = server.rss()
        per_session = (after - baseline) / count
        session_bytes = weights_bytes + slots_bytes
        rows: list[dict[str, Any]] = [
            {
                "benchmark": "memory",
                "figure": "session_rss",
                "sessions": count,
                "parameters": n,
                "optimizer": optimizer,
                "weights_bytes": weights_bytes,
                "slots_bytes": slots_bytes,
                "session_bytes": session_bytes,
                "baseline_rss": baseline,
                "rss_after": after,
                "rss_per_session": per_session,
                "ratio": per_session / session_bytes,
                "goal_ratio": GOAL_SESSION_VS_BYTES,
            }
        ]
        # The same sessions pushed once more by the client library, which sends an
        # Idempotency-Key with every push: over HTTP the server keeps each answer for replays.
        for transport, data_plane in (("http", False), ("data plane", True)):
            with Client(server.url, data_plane=data_plane) as pusher:
                if data_plane:  # the connection's buffers, before the RSS is taken
                    pusher.session(ids[0]).push(grads)
                    _settle()
                before = server.rss()
                for sid in ids:
                    pusher.session(sid).push(grads)
                used = transport_of(pusher)
            _settle()
            kept = (server.rss() - before) / count
            rows.append(
                {
                    "benchmark": "memory",
                    "figure": "idempotency_rss",
                    "transport": used if used == transport else f"{used} (asked {transport})",
                    "sessions": count,
                    "parameters": n,
                    "optimizer": optimizer,
                    "pushes": count,
                    "response_bytes": len(wire.pack({"iterations": 2, "weights": weights})),
                    "rss_per_push": kept,
                    "ratio": None,
                    "goal_ratio": None,
                }
            )
        for sid in ids:
            client.session(sid).delete(missing_ok=True)
    return rows


class _RSSPoller:
    """Samples a process's RSS every ``interval`` seconds in a thread; keeps the maximum."""

    def __init__(self, server: ServerProcess, interval: float = 0.001) -> None:
        self.server = server
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.server.rss())
            time.sleep(self.interval)

    def __enter__(self) -> _RSSPoller:
        self.peak = self.server.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.server.rss())


def _peak_row(n: int, pushes: int, optimizer: str) -> dict[str, Any]:
    weights, _, body = _model(n)
    extras: list[int] = []
    growth: list[int] = []
    with ServerProcess.paramserver() as server, Client(server.url) as client:
        session = client.create_session(weights, optimizer)
        with RawHTTPConnection(server.port) as conn:
            n_out = _push(conn, session.id, body)
            _push(conn, session.id, body)
            _settle()
            method = "VmHWM after clear_refs"
            for _ in range(pushes):
                before = server.rss()
                with _Peak(server) as peak:
                    _push(conn, session.id, body)
                if not peak.reset:
                    method = "polled VmRSS (1 ms)"
                extras.append(peak.value - before)
                _settle()
                growth.append(server.rss() - before)
        session.delete(missing_ok=True)
    extra = statistics.median(extras)
    return {
        "benchmark": "memory",
        "figure": "push_peak",
        "transport": "http",
        "parameters": n,
        "optimizer": optimizer,
        "pushes": pushes,
        "request_bytes": len(body),
        "response_bytes": n_out,
        "extra_peak_bytes": extra,
        "extra_peak_max_bytes": max(extras),
        "rss_growth_bytes": statistics.median(growth),
        "peak_method": method,
        "ratio": extra / len(body),
        "goal_ratio": GOAL_PEAK_VS_BODY,
    }


class _Peak:
    """The server's peak RSS over a ``with`` block: VmHWM reset at its start where the
    kernel allows it (:attr:`reset`), and polled meanwhile in any case."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.reset = False
        self.value = 0
        self._poller = _RSSPoller(server)

    def __enter__(self) -> _Peak:
        self.reset = self.server.reset_peak()
        self._poller.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._poller.__exit__(*exc)
        self.value = self._poller.peak
        if self.reset:
            self.value = max(self.value, self.server.memory()["hwm"])


def _plane_peak_row(n: int, pushes: int, optimizer: str) -> dict[str, Any]:
    """``push_peak`` over the data plane: the first data-plane push of the server, on a new
    connection, after two HTTP pushes (so that the session's slots are resident): the one
    whose connection buffers come from the operating system. Then, for information, the
    median over ``pushes`` more, each on a new connection, and one on a warm connection."""
    weights, grads, body = _model(n)
    extras: list[int] = []
    with ServerProcess.paramserver() as server, Client(server.url) as client:
        session = client.create_session(weights, optimizer)
        port = server.data_plane_port()
        with RawHTTPConnection(server.port) as http:
            _push(http, session.id, body)
            _push(http, session.id, body)
        _settle()
        method = "VmHWM after clear_refs"
        before = server.rss()
        with _Peak(server) as peak, RawFrameConnection(port) as conn:
            n_out = len(conn.push(session.id, grads)[1])
        first = peak.value - before
        if not peak.reset:
            method = "polled VmRSS (1 ms)"
        _settle()
        first_growth = server.rss() - before
        for _ in range(pushes):
            before = server.rss()
            with _Peak(server) as peak, RawFrameConnection(port) as conn:
                conn.push(session.id, grads)
            extras.append(peak.value - before)
            _settle()
        with RawFrameConnection(port) as conn:
            conn.push(session.id, grads)
            _settle()
            before = server.rss()
            with _Peak(server) as peak:
                conn.push(session.id, grads)
            warm = peak.value - before
        session.delete(missing_ok=True)
    request_bytes = len(body)
    return {
        "benchmark": "memory",
        "figure": "push_peak",
        "transport": "data plane",
        "parameters": n,
        "optimizer": optimizer,
        "pushes": 1,
        "request_bytes": request_bytes,
        "response_bytes": n_out,
        "extra_peak_bytes": first,
        "extra_peak_max_bytes": max([first, *extras]),
        # what the first connection leaves resident after it closed (its buffers, while the
        # server still holds them) and the peaks of later pushes on new and warm connections
        "rss_growth_bytes": first_growth,
        "new_connection_extra_peak_bytes": statistics.median(extras) if extras else None,
        "warm_extra_peak_bytes": warm,
        "peak_method": method + ", the server's first data-plane push, on a new connection",
        "ratio": first / request_bytes,
        "goal_ratio": GOAL_PEAK_VS_BODY,
    }


def _mib(value: Any) -> str:
    return f"{value / MiB:.1f}"


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    lines = []
    for row in rows:
        if row["figure"] == "session_rss":
            lines.append(
                f"session_rss: {row['sessions']} sessions of {row['parameters']:.0e} params "
                f"({row['optimizer']}): {_mib(row['rss_per_session'])} MiB resident each for "
                f"{_mib(row['session_bytes'])} MiB of weights+slots -> {row['ratio']:.3f}x "
                f"(goal <= {row['goal_ratio']})"
            )
        elif row["figure"] == "idempotency_rss":
            lines.append(
                f"idempotency_rss ({row['transport']}): {_mib(row['rss_per_push'])} MiB kept per "
                f"client push (answer {_mib(row['response_bytes'])} MiB)"
            )
        else:
            later = ""
            if row.get("warm_extra_peak_bytes") is not None:
                later = (
                    f"; kept after it closed {_mib(row['rss_growth_bytes'])}, later pushes on a "
                    f"new connection {_mib(row['new_connection_extra_peak_bytes'])}, on a warm "
                    f"one {_mib(row['warm_extra_peak_bytes'])}"
                )
            lines.append(
                f"push_peak ({row['transport']}): {row['parameters']:.0e} params, body "
                f"{_mib(row['request_bytes'])} MiB: extra peak {_mib(row['extra_peak_bytes'])} MiB "
                f"(max {_mib(row['extra_peak_max_bytes'])}{later}) -> {row['ratio']:.2f}x "
                f"(goal <= {row['goal_ratio']}; {row['peak_method']})"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--parameters", type=lambda s: int(float(s)), default=10**6)
    parser.add_argument("--peak-parameters", type=lambda s: int(float(s)), default=10**7)
    parser.add_argument("--pushes", type=int, default=5)
    parser.add_argument("--optimizer", default="adam")
    args = parser.parse_args(argv)
    rows = run(
        sessions=args.sessions,
        parameters=args.parameters,
        peak_parameters=args.peak_parameters,
        pushes=args.pushes,
        optimizer=args.optimizer,
    )
    print(format_rows(rows))


if __name__ == "__main__":
    main()
