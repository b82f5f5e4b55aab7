"""``GET /ready``: 503 until the sessions are recovered and the kernels loaded, then 200.

Recovery (snapshots and the journal) runs before uvicorn opens the port, so a server that
answers at all has its sessions; the kernels load after the port opens, while ``/health``
(liveness) already answers 200 and ``/ready`` 503 with Retry-After. Here: a real server process
whose kernels must be compiled (a CPU the cache holds nothing for), a journal replayed before
the first answer, the order of events with a warm-up held by the test, a warm-up that fails
(the server exits with code 3), and ``/ready`` without a token where tokens are configured.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from paramserver import wire
from paramserver.server import cli, main
from paramserver.server.serving import Readiness
from paramserver.server.settings import Settings
from tests.harness.http_api import HTTP, create_session, push
from tests.harness.servers import (
    ServerProcess,
    free_port,
    start_paramserver,
    start_server_thread,
)

WEIGHTS = {"w": np.linspace(-1, 1, 6, dtype=np.float32)}
STARTING = {"status": "starting", "waiting_for": ["kernels"]}


def ready(url: str, **headers: str) -> httpx.Response:
    return HTTP.get(f"{url}/ready", headers=headers)


def assert_not_ready(r: httpx.Response, body: dict[str, Any]) -> None:
    assert r.status_code == 503, r.text
    assert r.json() == body
    assert r.headers["retry-after"] == "1"


def wait_ready(url: str, timeout: float = 120) -> list[httpx.Response]:
    """Every answer of ``/ready`` until the first 200 (polled every 20 ms)."""
    answers = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answers.append(ready(url))
        if answers[-1].status_code == 200:
            return answers
        time.sleep(0.02)
    raise AssertionError(f"not ready after {timeout} s: {answers[-1].text}")


# --- a real server process ------------------------------------------------------------------


def test_a_server_compiling_its_kernels_is_live_but_not_ready(tmp_path: Path) -> None:
    """The kernels compiled for a CPU nothing is cached for (as on another machine than the
    image's builder): seconds during which /health is 200 and /ready 503, then /ready 200."""
    server = ServerProcess(
        ["-m", "paramserver", "serve", "--port", "{port}", "--data-plane-port", "0"],
        env={
            "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache"),  # empty: nothing to load
            "NUMBA_CPU_NAME": "generic",  # a CPU the shipped cache was not built for
        },
        log_dir=tmp_path,
    )
    with server:  # started: /health answers 200
        first = ready(server.url)
        assert_not_ready(first, STARTING)
        assert HTTP.get(f"{server.url}/health").json() == {"status": "ok"}
        answers = wait_ready(server.url)
        assert answers[-1].json() == {"status": "ready"}
        for r in answers[:-1]:
            assert_not_ready(r, STARTING)
        assert "compiled for CPU generic" in server.log, server.log
        # a push works once it is ready, with the kernels just compiled
        create_session(server.url, "adam", WEIGHTS, session_id="a")
        assert push(server.url, "a", {"w": np.ones(6, np.float32)}).status_code == 200
        assert ready(server.url).status_code == 200
        assert server.terminate() == 0, server.log


def test_the_port_opens_only_after_the_journal_is_replayed(tmp_path: Path) -> None:
    """Recovery runs before the port opens: the first answer a restarted server gives, even
    to /health, comes with every journaled push replayed, and /ready is 200 from then on."""
    args = ("--snapshot-dir", str(tmp_path / "data"), "--durability", "journal")
    args += ("--snapshot-interval-seconds", "3600")
    server = start_paramserver(tmp_path, *args)
    try:
        create_session(server.url, "sgd", WEIGHTS, session_id="a")
        for _ in range(200):
            assert push(server.url, "a", {"w": np.ones(6, np.float32)}).status_code == 200
    finally:
        server.kill()  # no final snapshot: all 200 pushes are replayed from the journal
    restarted = start_paramserver(tmp_path, *args)
    try:
        assert ready(restarted.url).json() == {"status": "ready"}
        weights = HTTP.get(f"{restarted.url}/sessions/a/weights")
        assert wire.unpack(weights.content)["iterations"] == 200
        assert "replayed 201 of 201 journal record(s)" in restarted.log, restarted.log  # + create
    finally:
        assert restarted.terminate() == 0, restarted.log


# --- the order of events, with a warm-up the test holds -------------------------------------


class HeldWarmUp:
    """A kernel backend whose warm-up waits for :meth:`release`, then succeeds or raises."""

    name = "held"

    def __init__(self, *, fails: bool = False) -> None:
        self.fails = fails
        self.started = threading.Event()
        self._release = threading.Event()

    def release(self) -> None:
        self._release.set()

    def warm_up(self) -> str:
        self.started.set()
        assert self._release.wait(60), "never released"
        if self.fails:
            raise RuntimeError("the kernels do not compile")
        return "held kernels"


def test_ready_only_once_the_kernels_are_loaded(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Also as the image's HEALTHCHECK asks: ``paramserver health --ready`` exits 1, then 0,
    while ``paramserver health`` (liveness) exits 0 all along."""
    backend = HeldWarmUp()
    monkeypatch.setattr(main, "default_backend", lambda: backend)
    server = start_server_thread(warm_up_kernels=True)
    monkeypatch.setenv("PARAMSERVER_PORT", server.url.rsplit(":", 1)[1])
    try:
        assert backend.started.wait(30)
        assert_not_ready(ready(server.url), STARTING)
        assert HTTP.get(f"{server.url}/health").status_code == 200
        assert cli.main(["health"]) == 0
        assert cli.main(["health", "--ready"]) == 1
        assert "GET /ready answered 503" in capsys.readouterr().err
        # requests are served meanwhile (a kernel is compiled on first use if need be)
        assert HTTP.get(f"{server.url}/sessions").status_code == 200
        backend.release()
        answers = wait_ready(server.url, timeout=30)
        assert answers[-1].json() == {"status": "ready"}
        assert cli.main(["health", "--ready"]) == 0
    finally:
        backend.release()
        server.stop()


def test_ready_at_once_without_warm_up(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = HeldWarmUp()  # never released: must not be asked
    monkeypatch.setattr(main, "default_backend", lambda: backend)
    server = start_server_thread(warm_up_kernels=False)
    try:
        assert ready(server.url).json() == {"status": "ready"}
        assert not backend.started.is_set()
    finally:
        server.stop()


def test_a_failed_warm_up_stops_the_server_with_exit_code_3(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``paramserver serve`` whose kernels fail to load: /ready is 503 until then, and the
    server stops by itself and exits 3, as for a start-up that fails before the port opens."""
    backend = HeldWarmUp(fails=True)
    monkeypatch.setattr(main, "default_backend", lambda: backend)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    answers: list[httpx.Response] = []

    def probe() -> None:
        try:
            assert backend.started.wait(30)
            deadline = time.monotonic() + 30
            while not answers and time.monotonic() < deadline:
                try:
                    answers.append(ready(url))
                except httpx.TransportError:  # the port is not open yet
                    time.sleep(0.02)
        finally:
            backend.release()

    prober = threading.Thread(target=probe)
    prober.start()
    with pytest.raises(SystemExit) as exited:
        cli.serve(Settings(port=port, data_plane=False, log_level="warning"))
    prober.join(30)
    assert exited.value.code == cli.EXIT_START_FAILED == 3
    assert answers, "the server never answered"
    assert_not_ready(answers[0], STARTING)
    assert any("loading the kernels failed" in r.getMessage() for r in caplog.records)


# --- tokens ---------------------------------------------------------------------------------


def test_ready_needs_no_token(server_factory: Any) -> None:
    server = server_factory(tokens="s3cret")
    assert HTTP.get(f"{server.url}/sessions").status_code == 401
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer s3cret"}):
        r = ready(server.url, **headers)
        assert r.status_code == 200, r.text
        assert r.json() == {"status": "ready"}


# --- the states -----------------------------------------------------------------------------


def test_readiness_states() -> None:
    readiness = Readiness()
    assert readiness.status() == {"status": "starting", "waiting_for": ["recovery", "kernels"]}
    readiness.done("recovery")
    assert readiness.status() == STARTING and not readiness.ready
    readiness.done("kernels")
    assert readiness.status() == {"status": "ready"} and readiness.ready
    readiness.stop()
    assert readiness.status() == {"status": "stopping"} and not readiness.ready
    failed = Readiness()
    failed.fail()
    assert failed.status() == {"status": "failed"} and failed.failed and not failed.ready
    with pytest.raises(ValueError, match="unknown start-up step"):
        failed.done("coffee")
