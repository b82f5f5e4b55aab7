"""The HTTP server around the app: uvicorn, with the connection guard and TLS.

:func:`http_server` is what ``paramserver serve`` runs and what the tests' in-process servers
run, so both have the same timeouts, cap and TLS. TLS is Python's ``ssl`` under asyncio's TLS
layer (:class:`paramserver.server.connections.GuardedTLSProtocol`), built from
``--ssl-certfile`` / ``--ssl-keyfile`` and, for client certificates, ``--ssl-ca-certs`` with
``--ssl-client-cert required|optional``.

:class:`Readiness` is what ``GET /ready`` reports: the port opens once the sessions are
recovered (uvicorn binds after the app's start-up), and the kernels load after that, while
``/health`` already answers.
"""

from __future__ import annotations

import logging
import resource
import socket
import ssl
import threading
from typing import Any

import uvicorn
from starlette.concurrency import run_in_threadpool

from .connections import ConnectionGuard, protocol_factory
from .settings import Settings

log = logging.getLogger("paramserver")

#: File descriptors kept out of the connection cap: the listening socket, snapshot and journal
#: files, log files, numba's caches, the event loop's own.
RESERVED_FILE_DESCRIPTORS = 64

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server's TLS context, or None for plain HTTP; ValueError names a bad file."""
    if settings.ssl_certfile is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(settings.ssl_certfile), _optional_path(settings.ssl_keyfile))
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(
            f"cannot load the certificate {settings.ssl_certfile} "
            f"(key {settings.ssl_keyfile or 'in the same file'}): {exc}"
        ) from exc
    if settings.ssl_ca_certs is not None:
        try:
            context.load_verify_locations(cafile=str(settings.ssl_ca_certs))
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"cannot load the client CA certificates {settings.ssl_ca_certs}: {exc}"
            ) from exc
        context.verify_mode = (
            ssl.CERT_REQUIRED if settings.ssl_client_cert == "required" else ssl.CERT_OPTIONAL
        )
    return context


def _optional_path(path: Any) -> str | None:
    return None if path is None else str(path)


def connection_caps(settings: Settings) -> tuple[int, int]:
    """The HTTP and data-plane connection caps: ``max_connections`` and
    ``data_plane_max_connections`` (0 without a data plane), lowered together to what the
    file-descriptor limit allows."""
    http = settings.max_connections
    plane = settings.data_plane_max_connections if settings.data_plane else 0
    allowed = connection_cap(http + plane)
    if allowed >= http + plane:
        return http, plane
    plane_share = 0 if plane == 0 else max(1, allowed * plane // (http + plane))
    return max(1, allowed - plane_share), plane_share


def connection_cap(requested: int) -> int:
    """``requested``, lowered to what the file-descriptor limit allows (raised first to the
    hard limit, as Go's runtime does), with a warning when lowered."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = requested + RESERVED_FILE_DESCRIPTORS
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return requested
    allowed = max(1, soft - RESERVED_FILE_DESCRIPTORS)
    log.warning(
        "connections (max_connections plus data_plane_max_connections) %d lowered to %d: the "
        "file-descriptor limit is %d (ulimit -n) and %d are kept for files; raise the limit "
        "to hold more connections",
        requested,
        allowed,
        soft,
        RESERVED_FILE_DESCRIPTORS,
    )
    return allowed


class Readiness:
    """Whether the server is ready for traffic, as ``GET /ready`` answers it.

    Ready once nothing is pending: ``"recovery"`` (snapshots and the journal; done before the
    port opens, since uvicorn binds only after the app's start-up) and ``"kernels"`` (the numba
    kernels loaded or compiled, in a thread of their own after the port opens; done at once
    with ``--no-warm-up-kernels``). Not ready again once the server stops or when its start-up
    failed after the port opened (the server then exits). Thread-safe: the warm-up thread
    reports here.
    """

    STEPS = ("recovery", "kernels")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending = list(self.STEPS)
        self._failed = False
        self._stopping = False

    def done(self, step: str) -> None:
        """``step`` (one of :data:`STEPS`) is finished."""
        if step not in self.STEPS:
            raise ValueError(f"unknown start-up step {step!r}")
        with self._lock:
            if step in self._pending:
                self._pending.remove(step)

    def fail(self) -> None:
        """The start-up failed after the port opened: never ready; :class:`_Server` exits."""
        with self._lock:
            self._failed = True

    def stop(self) -> None:
        """The server is shutting down: not ready any more."""
        with self._lock:
            self._stopping = True

    @property
    def failed(self) -> bool:
        return self._failed

    @property
    def ready(self) -> bool:
        with self._lock:
            return not (self._pending or self._failed or self._stopping)

    def status(self) -> dict[str, Any]:
        """The body of ``GET /ready``: ``{"status": "ready"}``, else ``{"status": "starting",
        "waiting_for": [...]}``, ``{"status": "failed"}`` or ``{"status": "stopping"}``."""
        with self._lock:
            if self._failed:
                return {"status": "failed"}
            if self._stopping:
                return {"status": "stopping"}
            if self._pending:
                return {"status": "starting", "waiting_for": list(self._pending)}
            return {"status": "ready"}


def _readiness_of(app: Any) -> Readiness | None:
    readiness = getattr(getattr(app, "state", None), "readiness", None)
    return readiness if isinstance(readiness, Readiness) else None


class _Server(uvicorn.Server):
    """uvicorn's server, which at the start of a shutdown first turns ``/ready`` to 503 and ends
    the open sync rounds (:meth:`SessionService.end_rounds`): their waiting pushes are answered
    503 at once rather than holding the graceful shutdown until its timeout. It also stops when
    the app's start-up fails after the port opened (:meth:`Readiness.fail`)."""

    async def on_tick(self, counter: int) -> bool:
        readiness = _readiness_of(self.config.app)
        if readiness is not None and readiness.failed:
            return True  # should exit; the failure is logged where it happened
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        app = self.config.app
        readiness = _readiness_of(app)
        if readiness is not None:
            readiness.stop()
        service = getattr(getattr(app, "state", None), "service", None)
        if service is not None:
            await run_in_threadpool(service.end_rounds)
        await super().shutdown(sockets=sockets)


def http_server(app: Any, settings: Settings, **config: Any) -> uvicorn.Server:
    """A uvicorn server for ``app`` on ``settings.host:settings.port`` with the guard's
    timeouts and cap and TLS when configured; ``config`` adds uvicorn options (log_level,
    access_log, port, ...)."""
    state = getattr(app, "state", None)
    direct = None
    if state is not None and hasattr(state, "tls_context"):  # create_app's: loaded once
        tls = state.tls_context
        http_cap = state.connection_caps[0]
        from .api.fastpath import DirectPushes  # the app's modules: not for a bare app

        direct = DirectPushes(app)
    else:
        tls = tls_context(settings)
        http_cap = connection_caps(settings)[0]
    guard = ConnectionGuard(
        max_connections=http_cap,
        header_timeout=settings.header_timeout_seconds,
        send_timeout=settings.request_timeout_seconds,
    )
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level.lower(),
        "timeout_graceful_shutdown": 30,
        "lifespan": "on",
        "ws": "none",  # no WebSocket routes: an upgrade request is answered as plain HTTP
    }
    options.update(config)
    uvicorn_config = uvicorn.Config(
        app,
        http=protocol_factory(guard, tls, direct),  # type: ignore[arg-type]
        timeout_keep_alive=settings.idle_timeout_seconds,  # type: ignore[arg-type]
        **options,
    )
    server = _Server(uvicorn_config)
    server.connection_guard = guard  # type: ignore[attr-defined]
    if tls is not None:
        logging.getLogger("uvicorn.error").addFilter(_say_https)
        log.info(
            "TLS on%s",
            ""
            if settings.ssl_ca_certs is None
            else f"; client certificates {settings.ssl_client_cert}",
        )
    return server


def _say_https(record: logging.LogRecord) -> bool:
    """uvicorn announces "Uvicorn running on http://..." since TLS runs under its protocol
    (connections.GuardedTLSProtocol), not through its own ssl options: say https."""
    if record.msg.startswith("Uvicorn running on") and record.args:
        args = tuple(record.args) if isinstance(record.args, tuple) else (record.args,)
        if args and args[0] == "http":
            record.args = ("https", *args[1:])
    return True


def warn_if_tokens_travel_in_clear(settings: Settings, has_tokens: bool) -> None:
    """Tokens without TLS on a non-loopback address cross the network in clear text."""
    if has_tokens and settings.ssl_certfile is None and settings.host not in LOOPBACK_HOSTS:
        log.warning(
            "tokens are set but TLS is not: on %s every bearer token crosses the network in "
            "clear text; give --ssl-certfile and --ssl-keyfile (or PARAMSERVER_SSL_CERTFILE / "
            "PARAMSERVER_SSL_KEYFILE)",
            settings.host,
        )
