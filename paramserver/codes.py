"""The protocol's error codes, their HTTP statuses, the error body, and the session-id rule.

Every error answer is ``{"error": {"code": str, "message": str, ...}}`` with the status its
code belongs to (some codes add fields: ``stale_gradient`` the session's ``iterations``).
:class:`ErrorCode` is the one list of codes: the server raises them
(:mod:`paramserver.server.errors`), the client maps them back to its exception tree
(:mod:`paramserver.client.errors`), and ``docs/protocol.md`` documents them.
"""

from __future__ import annotations

import enum
import json
import re
from typing import Any

__all__ = [
    "SESSION_ID_PATTERN",
    "SESSION_ID_RULE",
    "STATUS",
    "ErrorCode",
    "MessageError",
    "error_body",
    "error_json",
    "is_session_id",
    "status_of",
]


class ErrorCode(str, enum.Enum):
    """Every ``code`` an error body can carry; its value is the string on the wire."""

    # 400: the body is not well-formed
    BAD_REQUEST = "bad_request"
    # 401, 403: authentication
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    # 404: no such route, no such session
    NOT_FOUND = "not_found"
    SESSION_NOT_FOUND = "session_not_found"
    # 405, 406: stray HTTP errors of the framework
    METHOD_NOT_ALLOWED = "method_not_allowed"
    NOT_ACCEPTABLE = "not_acceptable"
    # 408: the body did not arrive in time
    REQUEST_TIMEOUT = "request_timeout"
    # 409: conflicts with the server's state
    SESSION_EXISTS = "session_exists"
    SNAPSHOTS_DISABLED = "snapshots_disabled"
    ITERATIONS_EXHAUSTED = "iterations_exhausted"
    STALE_GRADIENT = "stale_gradient"
    ROUND_ABORTED = "round_aborted"
    # 413, 415
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    # 422: well-formed, but the content is invalid
    INVALID_REQUEST = "invalid_request"
    UNKNOWN_OPTIMIZER = "unknown_optimizer"
    INVALID_OPTIMIZER = "invalid_optimizer"
    INVALID_TENSOR = "invalid_tensor"
    PARAMETER_MISMATCH = "parameter_mismatch"
    NON_FINITE_GRADIENT = "non_finite_gradient"
    NON_FINITE_RESULT = "non_finite_result"
    INVALID_STATE = "invalid_state"
    INVALID_WEIGHTS = "invalid_weights"
    INVALID_SESSION_ID = "invalid_session_id"
    INVALID_IDEMPOTENCY_KEY = "invalid_idempotency_key"
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    TENSORFLOW_NOT_INSTALLED = "tensorflow_not_installed"
    INVALID_TRAINING = "invalid_training"
    INVALID_CONSTRAINT = "invalid_constraint"
    MISSING_BASE_ITERATIONS = "missing_base_iterations"
    INVALID_BASE_ITERATIONS = "invalid_base_iterations"
    INVALID_METRICS = "invalid_metrics"
    # 500
    INTERNAL_ERROR = "internal_error"
    # 503: not processed; retry later (Retry-After)
    SERVICE_UNAVAILABLE = "service_unavailable"
    SESSION_BUSY = "session_busy"
    JOURNAL_FAILED = "journal_failed"
    SNAPSHOT_FAILED = "snapshot_failed"
    TOO_MANY_IDEMPOTENCY_KEYS = "too_many_idempotency_keys"
    ROUND_TIMEOUT = "round_timeout"
    ROUND_FULL = "round_full"
    # 507: a quota would be exceeded
    INSUFFICIENT_STORAGE = "insufficient_storage"
    TOO_MANY_SESSIONS = "too_many_sessions"
    MEMORY_QUOTA_EXCEEDED = "memory_quota_exceeded"

    def __str__(self) -> str:
        return self.value


_C = ErrorCode

#: The HTTP status of every code.
STATUS: dict[ErrorCode, int] = {
    _C.BAD_REQUEST: 400,
    _C.UNAUTHORIZED: 401,
    _C.FORBIDDEN: 403,
    _C.NOT_FOUND: 404,
    _C.SESSION_NOT_FOUND: 404,
    _C.METHOD_NOT_ALLOWED: 405,
    _C.NOT_ACCEPTABLE: 406,
    _C.REQUEST_TIMEOUT: 408,
    _C.SESSION_EXISTS: 409,
    _C.SNAPSHOTS_DISABLED: 409,
    _C.ITERATIONS_EXHAUSTED: 409,
    _C.STALE_GRADIENT: 409,
    _C.ROUND_ABORTED: 409,
    _C.PAYLOAD_TOO_LARGE: 413,
    _C.UNSUPPORTED_MEDIA_TYPE: 415,
    _C.INVALID_REQUEST: 422,
    _C.UNKNOWN_OPTIMIZER: 422,
    _C.INVALID_OPTIMIZER: 422,
    _C.INVALID_TENSOR: 422,
    _C.PARAMETER_MISMATCH: 422,
    _C.NON_FINITE_GRADIENT: 422,
    _C.NON_FINITE_RESULT: 422,
    _C.INVALID_STATE: 422,
    _C.INVALID_WEIGHTS: 422,
    _C.INVALID_SESSION_ID: 422,
    _C.INVALID_IDEMPOTENCY_KEY: 422,
    _C.IDEMPOTENCY_KEY_REUSED: 422,
    _C.TENSORFLOW_NOT_INSTALLED: 422,
    _C.INVALID_TRAINING: 422,
    _C.INVALID_CONSTRAINT: 422,
    _C.MISSING_BASE_ITERATIONS: 422,
    _C.INVALID_BASE_ITERATIONS: 422,
    _C.INVALID_METRICS: 422,
    _C.INTERNAL_ERROR: 500,
    _C.SERVICE_UNAVAILABLE: 503,
    _C.SESSION_BUSY: 503,
    _C.JOURNAL_FAILED: 503,
    _C.SNAPSHOT_FAILED: 503,
    _C.TOO_MANY_IDEMPOTENCY_KEYS: 503,
    _C.ROUND_TIMEOUT: 503,
    _C.ROUND_FULL: 503,
    _C.INSUFFICIENT_STORAGE: 507,
    _C.TOO_MANY_SESSIONS: 507,
    _C.MEMORY_QUOTA_EXCEEDED: 507,
}
assert set(STATUS) == set(ErrorCode), "every code has a status"


def status_of(code: ErrorCode | str) -> int:
    """The HTTP status of ``code`` (500 for a string that is not one of ours)."""
    try:
        return STATUS[ErrorCode(code)]
    except ValueError:
        return 500


def error_body(code: ErrorCode | str, message: str, **details: Any) -> dict[str, dict[str, Any]]:
    """The protocol's error body; ``details`` are extra fields of the error object (a
    ``stale_gradient`` carries the session's ``iterations``)."""
    return {"error": {"code": str(code), "message": message, **details}}


def error_json(code: ErrorCode | str, message: str, **details: Any) -> bytes:
    """:func:`error_body` as the JSON bytes of an answer (for routes and middlewares alike)."""
    return json.dumps(error_body(code, message, **details), separators=(",", ":")).encode("utf-8")


class MessageError(ValueError):
    """A message that cannot be read or made: ``code`` says why, ``status`` is its HTTP status.

    Raised by :mod:`paramserver.messages`; the server answers it as an error body, the client
    turns it into a :class:`~paramserver.client.errors.ProtocolError` (an answer it cannot read)
    or raises it before sending (a message it cannot make).
    """

    def __init__(self, message: str, *, code: ErrorCode = ErrorCode.INVALID_REQUEST) -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    @property
    def status(self) -> int:
        return STATUS[self.code]


#: A session id: 1-128 characters of ``[A-Za-z0-9._-]``, but not ``.`` or ``..`` (URL
#: normalisation would turn ``/sessions/..`` into another route).
SESSION_ID_PATTERN = r"^(?!\.{1,2}$)[A-Za-z0-9._-]{1,128}$"
SESSION_ID_RULE = "1-128 characters of [A-Za-z0-9._-], not '.' or '..'"
_SESSION_ID = re.compile(SESSION_ID_PATTERN)


def is_session_id(value: Any) -> bool:
    """Whether ``value`` is a valid session id (:data:`SESSION_ID_PATTERN`)."""
    return isinstance(value, str) and _SESSION_ID.fullmatch(value) is not None
