"""Liveness, ``GET /health``, and readiness, ``GET /ready`` (neither needs a token), and the
data plane's announcement."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from paramserver.codes import ErrorCode

from ..errors import ServiceError
from ..serving import Readiness
from .schemas import DataPlaneAnnouncement, Health, error_responses

router = APIRouter(tags=["health"])

#: Seconds a client (or a probe) is told to wait before asking ``/ready`` again.
READY_RETRY_AFTER_SECONDS = 1


@router.get("/health", response_model=Health, summary="Liveness check")
async def health() -> dict[str, str]:
    return {"status": "ok"}


class Ready(BaseModel):
    status: Literal["ready"]


class NotReady(BaseModel):
    status: Literal["starting", "stopping", "failed"] = Field(
        description="starting: the start-up is not finished (see waiting_for); stopping: the "
        "server is shutting down; failed: the start-up failed and the server is exiting."
    )
    waiting_for: list[Literal["recovery", "kernels"]] | None = Field(
        None,
        description="While starting: what is not done yet; recovery (snapshots and the journal) "
        "and kernels (the numba kernels loaded or compiled).",
    )


@router.get(
    "/ready",
    response_model=Ready,
    summary="Readiness check",
    description="200 once the server is ready for traffic: its sessions are recovered from "
    "the snapshots and the journal and its kernels are loaded. 503 with Retry-After before "
    "that (the port opens once recovery is done; the kernels load after it opens, while "
    "/health already answers), while it shuts down, and after a failed start-up. Never needs "
    "a token. Liveness is /health.",
    responses={
        503: {
            "model": NotReady,
            "description": "Not ready (yet): starting, stopping or failed.",
            "headers": {
                "Retry-After": {
                    "description": "Seconds to wait before asking again.",
                    "schema": {"type": "integer"},
                }
            },
        }
    },
)
async def ready(request: Request) -> Any:
    readiness: Readiness = request.app.state.readiness
    status = readiness.status()
    if status["status"] == "ready":
        return status
    return JSONResponse(
        status, status_code=503, headers={"Retry-After": str(READY_RETRY_AFTER_SECONDS)}
    )


class NoDataPlane(ServiceError):
    code = ErrorCode.NOT_FOUND


@router.get(
    "/data-plane",
    response_model=DataPlaneAnnouncement,
    summary="Where push and pull are served over the data plane",
    description="The port (on this server's host), TLS and frame version of the data plane "
    "(docs/protocol.md, 'Data plane'). 404 when the server runs without one "
    "(--no-data-plane); clients then use the REST routes alone.",
    responses=error_responses(401, 404),
)
async def data_plane(request: Request) -> dict[str, Any]:
    plane = request.app.state.data_plane
    if plane is None:
        raise NoDataPlane("this server has no data plane (--no-data-plane)")
    announcement: dict[str, Any] = plane.announcement()
    return announcement
