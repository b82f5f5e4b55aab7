"""Sync rounds against async steps: worker processes pushing into one session in each mode.

``workers`` worker processes (:class:`benchmarks.workers.WorkerPool`, one thread each), each
with its own ``client.Client`` (its defaults: the data plane), push a float32 gradient of
``parameters`` elements (one parameter ``w``, 1e6 by default, Adam) back to back, each push
answered with the new weights:

* ``sync``: into one session created with ``training=Sync(replicas_to_aggregate=workers)``.
  A push answers once its round holds a gradient from every worker and their mean has been
  applied as one step, so a step is a round of ``workers`` gradients;
* ``async``: into one session created with ``training=Async()``: every push is a step of its
  own.

Both move the same bytes per gradient (the gradient up, the weights back). The figures are
steps per second (sync: rounds per second) and gradients per second; their ratio, sync
gradients/s over async gradients/s, is what the barrier costs (a round waits for its slowest
worker) or saves (the optimizer's kernel runs once per round), reported without a goal.

Bursts alternate between the modes, so that a change of machine load hits both alike; each
figure is the median of its bursts. An async burst lasts ``seconds``; a sync burst pushes a
fixed count per worker (a round needs every worker: workers stopping at a deadline would
leave the last round unfilled), sized from the previous sync burst's rate to last about as
long. After every burst the session's iteration count must have advanced by exactly the
rounds (sync) or the pushes (async), the workers' warm-up pushes included, or the run fails.

Run ``python -m benchmarks.training_modes`` (``--help`` for options); ``run()`` returns the
rows.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

from paramserver.client import Client, Session
from paramserver.training import Async, Sync

from .push import ServerProcess, format_table
from .workers import TIMEOUT, Job, ThreadResult, WorkerPool, total_rate

__all__ = ["COLUMNS", "main", "run"]

#: Unmeasured pushes each worker makes when a burst sets up (see :mod:`benchmarks.workers`).
WARM_UP_PUSHES = 2
#: Rounds per worker of the first, unmeasured sync burst, which sizes the next one.
FIRST_SYNC_ROUNDS = 3


def run(
    *,
    workers: int = 4,
    parameters: int = 10**6,
    seconds: float = 2.0,
    rounds: int = 3,
    optimizer: str = "adam",
) -> list[dict[str, Any]]:
    """Two rows, ``sync`` then ``async``: median steps and gradients per second; the sync row
    holds the ratio of the gradients per second."""
    rng = np.random.default_rng(0)
    weights = {"w": rng.standard_normal(parameters, dtype=np.float32)}
    # A round that cannot fill gives up within the pool's own bound of a burst.
    sync_training = Sync(replicas_to_aggregate=workers, round_timeout_seconds=TIMEOUT)
    with (
        ServerProcess.paramserver() as server,
        WorkerPool(workers) as pool,
        Client(server.url, data_plane=False) as client,
    ):
        sync_session = client.create_session(weights, optimizer, training=sync_training)
        async_session = client.create_session(weights, optimizer, training=Async())
        try:
            bursts = _Bursts(pool, server, workers, parameters, seconds)
            bursts.sync(sync_session, FIRST_SYNC_ROUNDS)  # unmeasured: connects, sizes
            bursts.asynchronous(async_session, min(seconds, 0.5))
            measured: dict[str, list[dict[str, Any]]] = {"sync": [], "async": []}
            for r in range(max(1, rounds)):
                for mode in ("sync", "async") if r % 2 == 0 else ("async", "sync"):
                    if mode == "sync":
                        measured[mode].append(bursts.sync(sync_session, bursts.sync_count))
                    else:
                        measured[mode].append(bursts.asynchronous(async_session, seconds))
        finally:
            sync_session.delete(missing_ok=True)
            async_session.delete(missing_ok=True)
    rows = [
        _row("sync", sync_training.to_dict(), workers, measured["sync"]),
        _row("async", Async().to_dict(), 1, measured["async"]),
    ]
    for row in rows:
        row.update(workers=workers, parameters=parameters, optimizer=optimizer)
        row.update(seconds_per_round=seconds, rounds=rounds)
    rows[0]["sync_vs_async_gradients"] = rows[0]["gradients_per_s"] / rows[1]["gradients_per_s"]
    rows[1]["sync_vs_async_gradients"] = None
    return rows


class _Bursts:
    """One burst of either mode, measured: rates, CPU time, transports, and the check of the
    session's iteration count."""

    def __init__(
        self,
        pool: WorkerPool,
        server: ServerProcess,
        workers: int,
        parameters: int,
        seconds: float,
    ) -> None:
        self.pool = pool
        self.server = server
        self.workers = workers
        self.parameters = parameters
        self.seconds = seconds
        #: Rounds per worker of the next sync burst: about ``seconds`` at the last rate.
        self.sync_count = FIRST_SYNC_ROUNDS

    def sync(self, session: Session[Any], count: int) -> dict[str, Any]:
        """Every worker pushes ``count`` gradients into the sync session."""
        job = Job(
            "sync_client",
            url=self.server.url,
            session_ids=(session.id,),
            elements=self.parameters,
            pushes=count,
        )
        results, used, advanced = self._burst(session, job)
        if advanced != count + WARM_UP_PUSHES:
            raise RuntimeError(
                f"{self.workers} workers x {count + WARM_UP_PUSHES} sync pushes advanced the "
                f"session by {advanced} iterations, not {count + WARM_UP_PUSHES} rounds"
            )
        elapsed = max(r.seconds for r in results)  # every round ends at once for every worker
        steps = count / elapsed
        self.sync_count = max(FIRST_SYNC_ROUNDS, round(steps * self.seconds))
        return _figures(results, used, steps, self.workers * steps)

    def asynchronous(self, session: Session[Any], seconds: float) -> dict[str, Any]:
        """Every worker pushes into the async session for ``seconds``."""
        job = Job(
            "client", url=self.server.url, session_ids=(session.id,), elements=self.parameters
        )
        results, used, advanced = self._burst(session, job, seconds)
        pushes = sum(r.pushes for r in results) + self.workers * WARM_UP_PUSHES
        if advanced != pushes:
            raise RuntimeError(f"{pushes} async pushes advanced the session by {advanced}")
        rate = total_rate(results)
        return _figures(results, used, rate, rate)

    def _burst(
        self, session: Session[Any], job: Job, seconds: float | None = None
    ) -> tuple[list[ThreadResult], float, int]:
        """The threads' results, the server's CPU seconds, and the iterations the session
        advanced by (warm-up pushes included)."""
        before = session.info().iterations
        cpu0 = self.server.cpu_seconds()
        results = self.pool.burst(
            [job] * self.workers, self.seconds if seconds is None else seconds
        )
        used = self.server.cpu_seconds() - cpu0
        return results, used, session.info().iterations - before


def _figures(
    results: Sequence[ThreadResult], server_cpu: float, steps: float, gradients: float
) -> dict[str, Any]:
    """One burst's figures. CPU per gradient: the server's includes the burst's connecting
    and warm-up pushes (as in :mod:`benchmarks.concurrency`); the workers' is each process's
    CPU time over the measured pushes."""
    pushes = sum(r.pushes for r in results)
    worker_cpu = sum({r.process: r.process_cpu_seconds for r in results}.values())
    return {
        "steps_per_s": steps,
        "gradients_per_s": gradients,
        "server_cpu_ms": 1e3 * server_cpu / pushes if pushes else float("nan"),
        "worker_cpu_ms": 1e3 * worker_cpu / pushes if pushes else float("nan"),
        "transports": {r.transport for r in results},
    }


def _row(
    mode: str, training: dict[str, Any], per_step: int, bursts: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """A mode's row from its bursts (``per_step``: gradients per optimizer step)."""
    steps = [b["steps_per_s"] for b in bursts]
    gradients = [b["gradients_per_s"] for b in bursts]
    return {
        "benchmark": "training_modes",
        "mode": mode,
        "training": training,
        "transport": "/".join(sorted(set().union(*(b["transports"] for b in bursts)))),
        "steps_per_s": statistics.median(steps),
        "gradients_per_s": statistics.median(gradients),
        "gradients_per_step": per_step,
        "rounds_steps_per_s": steps,
        "rounds_gradients_per_s": gradients,
        "server_cpu_per_gradient_ms": statistics.median(b["server_cpu_ms"] for b in bursts),
        "worker_cpu_per_gradient_ms": statistics.median(b["worker_cpu_ms"] for b in bursts),
    }


COLUMNS = [
    ("mode", "mode", "{}"),
    ("transport", "transport", "{}"),
    ("workers", "workers", "{}"),
    ("parameters", "params", "{:.0e}"),
    ("steps_per_s", "steps/s", "{:.1f}"),
    ("gradients_per_step", "grads/step", "{:.0f}"),
    ("gradients_per_s", "grads/s", "{:.1f}"),
    ("sync_vs_async_gradients", "sync/async grads/s", "{:.2f}"),
    ("server_cpu_per_gradient_ms", "server cpu/grad ms", "{:.2f}"),
    ("worker_cpu_per_gradient_ms", "worker cpu/grad ms", "{:.2f}"),
]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--parameters", type=lambda s: int(float(s)), default=10**6)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--optimizer", default="adam")
    args = parser.parse_args(argv)
    rows = run(
        workers=args.workers,
        parameters=args.parameters,
        seconds=args.seconds,
        rounds=args.rounds,
        optimizer=args.optimizer,
    )
    print(
        f"{args.workers} workers pushing into one session: sync rounds (a step is a round of "
        f"{args.workers} gradients) against async steps (median of rounds)"
    )
    print(format_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
