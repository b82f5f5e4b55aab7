"""Several workers train one PyTorch model through a parameter server (no Keras anywhere).

The model is a small multilayer perceptron fitting ``y = sin(3 x0) + x1 * x2`` on data the
example makes. The session holds the model's parameters by name (``model.named_parameters()``,
so ``"0.weight"``, ``"0.bias"``, ...) and a Keras optimizer; each worker thread owns a copy
of the model and loops ``load the weights -> forward/backward on a minibatch -> push the
gradients``, the push answering the new weights. PyTorch's own optimizer is not used: the
server applies the update.

Run a server first (``paramserver serve``), then::

    python examples/torch_worker.py --url http://127.0.0.1:8000

If PyTorch is not installed the example says so and exits. ``main(argv)`` returns the loss
history on the whole data set (before training, then after every epoch).
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from paramserver import Client, DictWeights, Session, optimizers

try:
    import torch
except ImportError:  # the example is optional: say so instead of failing
    torch = None  # type: ignore[assignment]


def make_model(hidden: int) -> Any:
    return torch.nn.Sequential(
        torch.nn.Linear(3, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
    )


def load_weights(model: Any, weights: Mapping[str, np.ndarray]) -> None:
    """Copy the server's weights into the model's parameters (one copy per tensor)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.from_numpy(weights[name]))


def make_data(n: int, rng: np.random.Generator) -> tuple[Any, Any]:
    x = rng.uniform(-1.0, 1.0, size=(n, 3)).astype(np.float32)
    y = (np.sin(3.0 * x[:, 0]) + x[:, 1] * x[:, 2]).astype(np.float32)[:, None]
    return torch.from_numpy(x), torch.from_numpy(y)


def worker(
    session: Session[DictWeights],
    model: Any,
    x: Any,
    y: Any,
    *,
    steps: int,
    batch: int,
    seed: int,
    errors: list[BaseException],
) -> None:
    generator = torch.Generator().manual_seed(seed)
    loss_fn = torch.nn.MSELoss()
    try:
        weights = session.pull()
        for _ in range(steps):
            load_weights(model, weights)
            idx = torch.randint(0, len(y), (batch,), generator=generator)
            model.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            weights = session.push({name: p.grad.numpy() for name, p in model.named_parameters()})
    except BaseException as exc:  # handed to the main thread, which re-raises it
        errors.append(exc)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    parser.add_argument("--workers", type=int, default=4, help="worker threads")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50, help="pushes per worker per epoch")
    parser.add_argument("--batch", type=int, default=64, help="minibatch size")
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--hidden", type=int, default=32, help="hidden units")
    parser.add_argument("--lr", type=float, default=0.005, help="Adam's learning rate")
    parser.add_argument(
        "--decay", type=float, default=1e-3, help="lr decay: lr / (1 + decay * iterations)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--token", default=None, help="bearer token, if the server needs one")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[float]:
    args = parse_args(argv)
    if torch is None:
        print("PyTorch is not installed (pip install torch): skipping this example.")
        return []

    def say(text: str) -> None:
        if not args.quiet:
            print(text, flush=True)

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # the workers are the parallelism
    x, y = make_data(args.samples, np.random.default_rng(args.seed))
    shards = np.array_split(np.arange(args.samples), args.workers)
    model = make_model(args.hidden)
    loss_fn = torch.nn.MSELoss()

    def full_loss(weights: Mapping[str, np.ndarray]) -> float:
        load_weights(model, weights)
        with torch.no_grad():
            return float(loss_fn(model(x), y))

    with Client(args.url, token=args.token) as client:
        initial = {name: p.detach().numpy() for name, p in model.named_parameters()}
        optimizer = optimizers.Adam(lr=args.lr, decay=args.decay, amsgrad=True)
        session = client.create_session(initial, optimizer)
        say(f"session {session.id}: {args.workers} workers, parameters {list(session.names)}")
        try:
            history = [full_loss(initial)]
            say(f"epoch 0: loss {history[0]:.6f}")
            for epoch in range(1, args.epochs + 1):
                failures: list[BaseException] = []
                threads = [
                    threading.Thread(
                        target=worker,
                        args=(session, make_model(args.hidden), x[shard], y[shard]),
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
                history.append(full_loss(session.pull()))
                say(f"epoch {epoch}: loss {history[-1]:.6f}")
        finally:
            session.delete()
    say(f"loss fell {history[0] / max(history[-1], 1e-30):.1f}x")
    return history


if __name__ == "__main__":
    main()
