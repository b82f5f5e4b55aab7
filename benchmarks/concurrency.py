"""Concurrent large pushes: worker processes pushing into one session at once, against as many
concurrent TCP echoes of the same bytes.

``workers`` worker processes (:class:`benchmarks.workers.WorkerPool`, one thread each), each
with its own ``client.Client``, push a float32 gradient of ``parameters`` elements (1e6 by
default, Adam) to one shared session, back to back, for ``seconds``: many workers training
one model, whose pushes the server applies one at a time. The figure is the bytes moved per
second, both ways (each push's HTTP request body plus its answer's, the sizes the data
plane's frames carry too, give or take a few dozen bytes), summed over the workers.

The reference is the same number of worker processes moving the same bytes per round trip
through :mod:`benchmarks.echo_app`'s raw TCP echo at once (one server thread per
connection). Modes: ``"data_plane"``, our client with its defaults (the goal), and
``"http"``, the client forced onto HTTP (information). Rounds alternate between a mode and
the echo, so that a change of machine load hits both alike; each figure is the median of its
rounds.

Run ``python -m benchmarks.concurrency`` (``--help`` for options); ``run()`` returns the rows.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

from paramserver.client import Client, wire

from .push import RawHTTPConnection, ServerProcess, format_table
from .workers import Job, ThreadResult, WorkerPool, total_rate

__all__ = ["COLUMNS", "GOAL_VS_ECHO", "main", "run"]

#: Goal of the performance issue: our bytes per second over the concurrent echoes'.
GOAL_VS_ECHO = 0.7

MB = 1e6


def run(
    *,
    workers: int = 4,
    parameters: int = 10**6,
    seconds: float = 2.0,
    rounds: int = 3,
    optimizer: str = "adam",
    modes: Sequence[str] = ("data_plane", "http"),
) -> list[dict[str, Any]]:
    """One row per mode: median bytes/s of ours and of the echoes, and their ratio."""
    rng = np.random.default_rng(0)
    weights = {"w": rng.standard_normal(parameters, dtype=np.float32)}
    grads = {"w": rng.standard_normal(parameters, dtype=np.float32) * np.float32(1e-3)}
    request_bytes = len(wire.pack({"gradients": grads}))
    rows: list[dict[str, Any]] = []
    with (
        ServerProcess.paramserver() as server,
        ServerProcess.echo_tcp() as echo,
        WorkerPool(workers) as pool,
        Client(server.url, data_plane=False) as client,
    ):
        session = client.create_session(weights, optimizer)
        try:
            with RawHTTPConnection(server.port) as raw:  # our answer's size, for the echo
                status, answer = raw.request(
                    "POST", f"/sessions/{session.id}/gradients", wire.pack({"gradients": grads})
                )
                if status != 200:
                    raise RuntimeError(f"push answered {status}: {bytes(answer[:300])!r}")
                response_bytes = len(answer)
            per_push = request_bytes + response_bytes
            echo_job = Job("tcp_echo", port=echo.port, n_in=request_bytes, n_out=response_bytes)
            for mode in modes:
                job = Job(
                    "client",
                    url=server.url,
                    data_plane=mode == "data_plane",
                    session_ids=(session.id,),
                    elements=parameters,
                )
                measured = _alternate(
                    pool,
                    workers,
                    [("ours", job, server), ("echo", echo_job, echo)],
                    seconds,
                    max(1, rounds),
                )
                ours = statistics.median(r * per_push for r in measured["ours"])
                reference = statistics.median(r * per_push for r in measured["echo"])
                rows.append(
                    {
                        "benchmark": "concurrency",
                        "mode": mode,
                        "transport": measured["transport"],
                        "workers": workers,
                        "parameters": parameters,
                        "optimizer": optimizer,
                        "request_bytes": request_bytes,
                        "response_bytes": response_bytes,
                        "seconds_per_round": seconds,
                        "rounds": rounds,
                        "ours_bytes_per_s": ours,
                        "echo_bytes_per_s": reference,
                        "ours_pushes_per_s": ours / per_push,
                        "echo_round_trips_per_s": reference / per_push,
                        "ours_rounds_pushes_per_s": measured["ours"],
                        "echo_rounds_round_trips_per_s": measured["echo"],
                        "ours_worker_cpu_per_push_ms": measured["ours_cpu_ms"],
                        "echo_worker_cpu_per_round_trip_ms": measured["echo_cpu_ms"],
                        "ours_server_cpu_per_push_ms": measured["ours_server_cpu_ms"],
                        "echo_server_cpu_per_round_trip_ms": measured["echo_server_cpu_ms"],
                        "ratio": ours / reference,
                        "goal_ratio": GOAL_VS_ECHO if mode == "data_plane" else None,
                    }
                )
        finally:
            session.delete(missing_ok=True)
    return rows


def _cpu_per_push_ms(results: Sequence[ThreadResult]) -> float:
    """The workers' CPU milliseconds per push (each process's CPU time counted once)."""
    cpu = {r.process: r.process_cpu_seconds for r in results}
    pushes = sum(r.pushes for r in results)
    return 1e3 * sum(cpu.values()) / pushes if pushes else float("nan")


def _alternate(
    pool: WorkerPool,
    workers: int,
    bursts: Sequence[tuple[str, Job, ServerProcess]],
    seconds: float,
    rounds: int,
) -> dict[str, Any]:
    """Pushes per second of each ``(name, job, server)`` in every process, round after
    round, alternating which goes first; after one unmeasured burst of each. Also the
    workers' CPU time and the server's per push (medians; the server's includes the burst's
    connecting and two warm-up pushes per worker)."""
    out: dict[str, Any] = {}
    transports: set[str] = set()
    for name, job, _ in bursts:
        out[name], out[f"{name}_cpu"], out[f"{name}_server_cpu"] = [], [], []
        pool.burst([job] * workers, min(seconds, 0.5))
    for r in range(rounds):
        for name, job, server in bursts if r % 2 == 0 else bursts[::-1]:
            cpu0 = server.cpu_seconds()
            results = pool.burst([job] * workers, seconds)
            used = server.cpu_seconds() - cpu0
            pushes = sum(t.pushes for t in results)
            out[name].append(total_rate(results))
            out[f"{name}_cpu"].append(_cpu_per_push_ms(results))
            out[f"{name}_server_cpu"].append(1e3 * used / pushes if pushes else float("nan"))
            if name == "ours":
                transports.update(t.transport for t in results)
    for name, _, _ in bursts:
        out[f"{name}_cpu_ms"] = statistics.median(out.pop(f"{name}_cpu"))
        out[f"{name}_server_cpu_ms"] = statistics.median(out.pop(f"{name}_server_cpu"))
    out["transport"] = "/".join(sorted(transports))
    return out


COLUMNS = [
    ("mode", "mode", "{}"),
    ("transport", "transport", "{}"),
    ("workers", "workers", "{}"),
    ("parameters", "params", "{:.0e}"),
    ("ours_pushes_per_s", "pushes/s", "{:.1f}"),
    ("echo_round_trips_per_s", "echo/s", "{:.1f}"),
    ("ours_bytes_per_s", "ours B/s", "{:.3g}"),
    ("echo_bytes_per_s", "echo B/s", "{:.3g}"),
    ("ratio", "ours/echo", "{:.2f}"),
    ("ours_server_cpu_per_push_ms", "server cpu/push ms", "{:.2f}"),
    ("echo_server_cpu_per_round_trip_ms", "echo server ms", "{:.2f}"),
    ("ours_worker_cpu_per_push_ms", "worker cpu/push ms", "{:.2f}"),
    ("echo_worker_cpu_per_round_trip_ms", "echo worker ms", "{:.2f}"),
]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--parameters", type=lambda s: int(float(s)), default=10**6)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--modes", default="data_plane,http", help="data_plane, http or both")
    args = parser.parse_args(argv)
    rows = run(
        workers=args.workers,
        parameters=args.parameters,
        seconds=args.seconds,
        rounds=args.rounds,
        optimizer=args.optimizer,
        modes=[m.strip() for m in args.modes.split(",")],
    )
    print("concurrent pushes into one session, bytes per second both ways (median of rounds)")
    print(format_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
