"""The exceptions the client raises, in one tree.

::

    ParamServerError                    anything this package raises about a request
    ├── TransportError                  no usable answer: connect/read/write failure, timeout
    │   └── DeadlineExceeded            the call's overall deadline passed (retries included)
    ├── ProtocolError                   an answer that is not what the protocol says
    └── ServerError                     an error answer: .status, .code, .message, .response_headers
        ├── BadRequest                  400 bad_request
        ├── Unauthorized                401 unauthorized
        ├── Forbidden                   403 forbidden
        ├── NotFound                    404 not_found (unknown route: check the base URL)
        │   └── SessionNotFound         404 session_not_found
        ├── RequestTimeout              408 request_timeout
        ├── SessionExists               409 session_exists
        ├── PayloadTooLarge             413 payload_too_large
        ├── UnsupportedMediaType        415 unsupported_media_type
        ├── InvalidRequest              422: .code is invalid_request, unknown_optimizer,
        │                               invalid_optimizer, invalid_tensor, parameter_mismatch,
        │                               non_finite_gradient, invalid_state, invalid_weights,
        │                               invalid_session_id, invalid_idempotency_key
        ├── InternalServerError         500 internal_error
        ├── ServiceUnavailable          503 service_unavailable, session_busy (.retry_after)
        └── InsufficientStorage         507 insufficient_storage, too_many_sessions,
                                        memory_quota_exceeded

A status without a class of its own (a proxy's 502, say) raises :class:`ServerError` itself,
with the status kept. Mistakes caught before anything is sent are ``ValueError`` or
``TypeError``: :class:`paramserver.optimizers.InvalidOptimizerConfig`,
:class:`paramserver.optimizers.UnknownOptimizer`, :class:`paramserver.wire.TensorError` (an array of
a dtype that cannot travel), or a list of gradients of the wrong length.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

from paramserver.codes import STATUS, ErrorCode

__all__ = [
    "BadRequest",
    "DeadlineExceeded",
    "Forbidden",
    "InsufficientStorage",
    "InternalServerError",
    "InvalidRequest",
    "NotFound",
    "ParamServerError",
    "PayloadTooLarge",
    "ProtocolError",
    "RequestTimeout",
    "ServerError",
    "ServiceUnavailable",
    "SessionExists",
    "SessionNotFound",
    "TransportError",
    "Unauthorized",
    "UnsupportedMediaType",
    "error_for_status",
    "parse_retry_after",
]


class ParamServerError(Exception):
    """Base of every error this client raises about a request."""


class TransportError(ParamServerError):
    """No usable answer arrived: the connection failed, broke, or timed out.

    Raised once the retry policy gives up (or at once when retrying is not safe); the
    ``httpx`` exception is the ``__cause__``. ``attempts`` counts the requests made.
    ``idempotency_key`` is set for a push: the push may or may not have been applied, and
    sending it again with ``push(..., idempotency_key=err.idempotency_key)`` within the
    server's idempotency window applies it at most once.
    """

    def __init__(
        self, message: str, *, attempts: int = 1, idempotency_key: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.attempts = attempts
        self.idempotency_key = idempotency_key


class DeadlineExceeded(TransportError):
    """The call's overall deadline (``Client(deadline=...)``) passed before a final answer:
    attempts, waits between them and the reading of answers included. ``idempotency_key`` is
    set for a push, as for any :class:`TransportError`."""


class ProtocolError(ParamServerError):
    """The server answered, but not with what the protocol promises (wrong type, bad body)."""


class ServerError(ParamServerError):
    """The server answered with an error status.

    ``status`` is the HTTP status, ``code`` and ``message`` come from the error body
    ``{"error": {"code", "message"}}`` (for a body that is not ours, such as a proxy's error
    page, ``code`` is ``"http_<status>"`` and ``message`` the start of the body),
    ``response_headers`` holds the response's headers, lower-case names.
    """

    status: int = 0
    default_code: str = ""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        response_headers: Mapping[str, str] | None = None,
        request: str = "",
    ) -> None:
        if status is not None:
            self.status = status
        self.code = code or self.default_code or f"http_{self.status}"
        self.message = message
        self.response_headers: dict[str, str] = {
            k.lower(): v for k, v in (response_headers or {}).items()
        }
        self.request = request
        where = f" ({request})" if request else ""
        super().__init__(f"{self.status} {self.code}: {message}{where}")


class BadRequest(ServerError):
    """400: the body was not well-formed for the protocol."""

    default_code = ErrorCode.BAD_REQUEST.value
    status = STATUS[ErrorCode.BAD_REQUEST]


class Unauthorized(ServerError):
    """401: no bearer token, or an unknown one."""

    default_code = ErrorCode.UNAUTHORIZED.value
    status = STATUS[ErrorCode.UNAUTHORIZED]


class Forbidden(ServerError):
    """403: the token may not do this (a read-only token pushing, say)."""

    default_code = ErrorCode.FORBIDDEN.value
    status = STATUS[ErrorCode.FORBIDDEN]


class NotFound(ServerError):
    """404 for a route the server does not have: usually a wrong base URL."""

    default_code = ErrorCode.NOT_FOUND.value
    status = STATUS[ErrorCode.NOT_FOUND]


class SessionNotFound(NotFound):
    """404: no session has that id (it was never made, was deleted, or the server restarted)."""

    default_code = ErrorCode.SESSION_NOT_FOUND.value


class RequestTimeout(ServerError):
    """408: the request body did not arrive in time."""

    default_code = ErrorCode.REQUEST_TIMEOUT.value
    status = STATUS[ErrorCode.REQUEST_TIMEOUT]


class SessionExists(ServerError):
    """409: a session with that id already exists."""

    default_code = ErrorCode.SESSION_EXISTS.value
    status = STATUS[ErrorCode.SESSION_EXISTS]


class PayloadTooLarge(ServerError):
    """413: the body is over the server's size limit."""

    default_code = ErrorCode.PAYLOAD_TOO_LARGE.value
    status = STATUS[ErrorCode.PAYLOAD_TOO_LARGE]


class UnsupportedMediaType(ServerError):
    """415: the Content-Type is not one the endpoint reads."""

    default_code = ErrorCode.UNSUPPORTED_MEDIA_TYPE.value
    status = STATUS[ErrorCode.UNSUPPORTED_MEDIA_TYPE]


class InvalidRequest(ServerError):
    """422: a well-formed request whose content is invalid; ``code`` says what is wrong."""

    default_code = ErrorCode.INVALID_REQUEST.value
    status = STATUS[ErrorCode.INVALID_REQUEST]


class InternalServerError(ServerError):
    """500: the server failed; the message is generic and the server's log has the details."""

    default_code = ErrorCode.INTERNAL_ERROR.value
    status = STATUS[ErrorCode.INTERNAL_ERROR]


class ServiceUnavailable(ServerError):
    """503: overloaded (``service_unavailable``) or the session stayed busy (``session_busy``);
    the request was not processed.

    ``retry_after`` is the server's ``Retry-After`` in seconds, or ``None``.
    """

    default_code = ErrorCode.SERVICE_UNAVAILABLE.value
    status = STATUS[ErrorCode.SERVICE_UNAVAILABLE]

    @property
    def retry_after(self) -> float | None:
        return parse_retry_after(self.response_headers.get("retry-after"))


class InsufficientStorage(ServerError):
    """507: a session or memory quota would be exceeded; ``code`` says which."""

    default_code = ErrorCode.INSUFFICIENT_STORAGE.value
    status = STATUS[ErrorCode.INSUFFICIENT_STORAGE]


_BY_STATUS: dict[int, type[ServerError]] = {
    cls.status: cls
    for cls in (
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        RequestTimeout,
        SessionExists,
        PayloadTooLarge,
        UnsupportedMediaType,
        InvalidRequest,
        InternalServerError,
        ServiceUnavailable,
        InsufficientStorage,
    )
}


def error_for_status(status: int, code: str | None) -> type[ServerError]:
    """The exception class for an error answer: by status, and for 404 by code."""
    if status == 404 and code == SessionNotFound.default_code:
        return SessionNotFound
    return _BY_STATUS.get(status, ServerError)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or an HTTP date), or None.

    A value that is neither, negative or not finite is ignored (``None``); a date in the past
    means 0.
    """
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds
