"""Liveness, ``GET /health`` (never needs a token), and the data plane's announcement."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from paramserver.codes import ErrorCode

from ..errors import ServiceError
from .schemas import DataPlaneAnnouncement, Health, error_responses

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health, summary="Liveness check")
async def health() -> dict[str, str]:
    return {"status": "ok"}


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
