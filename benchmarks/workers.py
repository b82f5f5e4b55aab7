"""Worker processes that push at once: the load of :mod:`benchmarks.concurrency` and of the
client rows of :mod:`benchmarks.throughput`.

A :class:`WorkerPool` starts ``processes`` worker processes (``multiprocessing``, spawned: a
fresh interpreter each, nothing inherited from the benchmark but its ``sys.path``), each
driving ``threads`` threads, and each thread owns its connection: a ``client.Client`` of its
own (the product's client, as a training worker holds it), or an :class:`EchoConnection` to
the TCP echo. :meth:`WorkerPool.burst` hands every process a :class:`Job`, waits until every
connection is open and warmed up (two unmeasured pushes each), then starts every thread at
one instant (``time.monotonic``, which is one clock for the whole machine on Linux) and lets
each push back to back until the burst's end (or, for a job with a count of pushes, until
it has pushed that many). Each thread reports its pushes and the seconds from the start to its
last answer; each process its CPU time over the burst.

So that a server and its load run as separate processes, the benchmark process itself sends
nothing during a burst; every wait of the pool is bounded (:data:`TIMEOUT`).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["TIMEOUT", "Job", "ThreadResult", "WorkerPool", "total_rate"]

#: Seconds any step of a burst may take beyond its length before the pool gives up.
TIMEOUT = 120.0


@dataclasses.dataclass(frozen=True)
class Job:
    """What one worker process does in a burst.

    ``kind="client"``: each of its threads pushes a float32 gradient of ``elements`` elements
    (parameter ``w``) with its own ``Client(url, data_plane=data_plane)`` to the session
    ``session_ids[i]`` (one id per thread), the new weights returned.
    ``kind="sync_client"``: the same into a sync-mode session, ``pushes`` set; each thread
    pulls once after joining, so that its first gradient is based on the session's current
    weights. ``kind="tcp_echo"``: each thread sends ``n_in`` bytes to the TCP echo on ``port``
    and receives ``n_out``.

    ``pushes``: each thread pushes exactly this many times, however long that takes (bounded
    by the burst's length plus :data:`TIMEOUT`), instead of until the burst's end. A sync round
    needs a gradient from every worker: workers that each stopped at a deadline would leave
    the last round unfilled, while a count ends them all on the same round.
    """

    kind: str
    threads: int = 1
    url: str = ""
    data_plane: bool = True
    session_ids: tuple[str, ...] = ()
    elements: int = 10
    port: int = 0
    n_in: int = 0
    n_out: int = 0
    pushes: int | None = None


@dataclasses.dataclass(frozen=True)
class ThreadResult:
    """One thread's burst: ``pushes`` answered in ``seconds`` (start to last answer); the
    ``transport`` its client used (``"data plane"``, ``"http"``; ``"tcp"`` for the echo);
    ``process_cpu_seconds`` is its process's CPU time over the burst (every thread)."""

    process: int
    thread: int
    pushes: int
    seconds: float
    transport: str
    process_cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.pushes / self.seconds if self.seconds > 0 else 0.0


def total_rate(results: Sequence[ThreadResult]) -> float:
    """Pushes per second of all threads together: the sum of their rates (they ran over the
    same interval, give or take the last push of each)."""
    return sum(r.rate for r in results)


# --- in the worker process -----------------------------------------------------------------


class _Load:
    """A worker process's connections for one job, one per thread."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.closers: list[Callable[[], None]] = []
        self.pushes: list[Callable[[], None]] = []
        self.transports: list[Callable[[], str]] = []
        if job.kind in ("client", "sync_client"):
            self._clients()
        elif job.kind == "tcp_echo":
            self._echoes()
        else:
            raise ValueError(f"unknown job kind {job.kind!r}")
        for push in self.pushes:  # connect and warm up
            push()
            push()

    def _clients(self) -> None:
        import numpy as np

        from paramserver.client import Client

        from .push import transport_of

        job = self.job
        if len(job.session_ids) != job.threads:
            raise ValueError(f"{job.threads} threads need as many session ids")
        if job.kind == "sync_client" and job.pushes is None:
            raise ValueError("a sync_client job needs a count of pushes")
        rng = np.random.default_rng(2)
        for session_id in job.session_ids:
            client = Client(job.url, data_plane=job.data_plane)
            self.closers.append(client.close)
            session = client.session(session_id)
            if job.kind == "sync_client":
                session.pull()  # the handle's base_iterations: the session's count
            grads = {"w": rng.standard_normal(job.elements, dtype=np.float32) * np.float32(1e-3)}

            def push(session: Any = session, grads: Any = grads) -> None:
                session.push(grads)

            self.pushes.append(push)
            self.transports.append(lambda client=client: transport_of(client))

    def _echoes(self) -> None:
        from .push import EchoConnection

        job = self.job
        payload = bytes(job.n_in)
        for _ in range(job.threads):
            conn = EchoConnection(job.port)
            self.closers.append(conn.close)

            def push(conn: EchoConnection = conn) -> None:
                conn.round_trip(payload, job.n_out)

            self.pushes.append(push)
            self.transports.append(lambda: "tcp")

    def run(self, index: int, start_at: float, seconds: float) -> list[ThreadResult]:
        counts = [0] * len(self.pushes)
        ends = [start_at] * len(self.pushes)
        errors: list[BaseException] = []
        deadline = start_at + seconds
        count = self.job.pushes

        def more(i: int) -> bool:
            if count is not None:
                return counts[i] < count
            return time.monotonic() < deadline

        def loop(i: int) -> None:
            push = self.pushes[i]
            time.sleep(max(0.0, start_at - time.monotonic()))
            try:
                while more(i):
                    push()
                    counts[i] += 1
                    ends[i] = time.monotonic()
            except BaseException as exc:  # reported to the benchmark, which raises it
                errors.append(exc)

        threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(self.pushes))]
        cpu0 = time.process_time()
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + TIMEOUT)
        cpu = time.process_time() - cpu0
        if errors:
            raise errors[0]
        if any(t.is_alive() for t in threads):
            raise TimeoutError("a worker thread did not finish its burst")
        return [
            ThreadResult(index, i, counts[i], ends[i] - start_at, self.transports[i](), cpu)
            for i in range(len(self.pushes))
        ]

    def close(self) -> None:
        for close in self.closers:
            close()


def _worker_main(conn: Connection, index: int) -> None:  # pragma: no cover - a child process
    """A worker process: serves ``setup``, ``run``, ``teardown`` and ``exit`` messages."""
    load: _Load | None = None
    while True:
        message = conn.recv()
        op = message[0]
        try:
            if op == "setup":
                load = _Load(message[1])
                conn.send(("ok", None))
            elif op == "run":
                assert load is not None
                conn.send(("ok", load.run(index, message[1], message[2])))
            elif op == "teardown":
                if load is not None:
                    load.close()
                load = None
                conn.send(("ok", None))
            elif op == "exit":
                return
        except BaseException:
            conn.send(("error", traceback.format_exc()))


# --- in the benchmark ----------------------------------------------------------------------


class WorkerPool:
    """``processes`` worker processes, started on entering, stopped on leaving."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._conns: list[Connection] = []
        self._procs: list[Any] = []

    #: What each process runs (a subclass's own loop), and its processes' name.
    target: Any = None
    name = "worker"

    def __enter__(self) -> WorkerPool:
        context = multiprocessing.get_context("spawn")
        target = type(self).target or _worker_main
        try:
            for index in range(self.processes):
                ours, theirs = context.Pipe()
                proc = context.Process(
                    target=target, args=(theirs, index), daemon=True, name=f"{self.name}-{index}"
                )
                proc.start()
                theirs.close()
                self._conns.append(ours)
                self._procs.append(proc)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for conn in self._conns:
            try:
                conn.send(("exit",))
            except OSError:
                pass
        for proc in self._procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(10)
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []

    def _ask(self, messages: Sequence[tuple[Any, ...]], timeout: float) -> list[Any]:
        """Send one message to each process; their answers, in order (raises a worker's
        error, or after ``timeout`` seconds)."""
        for conn, message in zip(self._conns, messages, strict=True):
            conn.send(message)
        deadline = time.monotonic() + timeout
        answers = []
        for index, conn in enumerate(self._conns):
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"worker {index} did not answer within {timeout:g} s")
            status, value = conn.recv()
            if status != "ok":
                raise RuntimeError(f"worker {index} failed:\n{value}")
            answers.append(value)
        return answers

    def burst(self, jobs: Sequence[Job], seconds: float) -> list[ThreadResult]:
        """Every process runs its job (``jobs[i]`` for process ``i``) for ``seconds`` (or its
        count of pushes), all threads starting together once all are connected; every
        thread's result."""
        if len(jobs) != self.processes:
            raise ValueError(f"{self.processes} processes need as many jobs")
        # On an error the workers may be out of step: the pool is then only good for leaving.
        self._ask([("setup", job) for job in jobs], TIMEOUT)
        start_at = time.monotonic() + 0.05
        results = self._ask([("run", start_at, seconds)] * self.processes, seconds + TIMEOUT)
        self._ask([("teardown",)] * self.processes, TIMEOUT)
        return [r for per_process in results for r in per_process]
