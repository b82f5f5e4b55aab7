"""Four worker processes train one classifier through a parameter server in sync mode.

The example makes its own data, Gaussian blobs (``--classes`` classes, each a mixture of
``--clusters`` clusters in ``--dim`` dimensions, fixed seed), and a model written in numpy: a
two-layer perceptron (tanh hidden layer, softmax output, cross-entropy loss, backpropagation by
hand). It creates one session with ``training=Sync(replicas_to_aggregate=4)``, Keras's SGD with
momentum, and starts ``--workers`` worker processes (``multiprocessing``, spawned). Each joins
the session by its id, takes its own shard of the training data, and loops ``gradient of a
minibatch on the weights it holds -> push``. In sync mode a push answers once its round holds
a gradient from every worker: the server applies their mean as one step, and every worker of
the round gets the same new weights back, so the workers stay in lockstep as
``SyncReplicasOptimizer`` keeps TensorFlow's. The main process is the evaluator: after each
epoch's worth of rounds it waits for that iteration (``pull(min_iterations=K, wait=S)``) and
prints the loss and accuracy on held-out data.

``--backups 1`` adds a backup worker (``total_num_replicas=5``): a round still applies the
first 4 gradients, so a slow worker no longer holds everyone back; a gradient that arrives
after its round was applied is refused with ``StaleGradient``, and its worker pulls the new
weights and goes on.

Without ``--url`` the example starts a server of its own (``paramserver serve`` on a free port
of 127.0.0.1) and stops it at the end, so one command runs it::

    python examples/sync_workers.py
    python examples/sync_workers.py --backups 1
    python examples/sync_workers.py --url http://127.0.0.1:8000   # a server already running

``main(argv)`` returns the evaluations (before training, then after every epoch).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
from collections.abc import Sequence
from typing import Any

import numpy as np
from _common import add_data_arguments, evaluate, gradients, init_weights, local_server, make_blobs

from paramserver import optimizers
from paramserver.client import Client, DictWeights, Session, StaleGradient, Sync

# --- a worker process ----------------------------------------------------------------------


def iterations_of(session: Session[DictWeights]) -> int:
    """The iteration count of the weights the handle last received (every push and pull sets
    it): what its next push says its gradient was computed on."""
    if session.base_iterations is None:
        raise RuntimeError("the handle has received no weights yet: pull first")
    return session.base_iterations


@dataclasses.dataclass(frozen=True)
class WorkerReport:
    """What a worker sends back: the gradients it pushed that were applied, those refused as
    stale, and the error that stopped it (formatted), if one did."""

    worker: int
    applied: int
    stale: int
    error: str | None = None


def train_worker(
    worker: int,
    url: str,
    session_id: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    rounds: int,
    batch: int,
    seed: int,
    token: str | None,
    reports: Any,
) -> None:
    """One worker process: join the session, then push minibatch gradients from its shard
    until the session has applied ``rounds`` rounds; its :class:`WorkerReport` goes to the
    queue ``reports``."""
    rng = np.random.default_rng(seed)
    applied = stale = 0
    try:
        with Client(url, token=token) as client:
            session: Session[DictWeights] = client.session(session_id)
            # The weights this worker computes on; the handle remembers their iteration count
            # (session.base_iterations) and sends it with the next push.
            weights = session.pull()
            while iterations_of(session) < rounds:
                idx = rng.integers(0, len(y), size=batch)
                grads, _ = gradients(weights, x[idx], y[idx])
                try:
                    # Answers once the round has all its gradients: the same new weights for
                    # every worker of the round.
                    weights = session.push(grads)
                    applied += 1
                except StaleGradient:
                    # Our round was filled without us (we are the backup this time): catch up.
                    stale += 1
                    weights = session.pull()
    except Exception as exc:  # reported to the main process, which raises it
        reports.put(WorkerReport(worker, applied, stale, f"{type(exc).__name__}: {exc}"))
        raise
    reports.put(WorkerReport(worker, applied, stale))


# --- the main process ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Held-out loss and accuracy of the weights at ``iterations`` (rounds applied)."""

    iterations: int
    loss: float
    accuracy: float


def _wait_for(session: Session[DictWeights], iterations: int, procs: Sequence[Any]) -> DictWeights:
    """The weights once the session reaches ``iterations``; raises if a worker died first."""
    while True:
        weights = session.pull(min_iterations=iterations, wait=2.0)
        if iterations_of(session) >= iterations:
            return weights
        dead = [p.name for p in procs if p.exitcode not in (None, 0)]
        if dead:
            raise RuntimeError(f"{', '.join(dead)} failed (see its traceback above)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url", default=None, help="the server's base URL (default: start one for the run)"
    )
    parser.add_argument("--workers", type=int, default=4, help="gradients per round (N)")
    parser.add_argument(
        "--backups", type=int, default=0, help="extra workers whose late gradients are dropped"
    )
    parser.add_argument("--epochs", type=int, default=8)
    add_data_arguments(parser)
    parser.add_argument("--hidden", type=int, default=32, help="hidden units")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD's learning rate")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument(
        "--round-timeout", type=float, default=60.0, help="seconds a round may wait to fill"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--token", default=None, help="bearer token, if the server needs one")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[Evaluation]:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        url = args.url if args.url is not None else stack.enter_context(local_server())
        return train(args, url)


def train(args: argparse.Namespace, url: str) -> list[Evaluation]:
    """Create the session, run the workers and evaluate after every epoch."""
    rng = np.random.default_rng(args.seed)
    x, y = make_blobs(
        args.samples,
        dim=args.dim,
        classes=args.classes,
        clusters=args.clusters,
        spread=args.spread,
        rng=rng,
    )
    x_test, y_test, x_train, y_train = x[:1000], y[:1000], x[1000:], y[1000:]
    total = args.workers + args.backups
    shards = np.array_split(np.arange(len(y_train)), total)
    rounds_per_epoch = min(len(s) for s in shards) // args.batch
    rounds = args.epochs * rounds_per_epoch
    training = Sync(
        replicas_to_aggregate=args.workers,
        total_num_replicas=total,
        round_timeout_seconds=args.round_timeout,
    )
    optimizer = optimizers.SGD(lr=args.lr, momentum=args.momentum)
    initial = init_weights(args.dim, args.hidden, args.classes, rng)

    def say(text: str) -> None:
        if not args.quiet:
            print(text, flush=True)

    history = [Evaluation(0, *evaluate(initial, x_test, y_test))]
    context = multiprocessing.get_context("spawn")
    with Client(url, token=args.token) as client:
        session = client.create_session(initial, optimizer, training=training)
        say(
            f"session {session.id} at {url}: sync rounds of {args.workers} gradients from "
            f"{total} workers ({args.backups} backup), {rounds} rounds "
            f"({rounds_per_epoch} per epoch), SGD(lr={args.lr}, momentum={args.momentum})"
        )
        say(
            f"iteration {0:4d}: test loss {history[0].loss:.4f}, accuracy "
            f"{history[0].accuracy:6.1%} (chance {1 / args.classes:.0%})"
        )
        reports = context.Queue()
        procs = [
            context.Process(
                target=train_worker,
                args=(i, url, session.id, x_train[shard], y_train[shard]),
                kwargs={
                    "rounds": rounds,
                    "batch": args.batch,
                    "seed": args.seed * 1000 + i,
                    "token": args.token,
                    "reports": reports,
                },
                name=f"worker {i}",
            )
            for i, shard in enumerate(shards)
        ]
        try:
            for p in procs:
                p.start()
            for epoch in range(1, args.epochs + 1):
                weights = _wait_for(session, epoch * rounds_per_epoch, procs)
                history.append(
                    Evaluation(iterations_of(session), *evaluate(weights, x_test, y_test))
                )
                say(
                    f"iteration {history[-1].iterations:4d} (epoch {epoch}): test loss "
                    f"{history[-1].loss:.4f}, accuracy {history[-1].accuracy:6.1%}"
                )
            for report in sorted((reports.get(timeout=60) for _ in procs), key=lambda r: r.worker):
                if report.error is not None:
                    raise RuntimeError(f"worker {report.worker} failed: {report.error}")
                say(
                    f"worker {report.worker}: {report.applied} gradients applied, "
                    f"{report.stale} refused as stale"
                )
            for p in procs:
                p.join(30)
            info = session.info()
            say(f"session: {info.iterations} iterations applied, {info.training}")
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
                    p.join(10)
            session.delete(missing_ok=True)
    final = history[-1]
    say(
        f"final: test loss {final.loss:.4f} (from {history[0].loss:.4f}), accuracy "
        f"{final.accuracy:.1%} (chance {1 / args.classes:.0%})"
    )
    return history


if __name__ == "__main__":
    main()
