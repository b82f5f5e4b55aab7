"""The application factory: ``create_app(settings)`` builds a configured FastAPI app.

State (the session store, the service) is created in the lifespan, not in module globals, so
that several apps can live in one process (the tests do that).

Start-up, in the lifespan: recovery (lock the snapshot directory, load the snapshots, replay
the journal) and the data plane, then uvicorn opens the port; the numba kernels load in a
thread of their own meanwhile, so ``/health`` answers at once and ``/ready`` says 503 until
they are loaded (:class:`~paramserver.server.serving.Readiness`). A request that needs a
kernel before then waits for it or compiles it: it is never refused.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from paramserver import __version__

from .api import health, observability, sessions
from .api.fastpath import SmallPushes
from .api.schemas import CreateSessionRequest
from .auth import AuthMiddleware, load_tokens
from .backpressure import ConcurrencyLimitMiddleware
from .dataplane import DataPlane
from .errors import install_error_handlers
from .observability import RequestMetrics, RequestRecord, ServerMetrics
from .optim import default_backend
from .persistence import Durability, FinalSnapshotsFailed
from .service import SessionService
from .serving import (
    LOOPBACK_HOSTS,
    Readiness,
    connection_caps,
    tls_context,
    warn_if_tokens_travel_in_clear,
)
from .sessions import SessionStore
from .settings import Settings

log = logging.getLogger("paramserver")

DESCRIPTION = """
A parameter server for training one model from many workers. A session holds a model's
weights and a Keras 2.2 optimizer's state; workers push msgpack-encoded gradients and get the
new weights back. Arrays travel as `{dtype, shape, data}` maps with little-endian bytes in
`data`. Errors are `{"error": {"code", "message"}}`. See docs/protocol.md.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings if settings is not None else Settings()
    tokens = load_tokens(settings.tokens, settings.tokens_file)
    caps = connection_caps(settings)
    tls = tls_context(settings)  # once: the HTTP server (serving.http_server) reads it too

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = SessionStore(
            max_sessions=settings.max_sessions,
            max_session_bytes=settings.max_session_bytes,
            max_total_bytes=settings.max_total_bytes,
        )
        durability = Durability(settings) if settings.snapshot_dir is not None else None
        if durability is not None:
            durability.observe_fsync = metrics.fsync_seconds.observe
            durability.observe_snapshot = metrics.snapshot_written
        service = SessionService(store, settings, durability)
        app.state.service = service
        readiness = app.state.readiness = Readiness()
        if durability is not None:
            # Lock the directory, load the snapshots, replay the journal: a failure here
            # (another server on the directory, a damaged journal) stops the start-up. This
            # runs before uvicorn opens the port: a server that answers has its sessions.
            try:
                await run_in_threadpool(durability.open, service.store, service.idempotency)
            except Exception as exc:
                log.critical("cannot start: %s", exc)
                raise
        readiness.done("recovery")
        stop = asyncio.Event()
        periodic: asyncio.Task[None] | None = None
        try:
            _announce_access(settings, bool(tokens))
            address = settings.data_plane_address()
            if address is not None:
                plane = DataPlane(service, settings, tokens, tls, max_connections=caps[1])
                try:
                    plane.start(*address)
                except OSError as exc:
                    if settings.data_plane_port is not None or address[1] == 0:
                        log.critical("cannot start the data plane on %s:%d: %s", *address, exc)
                        raise
                    # the default (HTTP port + 1) is taken: any free port; clients ask for it
                    log.warning(
                        "the data plane's default port %d is taken (%s); it listens on a free "
                        "port instead (GET /data-plane announces it; set --data-plane-port to "
                        "choose)",
                        address[1],
                        exc,
                    )
                    plane.start(address[0], 0)
                app.state.data_plane = plane
            if settings.warm_up_kernels:
                _warm_up_kernels(readiness)
            else:
                readiness.done("kernels")  # compiled on first use
            log.info(
                "paramserver %s started (kernels: %s%s)",
                __version__,
                default_backend().name,
                "; loading them, GET /ready answers 200 once they are"
                if settings.warm_up_kernels
                else ", compiled on first use",
            )
            if durability is not None:
                periodic = asyncio.create_task(
                    _snapshot_periodically(durability, settings.snapshot_interval_seconds, stop)
                )
            yield
        finally:
            plane = app.state.data_plane
            if plane is not None:
                await run_in_threadpool(plane.stop)
            if durability is not None:
                stop.set()
                if periodic is not None:
                    await periodic
                # uvicorn runs this on SIGTERM/SIGINT once the requests in flight are answered:
                # the final snapshots, then the directory is unlocked. A final snapshot that
                # could not be written makes `paramserver serve` exit non-zero.
                try:
                    await run_in_threadpool(durability.close)
                except FinalSnapshotsFailed as exc:
                    log.error("shutdown: %s", exc)
                    app.state.shutdown_failed = True

    app = FastAPI(
        title="paramserver",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.readiness = Readiness()  # replaced by the lifespan's own at each start
    app.state.shutdown_failed = False
    app.state.connection_caps = caps
    app.state.tls_context = tls
    app.state.data_plane = None
    app.state.tokens = tokens
    metrics = app.state.metrics = ServerMetrics(lambda: getattr(app.state, "service", None))
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(sessions.router)
    app.include_router(observability.router)
    _document_json_models(app)
    # innermost: small pushes of small sessions on the loop, every middleware around them
    app.add_middleware(SmallPushes, fastapi=app)
    if settings.limit_concurrency is not None:
        app.add_middleware(ConcurrencyLimitMiddleware, limit=settings.limit_concurrency)
    if tokens:
        app.add_middleware(AuthMiddleware, tokens=tokens, metrics_public=settings.metrics_public)
    # outermost: counts and logs every answer, the middlewares' refusals included
    record = app.state.request_record = RequestRecord(
        metrics, access_log=settings.log_format == "json"
    )
    app.add_middleware(RequestMetrics, record=record)
    return app


def _warm_up_kernels(readiness: Readiness) -> None:
    """Load (or compile) the numba kernels in a daemon thread, then mark them done in
    ``readiness``; a failure fails the start-up (the server exits with code 3).

    A thread of its own rather than the threadpool: nothing waits for it at shutdown (a kernel
    half compiled is simply not cached), and it holds no worker that requests need.
    """
    warm_up = getattr(default_backend(), "warm_up", None)
    if warm_up is None:  # the numpy backend: nothing to compile
        readiness.done("kernels")
        return

    def run() -> None:
        try:
            summary = warm_up()
        except Exception:
            log.critical("cannot start: loading the kernels failed", exc_info=True)
            readiness.fail()
            return
        readiness.done("kernels")
        log.info("kernels ready: %s", summary)
        if readiness.ready:
            log.info("paramserver %s ready", __version__)

    threading.Thread(target=run, name="paramserver-warm-up", daemon=True).start()


async def _snapshot_periodically(
    durability: Durability, interval: float, stop: asyncio.Event
) -> None:
    """Every ``interval`` seconds, snapshot the sessions changed since their last snapshot."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
        except asyncio.TimeoutError:  # not yet the builtin TimeoutError on Python 3.10
            pass
        else:
            return
        try:
            await run_in_threadpool(durability.snapshot_changed)
        except Exception:
            log.exception("periodic snapshot failed; retrying in %g s", interval)


def _announce_access(settings: Settings, has_tokens: bool) -> None:
    if has_tokens:
        log.info(
            "authentication on: every endpoint but /health, /ready and /dashboard needs a "
            "bearer token%s",
            " (/metrics is public: --metrics-public)" if settings.metrics_public else "",
        )
        warn_if_tokens_travel_in_clear(settings, has_tokens)
        return
    loopback = settings.host in LOOPBACK_HOSTS
    log.warning(
        "no tokens configured: the server is OPEN to anyone who can reach %s%s",
        settings.host,
        "" if loopback else " (not loopback! set PARAMSERVER_TOKENS)",
    )


def _document_json_models(app: FastAPI) -> None:
    """Add the JSON request models that routes parse by hand to the OpenAPI components."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = original()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        extra = CreateSessionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in extra.pop("$defs", {}).items():
            components.setdefault(name, definition)
        components["CreateSessionRequest"] = extra
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
