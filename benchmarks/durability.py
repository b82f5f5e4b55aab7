"""Milliseconds per push with and without the write-ahead journal, over loopback HTTP.

First, in-process: the median time of ``SessionService.push`` (decode, step, encode the
answer without weights, and with the journal append and commit) for each model size, without
a journal and with each fsync policy, sampled in turn over rounds. The difference is the
journal's own cost per push.

Then over HTTP: one ``python -m paramserver serve`` child process per durability mode, all running
at once on a scratch directory (``--dir``, by default a temporary directory under ``/tmp``). For
each model size (one float32 parameter, Adam), ``--rounds`` rounds each sample every mode in turn
(so that a change of machine load hits all modes alike):

* one client pushes ``--pushes-*`` times in a row and each push is timed from request to
  answer, with and without the weights in the answer (``return_weights``): the median and the
  90th percentile over all rounds are reported;
* four threads push to four sessions at once: the median over the rounds of pushes per second
  (with ``journal_fsync=always`` one fsync serves the records of every push appended while the
  previous fsync ran).

Modes: ``off`` (no ``--snapshot-dir``), ``snapshot`` (snapshots only: the push path does no
I/O), ``journal/interval`` (appended, fsynced every second), ``journal/always`` (appended and
fsynced before the answer). Periodic snapshots are off during the measurement
(``--snapshot-interval-seconds 3600``) so that only the journal is measured.

Run ``python -m benchmarks.durability`` (``--help`` for options); it prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from paramserver import wire
from tests.harness.servers import ServerProcess

MODES: dict[str, list[str]] = {
    "off": [],
    "snapshot": ["--snapshot-dir", "{dir}"],
    "journal/interval": ["--snapshot-dir", "{dir}", "--durability", "journal",
                         "--journal-fsync", "interval"],
    "journal/always": ["--snapshot-dir", "{dir}", "--durability", "journal",
                       "--journal-fsync", "always"],
}  # fmt: skip
MSGPACK = {"content-type": wire.MSGPACK_MEDIA_TYPE}
MODES_IN_PROCESS = ("off", "journal/interval", "journal/always")


def start_server(args: list[str]) -> ServerProcess:
    """``python -m paramserver serve`` with ``args``, periodic snapshots off, serving."""
    server = ServerProcess.paramserver(*args, log_level="warning", snapshot_interval_seconds=3600)
    server.stop_timeout = 120.0  # the final snapshots of the largest models
    return server.start()


def _create(http: httpx.Client, url: str, sid: str, size: int) -> bytes:
    weights = {"w": np.zeros(size, np.float32)}
    body = wire.pack({"session_id": sid, "optimizer": "adam", "weights": weights})
    http.post(f"{url}/sessions", content=body, headers=MSGPACK).raise_for_status()
    grads = np.random.default_rng(0).standard_normal(size).astype(np.float32)
    return wire.pack({"gradients": {"w": grads}})


def _push(http: httpx.Client, url: str, sid: str, body: bytes, return_weights: bool) -> None:
    r = http.post(
        f"{url}/sessions/{sid}/gradients",
        params={"return_weights": "true" if return_weights else "false"},
        content=body,
        headers=MSGPACK,
    )
    r.raise_for_status()


def in_process(size: int, rounds: int, directory: Path) -> dict[str, float]:
    """Median ms of ``SessionService.push`` (no HTTP, no weights back) per journal mode."""
    from paramserver.server.persistence import Durability
    from paramserver.server.service import SessionService
    from paramserver.server.sessions import SessionStore
    from paramserver.server.settings import Settings

    services: dict[str, SessionService] = {}
    opened: list[Durability] = []
    try:
        for mode in ("off", "journal/interval", "journal/always"):
            if mode == "off":
                settings = Settings(warm_up_kernels=False)
                durability = None
            else:
                settings = Settings(
                    warm_up_kernels=False,
                    snapshot_dir=directory / mode.replace("/", "-"),
                    durability="journal",
                    journal_fsync=mode.split("/")[1],
                )
                durability = Durability(settings)
            service = SessionService(SessionStore(max_sessions=4), settings, durability)
            if durability is not None:
                durability.open(service.store, service.idempotency)
                opened.append(durability)
            weights = {"w": np.zeros(size, np.float32)}
            service.create(
                wire.pack({"session_id": "s", "optimizer": "adam", "weights": weights}), "msgpack"
            )
            services[mode] = service
        grads = np.random.default_rng(0).standard_normal(size).astype(np.float32)
        body = bytearray(wire.pack({"gradients": {"w": grads}}))
        times: dict[str, list[float]] = {mode: [] for mode in services}
        for r in range(rounds + 1):
            for mode, service in services.items():
                session = service.store.get("s")
                for _ in range(5):
                    start = time.perf_counter()
                    service.push(session, body, return_weights=False)
                    if r:  # round 0 warms up
                        times[mode].append((time.perf_counter() - start) * 1000)
        return {mode: statistics.median(t) for mode, t in times.items()}
    finally:
        for durability in opened:
            durability.close()


def _latencies(url: str, sid: str, body: bytes, n: int, return_weights: bool) -> list[float]:
    with httpx.Client(timeout=120) as http:
        out = []
        for _ in range(n):
            start = time.perf_counter()
            _push(http, url, sid, body, return_weights)
            out.append((time.perf_counter() - start) * 1000)
    return out


def _rate(url: str, bodies: dict[str, bytes], pushes: int) -> float:
    """Pushes per second of one thread per session in ``bodies`` (no weights back)."""
    barrier = threading.Barrier(len(bodies) + 1)

    def work(sid: str) -> None:
        with httpx.Client(timeout=120) as http:
            barrier.wait()
            for _ in range(pushes):
                _push(http, url, sid, bodies[sid], False)

    threads = [threading.Thread(target=work, args=(sid,)) for sid in bodies]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return len(bodies) * pushes / (time.perf_counter() - start)


def run(
    sizes: Sequence[int],
    pushes: dict[int, int],
    rounds: int,
    directory: Path,
    modes: Sequence[str],
) -> list[dict[str, Any]]:
    """Every mode's server runs at once; each round samples every mode in turn, so that a
    change of machine load hits all of them alike."""
    servers = {}
    try:
        for mode in modes:
            data = directory / mode.replace("/", "-")
            servers[mode] = start_server([a.format(dir=data) for a in MODES[mode]])
        rows = []
        for size in sizes:
            n = pushes[size]
            bodies: dict[str, dict[str, bytes]] = {}
            with httpx.Client(timeout=120) as http:
                for mode, server in servers.items():
                    bodies[mode] = {
                        f"{size}-{i}": _create(http, server.url, f"{size}-{i}", size)
                        for i in range(4)
                    }
                    for sid, body in bodies[mode].items():  # warm-up
                        for _ in range(5):
                            _push(http, server.url, sid, body, True)
            samples: dict[str, dict[str, list[float]]] = {
                m: {"w": [], "now": [], "rate": []} for m in servers
            }
            for r in range(rounds):
                order = list(servers)[r % len(servers) :] + list(servers)[: r % len(servers)]
                for mode in order:
                    url, sid = servers[mode].url, f"{size}-0"
                    body = bodies[mode][sid]
                    samples[mode]["w"] += _latencies(url, sid, body, n, True)
                    samples[mode]["now"] += _latencies(url, sid, body, n, False)
                    samples[mode]["rate"].append(_rate(url, bodies[mode], max(2, n // 2)))
            for mode in servers:
                w, now = sorted(samples[mode]["w"]), sorted(samples[mode]["now"])
                rows.append(
                    {"mode": mode, "size": size,
                     "median_w": statistics.median(w), "p90_w": w[int(0.9 * (len(w) - 1))],
                     "median": statistics.median(now), "p90": now[int(0.9 * (len(now) - 1))],
                     "rate": statistics.median(samples[mode]["rate"])}
                )  # fmt: skip
                print(rows[-1], file=sys.stderr)
        return rows
    finally:
        for server in servers.values():
            server.stop()


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| parameters | mode | median ms (weights back) | p90 ms | median ms (no weights) "
        "| p90 ms | 4 clients, pushes/s |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']:,} | {r['mode']} | {r['median_w']:.2f} | {r['p90_w']:.2f} | "
            f"{r['median']:.2f} | {r['p90']:.2f} | {r['rate']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory (default: tmp)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 1_000_000])
    parser.add_argument("--pushes-small", type=int, default=40, help="per round and mode")
    parser.add_argument("--pushes-large", type=int, default=6, help="per round and mode")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = parser.parse_args(argv)
    pushes = {s: (args.pushes_small if s < 100_000 else args.pushes_large) for s in args.sizes}
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        fs = subprocess.run(
            ["stat", "-f", "-c", "%T", scratch], capture_output=True, text=True, check=False
        ).stdout.strip()
        pushes_in_process = {
            size: in_process(
                size, 40 if size < 100_000 else 8, Path(scratch) / f"in-process-{size}"
            )
            for size in args.sizes
        }
        rows = run(args.sizes, pushes, args.rounds, Path(scratch), args.modes)
    print(f"{platform.platform()}, {os.cpu_count()} CPUs, scratch file system: {fs or '?'}")
    print()
    print("| parameters | " + " | ".join(MODES_IN_PROCESS) + " |")
    print("|---:|" + "---:|" * len(MODES_IN_PROCESS))
    for size, medians in pushes_in_process.items():
        cells = " | ".join(f"{medians[m]:.3f}" for m in MODES_IN_PROCESS)
        print(f"| {size:,} | {cells} |")
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
