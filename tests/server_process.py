"""``python -m paramserver serve`` as a child process on a free loopback port, for the durability
tests.

:meth:`ServerProcess.wait_ready` waits for ``/health``. Everything the process prints goes to a
file, so that a test can show it when an assertion fails. :func:`start` tries another port if
the one picked was taken in the meantime.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from paramserver import wire

MSGPACK = {"content-type": wire.MSGPACK_MEDIA_TYPE}
#: One client for the helpers: a new httpx client per request costs tens of milliseconds.
HTTP = httpx.Client(timeout=30)
_counter = itertools.count()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    def __init__(self, workdir: Path, *args: str) -> None:
        self.log_path = workdir / f"server-{os.getpid()}-{next(_counter)}.log"
        self.url = f"http://127.0.0.1:{free_port()}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PARAMSERVER_")}
        argv = [sys.executable, "-m", "paramserver", "serve", "--no-warm-up-kernels"]
        argv += ["--port", self.url.rsplit(":", 1)[1], *args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir
            )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """Wait for ``/health``; ``False`` if the port was taken, AssertionError otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if HTTP.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                if "address already in use" in self.log:
                    return False
                break
            time.sleep(0.02)
        self.kill()
        raise AssertionError(f"the server did not become ready; its output:\n{self.log}")

    def wait_exit(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the server did not exit; its output:\n{self.log}") from None

    def terminate(self) -> int:
        """SIGTERM, as a process manager stops it; returns the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit()

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def start(workdir: Path, *args: str) -> ServerProcess:
    for _ in range(3):
        server = ServerProcess(workdir, *args)
        if server.wait_ready():
            return server
    raise AssertionError(f"no free port found; the last output:\n{server.log}")


def create(url: str, session_id: str, optimizer: object, weights: dict[str, np.ndarray]) -> None:
    body = wire.pack({"session_id": session_id, "optimizer": optimizer, "weights": weights})
    r = HTTP.post(f"{url}/sessions", content=body, headers=MSGPACK)
    assert r.status_code == 201, r.text


def push(
    url: str,
    session_id: str,
    grads: dict[str, np.ndarray],
    *,
    key: str | None = None,
    client: httpx.Client | None = None,
) -> httpx.Response:
    headers = dict(MSGPACK)
    if key is not None:
        headers["Idempotency-Key"] = key
    body = wire.pack({"gradients": grads})
    target = f"{url}/sessions/{session_id}/gradients"
    return (client or HTTP).post(target, content=body, headers=headers)


def state(url: str, session_id: str) -> bytes:
    r = HTTP.get(f"{url}/sessions/{session_id}/state")
    assert r.status_code == 200, r.text
    return r.content


def session_ids(url: str) -> list[str]:
    r = HTTP.get(f"{url}/sessions")
    assert r.status_code == 200, r.text
    return sorted(s["session_id"] for s in r.json()["sessions"])
