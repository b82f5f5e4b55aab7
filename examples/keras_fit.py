"""tf.keras ``model.fit`` through a parameter server: one worker, or several worker processes.

The example makes its own data, Gaussian blobs (``--classes`` classes, each a mixture of
``--clusters`` clusters in ``--dim`` dimensions, fixed seed; 1000 points held out), and a
Keras model, a two-layer perceptron. The training is Keras's own ``compile`` + ``fit``: the
optimizer given to ``compile`` is the session's (:mod:`paramserver.client.keras`), so each
step of ``fit`` pushes the gradients and takes the weights the server answers. The update rule
is Keras 2.2's SGD with momentum, run by the server.

* ``--workers 1`` (the default): this process creates the session from its model and fits.
* ``--workers 4``: this process creates the session (``Sync(replicas_to_aggregate=4)``) and
  starts four worker processes (``multiprocessing``, spawned). Each builds the model with the
  same code (its own random initial weights and Keras's own layer names, which do not matter),
  joins the session by its id (which checks the parameters and loads the session's weights),
  and runs ``model.fit`` on its shard. A round's four gradients become one step; every worker
  gets the round's weights back, so they stay in lockstep. This process follows the session
  and evaluates the weights on the held-out data after every epoch.

Without ``--url`` the example starts a server of its own (``paramserver serve`` on a free port
of 127.0.0.1) and stops it at the end, so one command runs it::

    python examples/keras_fit.py
    python examples/keras_fit.py --workers 4
    python examples/keras_fit.py --url http://127.0.0.1:8000   # a server already running

It needs TensorFlow (``pip install 'paramserver[tensorflow]'``). ``main(argv)`` returns the
held-out accuracies (before training, then after every epoch); the process exits 1 if the last
is below ``--target``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter

from _common import add_data_arguments, local_server, make_blobs

from paramserver import optimizers
from paramserver.client import Client, Sync

try:
    import keras
    import tensorflow as tf

    from paramserver.client import keras as ps_keras
except ImportError as exc:  # the example needs TensorFlow: say so instead of a traceback
    sys.exit(f"examples/keras_fit.py: {exc}")

# --- the data and the model ----------------------------------------------------------------


def build_model(args: argparse.Namespace, seed: int) -> Any:
    """The same code in every process; ``seed`` only picks the initial weights (a joining
    worker replaces them with the session's)."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((args.dim,)),
            keras.layers.Dense(args.hidden, activation="relu"),
            keras.layers.Dense(args.hidden, activation="relu"),
            keras.layers.Dense(args.classes),
        ]
    )
    return model


def compile_model(model: Any, remote: Any) -> None:
    """``compile`` as for any optimizer: the remote one is the session's."""
    model.compile(
        optimizer=remote,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def held_out_accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    logits = np.asarray(model(x, training=False))
    return float((logits.argmax(axis=1) == y).mean())


# --- a worker process ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WorkerReport:
    """What a worker sends back: its steps and last training loss, or the error that stopped
    it (formatted)."""

    worker: int
    steps: int = 0
    loss: float = float("nan")
    error: str | None = None


def train_worker(
    worker: int,
    url: str,
    session_id: str,
    x: np.ndarray,
    y: np.ndarray,
    args: argparse.Namespace,
    reports: Any,
) -> None:
    """One worker process: build the model, join the session, ``fit`` on its shard."""
    # A small model gains nothing from TensorFlow's thread pools; several workers sharing a
    # machine would only compete for its cores.
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    try:
        with Client(url, token=args.token) as client:
            model = build_model(args, seed=args.seed + 1 + worker)
            remote = ps_keras.join_session(client, model, session_id)
            compile_model(model, remote)
            history = model.fit(x, y, batch_size=args.batch, epochs=args.epochs, verbose=0)
            report = WorkerReport(
                worker, int(remote.iterations.numpy()), history.history["loss"][-1]
            )
    except Exception as exc:  # reported to the main process, which raises it
        reports.put(WorkerReport(worker, error=f"{type(exc).__name__}: {exc}"))
        raise
    reports.put(report)


# --- the main process ----------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url", default=None, help="the server's base URL (default: start one for the run)"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="worker processes (more than 1: sync rounds)"
    )
    parser.add_argument("--epochs", type=int, default=6)
    add_data_arguments(parser)
    parser.add_argument("--hidden", type=int, default=32, help="units per hidden layer")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD's learning rate")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument(
        "--round-timeout", type=float, default=60.0, help="seconds a sync round may wait"
    )
    parser.add_argument("--target", type=float, default=0.85, help="held-out accuracy to reach")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--token", default=None, help="bearer token, if the server needs one")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> list[float]:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        url = args.url if args.url is not None else stack.enter_context(local_server())
        return train(args, url)


def train(args: argparse.Namespace, url: str) -> list[float]:
    """Create the session, fit (here, or in the worker processes), evaluate every epoch."""
    rng = np.random.default_rng(args.seed)
    x, y = make_blobs(
        args.samples,
        dim=args.dim,
        classes=args.classes,
        clusters=args.clusters,
        spread=args.spread,
        rng=rng,
    )
    y = y.astype(np.int32)
    x_test, y_test, x_train, y_train = x[:1000], y[:1000], x[1000:], y[1000:]

    def say(text: str) -> None:
        if not args.quiet:
            print(text, flush=True)

    optimizer = optimizers.SGD(lr=args.lr, momentum=args.momentum)
    model = build_model(args, seed=args.seed)
    accuracies = [held_out_accuracy(model, x_test, y_test)]
    with Client(url, token=args.token) as client:
        if args.workers == 1:
            remote = ps_keras.create_session(client, model, optimizer)
        else:
            training = Sync(
                replicas_to_aggregate=args.workers, round_timeout_seconds=args.round_timeout
            )
            remote = ps_keras.create_session(client, model, optimizer, training=training)
        say(
            f"session {remote.session.id} at {url}: {len(remote.names)} parameters "
            f"({', '.join(remote.names)}), SGD(lr={args.lr}, momentum={args.momentum}), "
            f"{args.workers} worker{'s' if args.workers > 1 else ''}"
        )
        say(f"before training: held-out accuracy {accuracies[0]:6.1%}")
        try:
            if args.workers == 1:
                accuracies += fit_here(args, model, remote, x_train, y_train, x_test, y_test, say)
            else:
                accuracies += fit_in_workers(
                    args, url, model, remote, x_train, y_train, x_test, y_test, say
                )
            info = remote.session.info()
            say(f"session: {info.iterations} steps applied ({info.training})")
        finally:
            remote.session.delete(missing_ok=True)
    final = accuracies[-1]
    say(
        f"final: held-out accuracy {final:.1%} (target {args.target:.0%}, chance "
        f"{1 / args.classes:.0%})"
    )
    return accuracies


def fit_here(
    args: argparse.Namespace,
    model: Any,
    remote: Any,
    x: np.ndarray,
    y: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    say: Any,
) -> list[float]:
    """One worker: this process fits; a callback evaluates after every epoch."""
    accuracies: list[float] = []

    class Evaluate(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            accuracies.append(held_out_accuracy(model, x_test, y_test))
            say(
                f"epoch {epoch + 1} (step {int(remote.iterations.numpy())}): training loss "
                f"{(logs or {}).get('loss', float('nan')):.4f}, held-out accuracy "
                f"{accuracies[-1]:6.1%}"
            )

    compile_model(model, remote)
    model.fit(x, y, batch_size=args.batch, epochs=args.epochs, verbose=0, callbacks=[Evaluate()])
    return accuracies


def fit_in_workers(
    args: argparse.Namespace,
    url: str,
    model: Any,
    remote: Any,
    x: np.ndarray,
    y: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    say: Any,
) -> list[float]:
    """``--workers`` processes fit equal shards (so every round fills); this process waits
    for each epoch's last round and evaluates the session's weights."""
    per_worker = len(y) // args.workers
    steps_per_epoch = -(-per_worker // args.batch)
    context = multiprocessing.get_context("spawn")
    reports = context.Queue()
    procs = [
        context.Process(
            target=train_worker,
            args=(
                i,
                url,
                remote.session.id,
                x[i * per_worker : (i + 1) * per_worker],
                y[i * per_worker : (i + 1) * per_worker],
                args,
                reports,
            ),
            name=f"worker {i}",
        )
        for i in range(args.workers)
    ]
    accuracies: list[float] = []
    try:
        for p in procs:
            p.start()
        for epoch in range(1, args.epochs + 1):
            goal = epoch * steps_per_epoch
            while ps_keras.pull_weights(remote, min_iterations=goal, wait=2.0) < goal:
                dead = [p.name for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"{', '.join(dead)} failed (see its traceback above)")
            accuracies.append(held_out_accuracy(model, x_test, y_test))
            say(f"epoch {epoch} (step {goal}): held-out accuracy {accuracies[-1]:6.1%}")
        for report in sorted((reports.get(timeout=60) for _ in procs), key=lambda r: r.worker):
            if report.error is not None:
                raise RuntimeError(f"worker {report.worker} failed: {report.error}")
            say(f"worker {report.worker}: {report.steps} steps, training loss {report.loss:.4f}")
        for p in procs:
            p.join(30)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(10)
    return accuracies


if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(0 if main(argv)[-1] >= parse_args(argv).target else 1)
