"""Train a PyTorch classifier through a parameter server with ``paramserver.client.torch``.

The training loop is torch's own: ``optimizer.zero_grad()``, ``loss.backward()``,
``optimizer.step()``, where the optimizer is a :class:`RemoteOptimizer`: its step pushes the
gradients to the session, whose Keras 2.2 Adam updates the weights on the server, and the new
weights land in the model's parameters in place. The hand loop of ``torch_worker.py`` (pull,
copy the weights in, push a dict of gradients) is gone.

The example makes its own data, Gaussian blobs (``--classes`` classes, each a mixture of
``--clusters`` clusters in ``--dim`` dimensions, fixed seed), and trains a two-layer perceptron
(``torch.nn.Sequential``) with cross-entropy: it reaches about 90% held-out accuracy, where a
linear model stops near 70%. ``--workers 1`` (the default) trains in this process; with
``--workers N`` the main process creates the session and starts N worker processes
(``multiprocessing``, spawned): each builds the same model, joins the session by its id
(``join_session`` checks the parameters' names and shapes and loads the current weights), and
trains on its shard, pushing asynchronously. After every epoch the main process prints the
loss and accuracy on held-out data.

Without ``--url`` the example starts a server of its own (``paramserver serve`` on a free port
of 127.0.0.1) and stops it at the end, so one command runs it::

    python examples/torch_train.py
    python examples/torch_train.py --workers 4
    python examples/torch_train.py --url http://127.0.0.1:8000   # a server already running

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
from _common import add_data_arguments, local_server, make_blobs

from paramserver import optimizers
from paramserver.client import Client

try:
    import torch

    from paramserver.client.torch import RemoteOptimizer, create_session, join_session
except ImportError:  # the example is optional: say so instead of failing
    torch = None  # type: ignore[assignment]

# --- the data and the model ----------------------------------------------------------------


def make_model(dim: int, hidden: int, classes: int) -> Any:
    return torch.nn.Sequential(
        torch.nn.Linear(dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, classes)
    )


def train_epoch(model: Any, optimizer: Any, x: Any, y: Any, *, batch: int, generator: Any) -> float:
    """One pass over ``(x, y)`` in shuffled minibatches; the mean training loss."""
    loss_fn = torch.nn.CrossEntropyLoss()
    total = 0.0
    batches = torch.randperm(len(y), generator=generator).split(batch)
    for idx in batches:
        optimizer.zero_grad()
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()  # one push: the session's optimizer step, weights written in place
        total += loss.item()
    return total / len(batches)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Held-out loss and accuracy after ``epoch`` epochs (``iterations`` steps applied)."""

    epoch: int
    iterations: int
    loss: float
    accuracy: float


def evaluate(model: Any, x: Any, y: Any, *, epoch: int, iterations: int) -> Evaluation:
    with torch.no_grad():
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(dim=1) == y).float().mean().item()
    return Evaluation(epoch, iterations, loss, accuracy)


# --- a worker process ----------------------------------------------------------------------


def train_worker(
    url: str, session_id: str, args: argparse.Namespace, shard: Any, seed: int
) -> None:
    """One worker process: the same model, joined to the session, trained on its shard."""
    torch.set_num_threads(1)  # the processes are the parallelism
    x, y = make_blobs(
        args.samples,
        dim=args.dim,
        classes=args.classes,
        clusters=args.clusters,
        spread=args.spread,
        rng=np.random.default_rng(args.seed),
    )
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    x, y = x[shard], y[shard]
    model = make_model(args.dim, args.hidden, args.classes)
    generator = torch.Generator().manual_seed(seed)
    with Client(url, token=args.token) as client:
        optimizer = RemoteOptimizer(model, join_session(client, model, session_id))
        for _ in range(args.epochs):
            train_epoch(model, optimizer, x, y, batch=args.batch, generator=generator)


# --- the main process ----------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url", default=None, help="the server's base URL (default: start one for the run)"
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes (1: this one)")
    parser.add_argument("--epochs", type=int, default=5)
    add_data_arguments(parser, samples=6000, spread=1.5, batch_help="minibatch size")
    parser.add_argument("--hidden", type=int, default=64, help="hidden units")
    parser.add_argument("--lr", type=float, default=0.003, help="Adam's learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--token", default=None, help="bearer token, if the server needs one")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[Evaluation]:
    args = parse_args(argv)
    if torch is None:
        print("PyTorch is not installed (pip install 'paramserver[torch]'): skipping this example.")
        return []
    with contextlib.ExitStack() as stack:
        url = args.url if args.url is not None else stack.enter_context(local_server())
        return train(args, url)


def train(args: argparse.Namespace, url: str) -> list[Evaluation]:
    """Create the session, train (here or in worker processes), evaluate after every epoch."""

    def say(text: str) -> None:
        if not args.quiet:
            print(text, flush=True)

    torch.manual_seed(args.seed)
    x, y = make_blobs(
        args.samples,
        dim=args.dim,
        classes=args.classes,
        clusters=args.clusters,
        spread=args.spread,
        rng=np.random.default_rng(args.seed),
    )
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    x_test, y_test, x_train, y_train = x[:1000], y[:1000], x[1000:], y[1000:]
    model = make_model(args.dim, args.hidden, args.classes)
    history = [evaluate(model, x_test, y_test, epoch=0, iterations=0)]
    with Client(url, token=args.token) as client:
        session = create_session(client, model, optimizers.Adam(lr=args.lr))
        optimizer = RemoteOptimizer(model, session)
        say(f"session {session.id} at {url}: parameters {list(session.names)}")
        say(
            f"epoch 0: test loss {history[0].loss:.4f}, accuracy {history[0].accuracy:6.1%} "
            f"(chance {1 / args.classes:.0%})"
        )
        try:
            if args.workers == 1:
                generator = torch.Generator().manual_seed(args.seed)
                for epoch in range(1, args.epochs + 1):
                    train_loss = train_epoch(
                        model, optimizer, x_train, y_train, batch=args.batch, generator=generator
                    )
                    history.append(
                        evaluate(
                            model, x_test, y_test, epoch=epoch, iterations=optimizer.iterations
                        )
                    )
                    say(
                        f"epoch {epoch}: train loss {train_loss:.4f}, test loss "
                        f"{history[-1].loss:.4f}, accuracy {history[-1].accuracy:6.1%}"
                    )
            else:
                history += _train_in_processes(args, url, model, optimizer, x_test, y_test, say)
        finally:
            session.delete(missing_ok=True)
    final = history[-1]
    say(
        f"final: test loss {final.loss:.4f} (from {history[0].loss:.4f}), accuracy "
        f"{final.accuracy:.1%} after {final.iterations} steps"
    )
    return history


def _train_in_processes(
    args: argparse.Namespace,
    url: str,
    model: Any,
    optimizer: Any,
    x_test: Any,
    y_test: Any,
    say: Any,
) -> list[Evaluation]:
    """Start the workers on shards of the training data; after each epoch's worth of steps
    from all of them, pull the weights into ``model`` (``optimizer``'s) and evaluate it."""
    n_train = args.samples - 1000
    shards = np.array_split(np.arange(1000, args.samples), args.workers)
    steps_per_epoch = sum(-(-len(s) // args.batch) for s in shards)
    say(f"{args.workers} worker processes, {steps_per_epoch} pushes per epoch ({n_train} samples)")
    context = multiprocessing.get_context("spawn")
    procs = [
        context.Process(
            target=train_worker,
            args=(url, optimizer.session.id, args, shard, args.seed * 1000 + i),
            name=f"worker {i}",
        )
        for i, shard in enumerate(shards)
    ]
    history: list[Evaluation] = []
    try:
        for p in procs:
            p.start()
        for epoch in range(1, args.epochs + 1):
            target = epoch * steps_per_epoch
            while True:  # the weights once every worker finished the epoch's steps
                optimizer.pull(min_iterations=target, wait=2.0)
                if optimizer.iterations >= target:
                    break
                dead = [p.name for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"{', '.join(dead)} failed (see its traceback above)")
            history.append(
                evaluate(model, x_test, y_test, epoch=epoch, iterations=optimizer.iterations)
            )
            say(
                f"epoch {epoch} (iteration {optimizer.iterations}): test loss "
                f"{history[-1].loss:.4f}, accuracy {history[-1].accuracy:6.1%}"
            )
        for p in procs:
            p.join(60)
            if p.exitcode != 0:
                raise RuntimeError(f"{p.name} exited with code {p.exitcode}")
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(10)
    return history


if __name__ == "__main__":
    main()
