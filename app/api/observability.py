"""What operators and dashboards read: ``GET /metrics`` (Prometheus), ``GET /stats`` (JSON),
``GET /sessions/{id}/metrics`` (the points workers report) and ``GET /dashboard`` (a page
served from the package's static files, no CDN, no build step)."""

from __future__ import annotations

from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from paramserver.codes import ErrorCode

from ..errors import ServiceError, SessionNotFound
from . import schemas
from .sessions import ServiceDep, SessionId

router = APIRouter()

#: The dashboard's files (``paramserver/server/static/dashboard``), by name, with their type.
DASHBOARD_FILES = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
#: Points one answer of ``GET /sessions/{id}/metrics`` carries at most.
MAX_POINTS = 10_000


@router.get(
    "/metrics",
    tags=["observability"],
    summary="Prometheus metrics",
    description="The server's and every session's series in the Prometheus text format "
    "(docs/observability.md lists them). With tokens configured it needs one (read-only is "
    "enough) unless the server runs with --metrics-public.",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}, **schemas.error_responses(401)},
)
async def metrics(request: Request) -> Response:
    body = await run_in_threadpool(request.app.state.metrics.render)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/stats",
    tags=["observability"],
    summary="Per-session statistics over the last minute",
    description="For each session: optimizer, iterations, parameters' bytes held, steps per "
    "second and push latency p50/p99 over the last minute, pushes, replays, stale "
    "refusals, bytes in and out, the last push's age. What the dashboard draws.",
)
async def stats(service: ServiceDep) -> dict[str, Any]:
    def collect() -> dict[str, Any]:
        sessions = []
        for session in service.store.list():
            trainer = session.trainer
            sessions.append(
                {
                    "session_id": session.id,
                    "optimizer": type(trainer.optimizer).__name__,
                    "iterations": trainer.iterations,
                    "training": trainer.training.to_dict(),
                    "held_bytes": session.held_bytes(),
                    "metric_names": list(session.points.names),
                    **session.stats.window(),
                }
            )
        return {
            "sessions": sessions,
            "server": {
                "sessions": len(sessions),
                "held_bytes": sum(s["held_bytes"] for s in sessions),
            },
        }

    return await run_in_threadpool(collect)


@router.get(
    "/sessions/{session_id}/metrics",
    tags=["observability"],
    summary="The points workers reported",
    description="The points (name, value, iterations, time) that pushes reported in their "
    "'metrics' and that were applied, oldest first: the session keeps its last 10,000 (fewer "
    "when its memory quota leaves less room). Filter by name, by iterations > "
    "since_iterations, and keep the last 'limit'. A read: a read-only token may call it.",
    responses=schemas.error_responses(404, 422),
)
async def session_metrics(
    session_id: SessionId,
    service: ServiceDep,
    name: Annotated[str | None, Query(max_length=64, description="Only this metric.")] = None,
    since_iterations: Annotated[
        int | None, Query(ge=-1, description="Only points of iterations after this.")
    ] = None,
    limit: Annotated[
        int, Query(ge=0, le=MAX_POINTS, description="The last this many points.")
    ] = MAX_POINTS,
) -> dict[str, Any]:
    session = service.store.find(session_id)
    if session is None:
        raise SessionNotFound(f"no session {session_id!r}")
    points = await run_in_threadpool(
        session.points.points, name=name, since_iterations=since_iterations, limit=limit
    )
    return {"session_id": session.id, "names": list(session.points.names), "points": points}


def _dashboard_file(name: str) -> Response:
    data = resources.files("paramserver.server").joinpath("static", "dashboard", name).read_bytes()
    return Response(
        data,
        media_type=DASHBOARD_FILES[name],
        headers={
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
            # the page loads only its own files and talks only to this server
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
            "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
            "Referrer-Policy": "no-referrer",
        },
    )


@router.get(
    "/dashboard",
    tags=["observability"],
    summary="The live dashboard",
    description="A page served from the package (public: a browser cannot send a bearer "
    "header when it opens a page); the data it fetches needs a token as usual, which the page "
    "asks for and keeps in sessionStorage.",
    response_class=Response,
)
async def dashboard() -> Response:
    return _dashboard_file("index.html")


@router.get("/dashboard/{name}", include_in_schema=False)
async def dashboard_file(name: str) -> Response:
    if name not in DASHBOARD_FILES or name == "index.html":
        raise ServiceError(f"no dashboard file {name!r}"[:200], code=ErrorCode.NOT_FOUND)
    return _dashboard_file(name)
