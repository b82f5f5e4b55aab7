"""``paramserver serve`` as a real process: start-up, configuration, one push, clean shutdown.

Each test starts the installed console script (or ``python -m paramserver``) as a subprocess on a
loopback port, talks to it over HTTP and stops it with a signal, as a process manager or
``docker stop`` would. A clean shutdown is exit code 0 with uvicorn's shutdown lines in the log
and no traceback.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx
import numpy as np
import pytest

from paramserver.server.settings import Settings
from tests.harness.http_api import array, create_session, pushed
from tests.harness.servers import free_port

START_TIMEOUT = 60.0
STOP_TIMEOUT = 40.0  # above uvicorn's 30 s graceful-shutdown limit
RUNNING = re.compile(r"Uvicorn running on http://([0-9.]+):(\d+)")


def console_script() -> list[str]:
    """The ``paramserver`` command installed beside this interpreter."""
    script = Path(sys.executable).parent / "paramserver"
    if not script.exists():
        found = shutil.which("paramserver")
        if found is None:
            pytest.fail("the paramserver console script is not installed (pip install -e .)")
        script = Path(found)
    return [str(script)]


def python_m_app() -> list[str]:
    return [sys.executable, "-m", "paramserver"]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any PARAMSERVER_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARAMSERVER_")}
    env.update(extra)
    return env


class ServeProcess:
    """A ``serve`` subprocess whose combined output is collected line by line."""

    def __init__(self, argv: Sequence[str], env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            list(argv),
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_ready(self) -> str:
        """Wait until uvicorn says where it listens and /health answers; return the base URL."""
        deadline = time.monotonic() + START_TIMEOUT
        url = None
        while time.monotonic() < deadline:
            if url is None:
                match = RUNNING.search(self.log)
                if match:
                    url = f"http://{match[1]}:{match[2]}"
            if url is not None:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        return url
                except httpx.TransportError:
                    pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.kill()
        pytest.fail(f"the server did not become ready; its output:\n{self.log}")

    def stop(self, sig: int) -> int:
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the server did not exit within {STOP_TIMEOUT}s:\n{self.log}")
        self._reader.join(timeout=5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._reader.join(timeout=5)

    def close(self) -> None:
        self.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[type[ServeProcess]]:
    """Start ``serve`` processes (in a scratch directory) that are always reaped at teardown."""
    started: list[ServeProcess] = []

    class Tracked(ServeProcess):
        def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
            super().__init__(argv, clean_env() if env is None else env, tmp_path)
            started.append(self)

    yield Tracked
    for proc in started:
        proc.close()


def push_once(url: str, token: str | None = None) -> None:
    """Create an SGD session over msgpack, push one gradient, check the step's weights."""
    headers = {} if token is None else {"authorization": f"Bearer {token}"}
    session = create_session(url, "sgd", {"w": np.zeros(3, np.float32)}, headers=headers)
    grads = {"w": np.ones(3, np.float32)}
    answer = pushed(url, session["session_id"], grads, headers=headers)
    assert answer["iterations"] == 1
    # Keras 2.2.4 SGD defaults: lr=0.01, no momentum, so w = 0 - 0.01 * 1.
    np.testing.assert_array_equal(array(answer["weights"]["w"]), np.full(3, -0.01, np.float32))


def assert_clean_exit(proc: ServeProcess, code: int) -> None:
    log = proc.log
    assert code == 0, f"exit code {code}; output:\n{log}"
    assert "Application shutdown complete." in log, log
    assert "Finished server process" in log, log
    assert "Traceback" not in log, log


@pytest.mark.parametrize(
    ("launcher", "sig"),
    [
        pytest.param(console_script, signal.SIGTERM, id="paramserver-SIGTERM"),
        pytest.param(console_script, signal.SIGINT, id="paramserver-SIGINT"),
        pytest.param(python_m_app, signal.SIGTERM, id="python-m-app-SIGTERM"),
    ],
)
def test_serve_push_and_clean_shutdown(
    serve: type[ServeProcess], launcher: Callable[[], list[str]], sig: int
) -> None:
    proc = serve([*launcher(), "serve", "--port", "0"])
    url = proc.wait_ready()
    assert url.startswith("http://127.0.0.1:"), "the default host must be loopback"
    assert "kernels: numba" in proc.log  # the kernels were warmed up (the default)
    push_once(url)
    assert_clean_exit(proc, proc.stop(sig))


def test_environment_configures_the_server(serve: type[ServeProcess]) -> None:
    port = free_port()
    env = clean_env(
        PARAMSERVER_PORT=str(port),
        PARAMSERVER_TOKENS="s3cret",
        PARAMSERVER_WARM_UP_KERNELS="false",
    )
    proc = serve([*python_m_app(), "serve"], env)
    url = proc.wait_ready()
    assert url == f"http://127.0.0.1:{port}"
    assert httpx.get(f"{url}/sessions", timeout=5).status_code == 401  # the token is required
    push_once(url, token="s3cret")
    assert_clean_exit(proc, proc.stop(signal.SIGTERM))


def test_command_line_overrides_the_environment(serve: type[ServeProcess]) -> None:
    # The environment's port is not even a number: the option given on the command line wins,
    # so it is never used.
    env = clean_env(PARAMSERVER_PORT="not-a-port", PARAMSERVER_MAX_SESSIONS="7")
    proc = serve([*python_m_app(), "serve", "--port", "0", "--no-warm-up-kernels"], env)
    url = proc.wait_ready()
    assert httpx.get(f"{url}/health", timeout=5).json() == {"status": "ok"}
    assert_clean_exit(proc, proc.stop(signal.SIGTERM))


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*python_m_app(), *args],
        env=clean_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("args", "env", "field"),
    [
        (["--port", "70000"], {}, "port"),
        (["--max-body-bytes", "lots"], {}, "max_body_bytes"),
        ([], {"PARAMSERVER_PORT": "eighty"}, "port"),
        ([], {"PARAMSERVER_DURABILITY": "hope"}, "durability"),
    ],
    ids=["option-out-of-range", "option-not-a-number", "env-not-a-number", "env-not-a-choice"],
)
def test_invalid_setting_exits_2_with_a_message(
    args: list[str], env: dict[str, str], field: str
) -> None:
    result = run_cli("serve", *args, env=clean_env(**env))
    assert result.returncode == 2, result.stderr
    assert "invalid settings" in result.stderr
    assert field in result.stderr
    assert "Traceback" not in result.stderr
    assert "Uvicorn running" not in result.stderr + result.stdout


def test_unknown_option_exits_2() -> None:
    result = run_cli("serve", "--no-such-option")
    assert result.returncode == 2
    assert "unrecognized arguments" in result.stderr


def test_help_lists_every_setting() -> None:
    top = run_cli("--help")
    assert top.returncode == 0, top.stderr
    assert "serve" in top.stdout
    serve_help = run_cli("serve", "--help")
    assert serve_help.returncode == 0, serve_help.stderr
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in serve_help.stdout, name
        assert f"PARAMSERVER_{name.upper()}" in serve_help.stdout, name


def test_version() -> None:
    from paramserver import __version__

    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"paramserver {__version__}"


def test_a_command_is_required() -> None:
    result = run_cli()
    assert result.returncode == 2
    assert "serve" in result.stderr


def test_demo_trains_through_the_server_and_keeps_serving(serve: type[ServeProcess]) -> None:
    # The README's first command ends in `paramserver serve --demo`.
    proc = serve([*console_script(), "serve", "--demo", "--port", "0", "--no-warm-up-kernels"])
    url = proc.wait_ready()
    deadline = time.monotonic() + START_TIMEOUT
    while "demo: done" not in proc.log and time.monotonic() < deadline:
        assert proc.proc.poll() is None, proc.log
        time.sleep(0.1)
    log = proc.log
    assert "demo: done" in log, log
    losses = [float(m) for m in re.findall(r"loss (\d+\.\d+)", log)]
    assert len(losses) >= 2 and losses[-1] * 10 < losses[0], log
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200  # still serving
    assert httpx.get(f"{url}/sessions", timeout=5).json() == {"sessions": []}  # demo cleaned up
    assert_clean_exit(proc, proc.stop(signal.SIGTERM))


def test_demo_uses_a_write_token_when_tokens_are_set(serve: type[ServeProcess]) -> None:
    env = clean_env(PARAMSERVER_TOKENS="reader:ro,writer")
    proc = serve([*console_script(), "serve", "--demo", "--port", "0"], env)
    proc.wait_ready()
    deadline = time.monotonic() + START_TIMEOUT
    while "demo: done" not in proc.log and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "demo: done" in proc.log, proc.log
    assert_clean_exit(proc, proc.stop(signal.SIGTERM))
