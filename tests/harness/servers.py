"""Servers on a free loopback port: the app in a thread of this process, or a child process.

* :func:`start_server_thread` runs ``create_app(Settings(...))`` under uvicorn in a background
  thread and waits for ``/health`` (the ``server`` and ``server_factory`` fixtures of
  ``tests/conftest.py``). Tests reach it over real HTTP on 127.0.0.1 and may reach into its
  ``app`` (the service, the middleware stack).
* :class:`ServerProcess` runs a server as a child process of this Python: what the system
  tests start, SIGTERM and SIGKILL, and what the benchmarks measure.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

import httpx
import uvicorn

from paramserver.server.main import create_app
from paramserver.server.optim import default_backend
from paramserver.server.serving import http_server
from paramserver.server.settings import Settings

__all__ = [
    "HOST",
    "REPO",
    "ServerProcess",
    "ServerThread",
    "free_port",
    "settings_options",
    "start_paramserver",
    "start_server_thread",
    "warm_kernels",
]

HOST = "127.0.0.1"
#: The repository's root: the working directory of child processes (``python -m benchmarks...``).
REPO = Path(__file__).resolve().parents[2]


def warm_kernels() -> None:
    """Load every kernel in this process: servers in its threads share the backend, and serve
    small pushes on the loop only once the kernels are loaded."""
    warm_up = getattr(default_backend(), "warm_up", None)
    if warm_up is not None:
        warm_up()


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# --- in a thread of this process --------------------------------------------------------------


@dataclass
class ServerThread:
    """The app under uvicorn in a daemon thread; :meth:`stop` asks it to exit and waits."""

    url: str
    app: Any
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server_thread(**overrides: Any) -> ServerThread:
    """Start the app in a thread; ``overrides`` are :class:`Settings` fields.

    The kernels are not warmed up unless asked (``warm_up_kernels=True``): compiling them is
    the numba tests' business, and costs seconds per server.
    """
    overrides.setdefault("warm_up_kernels", False)
    overrides.setdefault("data_plane_port", 0)  # any free port: "HTTP port + 1" may be taken
    app = create_app(Settings(**overrides))
    port = free_port()
    server = http_server(app, app.state.settings, host=HOST, port=port, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.started:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return ServerThread(url, app, server, thread)
            except httpx.TransportError:
                pass
        if not thread.is_alive():
            break
        time.sleep(0.02)
    server.should_exit = True
    raise RuntimeError("the test server did not start")


# --- as a child process -----------------------------------------------------------------------

#: prctl(2), resolved here: the child calls it between fork and exec, where it must not load
#: anything (another thread of this process may hold the loader's lock at the fork).
_PRCTL = ctypes.CDLL(None).prctl if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: SIGTERM the child when the thread that started it dies (PR_SET_PDEATHSIG)."""
    assert _PRCTL is not None
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def settings_options(**settings: Any) -> list[str]:
    """``Settings`` fields as ``paramserver serve`` options: ``max_sessions=3`` is
    ``--max-sessions 3``, ``warm_up_kernels=False`` is ``--no-warm-up-kernels``."""
    options: list[str] = []
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            options.append(flag if value else "--no-" + flag[2:])
        else:
            options += [flag, str(value)]
    return options


def _is_up(port: int, http: bool, tls: ssl.SSLContext | None = None, path: str = "/health") -> bool:
    """Whether 127.0.0.1:``port`` accepts a connection (and answers ``GET path`` with 200,
    over TLS with ``tls``)."""
    try:
        with contextlib.ExitStack() as stack:
            sock = stack.enter_context(socket.create_connection((HOST, port), timeout=2))
            if not http:
                return True
            if tls is not None:
                sock = stack.enter_context(tls.wrap_socket(sock, server_hostname=HOST))
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode())
            head = b""
            while b"\r\n" not in head:
                chunk = sock.recv(1024)
                if not chunk:
                    return False
                head += chunk
            return head.split(b"\r\n", 1)[0].split()[1:2] == [b"200"]
    except OSError:
        return False


_Process = TypeVar("_Process", bound="ServerProcess")


class ServerProcess:
    """A server in a child process of this Python, on a free port of 127.0.0.1.

    ``argv`` follows ``python``; every ``{port}`` in it becomes the port. :meth:`start` waits
    until the server answers (``GET /health``, or accepts a connection when ``http=False``)
    and starts it again on another port if the one picked was taken meanwhile; :meth:`launch`
    only starts it (for a server that is expected to refuse to start). ``tls`` (a client
    context trusting the server's certificate) makes the URL and the readiness check https;
    ``nofile`` sets the child's file-descriptor limit (soft and hard). The child gets this
    process's environment without its ``PARAMSERVER_*`` variables, plus ``env``. Its output
    goes to a file in ``log_dir`` (kept, for a failing test to show) or to a temporary file,
    and :attr:`log` reads it. Leaving a ``with`` block stops it (SIGTERM, then SIGKILL after
    ``stop_timeout``); on Linux it also gets SIGTERM when the thread that started it dies, so
    that an interrupted run leaves no server behind.
    """

    _count = 0

    def __init__(
        self,
        argv: Sequence[str],
        *,
        http: bool = True,
        env: Mapping[str, str] | None = None,
        log_dir: Path | None = None,
        start_timeout: float = 120.0,
        stop_timeout: float = 30.0,
        tls: ssl.SSLContext | None = None,
        nofile: int | None = None,
    ) -> None:
        self.argv_template = list(argv)
        self.http = http
        self.tls = tls
        self.nofile = nofile
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PARAMSERVER_")}
        self.env.update(env or {})
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.port = 0
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None
        ServerProcess._count += 1
        self.log_path = (
            None if log_dir is None else log_dir / f"server-{os.getpid()}-{self._count}.log"
        )
        self._log: IO[bytes] | None = None

    @classmethod
    def paramserver(
        cls: type[_Process],
        *args: str,
        log_dir: Path | None = None,
        tls: ssl.SSLContext | None = None,
        nofile: int | None = None,
        **settings: Any,
    ) -> _Process:
        """``python -m paramserver serve`` with the options ``args``, and ``settings``
        (:class:`Settings` fields, see :func:`settings_options`)."""
        argv = ["-m", "paramserver", "serve", "--port", "{port}"]
        if not any(a.startswith("--data-plane-port") or a == "--no-data-plane" for a in args):
            settings.setdefault("data_plane_port", 0)  # "HTTP port + 1" may be taken
        return cls(
            [*argv, *settings_options(**settings), *args], log_dir=log_dir, tls=tls, nofile=nofile
        )

    # --- lifecycle ---

    def launch(self: _Process) -> _Process:
        """Start the process on a free port; do not wait for it."""
        self.port = free_port()
        self.url = f"{'http' if self.tls is None else 'https'}://{HOST}:{self.port}"
        argv = [sys.executable, *(a.replace("{port}", str(self.port)) for a in self.argv_template)]
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.log_path is None:
            self._log = tempfile.TemporaryFile()
            output: IO[bytes] = self._log
        else:
            output = open(self.log_path, "wb")  # the child keeps its own copy
        with contextlib.ExitStack() as own:
            if self.log_path is not None:
                own.enter_context(output)
            self.proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                preexec_fn=self._preexec(),
            )
        return self

    def _preexec(self) -> Callable[[], None] | None:
        nofile = self.nofile
        if nofile is None:
            return _die_with_parent if _PRCTL is not None else None

        def preexec() -> None:  # pragma: no cover - runs in the child before exec
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
            if _PRCTL is not None:
                _die_with_parent()

        return preexec

    def start(self: _Process) -> _Process:
        """Launch and wait until it serves; on another port if the first was taken."""
        for _ in range(3):
            if self.launch().wait_ready():
                return self
        raise RuntimeError(f"no free port found; the last output:\n{self.log}")

    def wait_ready(self, timeout: float | None = None, path: str = "/health") -> bool:
        """Wait until it serves (``GET path`` answers 200): ``True``; ``False`` if its port was
        taken meanwhile.

        Raises (with the server's output) if it exits otherwise or is not ready in time.
        """
        assert self.proc is not None, "not launched"
        deadline = time.monotonic() + (self.start_timeout if timeout is None else timeout)
        while time.monotonic() < deadline:
            if _is_up(self.port, self.http, self.tls, path):
                return True
            if self.proc.poll() is not None:
                if "address already in use" in self.log.lower():
                    return False
                break
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"{self.command} did not become ready; its output:\n{self.log}")

    def wait_warm(self, timeout: float = 180.0) -> None:
        """Wait until ``GET /ready`` answers 200: the kernels warmed up (``warm_up_kernels``),
        from when on small pushes are served on the loop."""
        self.wait_ready(timeout, path="/ready")

    def wait_exit(self, timeout: float = 60.0) -> int:
        """The exit code, once it has exited."""
        assert self.proc is not None, "not launched"
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"{self.command} did not exit; its output:\n{self.log}") from None

    def terminate(self) -> int:
        """SIGTERM, as a process manager or ``docker stop`` sends it; returns the exit code."""
        assert self.proc is not None, "not launched"
        self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(self.stop_timeout + 30)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``stop_timeout`` seconds; then close its log."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self: _Process) -> _Process:
        if self.proc is not None and self.proc.poll() is None:
            return self  # already started (start_paramserver)
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- what it is ---

    @property
    def command(self) -> str:
        return " ".join(["python", *self.argv_template]).replace("{port}", str(self.port))

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not launched"
        return self.proc.pid

    @property
    def log(self) -> str:
        """Everything it printed so far."""
        if self.log_path is not None:
            return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        if self._log is None:
            return ""
        # pread: the child writes through the same file offset, which a seek would move.
        fd = self._log.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode("utf-8", "replace")


def start_paramserver(
    log_dir: Path,
    *args: str,
    tls: ssl.SSLContext | None = None,
    nofile: int | None = None,
    **settings: Any,
) -> ServerProcess:
    """``python -m paramserver serve`` with ``args`` and ``settings``, started and serving;
    its output in ``log_dir``. The kernels are not warmed up unless asked."""
    settings.setdefault("warm_up_kernels", False)
    return ServerProcess.paramserver(
        *args, log_dir=log_dir, tls=tls, nofile=nofile, **settings
    ).start()
