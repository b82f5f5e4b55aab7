"""``paramserver serve --demo``: show a newcomer the service doing its job.

Once the server answers, a worker in a background thread trains a small linear regression
through it with the client library: it creates a session with Keras's Adam, pushes minibatch
gradients, prints the loss as it falls, and deletes its session. The server keeps serving
afterwards, so the newcomer can go on with ``curl`` or the client.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np

log = logging.getLogger("paramserver.demo")

STEPS = 300


def local_address(host: str) -> str:
    """Where a process on this machine reaches a server bound to ``host``: a wildcard bind
    is reached on loopback."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def demo_url(host: str, port: int, *, tls: bool = False) -> str:
    """Where a local worker reaches the server."""
    host = local_address(host)
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port}"


def run_demo(url: str, *, token: str | None = None, steps: int = STEPS) -> list[float]:
    """Train ``y = X @ w + b`` through the server at ``url``; returns the loss history.

    Over https the local worker does not check the certificate: it names the server's
    public name, not the loopback address the worker uses."""
    from paramserver.client import Client, optimizers

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 8)).astype(np.float32)
    w_true = rng.normal(size=8).astype(np.float32)
    y = (x @ w_true + 0.5 + 0.1 * rng.normal(size=2000)).astype(np.float32)

    def loss(weights: dict[str, np.ndarray]) -> float:
        return float(np.mean((x @ weights["w"] + weights["b"] - y) ** 2))

    weights = {"w": np.zeros(8, np.float32), "b": np.zeros((), np.float32)}
    history = [loss(weights)]
    print(f"demo: training a linear regression through {url}", flush=True)
    with Client(url, token=token, verify=not url.startswith("https:")) as client:
        session = client.create_session(weights, optimizers.Adam(lr=0.05))
        print(
            f"demo: session {session.id} (Adam, lr=0.05); step 0 loss {history[0]:.5f}", flush=True
        )
        try:
            for step in range(1, steps + 1):
                idx = rng.integers(0, len(y), size=64)
                err = x[idx] @ weights["w"] + weights["b"] - y[idx]
                grads = {
                    "w": (2.0 / len(idx)) * (x[idx].T @ err),
                    "b": np.asarray(2.0 * err.mean(), np.float32),
                }
                weights = session.push(grads)
                if step % 50 == 0:
                    history.append(loss(weights))
                    print(f"demo: step {step} loss {history[-1]:.5f}", flush=True)
        finally:
            session.delete()
    print(
        f"demo: done, loss fell {history[0] / max(history[-1], 1e-30):.0f}x in {steps} pushes; "
        f"the server keeps running at {url} (Ctrl-C stops it)",
        flush=True,
    )
    return history


def first_write_token(tokens: str | None, tokens_file: Any) -> str | None:
    """A read-write token from the settings, for the demo worker, or None."""
    entries: list[str] = []
    if tokens:
        entries.extend(tokens.split(","))
    if tokens_file is not None:
        with open(tokens_file, encoding="utf-8") as f:
            entries.extend(f.read().splitlines())
    for entry in entries:
        entry = entry.strip()
        if not entry or entry.startswith("#") or entry.endswith(":ro"):
            continue
        return entry[:-3] if entry.endswith(":rw") else entry
    return None


def start_demo_thread(
    server: Any, host: str, token: str | None, *, tls: bool = False
) -> threading.Thread:
    """Run the demo once ``server`` (a uvicorn.Server) has started; never kills the server."""

    def run() -> None:
        while not server.started:
            if server.should_exit:
                return
            time.sleep(0.05)
        try:
            port = server.servers[0].sockets[0].getsockname()[1]  # the bound port (even for 0)
            run_demo(demo_url(host, port, tls=tls), token=token)
        except Exception:
            log.exception("the demo worker failed")

    thread = threading.Thread(target=run, name="paramserver-demo", daemon=True)
    thread.start()
    return thread
