"""Back-pressure: a bound on requests in progress, answered with 503 and ``Retry-After``.

Like uvicorn's ``--limit-concurrency`` but with the protocol's JSON error body and a
``Retry-After`` header, so that clients back off and retry (the request was not processed, so
a retry is always safe). ``/health`` is never refused.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from paramserver.codes import ErrorCode, error_json

__all__ = ["ConcurrencyLimitMiddleware"]


class ConcurrencyLimitMiddleware:
    def __init__(self, app: ASGIApp, limit: int, retry_after_seconds: int = 1) -> None:
        self.app = app
        self.limit = limit
        self.in_flight = 0
        body = error_json(
            ErrorCode.SERVICE_UNAVAILABLE,
            f"the server is at its limit of {limit} requests in progress; retry later",
        )
        self._start = {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(retry_after_seconds).encode()),
            ],
        }
        self._body = {"type": "http.response.body", "body": body}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            await send(self._start)
            await send(self._body)
            return
        self.in_flight += 1  # one event loop: no lock needed
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
