"""What the training examples share: their synthetic data, a small numpy perceptron, and a
server of their own.

Not an example itself. The examples import it from their folder (``python
examples/<name>.py`` puts that folder first on ``sys.path``, and the worker processes they
spawn inherit it).
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import numpy as np

__all__ = [
    "add_data_arguments",
    "evaluate",
    "forward",
    "gradients",
    "init_weights",
    "local_server",
    "make_blobs",
]

Weights = dict[str, np.ndarray]


def add_data_arguments(
    parser: argparse.ArgumentParser,
    *,
    samples: int = 5000,
    spread: float = 2.0,
    batch_help: str = "minibatch size per worker",
) -> None:
    """The synthetic data's options (:func:`make_blobs`) and the minibatch size, as every
    training example takes them."""
    parser.add_argument("--batch", type=int, default=32, help=batch_help)
    parser.add_argument("--samples", type=int, default=samples, help="1000 of them held out")
    parser.add_argument("--dim", type=int, default=8, help="number of features")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--clusters", type=int, default=3, help="Gaussian clusters per class")
    parser.add_argument("--spread", type=float, default=spread, help="std. dev. of the centres")


def make_blobs(
    n: int, *, dim: int, classes: int, clusters: int, spread: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` float32 points and their int64 labels: each class a mixture of ``clusters`` unit
    Gaussians whose centres are drawn with standard deviation ``spread``."""
    centres = rng.normal(scale=spread, size=(classes * clusters, dim)).astype(np.float32)
    label_of_centre = np.repeat(np.arange(classes), clusters)
    centre = rng.integers(0, len(centres), size=n)
    x = (centres[centre] + rng.normal(size=(n, dim))).astype(np.float32)
    return x, label_of_centre[centre]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def local_server(timeout: float = 120.0) -> Iterator[str]:
    """``paramserver serve`` in a child process on a free port of 127.0.0.1; its URL once it
    answers ``/health``. Stopped (SIGTERM, then SIGKILL) on leaving."""
    port = _free_port()
    argv = [sys.executable, "-m", "paramserver", "serve", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--data-plane-port", "0", "--log-level", "error"]
    proc = subprocess.Popen(argv)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {proc.returncode}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not answer within {timeout:g} s")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- a two-layer perceptron in numpy (the sync and Ray workers' model) -----------------------


def init_weights(dim: int, hidden: int, classes: int, rng: np.random.Generator) -> Weights:
    """The perceptron's parameters by name: ``w1``, ``b1`` (input to hidden), ``w2``, ``b2``
    (hidden to output), scaled by ``1/sqrt(fan_in)``."""
    return {
        "w1": (rng.normal(size=(dim, hidden)) / np.sqrt(dim)).astype(np.float32),
        "b1": np.zeros(hidden, np.float32),
        "w2": (rng.normal(size=(hidden, classes)) / np.sqrt(hidden)).astype(np.float32),
        "b2": np.zeros(classes, np.float32),
    }


def forward(weights: Weights, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The hidden activations and the class probabilities of ``x``."""
    hidden = np.tanh(x @ weights["w1"] + weights["b1"])
    logits = hidden @ weights["w2"] + weights["b2"]
    logits = logits - logits.max(axis=1, keepdims=True)  # softmax is shift-invariant
    e = np.exp(logits)
    return hidden, e / e.sum(axis=1, keepdims=True)


def evaluate(weights: Weights, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of the model on ``(x, y)``."""
    _, probs = forward(weights, x)
    loss = -np.log(probs[np.arange(len(y)), y] + 1e-12).mean()
    return float(loss), float((probs.argmax(axis=1) == y).mean())


def gradients(weights: Weights, x: np.ndarray, y: np.ndarray) -> tuple[Weights, float]:
    """The gradient of the mean cross-entropy on ``(x, y)`` by backpropagation, and the loss.

    For a softmax output, d loss / d logits is ``probs - onehot(y)`` (over the batch size);
    tanh' is ``1 - tanh^2``."""
    hidden, probs = forward(weights, x)
    rows = np.arange(len(y))
    loss = float(-np.log(probs[rows, y] + 1e-12).mean())
    d_logits = probs.copy()
    d_logits[rows, y] -= 1.0
    d_logits /= len(y)
    d_hidden = (d_logits @ weights["w2"].T) * (1.0 - hidden * hidden)
    grads = {
        "w1": x.T @ d_hidden,
        "b1": d_hidden.sum(axis=0),
        "w2": hidden.T @ d_logits,
        "b2": d_logits.sum(axis=0),
    }
    return {name: g.astype(weights[name].dtype, copy=False) for name, g in grads.items()}, loss
