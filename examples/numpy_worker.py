"""Several workers train one linear regression through a parameter server, with numpy only.

The example makes its own data (``y = X @ w_true + b_true + noise``), creates a session with
the initial weights and a Keras optimizer, then runs epochs: in each, ``--workers`` threads
take disjoint shards of the data and loop ``pull weights -> gradient of the mean squared error
on a minibatch -> push``, the push answering the new weights. Between epochs the main thread
pulls the weights and prints the loss on the whole data set. The session is deleted at the end.

Run a server first (``paramserver serve``), then::

    python examples/numpy_worker.py --url http://127.0.0.1:8000

``main(argv)`` returns the loss history (before training, then after every epoch).
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Sequence

import numpy as np

from paramserver import Client, ListWeights, Session, optimizers


def make_data(
    n: int, dim: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Features, targets and the true parameters of a noisy linear model (float32)."""
    x = rng.normal(size=(n, dim)).astype(np.float32)
    w_true = rng.normal(size=dim).astype(np.float32)
    b_true = float(rng.normal())
    y = (x @ w_true + b_true + 0.01 * rng.normal(size=n)).astype(np.float32)
    return x, y, w_true, b_true


def mse(weights: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    w, b = weights
    return float(np.mean((x @ w + b - y) ** 2))


def gradients(weights: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """d/dw and d/db of the mean squared error, in the order of the weights list."""
    w, b = weights
    err = x @ w + b - y
    return [(2.0 / len(y)) * (x.T @ err), np.asarray(2.0 * err.mean(), dtype=b.dtype)]


def worker(
    session: Session[ListWeights],
    x: np.ndarray,
    y: np.ndarray,
    *,
    steps: int,
    batch: int,
    seed: int,
    errors: list[BaseException],
) -> None:
    """One worker's epoch: ``steps`` pushes of minibatch gradients from its shard."""
    rng = np.random.default_rng(seed)
    try:
        weights = session.pull()
        for _ in range(steps):
            idx = rng.integers(0, len(y), size=batch)
            weights = session.push(gradients(weights, x[idx], y[idx]))
    except BaseException as exc:  # handed to the main thread, which re-raises it
        errors.append(exc)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    parser.add_argument("--workers", type=int, default=4, help="worker threads")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=25, help="pushes per worker per epoch")
    parser.add_argument("--batch", type=int, default=64, help="minibatch size")
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--dim", type=int, default=20, help="number of features")
    parser.add_argument("--lr", type=float, default=0.05, help="Adam's learning rate")
    parser.add_argument(
        "--decay", type=float, default=0.01, help="lr decay: lr / (1 + decay * iterations)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--token", default=None, help="bearer token, if the server needs one")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[float]:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    x, y, _, _ = make_data(args.samples, args.dim, rng)
    initial = [np.zeros(args.dim, dtype=np.float32), np.zeros((), dtype=np.float32)]
    shards = np.array_split(np.arange(args.samples), args.workers)

    def say(text: str) -> None:
        if not args.quiet:
            print(text, flush=True)

    with Client(args.url, token=args.token) as client:
        # A list of arrays, as model.get_weights() gives: pushes take and return lists too.
        session = client.create_session(initial, optimizers.Adam(lr=args.lr, decay=args.decay))
        say(f"session {session.id}: {args.workers} workers, {args.epochs} epochs")
        try:
            history = [mse(initial, x, y)]
            say(f"epoch 0: loss {history[0]:.6f}")
            for epoch in range(1, args.epochs + 1):
                failures: list[BaseException] = []
                threads = [
                    threading.Thread(
                        target=worker,
                        args=(session, x[shard], y[shard]),
                        kwargs={
                            "steps": args.steps,
                            "batch": args.batch,
                            "seed": args.seed * 1000 + epoch * 100 + i,
                            "errors": failures,
                        },
                    )
                    for i, shard in enumerate(shards)
                ]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                if failures:
                    raise failures[0]
                history.append(mse(session.pull(), x, y))
                say(f"epoch {epoch}: loss {history[-1]:.6f} (iterations {session.last_iterations})")
        finally:
            session.delete()
    say(f"loss fell {history[0] / max(history[-1], 1e-30):.0f}x")
    return history


if __name__ == "__main__":
    main()
