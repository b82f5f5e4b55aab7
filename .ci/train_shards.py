"""Train through three shards with the sharded client, as .ci/docker-check runs it against
docker-compose.shards.yml:

    python .ci/train_shards.py http://127.0.0.1:P0 http://127.0.0.1:P1 http://127.0.0.1:P2

A small two-layer regression (tanh hidden layer, numpy gradients) trains for STEPS pushes with
Adam and clipnorm (each shard clips with the whole push's norm) through
``Client([url0, url1, url2])``, its larger tensors split over the shards; the loss must fall,
every shard must hold a part of the session, and the weights must equal, bit for bit, those of
the same training on one server (a plain session on the first shard's server). Exit 0 when
all of that holds; an AssertionError (exit 1) names what did not.
"""

from __future__ import annotations

import sys
import uuid

import httpx
import numpy as np

from paramserver import optimizers
from paramserver.client import Client

STEPS = 60
#: Tensors larger than this are split along their rows over the shards (the default is 4 MiB;
#: this model is a few KB).
SLICE_BYTES = 1024


def data() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(16)
    x = rng.standard_normal((256, 16)).astype(np.float32)
    y = np.tanh(x @ rng.standard_normal((16, 1)).astype(np.float32)) * 2
    weights = {
        "w1": (rng.standard_normal((16, 32)) * 0.3).astype(np.float32),
        "b1": np.zeros(32, np.float32),
        "w2": (rng.standard_normal((32, 1)) * 0.3).astype(np.float32),
        "b2": np.zeros(1, np.float32),
    }
    return x, y.astype(np.float32), weights


def loss_and_gradients(
    w: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray
) -> tuple[float, dict[str, np.ndarray]]:
    """Mean squared error of ``tanh(x @ w1 + b1) @ w2 + b2`` and its gradients."""
    h = np.tanh(x @ w["w1"] + w["b1"])
    err = h @ w["w2"] + w["b2"] - y
    d = (2 / len(x)) * err
    dh = (d @ w["w2"].T) * (1 - h * h)
    grads = {"w1": x.T @ dh, "b1": dh.sum(0), "w2": h.T @ d, "b2": d.sum(0)}
    return float(np.mean(err * err)), {k: g.astype(np.float32) for k, g in grads.items()}


def train(session: object, weights: dict[str, np.ndarray]) -> tuple[list[float], dict]:
    x, y, _ = data()
    losses = []
    for _ in range(STEPS):
        loss, grads = loss_and_gradients(weights, x, y)
        losses.append(loss)
        weights = {k: np.asarray(v) for k, v in session.push(grads).items()}  # type: ignore[attr-defined]
    return losses, weights


def main(urls: list[str]) -> None:
    assert len(urls) == 3, f"three shard URLs, got {urls}"
    optimizer = optimizers.Adam(lr=0.02, clipnorm=1.0)
    _, _, initial = data()
    session_id = f"ci-shards-{uuid.uuid4().hex[:8]}"

    with Client(urls, slice_bytes=SLICE_BYTES) as sharded:
        session = sharded.create_session(initial, optimizer, session_id)
        losses, weights = train(session, initial)
        parts = []
        for index, url in enumerate(urls):
            summary = httpx.get(f"{url}/sessions/{session_id}", timeout=10).json()
            assert summary["shard"]["index"] == index and summary["shard"]["count"] == 3, summary
            parts.append(sorted(summary["parameters"]))
        pulled = {k: np.asarray(v) for k, v in session.pull().items()}
        session.delete()
    assert all(parts), f"a shard holds no part of the session: {parts}"
    print(f"sharded session {session_id}: parts per shard {parts}")
    for name, value in weights.items():
        np.testing.assert_array_equal(pulled[name], value, err_msg=f"pull of {name}")

    with Client(urls[0]) as single:
        alone = single.create_session(initial, optimizer, f"{session_id}-single")
        single_losses, single_weights = train(alone, initial)
        alone.delete()

    print(f"loss through 3 shards: {losses[0]:.4f} -> {losses[-1]:.4f} in {STEPS} pushes")
    assert losses[-1] < 0.5 * losses[0], f"the loss did not fall: {losses[0]} -> {losses[-1]}"
    assert losses == single_losses, "the losses differ from the single server's"
    for name, value in weights.items():
        assert value.tobytes() == single_weights[name].tobytes(), f"{name} differs"
    print("weights equal the single server's, bit for bit")


if __name__ == "__main__":
    main(sys.argv[1:])
