"""Domain errors and their one mapping to HTTP.

Every error body is ``{"error": {"code": str, "message": str}}`` (built by
:func:`paramserver.codes.error_json`, for these handlers and the middlewares alike); a code's
status comes from :data:`paramserver.codes.STATUS`. Handlers never put a traceback or an
internal detail into a body: an unexpected exception is logged and answered with a generic 500.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from paramserver.codes import STATUS, ErrorCode, MessageError, error_json

log = logging.getLogger("paramserver")


class ServiceError(Exception):
    """An error a client caused or must know about; its ``code`` gives the HTTP status."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | str | None = None,
        headers: dict[str, str] | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = ErrorCode(code)
        self.headers = headers or {}
        #: Extra fields of the error object (``stale_gradient``: the session's iterations).
        self.details = details or {}

    @property
    def status(self) -> int:
        return STATUS[self.code]

    @classmethod
    def of(cls, exc: MessageError) -> ServiceError:
        """The service error of a message that could not be read."""
        return cls(exc.message, code=exc.code)


class BadRequest(ServiceError):
    """The body is not well-formed (HTTP 400)."""

    code = ErrorCode.BAD_REQUEST


class Unauthorized(ServiceError):
    code = ErrorCode.UNAUTHORIZED


class Forbidden(ServiceError):
    code = ErrorCode.FORBIDDEN


class SessionNotFound(ServiceError):
    code = ErrorCode.SESSION_NOT_FOUND


class SessionExists(ServiceError):
    code = ErrorCode.SESSION_EXISTS


class RequestTimeout(ServiceError):
    code = ErrorCode.REQUEST_TIMEOUT


class PayloadTooLarge(ServiceError):
    code = ErrorCode.PAYLOAD_TOO_LARGE


class UnsupportedMediaType(ServiceError):
    code = ErrorCode.UNSUPPORTED_MEDIA_TYPE


class InvalidRequest(ServiceError):
    """Well-formed but invalid (HTTP 422); ``code`` says what kind."""

    code = ErrorCode.INVALID_REQUEST


class ServiceUnavailable(ServiceError):
    code = ErrorCode.SERVICE_UNAVAILABLE


class StaleGradient(ServiceError):
    """A push computed on weights older than the session allows (HTTP 409); carries the
    session's ``iterations``."""

    code = ErrorCode.STALE_GRADIENT

    def __init__(self, message: str, *, iterations: int, **kwargs: Any) -> None:
        super().__init__(message, details={"iterations": iterations}, **kwargs)
        self.iterations = iterations


class InsufficientStorage(ServiceError):
    """A session or memory quota would be exceeded (HTTP 507)."""

    code = ErrorCode.INSUFFICIENT_STORAGE


def error_response(
    status: int,
    code: ErrorCode | str,
    message: str,
    headers: dict[str, str] | None = None,
    details: dict[str, Any] | None = None,
) -> Response:
    return Response(
        error_json(code, message, **(details or {})),
        status_code=status,
        headers=headers,
        media_type="application/json",
    )


_HTTP_CODES: dict[int, ErrorCode] = {
    400: ErrorCode.BAD_REQUEST,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    406: ErrorCode.NOT_ACCEPTABLE,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    422: ErrorCode.INVALID_REQUEST,
    503: ErrorCode.SERVICE_UNAVAILABLE,
}


def install_error_handlers(app: FastAPI) -> None:
    """Map domain errors, FastAPI's validation errors and stray HTTP errors to our body."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> Response:
        return error_response(exc.status, exc.code, exc.message, exc.headers, exc.details)

    @app.exception_handler(MessageError)
    async def _message_error(request: Request, exc: MessageError) -> Response:
        return error_response(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()))
            parts.append(f"{loc}: {err.get('msg', 'invalid')}")
        return error_response(422, ErrorCode.INVALID_REQUEST, "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        known = _HTTP_CODES.get(exc.status_code)
        code = "http_error" if known is None else known.value
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        return error_response(exc.status_code, code, message, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, ErrorCode.INTERNAL_ERROR, "internal server error")
