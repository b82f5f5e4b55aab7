"""What the training examples share: their synthetic data, and a server of their own.

Not an example itself. The examples import it from their folder (``python
examples/<name>.py`` puts that folder first on ``sys.path``, and the worker processes they
spawn inherit it).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import numpy as np

__all__ = ["local_server", "make_blobs"]


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
