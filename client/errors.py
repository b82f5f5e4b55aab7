"""The exceptions the client raises, in one tree.

::

    ParamServerError                    anything this package raises about a request
    ├── TransportError                  no usable answer: connect/read/write failure, timeout
    │   └── DeadlineExceeded            the call's overall deadline passed (retries included)
    ├── ProtocolError                   an answer that is not what the protocol says
    ├── ShardError                      a sharded session's shards disagree or did not all answer
    │   ├── PushIncomplete              some shards applied a push, others did not answer
    │   │                               (.failed, .applied, .idempotency_key: retry with it)
    │   ├── ShardsDiverged              the shards are at different iterations (.iterations)
    │   └── LayoutMismatch              the servers do not hold this layout's shards
    └── ServerError                     an error answer: .status, .code, .message, .response_headers
        ├── BadRequest                  400 bad_request
        ├── Unauthorized                401 unauthorized
        ├── Forbidden                   403 forbidden
        ├── NotFound                    404 not_found (unknown route: check the base URL)
        │   └── SessionNotFound         404 session_not_found
        ├── RequestTimeout              408 request_timeout
        ├── Conflict                    409 snapshots_disabled, iterations_exhausted
        │   ├── SessionExists           409 session_exists
        │   ├── StaleGradient           409 stale_gradient (.iterations: the session's)
        │   └── RoundAborted            409 round_aborted (a state import ended the round)
        ├── PayloadTooLarge             413 payload_too_large
        ├── UnsupportedMediaType        415 unsupported_media_type
        ├── InvalidRequest              422: .code is invalid_request, unknown_optimizer,
        │                               invalid_optimizer, invalid_tensor, parameter_mismatch,
        │                               non_finite_gradient, invalid_state, invalid_weights,
        │                               invalid_session_id, invalid_idempotency_key
        ├── InternalServerError         500 internal_error
        ├── ServiceUnavailable          503 service_unavailable, session_busy (.retry_after)
        │   ├── RoundTimeout            503 round_timeout (the sync round did not fill)
        │   └── RoundFull               503 round_full (more pushes for a round than workers)
        └── InsufficientStorage         507 insufficient_storage, too_many_sessions,
                                        memory_quota_exceeded

The class is chosen by the error body's ``code`` first, then by the status: a status without a
class of its own (a proxy's 502, say) raises :class:`ServerError` itself, with the status kept.
Mistakes caught before anything is sent are ``ValueError`` or ``TypeError``:
:class:`paramserver.optimizers.InvalidOptimizerConfig`,
:class:`paramserver.optimizers.UnknownOptimizer`, :class:`paramserver.wire.TensorError` (an
array of a dtype that cannot travel), or a list of gradients of the wrong length.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

from paramserver.codes import STATUS, ErrorCode

__all__ = [
    "BadRequest",
    "Conflict",
    "DeadlineExceeded",
    "Forbidden",
    "InsufficientStorage",
    "InternalServerError",
    "InvalidRequest",
    "LayoutMismatch",
    "NotFound",
    "ParamServerError",
    "PayloadTooLarge",
    "PushIncomplete",
    "ProtocolError",
    "RequestTimeout",
    "RoundAborted",
    "RoundFull",
    "RoundTimeout",
    "ServerError",
    "ServiceUnavailable",
    "SessionExists",
    "SessionNotFound",
    "ShardError",
    "ShardsDiverged",
    "StaleGradient",
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


class ShardError(ParamServerError):
    """A sharded session's shards (one session per server) do not agree, or did not all
    answer one call."""


class PushIncomplete(ShardError):
    """A sharded push that some shards applied while others failed with a transient error
    (down, timing out, busy). ``failed`` maps each shard index that did not apply it to its
    error, ``applied`` lists the shards that did, ``idempotency_key`` is the push's key: push
    the same gradients again with ``idempotency_key=`` that key, and the shards that applied
    it replay their answer while the others apply it, once."""

    def __init__(
        self,
        message: str,
        *,
        failed: Mapping[int, BaseException],
        applied: list[int],
        idempotency_key: str,
    ) -> None:
        super().__init__(message)
        self.failed = dict(failed)
        self.applied = list(applied)
        self.idempotency_key = idempotency_key


class ShardsDiverged(ShardError):
    """The shards of a sharded session are not at the same iteration (one restarted from an
    older snapshot, or a sync round applied on some shards but timed out on others), so their
    weights are not one model's. ``iterations`` maps shard index to its iteration count
    (``None``: that shard's error is in ``errors``). Restore the session from a state (a
    checkpoint) to go on."""

    def __init__(
        self,
        message: str,
        *,
        iterations: Mapping[int, int | None],
        errors: Mapping[int, BaseException] | None = None,
    ) -> None:
        super().__init__(message)
        self.iterations = dict(iterations)
        self.errors = dict(errors or {})


class LayoutMismatch(ShardError, ValueError):
    """The servers given do not hold the shards of this session's layout: another server
    list or order, another shard count, or another model."""


class ServerError(ParamServerError):
    """The server answered with an error status.

    ``status`` is the HTTP status, ``code`` and ``message`` come from the error body
    ``{"error": {"code", "message"}}`` (for a body that is not ours, such as a proxy's error
    page, ``code`` is ``"http_<status>"`` and ``message`` the start of the body),
    ``response_headers`` holds the response's headers, lower-case names; ``details`` the error
    object's other fields (``stale_gradient``: ``iterations``).
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
        details: Mapping[str, object] | None = None,
    ) -> None:
        if status is not None:
            self.status = status
        self.details: dict[str, object] = dict(details or {})
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


class Conflict(ServerError):
    """409: the request conflicts with the session's state; ``code`` says how."""

    status = 409


class SessionExists(Conflict):
    """409: a session with that id already exists."""

    default_code = ErrorCode.SESSION_EXISTS.value
    status = STATUS[ErrorCode.SESSION_EXISTS]


class StaleGradient(Conflict):
    """409: the gradient was computed on weights older than the session accepts (a sync
    round takes gradients of the current weights only; ``max_staleness`` bounds an async
    session). Nothing was applied. ``iterations`` is the session's iteration count: pull the
    weights and compute the gradient again."""

    default_code = ErrorCode.STALE_GRADIENT.value
    status = STATUS[ErrorCode.STALE_GRADIENT]

    @property
    def iterations(self) -> int | None:
        value = self.details.get("iterations")
        return value if isinstance(value, int) and not isinstance(value, bool) else None


class RoundAborted(Conflict):
    """409: the session's state was replaced (a state import) while the push waited for its
    sync round; nothing of the round was applied."""

    default_code = ErrorCode.ROUND_ABORTED.value
    status = STATUS[ErrorCode.ROUND_ABORTED]


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


class RoundTimeout(ServiceUnavailable):
    """503: the sync round did not get its ``replicas_to_aggregate`` gradients within
    ``round_timeout_seconds``; nothing of it was applied. Not retried by the client (a retry
    waits for another whole round): pull the weights and push again (with the same
    ``idempotency_key`` if you like: a timed-out push is not remembered)."""

    default_code = ErrorCode.ROUND_TIMEOUT.value


class RoundFull(ServiceUnavailable):
    """503: more pushes arrived for one sync round than ``total_num_replicas`` (a worker that
    pushed twice without its Idempotency-Key, or more workers than the session counts). Not
    retried by the client."""

    default_code = ErrorCode.ROUND_FULL.value


_BY_STATUS: dict[int, type[ServerError]] = {
    cls.status: cls
    for cls in (
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        RequestTimeout,
        Conflict,
        PayloadTooLarge,
        UnsupportedMediaType,
        InvalidRequest,
        InternalServerError,
        ServiceUnavailable,
        InsufficientStorage,
    )
}

#: Codes with a class of their own (checked against their status: a code under another
#: status, from something that is not our server, falls back to the status's class).
_BY_CODE: dict[str, type[ServerError]] = {
    cls.default_code: cls
    for cls in (
        SessionNotFound,
        SessionExists,
        StaleGradient,
        RoundAborted,
        RoundTimeout,
        RoundFull,
    )
}

#: 503 codes the client does not retry: retrying would not help (or would wait a round again).
NOT_RETRIED = frozenset({ErrorCode.ROUND_TIMEOUT.value, ErrorCode.ROUND_FULL.value})


def error_for_status(status: int, code: str | None) -> type[ServerError]:
    """The exception class for an error answer: by its code, else by its status."""
    by_code = _BY_CODE.get(code or "")
    if by_code is not None and by_code.status == status:
        return by_code
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
