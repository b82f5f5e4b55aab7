"""Ray actors train one classifier through a sharded session, each on its part of the data.

The driver (this process) makes the data, Gaussian blobs (``--classes`` classes, each a mixture
of ``--clusters`` clusters in ``--dim`` dimensions, fixed seed), and a model written in numpy:
a two-layer perceptron (tanh hidden layer, softmax output, cross-entropy loss,
backpropagation by hand). It creates one **sharded session** over the servers
(``Client([url0, url1, ...])``: each server holds one part of the parameters, the client
splits every push and joins every pull) with Keras's SGD with momentum, then starts
``--workers`` Ray actors. Each actor gets only its own shard of the training data, opens its
own ``Client(urls)`` in its Ray worker process, joins the session by its id and, once per
epoch, makes one pass over its shard: ``gradient of a minibatch on the weights it holds ->
push`` (the push answers the new weights). Between epochs the driver pulls the weights and
prints the held-out loss and accuracy; at the end it deletes the session (``--keep-session``
keeps it).

Sessions are asynchronous by default: every push is one step. With ``--sync`` the session
trains in synchronous rounds (``Sync(replicas_to_aggregate=N)``): a push answers once its
round holds a gradient from every worker, and their mean is applied as one step.

The servers are ``--urls`` (comma-separated, in shard order) or ``$PARAMSERVER_URLS``; with
neither, the example starts ``--shards`` servers of its own (``paramserver serve`` on free
ports of 127.0.0.1) and stops them at the end. Ray is a local instance started for the run
(``--ray-address`` joins an existing cluster instead; its workers must then reach the
servers' URLs); when the calling program has already started Ray, the example uses that
instance and leaves it running. So one command runs it::

    pip install 'paramserver[ray]'
    python examples/ray_workers.py
    python examples/ray_workers.py --sync --workers 3 --shards 3
    PARAMSERVER_URLS=http://ps-0.ps:8000,http://ps-1.ps:8000 python examples/ray_workers.py

``main(argv)`` returns a :class:`RayRun` (the evaluations before training and after every
epoch, each worker's report, the session's id and servers), or None without Ray.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import _common
import numpy as np
from _common import add_data_arguments, gradients, init_weights, local_server, make_blobs
from _common import evaluate as loss_and_accuracy

from paramserver import optimizers
from paramserver.client import Client, Sync, urls_from_env

try:
    import ray
except ImportError:  # the example is optional: say so instead of failing
    ray = None  # type: ignore[assignment]

# --- a Ray actor ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EpochReport:
    """What a worker did in one epoch: ``pushes`` gradients applied, their minibatches' mean
    loss, in the Ray worker process ``pid``."""

    worker: int
    pid: int
    pushes: int
    train_loss: float
    seconds: float


class Worker:
    """One worker, run as a Ray actor (``ray.remote(Worker)``) in a Ray worker process: its
    shard of the data, its own client of the servers, the session joined by id and the
    weights it computes on."""

    def __init__(
        self,
        worker: int,
        urls: Sequence[str],
        session_id: str,
        x: np.ndarray,
        y: np.ndarray,
        *,
        batch: int,
        seed: int,
        token: str | None,
    ) -> None:
        self.worker = worker
        self.x, self.y = x, y
        self.batch = batch
        self.rng = np.random.default_rng(seed)
        self.client = Client(list(urls), token=token)  # a ShardedClient: one client per shard
        self.session = self.client.session(session_id)  # checks the servers hold its shards
        self.weights = self.session.pull()

    def ready(self) -> int:
        """The process id, once the actor has joined the session and pulled its weights."""
        return os.getpid()

    def run_epoch(self, steps: int) -> EpochReport:
        """``steps`` pushes of minibatch gradients, drawn without replacement from the shard."""
        start = time.monotonic()
        order = self.rng.permutation(len(self.y))
        losses = []
        for step in range(steps):
            idx = order[step * self.batch : (step + 1) * self.batch]
            grads, loss = gradients(self.weights, self.x[idx], self.y[idx])
            # Async: one step on the current weights. Sync: answers once the round has every
            # worker's gradient, the same new weights for all of them.
            self.weights = self.session.push(grads)
            losses.append(loss)
        mean = float(np.mean(losses)) if losses else float("nan")
        return EpochReport(self.worker, os.getpid(), steps, mean, time.monotonic() - start)

    def close(self) -> None:
        self.client.close()


# --- the driver ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Held-out loss and accuracy after ``epoch`` epochs (``iterations`` steps applied)."""

    epoch: int
    iterations: int
    loss: float
    accuracy: float


@dataclasses.dataclass(frozen=True)
class RayRun:
    """What a run did: its session (kept only with ``--keep-session``) on ``urls``, the
    evaluations (before training, then after every epoch), and each worker's epochs."""

    session_id: str
    urls: list[str]
    sync: bool
    steps_per_epoch: int
    evaluations: list[Evaluation]
    reports: list[list[EpochReport]]  # [worker][epoch]

    @property
    def pushes(self) -> list[int]:
        """Gradients each worker pushed, in all."""
        return [sum(r.pushes for r in epochs) for epochs in self.reports]


@contextlib.contextmanager
def ray_instance(*, address: str, num_cpus: int, temp_dir: str | None = None) -> Iterator[None]:
    """Ray for the run. The instance this process already runs, left running; else a new
    local one (``address="local"``: ``num_cpus`` logical CPUs, no dashboard, quiet, its
    files under ``temp_dir``, default /tmp/ray) or the cluster at ``address``, shut down on
    leaving."""
    if ray.is_initialized():
        yield
        return
    options: dict[str, Any] = {
        "address": address,
        "logging_level": logging.ERROR,
        "log_to_driver": False,  # a worker's error still reaches the driver, with its traceback
    }
    if address == "local":
        options.update(num_cpus=num_cpus, include_dashboard=False)
        if temp_dir is not None:
            options["_temp_dir"] = temp_dir  # Unix sockets go under it: keep the path short
    ray.init(**options)
    try:
        yield
    finally:
        ray.shutdown()


def _wait_all(refs: list[Any]) -> list[Any]:
    """``ray.get(refs)``, raising a failed worker's error at once, not after the others."""
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)
    return list(ray.get(refs))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--urls",
        default=None,
        help="the servers' URLs, comma-separated, in shard order (default: $PARAMSERVER_URLS, or "
        "start --shards servers for the run)",
    )
    parser.add_argument("--shards", type=int, default=2, help="servers to start without URLs")
    parser.add_argument("--workers", type=int, default=2, help="Ray actors (N)")
    parser.add_argument(
        "--sync", action="store_true", help="synchronous rounds of N gradients (default: async)"
    )
    parser.add_argument("--epochs", type=int, default=5)
    add_data_arguments(parser)
    parser.add_argument("--hidden", type=int, default=32, help="hidden units")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD's learning rate")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument(
        "--round-timeout", type=float, default=60.0, help="--sync: seconds a round may wait"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--token", default=None, help="bearer token, if the servers need one")
    parser.add_argument(
        "--ray-address",
        default="local",
        help="'local' (default): a new local Ray instance; 'auto' or ray://host:port: a cluster",
    )
    parser.add_argument(
        "--keep-session", action="store_true", help="leave the session on the servers"
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.shards < 1 or args.epochs < 0:
        parser.error("--workers and --shards must be at least 1, --epochs at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> RayRun | None:
    args = parse_args(argv)
    if ray is None:
        print("Ray is not installed (pip install 'paramserver[ray]'): skipping this example.")
        return None
    if __name__ != "__main__":
        # Loaded from its file by another program (a test): Ray's workers cannot import this
        # module by name, so its classes and functions travel by value.
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # the model lives in _common, which Ray's workers cannot import either
    ray.cloudpickle.register_pickle_by_value(_common)
    with contextlib.ExitStack() as stack:
        if args.urls is not None:
            urls = [u.strip() for u in args.urls.split(",") if u.strip()]
        else:
            try:
                urls = urls_from_env()  # $PARAMSERVER_URLS
            except ValueError:  # unset or empty: servers of our own
                urls = [stack.enter_context(local_server()) for _ in range(args.shards)]
        stack.enter_context(ray_instance(address=args.ray_address, num_cpus=args.workers))
        return train(args, urls)


def train(args: argparse.Namespace, urls: list[str]) -> RayRun:
    """Create the sharded session, run the actors epoch by epoch, evaluate after each."""

    def say(text: str) -> None:
        if not args.quiet:
            print(text, flush=True)

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
    shards = np.array_split(rng.permutation(len(y_train)), args.workers)
    # The same number of pushes from every worker: a sync round needs one from each.
    steps = min(len(s) for s in shards) // args.batch
    training = (
        Sync(replicas_to_aggregate=args.workers, round_timeout_seconds=args.round_timeout)
        if args.sync
        else None
    )
    optimizer = optimizers.SGD(lr=args.lr, momentum=args.momentum)
    initial = init_weights(args.dim, args.hidden, args.classes, rng)
    history = [Evaluation(0, 0, *loss_and_accuracy(initial, x_test, y_test))]
    reports: list[list[EpochReport]] = [[] for _ in range(args.workers)]
    remote_worker = ray.remote(num_cpus=1, max_restarts=0)(Worker)

    with Client(urls, token=args.token) as client:
        session = client.create_session(initial, optimizer, training=training)
        layout = ", ".join(
            f"shard {i}: {[p.name for p in session.layout.on(i)]}" for i in range(len(urls))
        )
        mode = f"sync rounds of {args.workers} gradients" if args.sync else "async"
        say(f"session {session.id} over {len(urls)} servers ({layout})")
        say(
            f"{args.workers} Ray actors, {mode}, {args.epochs} epochs of {steps} pushes per "
            f"worker, SGD(lr={args.lr}, momentum={args.momentum})"
        )
        say(
            f"epoch 0: test loss {history[0].loss:.4f}, accuracy {history[0].accuracy:6.1%} "
            f"(chance {1 / args.classes:.0%})"
        )
        actors: list[Any] = []
        try:
            actors = [
                remote_worker.remote(
                    i,
                    urls,
                    session.id,
                    x_train[shard],
                    y_train[shard],
                    batch=args.batch,
                    seed=args.seed * 1000 + i,
                    token=args.token,
                )
                for i, shard in enumerate(shards)
            ]
            # Every actor has pulled before any pushes: a sharded pull during asynchronous
            # pushes can find the shards one step apart (the driver, too, pulls only between
            # epochs, when every push of the epoch has been applied).
            pids = _wait_all([a.ready.remote() for a in actors])
            say(f"actors ready in Ray worker processes {pids}")
            for epoch in range(1, args.epochs + 1):
                start = time.monotonic()
                done: list[EpochReport] = _wait_all([a.run_epoch.remote(steps) for a in actors])
                for report in done:
                    reports[report.worker].append(report)
                weights = session.pull()
                history.append(
                    Evaluation(
                        epoch,
                        session.last_iterations or 0,
                        *loss_and_accuracy(weights, x_test, y_test),
                    )
                )
                train_loss = np.mean([r.train_loss for r in done])
                say(
                    f"epoch {epoch} (iteration {history[-1].iterations}): train loss "
                    f"{train_loss:.4f}, test loss {history[-1].loss:.4f}, accuracy "
                    f"{history[-1].accuracy:6.1%} ({time.monotonic() - start:.1f} s)"
                )
            _wait_all([a.close.remote() for a in actors])
            for i, epochs in enumerate(reports):
                pid = epochs[0].pid if epochs else "-"
                say(f"worker {i} (pid {pid}): {sum(r.pushes for r in epochs)} pushes")
        finally:
            for actor in actors:
                ray.kill(actor, no_restart=True)
            if not args.keep_session:
                session.delete(missing_ok=True)
    final = history[-1]
    say(
        f"final: test loss {final.loss:.4f} (from {history[0].loss:.4f}), accuracy "
        f"{final.accuracy:.1%} (chance {1 / args.classes:.0%})"
        + (f"; session {session.id} kept" if args.keep_session else "")
    )
    return RayRun(session.id, urls, args.sync, steps, history, reports)


if __name__ == "__main__":
    main()
