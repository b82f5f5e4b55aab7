"""Liveness: ``GET /health``. Never needs a token."""

from __future__ import annotations

from fastapi import APIRouter

from .schemas import Health

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health, summary="Liveness check")
async def health() -> dict[str, str]:
    return {"status": "ok"}
