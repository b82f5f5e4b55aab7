"""Server memory: resident size per session, and the peak during a large push.

Both figures are read from the server process's ``/proc/<pid>/status`` (``python -m paramserver
serve`` in a subprocess, default settings):

* ``session_rss``: the resident size a session adds, against the bytes of its weights and
  optimizer slots. A warm-up session of the same size is created, pushed once and deleted
  first, so that the baseline already holds what any push of that size leaves behind (code,
  allocator pools). Then ``sessions`` sessions are created and each pushed once (Adam's slots
  are zero pages until the first step writes them), and the RSS growth over the baseline is
  divided by their number. The weights and slots bytes come from the session's exported
  state. Pushes here carry no ``Idempotency-Key``; a second row,
  ``idempotency_rss``, pushes each session once more through ``client.Client`` (which sends
  a key with every push) and reports what the server keeps per push for replays.
* ``push_peak``: the extra resident memory while a push of ``peak_parameters`` parameters
  is served, against the request body's size: VmHWM reset to the current RSS just before
  the push (``clear_refs``), read after it, minus the RSS before; where resetting is refused
  the RSS is polled every millisecond instead. Median over ``pushes`` pushes, after two
  unmeasured ones.

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

from .push import RawHTTPConnection, ServerProcess

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
    """Rows ``session_rss``, ``idempotency_rss`` and ``push_peak`` (bytes, and ratios)."""
    rows = _session_rows(sessions, parameters, optimizer)
    rows.append(_peak_row(peak_parameters, max(1, pushes), optimizer))
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
        # Idempotency-Key with every push: the server keeps each answer for replays.
        before = server.rss()
        for sid in ids:
            client.session(sid).push(grads)
        _settle()
        kept = (server.rss() - before) / count
        rows.append(
            {
                "benchmark": "memory",
                "figure": "idempotency_rss",
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
                reset = server.reset_peak()
                with _RSSPoller(server) as poller:
                    _push(conn, session.id, body)
                peak = poller.peak
                if reset:
                    peak = max(peak, server.memory()["hwm"])
                else:
                    method = "polled VmRSS (1 ms)"
                extras.append(peak - before)
                _settle()
                growth.append(server.rss() - before)
        session.delete(missing_ok=True)
    extra = statistics.median(extras)
    return {
        "benchmark": "memory",
        "figure": "push_peak",
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
                f"idempotency_rss: {_mib(row['rss_per_push'])} MiB kept per client push "
                f"(answer {_mib(row['response_bytes'])} MiB)"
            )
        else:
            lines.append(
                f"push_peak: {row['parameters']:.0e} params, body {_mib(row['request_bytes'])} "
                f"MiB: extra peak {_mib(row['extra_peak_bytes'])} MiB (max "
                f"{_mib(row['extra_peak_max_bytes'])}) -> {row['ratio']:.2f}x "
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
