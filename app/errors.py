"""Domain errors and their one mapping to HTTP.

Every error body is ``{"error": {"code": str, "message": str}}``. Handlers never put a
traceback or an internal detail into a body: an unexpected exception is logged and answered
with a generic 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("paramserver")


class ServiceError(Exception):
    """An error a client caused or must know about; carries its HTTP status and code."""

    status = 500
    code = "internal_error"

    def __init__(
        self, message: str, *, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.headers = headers or {}


class BadRequest(ServiceError):
    """The body is not well-formed (HTTP 400)."""

    status = 400
    code = "bad_request"


class Unauthorized(ServiceError):
    status = 401
    code = "unauthorized"


class Forbidden(ServiceError):
    status = 403
    code = "forbidden"


class SessionNotFound(ServiceError):
    status = 404
    code = "session_not_found"


class SessionExists(ServiceError):
    status = 409
    code = "session_exists"


class RequestTimeout(ServiceError):
    status = 408
    code = "request_timeout"


class PayloadTooLarge(ServiceError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status = 415
    code = "unsupported_media_type"


class InvalidRequest(ServiceError):
    """Well-formed but invalid (HTTP 422); ``code`` says what kind."""

    status = 422
    code = "invalid_request"


class ServiceUnavailable(ServiceError):
    status = 503
    code = "service_unavailable"


class InsufficientStorage(ServiceError):
    """A session or memory quota would be exceeded (HTTP 507)."""

    status = 507
    code = "insufficient_storage"


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    503: "service_unavailable",
}


def install_error_handlers(app: FastAPI) -> None:
    """Map domain errors, FastAPI's validation errors and stray HTTP errors to our body."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()))
            parts.append(f"{loc}: {err.get('msg', 'invalid')}")
        return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        return error_response(exc.status_code, code, message, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal server error")
