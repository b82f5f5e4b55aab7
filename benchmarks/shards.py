"""Sharded sessions: pushes per second of a 1e7-parameter model against 1, 2 and 3 shard
processes, from 1 and 2 worker processes.

The model is a text classifier of 10,038,504 float32 parameters (40.2 MB), Adam, in seven
tensors named as Keras names them: an embedding of 30,000 x 256 (30.7 MB, which the sharded
client splits along axis 0 into eight slices of at most 4 MiB), a 256 -> 4096 -> 256 MLP
(two 4 MiB kernels, kept whole, and their biases) and a 1000-way head. ``parameters`` other
than 1e7 scale every dimension by ``sqrt(parameters / 1e7)`` (:func:`model_shapes`).

Every server is its own ``python -m paramserver serve`` process (default settings, data
plane on), so that shards never share a GIL; the three start at once. One session per way
of pushing is created on them, all side by side:

* ``plain``: an ordinary session on server 0, pushed with ``Client(url)``: the reference for
  the sharded client's own overhead;
* ``sharded``, ``S`` = 1, 2, 3: one sharded session over servers ``0..S-1``, pushed with
  ``Client([url0, ..., urlS-1])`` (:class:`paramserver.client.ShardedClient`: every shard's
  part in parallel, from a thread pool, the answers joined).

``W`` worker processes (the first ``W`` of a :class:`ShardPushPool`, spawned) each join the
session by id with a client of their own (its defaults: the data plane) and push the same
gradient back to back for ``seconds``, after two unmeasured warm-up pushes. Each push is
answered with the new weights, received in one of two ways (``receive``):

* ``new``: as new arrays, as a worker that does not pass ``out=`` gets them (the sharded
  client receives each slice into an array of its own, then joins the slices into a new
  array per split tensor);
* ``out``: with ``out=``, into arrays the worker allocated once (the sharded client receives
  every slice straight into its rows of them): no fresh memory per push in either client.

Bursts of every (receive, way, W) run in turn within a round, in the opposite order every
other round, so that a change of machine load hits all alike; rates and CPU figures are
medians over the rounds, latencies are pooled over them. After every burst the session's
iteration count (on every shard) must have advanced by exactly the pushes made, warm-ups
included.

Figures per row: pushes per second (all workers together), p50 and p99 of one push as a worker
sees it, CPU per push of the server processes involved (every thread, read from their CPU-time
clocks over the measured pushes only) and of the workers (``time.process_time``, which counts
the sharded client's pool threads), the ratio of the pushes per second to ``S=1`` (and to
``plain``) with as many workers, and the minor page faults per push of the servers and of the
workers (each a 4 KiB page of fresh memory that the kernel zeroes first: memory a push
allocated after the allocator had given it back to the system). No goal: these are the
measured points of docs/scaling.md's model. On a machine with fewer cores than servers plus
workers the shards and workers share the CPUs, which bounds what more shards can give; the
row records ``nproc``.

Run ``python -m benchmarks.shards`` (``--help`` for options); ``run()`` returns the rows.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import resource
import statistics
import time
import traceback
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from paramserver.client import Client

from .push import ServerProcess, format_table, percentile, transport_of
from .workers import TIMEOUT, WorkerPool

__all__ = [
    "BASE_MODEL",
    "COLUMNS",
    "RECEIVES",
    "WARM_UP_PUSHES",
    "PushJob",
    "PushResult",
    "ShardPushPool",
    "main",
    "minor_faults",
    "model_shapes",
    "run",
]

#: The model at 1e7 (10,038,504 parameters): a text classifier, Keras's parameter names.
BASE_MODEL: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("embedding/embeddings", (30_000, 256)),
    ("dense/kernel", (256, 4096)),
    ("dense/bias", (4096,)),
    ("dense_1/kernel", (4096, 256)),
    ("dense_1/bias", (256,)),
    ("dense_2/kernel", (256, 1000)),
    ("dense_2/bias", (1000,)),
)
_BASE_PARAMETERS = 10**7
#: Unmeasured pushes each worker makes when a burst sets up.
WARM_UP_PUSHES = 2
#: How the answers are received: into new arrays, or with ``out=`` into arrays kept.
RECEIVES = ("new", "out")


def model_shapes(parameters: int = _BASE_PARAMETERS) -> dict[str, tuple[int, ...]]:
    """:data:`BASE_MODEL` with every dimension scaled by ``sqrt(parameters / 1e7)`` (at
    least 1): about ``parameters`` parameters, exactly :data:`BASE_MODEL` at 1e7."""
    scale = math.sqrt(parameters / _BASE_PARAMETERS)
    return {name: tuple(max(1, round(d * scale)) for d in shape) for name, shape in BASE_MODEL}


# --- the worker processes ------------------------------------------------------------------


_Shapes = tuple[tuple[str, tuple[int, ...]], ...]


@dataclasses.dataclass(frozen=True)
class PushJob:
    """What a worker process pushes in a burst: into session ``session_id`` on ``urls``,
    with ``Client(urls[0])`` (``sharded=False``) or ``Client(list(urls))``, a float32
    gradient of ``shapes`` (name, shape), back to back; the answers into new arrays, or
    with ``out=True`` into arrays allocated once."""

    urls: tuple[str, ...]
    sharded: bool
    session_id: str
    shapes: _Shapes
    out: bool = False


@dataclasses.dataclass(frozen=True)
class PushResult:
    """One worker's burst: ``pushes`` answered in ``seconds`` (start to last answer), each
    push's ``latencies`` (seconds), its client's ``transport``, and its process's CPU seconds
    and minor page faults over the burst (every thread)."""

    process: int
    pushes: int
    seconds: float
    latencies: tuple[float, ...]
    transport: str
    cpu_seconds: float
    minor_faults: int

    @property
    def rate(self) -> float:
        return self.pushes / self.seconds if self.seconds > 0 else 0.0


#: The worker's gradients and ``out=`` arrays, made once per model (1e7 normals take 0.2 s).
_GRADIENTS: dict[_Shapes, dict[str, np.ndarray]] = {}
_OUT: dict[_Shapes, dict[str, np.ndarray]] = {}


class _Pusher:
    """A worker process's client and session handle for one job, connected and warmed up."""

    def __init__(self, job: PushJob) -> None:
        if job.shapes not in _GRADIENTS:
            rng = np.random.default_rng(2)
            _GRADIENTS[job.shapes] = {
                name: rng.standard_normal(shape, dtype=np.float32) * np.float32(1e-3)
                for name, shape in job.shapes
            }
        self.grads = _GRADIENTS[job.shapes]
        self.out: dict[str, np.ndarray] | None = None
        if job.out:
            if job.shapes not in _OUT:
                _OUT[job.shapes] = {name: np.zeros(shape, np.float32) for name, shape in job.shapes}
            self.out = _OUT[job.shapes]
        self.client = Client(list(job.urls)) if job.sharded else Client(job.urls[0])
        self.session = self.client.session(job.session_id)
        for _ in range(WARM_UP_PUSHES):
            self.push()

    def push(self) -> None:
        self.session.push(self.grads, out=self.out)

    def transport(self) -> str:
        """``"data plane"`` if every (shard's) client pushes over it, else ``"http"``."""
        clients = getattr(self.client, "_clients", [self.client])  # a sharded client's shards
        found = {transport_of(c) for c in clients}
        return found.pop() if len(found) == 1 else "mixed"

    def run(self, index: int, start_at: float, seconds: float) -> PushResult:
        latencies: list[float] = []
        deadline = start_at + seconds
        cpu0, faults0 = time.process_time(), _own_minor_faults()
        time.sleep(max(0.0, start_at - time.monotonic()))
        end = start_at
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            self.push()
            latencies.append(time.perf_counter() - t0)
            end = time.monotonic()
        cpu, faults = time.process_time() - cpu0, _own_minor_faults() - faults0
        return PushResult(
            index, len(latencies), end - start_at, tuple(latencies), self.transport(), cpu, faults
        )

    def close(self) -> None:
        self.client.close()


def _own_minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def minor_faults(pid: int) -> int:
    """Minor page faults of process ``pid`` so far (every thread; ``/proc/<pid>/stat``): a
    fault per 4 KiB page of fresh memory touched, which the kernel zeroes first."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7])


def _worker_main(conn: Connection, index: int) -> None:  # pragma: no cover - a child process
    """A worker process: serves ``setup``, ``run``, ``teardown`` and ``exit`` messages, as
    :mod:`benchmarks.workers`'s do."""
    pusher: _Pusher | None = None
    while True:
        message = conn.recv()
        op = message[0]
        try:
            if op == "setup":
                pusher = _Pusher(message[1])
                conn.send(("ok", None))
            elif op == "run":
                assert pusher is not None
                conn.send(("ok", [pusher.run(index, message[1], message[2])]))
            elif op == "teardown":
                if pusher is not None:
                    pusher.close()
                pusher = None
                conn.send(("ok", None))
            elif op == "exit":
                return
        except BaseException:
            conn.send(("error", traceback.format_exc()))


class ShardPushPool(WorkerPool):
    """:class:`benchmarks.workers.WorkerPool`'s processes (spawned, stopped on leaving,
    every wait bounded), running :class:`PushJob` s; :meth:`measure` uses the first
    ``workers`` of them and reads the servers' CPU time around the measured pushes only
    (not the connecting and warm-up ones)."""

    target = staticmethod(_worker_main)
    name = "pusher"

    def _exchange(self, workers: int, message: tuple[Any, ...], timeout: float) -> list[Any]:
        """Send ``message`` to the first ``workers`` processes; their answers, in order
        (raises a worker's error, or after ``timeout`` seconds)."""
        conns = self._conns[:workers]
        for conn in conns:
            conn.send(message)
        deadline = time.monotonic() + timeout
        answers = []
        for index, conn in enumerate(conns):
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"worker {index} did not answer within {timeout:g} s")
            status, value = conn.recv()
            if status != "ok":
                raise RuntimeError(f"worker {index} failed:\n{value}")
            answers.append(value)
        return answers

    def measure(
        self, job: PushJob, workers: int, seconds: float, servers: Sequence[ServerProcess]
    ) -> tuple[list[PushResult], float, int]:
        """The first ``workers`` processes push ``job`` for ``seconds``, all starting at once
        once all are connected and warmed up; their results, and the CPU seconds and minor
        page faults of ``servers`` meanwhile."""
        if not 1 <= workers <= self.processes:
            raise ValueError(f"{workers} workers from a pool of {self.processes}")
        self._exchange(workers, ("setup", job), TIMEOUT)
        cpu0 = sum(s.cpu_seconds() for s in servers)
        faults0 = sum(minor_faults(s.pid) for s in servers)
        start_at = time.monotonic() + 0.05
        answers = self._exchange(workers, ("run", start_at, seconds), seconds + TIMEOUT)
        used = sum(s.cpu_seconds() for s in servers) - cpu0
        faults = sum(minor_faults(s.pid) for s in servers) - faults0
        self._exchange(workers, ("teardown",), TIMEOUT)
        return [r for per_process in answers for r in per_process], used, faults


# --- the benchmark -------------------------------------------------------------------------


@dataclasses.dataclass
class _Way:
    """One way of pushing: a session on some of the servers and how workers reach it."""

    name: str
    shards: int
    sharded: bool
    servers: list[ServerProcess]
    session: Any
    bytes_per_shard: list[int]

    @property
    def job_urls(self) -> tuple[str, ...]:
        return tuple(s.url for s in self.servers)


def _start(servers: Sequence[ServerProcess]) -> None:
    """Launch every server, then wait for each: they warm their kernels up in parallel."""
    for server in servers:
        server.launch()
    for server in servers:
        if not server.wait_ready():  # its port was taken meanwhile: another one
            server.start()


def run(
    *,
    shard_counts: Sequence[int] = (1, 2, 3),
    worker_counts: Sequence[int] = (1, 2),
    parameters: int = 10**7,
    seconds: float = 0.75,
    rounds: int = 3,
    optimizer: str = "adam",
    plain: bool = True,
    receives: Sequence[str] = RECEIVES,
) -> list[dict[str, Any]]:
    """One row per worker count, way of receiving (``receives``: ``"new"``, ``"out"``) and
    way of pushing (``plain`` first, then each shard count), in that order: median pushes per
    second, pooled p50/p99, CPU per push, ratios to ``S=1`` and ``plain`` (same W and
    receive)."""
    unknown = sorted(set(receives) - set(RECEIVES))
    if unknown or not receives:
        raise ValueError(f"receives must be some of {RECEIVES}, got {list(receives)}")
    shard_counts = sorted(set(shard_counts))
    worker_counts = sorted(set(worker_counts))
    if not shard_counts or shard_counts[0] < 1 or not worker_counts or worker_counts[0] < 1:
        raise ValueError("shard and worker counts must be positive")
    shapes = model_shapes(parameters)
    rng = np.random.default_rng(0)
    weights = {
        name: rng.standard_normal(shape, dtype=np.float32) * np.float32(0.05)
        for name, shape in shapes.items()
    }
    model_parameters = sum(math.prod(s) for s in shapes.values())
    push_bytes = sum(w.nbytes for w in weights.values())
    measured: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    with contextlib.ExitStack() as stack:
        servers = [ServerProcess.paramserver() for _ in range(max(shard_counts))]
        for server in servers:
            stack.callback(server.stop)
        # the workers import while the servers warm their kernels up
        pool = stack.enter_context(ShardPushPool(max(worker_counts)))
        _start(servers)
        ways: list[_Way] = []
        if plain:
            client = stack.enter_context(Client(servers[0].url, data_plane=False))
            session = client.create_session(weights, optimizer)
            stack.callback(session.delete, missing_ok=True)
            ways.append(_Way("plain", 1, False, servers[:1], session, [push_bytes]))
        for count in shard_counts:
            client = stack.enter_context(Client([s.url for s in servers[:count]], data_plane=False))
            session = client.create_session(weights, optimizer)
            stack.callback(session.delete, missing_ok=True)
            ways.append(
                _Way(
                    f"S={count}",
                    count,
                    True,
                    servers[:count],
                    session,
                    session.layout.bytes_per_shard(),
                )
            )
        bursts = [(way, rx, w) for w in worker_counts for rx in receives for way in ways]
        for r in range(max(1, rounds)):
            for way, rx, w in bursts if r % 2 == 0 else bursts[::-1]:
                figures = _burst(pool, way, rx, w, shapes, seconds)
                measured.setdefault((way.name, rx, w), []).append(figures)
    rows = []
    for way, rx, w in bursts:
        row = _row(way, rx, w, measured[(way.name, rx, w)])
        row.update(
            parameters=model_parameters,
            tensors=len(shapes),
            push_bytes=push_bytes,
            optimizer=optimizer,
            seconds_per_round=seconds,
            rounds=rounds,
            nproc=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        )
        rows.append(row)
    by = {(r["way"], r["receive"], r["workers"]): r for r in rows}
    for row in rows:
        one = by.get(("S=1", row["receive"], row["workers"]))
        base = by.get(("plain", row["receive"], row["workers"]))
        row["vs_one_shard"] = row["pushes_per_s"] / one["pushes_per_s"] if one else None
        row["p50_vs_one_shard"] = row["p50_ms"] / one["p50_ms"] if one else None
        row["vs_plain"] = row["pushes_per_s"] / base["pushes_per_s"] if base else None
        row["p50_vs_plain"] = row["p50_ms"] / base["p50_ms"] if base else None
    return rows


def _burst(
    pool: ShardPushPool,
    way: _Way,
    receive: str,
    workers: int,
    shapes: dict[str, tuple[int, ...]],
    seconds: float,
) -> dict[str, Any]:
    job = PushJob(
        way.job_urls, way.sharded, way.session.id, tuple(shapes.items()), out=receive == "out"
    )
    before = way.session.info().iterations
    results, server_cpu, server_faults = pool.measure(job, workers, seconds, way.servers)
    advanced = way.session.info().iterations - before
    pushes = sum(r.pushes for r in results)
    if advanced != pushes + workers * WARM_UP_PUSHES:
        raise RuntimeError(
            f"{way.name}: {pushes} pushes and {workers * WARM_UP_PUSHES} warm-ups advanced the "
            f"session by {advanced} iterations"
        )
    worker_cpu = sum(r.cpu_seconds for r in results)
    worker_faults = sum(r.minor_faults for r in results)
    return {
        "pushes_per_s": sum(r.rate for r in results),
        "latencies": [t for r in results for t in r.latencies],
        "server_cpu_ms": 1e3 * server_cpu / pushes if pushes else float("nan"),
        "worker_cpu_ms": 1e3 * worker_cpu / pushes if pushes else float("nan"),
        "server_faults": server_faults / pushes if pushes else float("nan"),
        "worker_faults": worker_faults / pushes if pushes else float("nan"),
        "transports": {r.transport for r in results},
    }


def _row(way: _Way, receive: str, workers: int, bursts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    latencies = [1e3 * t for b in bursts for t in b["latencies"]]
    rates = [b["pushes_per_s"] for b in bursts]
    server = statistics.median(b["server_cpu_ms"] for b in bursts)
    worker = statistics.median(b["worker_cpu_ms"] for b in bursts)
    return {
        "benchmark": "shards",
        "way": way.name,
        "client": "sharded" if way.sharded else "plain",
        "shards": way.shards,
        "workers": workers,
        "receive": receive,
        "transport": "/".join(sorted(set().union(*(b["transports"] for b in bursts)))),
        "bytes_per_shard": way.bytes_per_shard,
        "max_shard_bytes": max(way.bytes_per_shard),
        "pushes_per_s": statistics.median(rates),
        "rounds_pushes_per_s": rates,
        "samples": len(latencies),
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "min_ms": min(latencies),
        "server_cpu_per_push_ms": server,
        "worker_cpu_per_push_ms": worker,
        "cpu_per_push_ms": server + worker,
        "server_faults_per_push": statistics.median(b["server_faults"] for b in bursts),
        "worker_faults_per_push": statistics.median(b["worker_faults"] for b in bursts),
    }


COLUMNS = [
    ("way", "way", "{}"),
    ("workers", "W", "{}"),
    ("receive", "receive", "{}"),
    ("transport", "transport", "{}"),
    ("max_shard_bytes", "max shard MB", "{:.3g}"),
    ("pushes_per_s", "pushes/s", "{:.1f}"),
    ("vs_one_shard", "vs S=1", "{:.2f}"),
    ("vs_plain", "vs plain", "{:.2f}"),
    ("p50_ms", "p50 ms", "{:.1f}"),
    ("p99_ms", "p99 ms", "{:.1f}"),
    ("server_cpu_per_push_ms", "server cpu/push ms", "{:.1f}"),
    ("worker_cpu_per_push_ms", "worker cpu/push ms", "{:.1f}"),
    ("cpu_per_push_ms", "cpu/push ms", "{:.1f}"),
    ("server_faults_per_push", "server faults/push", "{:.0f}"),
    ("worker_faults_per_push", "worker faults/push", "{:.0f}"),
]


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """:data:`COLUMNS` of ``rows``, the shard bytes in MB."""
    return format_table(
        [{**r, "max_shard_bytes": r["max_shard_bytes"] / 1e6} for r in rows], COLUMNS
    )


def main(argv: Sequence[str] | None = None) -> None:
    def counts(text: str) -> list[int]:
        return [int(x) for x in text.split(",")]

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=counts, default=[1, 2, 3], help="shard counts")
    parser.add_argument("--workers", type=counts, default=[1, 2], help="worker counts")
    parser.add_argument("--parameters", type=lambda s: int(float(s)), default=10**7)
    parser.add_argument("--seconds", type=float, default=0.75)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain Client rows")
    parser.add_argument(
        "--receives", default=",".join(RECEIVES), help="new (new arrays), out (out=) or both"
    )
    args = parser.parse_args(argv)
    rows = run(
        shard_counts=args.shards,
        worker_counts=args.workers,
        parameters=args.parameters,
        seconds=args.seconds,
        rounds=args.rounds,
        optimizer=args.optimizer,
        plain=not args.no_plain,
        receives=[r.strip() for r in args.receives.split(",")],
    )
    print(
        f"pushes of a {rows[0]['parameters']:,}-parameter model ({rows[0]['tensors']} tensors, "
        f"{rows[0]['push_bytes'] / 1e6:.1f} MB) into a sharded session; {rows[0]['nproc']} CPUs"
    )
    print(format_rows(rows))


if __name__ == "__main__":
    main()
