"""What the sync and async clients share: defaults, requests, answers, and the retry rules.

Nothing here does I/O. An operation is described by a :class:`Call` (method, path, body,
headers, how safe it is to repeat, and how to read a successful answer); :class:`Attempts`
decides after each try whether to retry and how long to wait. :mod:`paramserver.client.sync` and
:mod:`paramserver.client.aio` only send calls over ``httpx`` and sleep, so the two clients cannot
drift.

Retries (the one policy of the package, :class:`RetryPolicy`; see ``docs/client.md``):

* **503** (``service_unavailable``, ``session_busy``: the server did not process the request)
  is retried for every request, waiting at least the ``Retry-After`` the server sent.
* **Push** (``POST /sessions/{id}/gradients``) carries an ``Idempotency-Key`` (a fresh uuid4
  hex per call, reused by every retry of that call, with the same body). The server applies a
  key once and replays the first answer for a repeat, so the push is retried after any
  transient transport failure: connect errors and timeouts, read/write errors and timeouts,
  and connections dropped before the answer. A replayed answer the server kept without its
  weights (``{"iterations"}`` alone) makes the client pull the weights.
* **Reads** (``GET``), **state import** (``PUT``, idempotent) and **delete** are retried after
  the same transient failures. A delete whose first answer was lost may then see 404
  (``SessionNotFound``): ``delete(missing_ok=True)`` accepts that.
* **Create** (``POST /sessions``) is retried only when the request cannot have reached the
  server (``httpx.ConnectError``, ``ConnectTimeout``, ``PoolTimeout``); after any later failure
  the session may exist, and the error (:class:`~paramserver.client.errors.TransportError`) says so.
* Nothing else is retried: no other status (4xx are final; 500 may have changed state), and
  no ``httpx`` error that is a local mistake (unsupported URL scheme, invalid header, proxy).

Waits use exponential backoff with full jitter: before retry ``n`` (from 0) the client sleeps
a uniform random time in ``[0, min(backoff_cap, backoff_base * 2**n)]``, or the server's
``Retry-After`` if that is longer; a ``Retry-After`` beyond ``max_retry_after`` ends the
retries at once (the :class:`~paramserver.client.errors.ServiceUnavailable` carries it).
"""

from __future__ import annotations

import enum
import functools
import json
import math
import os
import random
import ssl
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, NamedTuple, TypeAlias, TypeVar, cast
from urllib.parse import quote

import httpx
import msgpack
import numpy as np

from paramserver import frames, messages, optimizers, wire
from paramserver import training as modes
from paramserver.codes import MessageError
from paramserver.constraints import Constraint, decode_constraints
from paramserver.messages import ANSWER_LIMITS, SessionState
from paramserver.sharding import Shard, decode_shard
from paramserver.sparse import Rows
from paramserver.training import Training

from . import errors

__all__ = [
    "DEFAULT_RETRY_POLICY",
    "DEFAULT_DEADLINE",
    "DEFAULT_TIMEOUT",
    "Attempts",
    "Call",
    "Parameter",
    "Reply",
    "RetryPolicy",
    "Safety",
    "SessionInfo",
    "SessionState",
]

T = TypeVar("T")

#: Timeouts: 10 s to connect, 60 s to get a pooled connection, and 300 s between bytes read
#: or written, longer than the server's 120 s default wait for a busy session's turn (so a
#: queued push is answered by the server, not abandoned by the client).
DEFAULT_TIMEOUT = httpx.Timeout(300.0, connect=10.0, pool=60.0)

#: The most one call may take in all, retries and waits included (``deadline=``): longer than
#: the server's longest legitimate answer (a body received in up to 120 s, then a wait of up
#: to 120 s for the session's turn, then the step and the transfer), far shorter than the read
#: timeout times the attempts (4 x 300 s), and half the server's idempotency window (600 s), so
#: a push retried by hand with its key after ``DeadlineExceeded`` still finds it.
DEFAULT_DEADLINE = 300.0

#: How much longer than what is left of the deadline an attempt's timeouts may be before
#: they are capped to it: the deadline is also checked after every read, and a timeout that
#: stays as it is spares a pooled connection's socket two system calls per call.
TIMEOUT_SLACK = 0.01

#: Keep-alive pool: one connection per concurrent request, up to these bounds.
DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)

USER_AGENT = "paramserver-client/1"

ArrayLike = Any  # numpy arrays, or anything numpy.asarray accepts (CPU torch tensors, lists)
Weights: TypeAlias = Mapping[str, ArrayLike] | Sequence[ArrayLike]
DictWeights: TypeAlias = dict[str, np.ndarray]
ListWeights: TypeAlias = list[np.ndarray]
WeightsOut: TypeAlias = DictWeights | ListWeights
#: The form a session answers in: ``DictWeights`` or ``ListWeights``.
W = TypeVar("W", DictWeights, ListWeights)
OptimizerLike: TypeAlias = "str | Mapping[str, Any] | optimizers.Optimizer"
#: A training mode: ``Sync(...)``, ``Async(...)``, its ``{"mode": ...}`` dict, or an object
#: with ``get_config()``.
TrainingLike: TypeAlias = "Training | Mapping[str, Any] | Any"

_SYNC_OPTIONS = frozenset({"replicas_to_aggregate", "total_num_replicas", "round_timeout_seconds"})
_ASYNC_OPTIONS = frozenset({"max_staleness"})


def training_of(training: TrainingLike | None, options: Mapping[str, Any]) -> Training:
    """``create_session``'s training mode: ``training=``, or its keyword arguments
    (``replicas_to_aggregate=...`` and co. make a sync session, ``max_staleness=`` an async
    one)."""
    unknown = sorted(set(options) - _SYNC_OPTIONS - _ASYNC_OPTIONS)
    if unknown:
        raise TypeError(f"create_session() got unexpected keyword argument(s) {unknown}")
    if not options:
        return modes.get(training)
    if training is not None:
        raise TypeError(
            f"give the training mode as training=... or as keyword arguments, not both "
            f"(got training={training!r} and {sorted(options)})"
        )
    if set(options) & _SYNC_OPTIONS:
        if set(options) & _ASYNC_OPTIONS:
            raise TypeError("max_staleness is an async option; a sync session takes rounds")
        return modes.decode_training({"mode": "sync", **options})
    return modes.decode_training({"mode": "async", **options})


# --- retries ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently the client retries (what it retries: module docstring).

    ``retries`` is the number of retries after the first attempt (0 turns retrying off).
    """

    retries: int = 3
    backoff_base: float = 0.1
    backoff_cap: float = 5.0
    max_retry_after: float = 60.0

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {self.retries!r}")
        for name in ("backoff_base", "backoff_cap", "max_retry_after"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    def delay(self, retry: int, retry_after: float | None = None, *, rng: random.Random) -> float:
        """Seconds to wait before retry number ``retry`` (0 for the first retry)."""
        ceiling = min(self.backoff_cap, self.backoff_base * 2.0 ** min(retry, 60))
        backoff = rng.uniform(0.0, ceiling)
        return backoff if retry_after is None else max(retry_after, backoff)

    @classmethod
    def of(cls, retries: int | RetryPolicy) -> RetryPolicy:
        """``retries=`` as the clients take it: a count (other fields default) or a policy."""
        if isinstance(retries, RetryPolicy):
            return retries
        return cls(retries=retries)


DEFAULT_RETRY_POLICY = RetryPolicy()


class Safety(enum.Enum):
    """When a request may be sent again after a transport failure (503 is always retried)."""

    #: The request is idempotent (GET, PUT, DELETE, or a push carrying an Idempotency-Key):
    #: retry after any transient transport failure.
    REPEATABLE = "repeatable"
    #: The request is not idempotent (create): retry only if it cannot have been sent.
    UNSENT_ONLY = "unsent_only"


#: Failures after which the request surely never reached the server.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
#: Transient failures: the above, timeouts, broken connections, an answer cut short.
_TRANSIENT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


@dataclass
class Reply:
    """A whole answer: status, headers and the body in one writable buffer."""

    status: int
    headers: httpx.Headers
    body: bytearray


class BodyBuffer:
    """Collects a response body into one ``bytearray``: the one copy of the received bytes.

    Arrays decoded from it are writable views. With a ``Content-Length`` (and no content
    encoding) the buffer is allocated once at its final size.
    """

    __slots__ = ("_buf", "_pos", "_sized")

    def __init__(self, headers: httpx.Headers) -> None:
        length = headers.get("content-length")
        encoded = headers.get("content-encoding", "identity").strip().lower() != "identity"
        size = int(length) if length is not None and length.isdigit() and not encoded else -1
        self._sized = size >= 0
        self._buf = bytearray(max(size, 0))
        self._pos = 0

    def feed(self, chunk: bytes) -> None:
        end = self._pos + len(chunk)
        if self._sized and end <= len(self._buf):
            self._buf[self._pos : end] = chunk
        else:
            del self._buf[self._pos :]
            self._buf += chunk
            self._sized = False
        self._pos = end

    def value(self) -> bytearray:
        if self._pos != len(self._buf):
            del self._buf[self._pos :]
        return self._buf


@dataclass
class LeanRequest:
    """A push or pull as the data plane carries it (:mod:`paramserver.frames`): the frame
    header (a dict, or already packed), the tensors whose memory is sent, and ``out``, arrays
    to receive the weights in."""

    header: dict[str, Any] | bytes
    tensors: Sequence[np.ndarray] = ()
    out: Mapping[str, np.ndarray] | None = None


@dataclass
class LeanAnswer:
    """A data plane's 200 answer: the iterations, and the weights (None when not asked for,
    or for a replay whose weights the server did not keep)."""

    iterations: int
    weights: dict[str, np.ndarray] | None
    replayed: bool


@dataclass(eq=False)  # not frozen: made for every call, and a frozen init costs 3x
class Call(Generic[T]):
    """One protocol operation: the request, its retry safety and how to read its answer.
    Made once per call and not changed after (the twins only read it).

    ``finish(reply)`` raises the mapped :class:`~paramserver.client.errors.ServerError` for any
    status not in ``expect``, else returns ``parse(reply)``. ``encode`` makes the body when
    HTTP needs it (once per call, not for the data plane). A push or pull also has ``lean``,
    its data-plane form, and ``parse_lean`` for the data plane's answer.
    """

    method: str
    path: str
    parse: Callable[[Reply], T]
    safety: Safety = Safety.REPEATABLE
    expect: frozenset[int] = frozenset({200})
    params: Mapping[str, str] | None = None
    body: bytes | None = None
    idempotency_key: str | None = None
    encode: Callable[[], bytes] | None = None
    lean: LeanRequest | None = None
    parse_lean: Callable[[LeanAnswer], T] | None = None
    #: Seconds the server may hold the answer back on purpose (a sync round, a waiting
    #: pull): added to the client's read timeout and deadline for this call.
    wait: float = 0.0
    _encoded: list[bytes] = field(default_factory=list, compare=False, repr=False)

    def content(self) -> bytes | None:
        """The HTTP body (encoded on first use)."""
        if self.body is not None or self.encode is None:
            return self.body
        if not self._encoded:
            self._encoded.append(self.encode())
        return self._encoded[0]

    def finish_lean(self, answer: LeanAnswer) -> T:
        assert self.parse_lean is not None
        return self.parse_lean(answer)

    def headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.body is not None or self.encode is not None:
            out["Content-Type"] = wire.MSGPACK_MEDIA_TYPE
        if self.idempotency_key is not None:
            out["Idempotency-Key"] = self.idempotency_key
        return out

    def describe(self) -> str:
        return f"{self.method} {self.path}"

    def finish(self, reply: Reply) -> T:
        if reply.status not in self.expect:
            raise server_error(reply, self.describe())
        try:
            return self.parse(reply)
        except errors.ParamServerError:
            raise  # a parser's own verdict (LayoutMismatch is a ValueError too)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # MalformedBody and TensorError are ValueErrors: a body we cannot read.
            raise errors.ProtocolError(
                f"{self.describe()}: unexpected answer ({reply.status}): {exc}"
            ) from exc


class Attempts:
    """The retry decisions for one call: feed it each failure, get a delay or an exception."""

    def __init__(
        self,
        call: Call[Any],
        policy: RetryPolicy,
        rng: random.Random,
        *,
        deadline: float | None = None,
        timeout: httpx.Timeout | None = None,
    ) -> None:
        self.call = call
        self.policy = policy
        self.rng = rng
        self.count = 0
        self.deadline = deadline
        self.deadline_at = math.inf if deadline is None else time.monotonic() + deadline
        self._timeout = timeout if timeout is not None else httpx.Timeout(None)

    def remaining(self) -> float:
        """Seconds left before the call's deadline (``inf`` without one)."""
        return self.deadline_at - time.monotonic()

    def timeout(self) -> httpx.Timeout:
        """The next attempt's timeouts: the client's, none longer than what is left."""
        left = self.remaining()
        t = self._timeout
        if left == math.inf:
            return t
        if left + TIMEOUT_SLACK >= max(map(_or_inf, (t.connect, t.read, t.write, t.pool))):
            # No timeout outlasts the deadline by more than the slack: the client's own, so
            # that a pooled connection keeps its socket timeout (the default timeout and
            # deadline are both 300 s, and capping would change them on every call).
            return t
        left = max(left, 0.001)

        def cap(value: float | None) -> float:
            return left if value is None else min(value, left)

        return httpx.Timeout(
            connect=cap(t.connect), read=cap(t.read), write=cap(t.write), pool=cap(t.pool)
        )

    def check_deadline(self, cause: BaseException | None = None) -> None:
        """Raise :class:`~.errors.DeadlineExceeded` once the deadline has passed."""
        if self.remaining() <= 0:
            raise self.deadline_error() from cause

    def deadline_error(self) -> errors.DeadlineExceeded:
        key = self.call.idempotency_key
        note = ""
        if key is not None:
            note = (
                "; the push may or may not have been applied: push again with "
                f"idempotency_key={key!r} to apply it at most once"
            )
        tries = f"{self.count or 1} attempt{'s' if (self.count or 1) != 1 else ''}"
        return errors.DeadlineExceeded(
            f"{self.call.describe()}: no answer within the call's deadline of "
            f"{self.deadline:g} s ({tries}){note}",
            attempts=self.count or 1,
            idempotency_key=key,
        )

    def _may_retry(self) -> bool:
        return self.count <= self.policy.retries

    def after_exception(self, exc: httpx.RequestError) -> float:
        """A delay before the next try, or raises :class:`~.errors.TransportError`
        (:class:`~.errors.ProtocolError` for an answer ``httpx`` could not decode)."""
        self.count += 1
        if isinstance(exc, httpx.DecodingError):
            raise errors.ProtocolError(f"{self.call.describe()}: {exc}") from exc
        safe = _NOT_SENT if self.call.safety is Safety.UNSENT_ONLY else _TRANSIENT
        if isinstance(exc, httpx.TimeoutException):
            self.check_deadline(exc)  # the attempt's timeout was the deadline's remainder
        if isinstance(exc, safe) and not tls_failure(exc) and self._may_retry():
            delay = self.policy.delay(self.count - 1, rng=self.rng)
            if delay >= self.remaining():
                raise self.deadline_error() from exc
            return delay
        raise transport_error(
            self.call, exc, self.count, retryable=isinstance(exc, safe) and not tls_failure(exc)
        ) from exc

    def after_reply(self, reply: Reply) -> float | None:
        """A delay before the next try (for a 503), or ``None``: the reply is final."""
        self.count += 1
        if reply.status != 503 or not self._may_retry() or error_code(reply) in errors.NOT_RETRIED:
            return None
        retry_after = errors.parse_retry_after(reply.headers.get("retry-after"))
        if retry_after is not None and retry_after > self.policy.max_retry_after:
            return None
        delay = self.policy.delay(self.count - 1, retry_after, rng=self.rng)
        if delay >= self.remaining():
            return None  # no time left for another try: the 503 is the answer
        return delay


def _or_inf(value: float | None) -> float:
    return math.inf if value is None else value


def tls_failure(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error under an httpx error (a certificate that does not verify, a server that
    wants a client certificate): a setting to fix, not a transient failure."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def transport_error(
    call: Call[Any], exc: httpx.RequestError, attempts: int, *, retryable: bool
) -> errors.TransportError:
    what = f"{call.describe()}: {type(exc).__name__}: {str(exc) or 'no detail'}"
    tries = f"after {attempts} attempt{'s' if attempts != 1 else ''}"
    maybe_sent = isinstance(exc, _TRANSIENT) and not isinstance(exc, _NOT_SENT)
    if maybe_sent and call.idempotency_key is not None:
        note = (
            "; the push may or may not have been applied: push again with "
            f"idempotency_key={call.idempotency_key!r} to apply it at most once"
        )
    elif maybe_sent and call.safety is Safety.UNSENT_ONLY:
        note = (
            "; the request may have reached the server (not retried after such a failure, as "
            "creating is not idempotent): the session may exist, check with client.sessions()"
        )
    elif tls_failure(exc) is not None:
        note = (
            " (a TLS failure, not retried: check the client's verify= (the CA that signed the "
            "server's certificate) and cert= (a client certificate, if the server asks for one))"
        )
    elif not retryable:
        note = " (not a transient failure: not retried)"
    else:
        note = ""
    return errors.TransportError(
        f"{what} ({tries}){note}", attempts=attempts, idempotency_key=call.idempotency_key
    )


def error_code(reply: Reply) -> str | None:
    """The ``code`` of an error answer's body, if it is ours."""
    try:
        code = json.loads(reply.body)["error"]["code"]
    except (ValueError, TypeError, KeyError):
        return None
    return code if isinstance(code, str) else None


def server_error(reply: Reply, request: str) -> errors.ServerError:
    """The exception for an error answer, carrying the server's code and message."""
    code: str | None = None
    message: str | None = None
    details: dict[str, Any] = {}
    try:
        obj = json.loads(reply.body)
        detail = obj["error"]
        if isinstance(detail["code"], str) and isinstance(detail["message"], str):
            code, message = detail["code"], detail["message"]
            details = {k: v for k, v in detail.items() if k not in ("code", "message")}
    except (ValueError, TypeError, KeyError):
        pass
    if message is None:
        text = bytes(reply.body[:500]).decode("utf-8", "replace").strip()
        message = text or httpx.codes.get_reason_phrase(reply.status) or "no detail"
    cls = errors.error_for_status(reply.status, code)
    return cls(
        message,
        status=reply.status,
        code=code,
        response_headers=dict(reply.headers),
        request=request,
        details=details,
    )


# --- messages -----------------------------------------------------------------------------


class Parameter(NamedTuple):
    """One parameter of a session, as the server describes it."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class SessionInfo:
    """A session's summary. ``parameters`` is in the model's order; timestamps are UTC."""

    session_id: str
    optimizer: dict[str, Any]
    iterations: int
    parameters: dict[str, Parameter]
    created_at: datetime | None = None
    updated_at: datetime | None = None
    refuse_non_finite: bool = False
    #: The session's training mode; ``None`` from a server that predates training modes.
    training: Training | None = None
    #: A sync session's open round: ``{"received", "needed", "age_seconds"}``.
    round: dict[str, Any] | None = None
    #: Parameter name -> its Keras 2.2.4 constraint (``paramserver.constraints``).
    constraints: dict[str, Constraint] = field(default_factory=dict)
    #: Which shard of a sharded session this server's session is (``None``: a whole one).
    shard: Shard | None = None
    #: How row-sparse gradients update: "exact" or "lazy".
    sparse_updates: str = "exact"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.parameters)

    @classmethod
    def from_json(cls, obj: Any) -> SessionInfo:
        def when(key: str) -> datetime | None:
            value = obj.get(key)
            return None if value is None else datetime.fromisoformat(value)

        iterations = obj["iterations"]
        if not isinstance(obj["session_id"], str) or not isinstance(iterations, int):
            raise TypeError(f"not a session summary: {obj!r}"[:300])
        return cls(
            session_id=obj["session_id"],
            optimizer=dict(obj["optimizer"]),
            iterations=iterations,
            parameters={
                name: Parameter(str(p["dtype"]), tuple(int(d) for d in p["shape"]))
                for name, p in obj["parameters"].items()
            },
            created_at=when("created_at"),
            updated_at=when("updated_at"),
            refuse_non_finite=bool(obj.get("refuse_non_finite", False)),
            training=None if "training" not in obj else modes.decode_training(obj["training"]),
            round=dict(obj["round"]) if isinstance(obj.get("round"), dict) else None,
            constraints=_known_constraints(obj.get("constraints")),
            shard=_shard(obj.get("shard")),
            sparse_updates=str(obj.get("sparse_updates", "exact")),
        )


def _shard(obj: Any) -> Shard | None:
    if obj is None:
        return None
    try:
        return decode_shard(obj)
    except MessageError as exc:
        raise TypeError(f"not a session summary: its 'shard' is invalid: {exc}") from None


def _known_constraints(obj: Any) -> dict[str, Constraint]:
    """A summary's constraints; one this client does not know (a newer server's class) is
    left out rather than making the whole summary unreadable."""
    out: dict[str, Constraint] = {}
    if isinstance(obj, dict):
        for name, value in obj.items():
            try:
                out.update(decode_constraints({name: value}))
            except (MessageError, TypeError):
                continue
    return out


def new_key() -> str:
    """A fresh Idempotency-Key: a random uuid4 in hex (``uuid.uuid4().hex``, made without the
    ``UUID`` object: a push makes one each)."""
    h = os.urandom(16).hex()
    return f"{h[:12]}4{h[13:16]}{'89ab'[int(h[16], 16) & 3]}{h[17:]}"


def named_arrays(
    values: Weights, names: Sequence[str] | None, what: str
) -> tuple[dict[str, np.ndarray], bool]:
    """``values`` as ``{name: array}``, and whether they came as a list.

    A list is matched with ``names`` in order (with ``names=None`` it names them "0", "1", ...).
    """
    if isinstance(values, Mapping):
        return messages.arrays(values, what), False
    if isinstance(values, (list, tuple)):
        if names is None:
            names = [str(i) for i in range(len(values))]
        elif len(values) != len(names):
            raise ValueError(
                f"{what}: got a list of {len(values)} arrays; the session has "
                f"{len(names)} parameters ({', '.join(names)[:200]}), one array each, in order"
            )
        return messages.arrays(dict(zip(names, values, strict=True)), what), True
    raise TypeError(
        f"{what} must be a dict of name -> array or a list of arrays (model.get_weights() "
        f"order), got {type(values).__name__}"
    )


def shape_weights(
    weights: dict[str, np.ndarray], names: Sequence[str], as_list: bool
) -> WeightsOut:
    """The weights in the session's form: a dict, or a list in ``names`` order."""
    if not as_list:
        return weights
    missing = [n for n in names if n not in weights]
    if missing:
        raise KeyError(f"the answer has no weights for {missing[:5]}")
    return [weights[n] for n in names]


def session_path(session_id: str, *rest: str) -> str:
    """``/sessions/{id}/...`` with the id escaped (and ``.``/``..`` kept from collapsing)."""
    if not isinstance(session_id, str) or not session_id:
        raise ValueError(f"a session id is a non-empty string, got {session_id!r}")
    return _session_path(session_id, *rest)


@functools.lru_cache(maxsize=1024)
def _session_path(session_id: str, *rest: str) -> str:
    escaped = quote(session_id, safe="")
    if session_id in (".", ".."):
        escaped = escaped.replace(".", "%2E")
    return "/".join(("/sessions", escaped, *rest))


# --- answers ------------------------------------------------------------------------------


def _json(reply: Reply) -> Any:
    return json.loads(reply.body)


def _check_msgpack(reply: Reply) -> None:
    media = reply.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media not in wire.MSGPACK_CONTENT_TYPES:
        raise ValueError(f"expected a msgpack answer, got Content-Type {media!r}")


def _weights_message(reply: Reply) -> tuple[int, dict[str, np.ndarray] | None]:
    _check_msgpack(reply)
    return messages.decode_weights(reply.body, ANSWER_LIMITS)


def _state_message(reply: Reply) -> SessionState:
    _check_msgpack(reply)
    return messages.decode_state(reply.body, ANSWER_LIMITS)


# --- the shared halves of the clients and sessions ----------------------------------------


#: The fields of a data-plane push header, packed: the header is put together from them
#: (:func:`paramserver.frames.pack_map`), the same bytes as ``msgpack.packb`` of the dict.
_OP_PUSH = msgpack.packb("op") + msgpack.packb("push")
_SESSION = msgpack.packb("session")
_KEY = msgpack.packb("key")
_RETURN_WEIGHTS = {
    flag: msgpack.packb("return_weights") + msgpack.packb(flag) for flag in (True, False)
}
_TENSORS = msgpack.packb("tensors")
_BASE_ITERATIONS = msgpack.packb("base_iterations")
_SUM_SQUARES = msgpack.packb("sum_squares")
_ROUND_ORDER = msgpack.packb("round_order")
_METRICS = msgpack.packb("metrics")


class SessionCore(Generic[W]):
    """A session handle's data and the calls it makes; the twins add sending.

    ``names`` are the parameter names in the model's order; ``as_list`` says whether weights
    come back as a list in that order (else as a dict). ``last_iterations`` is the iteration
    count of the last answer this handle received (``None`` before any). ``base_iterations``
    is the iteration count of the last weights it received (create, push, pull): what a push
    says its gradient was computed on (``None`` until it has weights: pull first).
    ``training`` is the session's mode as the server described it.
    """

    def __init__(
        self, client: Any, session_id: str, names: Sequence[str], *, as_list: bool
    ) -> None:
        self._client = client
        self.id = session_id
        self.names: tuple[str, ...] = tuple(names)
        self.as_list = as_list
        self.last_iterations: int | None = None
        self.base_iterations: int | None = None
        self.training: Training | None = None
        #: float64 parameters, and whether float32 gradients for them were warned about.
        self._float64: set[str] = set()
        #: Each parameter's shape, from the last summary (fills a ``Rows``'s shape).
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._warned_float64 = False
        #: The data plane's push header, in parts packed once (see :meth:`_push_call`).
        self._push_head: tuple[str, tuple[bytes, ...]] | None = None
        self._specs = frames.SpecsCache()

    def __repr__(self) -> str:
        form = "list" if self.as_list else "dict"
        return f"<{type(self).__name__} {self.id!r}: {len(self.names)} parameters, {form} form>"

    def _seen(self, iterations: int) -> None:
        self.last_iterations = iterations

    def _shape(self, weights: DictWeights) -> W:
        return cast(W, shape_weights(weights, self.names, self.as_list))

    def _push_call(
        self,
        gradients: Weights,
        *,
        return_weights: bool,
        idempotency_key: str | None,
        out: Weights | None = None,
        base_iterations: int | None = None,
        sum_squares: float | None = None,
        round_order: str | None = None,
        metrics: Mapping[str, float] | None = None,
        returns: Mapping[str, Any] | None = None,
    ) -> Call[tuple[int, W | None]]:
        """The push; its answer is ``(iterations, weights or None)``.

        The weights are ``None`` with ``return_weights=False``, and also for a replayed push
        whose answer the server kept without weights (then the twin pulls them). With ``out``
        they are written into those arrays, which are returned. ``base_iterations`` defaults
        to the handle's for the sessions that need it (sync, and ``max_staleness``).
        ``sum_squares`` and ``round_order``: a sharded push's part carries the whole push's
        sum of squares (clipnorm) and digest (the order of a sync round's sum). ``metrics``:
        what the worker reports (``{"loss": 0.31}``), recorded once the push is applied.
        """
        reported = None if not metrics else messages.decode_metrics(dict(metrics))
        grads, _ = named_arrays(gradients, self.names, "gradients")
        sparse = any(isinstance(g, Rows) for g in grads.values())
        if sparse:
            grads = self._shaped_rows(grads)
        if self._float64 and not self._warned_float64:
            self._warn_float64(grads)
        targets = self._targets(out)
        key = new_key() if idempotency_key is None else idempotency_key
        if base_iterations is None and self.training is not None and self.training.needs_base:
            base_iterations = self.base_iterations  # sync, or max_staleness: the server checks
        elif base_iterations is not None:
            messages.base_iterations(base_iterations)  # an int in range, checked before sending

        def parse(reply: Reply) -> tuple[int, W | None]:
            iterations, weights = _weights_message(reply)
            self._seen(iterations)
            if weights is None:
                return iterations, None
            if returns is not None:  # a subset: as the server answered it, by name
                return iterations, cast(W, weights)
            self.base_iterations = iterations
            return iterations, self._deliver(weights, targets, out)

        def parse_lean(answer: LeanAnswer) -> tuple[int, W | None]:
            self._seen(answer.iterations)
            if answer.weights is None:
                return answer.iterations, None
            self.base_iterations = answer.iterations
            return answer.iterations, self._deliver(answer.weights, targets, out)

        # rows and subsets travel over HTTP (the data plane's frames carry dense tensors)
        lean = None
        if not sparse and returns is None:
            fields = [
                *self._push_fields(),
                _KEY + msgpack.packb(key),
                _RETURN_WEIGHTS[bool(return_weights)],
                _TENSORS + self._specs.packed(grads),
            ]
            if base_iterations is not None:
                fields.append(_BASE_ITERATIONS + msgpack.packb(base_iterations))
            if sum_squares is not None:
                fields.append(_SUM_SQUARES + msgpack.packb(float(sum_squares)))
            if round_order is not None:
                fields.append(_ROUND_ORDER + msgpack.packb(round_order))
            if reported:
                fields.append(_METRICS + msgpack.packb(reported))
            lean = LeanRequest(frames.pack_map(fields), list(grads.values()), targets)
        training = self.training
        return Call(
            "POST",
            session_path(self.id, "gradients"),
            parse,
            params=None if return_weights else {"return_weights": "false"},
            encode=lambda: messages.encode_push(
                grads, base_iterations, sum_squares, round_order, reported, returns
            ),
            idempotency_key=key,
            lean=lean,
            parse_lean=parse_lean,
            wait=training.round_timeout_seconds if isinstance(training, modes.Sync) else 0.0,
        )

    def _push_fields(self) -> tuple[bytes, ...]:
        """A push header's first fields, packed (``op`` and ``session``)."""
        if self._push_head is None or self._push_head[0] != self.id:
            self._push_head = (self.id, (_OP_PUSH, _SESSION + msgpack.packb(self.id)))
        return self._push_head[1]

    def _shaped_rows(self, grads: dict[str, Any]) -> dict[str, Any]:
        """``Rows`` gradients given their tensor's shape (from the session's summary)."""
        out = dict(grads)
        for name, g in grads.items():
            if isinstance(g, Rows) and g.shape is None:
                shape = self._shapes.get(name)
                if shape is None:
                    raise ValueError(
                        f"gradients[{name!r}]: Rows without a shape, and this handle does not "
                        "know the parameter's: give Rows(indices, values, shape) or call "
                        "session.info() first"
                    )
                out[name] = g.with_shape(shape)
        return out

    def _query_call(self, tensors: Mapping[str, Any]) -> Call[dict[str, Any]]:
        """``POST .../weights/query``: the tensors named (name -> row indices, or None for
        the whole tensor); row subsets come back as ``Rows``."""
        if not isinstance(tensors, Mapping) or not tensors:
            raise ValueError("name at least one tensor: {name: row indices or None}")
        body = wire.pack({"tensors": messages.encode_query(tensors)})

        def parse(reply: Reply) -> dict[str, Any]:
            iterations, weights = _weights_message(reply)
            self._seen(iterations)
            if weights is None:
                raise KeyError("the answer has no 'weights'")
            return weights

        return Call(
            "POST",
            session_path(self.id, "weights", "query"),
            parse,
            body=body,
        )

    def _warn_float64(self, grads: Mapping[str, np.ndarray]) -> None:
        """Once per handle: float32 gradients for float64 parameters mean a session made from
        numpy's default float64 arrays for a float32 model; its math then runs in float64."""
        mixed = sorted(n for n in self._float64 if n in grads and grads[n].dtype == np.float32)
        if mixed:
            self._warned_float64 = True
            warnings.warn(
                f"session {self.id!r} holds float64 parameters ({', '.join(mixed[:5])}) but "
                "gets float32 gradients: it was probably created from numpy's default float64 "
                "arrays. Its steps run in float64 and answer float64 weights; create it from "
                "float32 arrays (np.asarray(w, np.float32)) for a float32 model's math",
                UserWarning,
                stacklevel=4,
            )

    def _pull_call(
        self,
        out: Weights | None = None,
        *,
        min_iterations: int | None = None,
        wait: float | None = None,
    ) -> Call[W]:
        targets = self._targets(out)
        params: dict[str, str] = {}
        lean_header: dict[str, Any] = {"op": "pull", "session": self.id}
        if min_iterations is not None:
            if isinstance(min_iterations, bool) or not isinstance(min_iterations, int):
                raise TypeError(f"min_iterations must be an int, got {min_iterations!r}")
            params["min_iterations"] = str(min_iterations)
            lean_header["min_iterations"] = min_iterations
            if wait is not None:
                params["wait_seconds"] = repr(float(wait))
                lean_header["wait_seconds"] = float(wait)

        def parse(reply: Reply) -> W:
            iterations, weights = _weights_message(reply)
            self._seen(iterations)
            if weights is None:
                raise KeyError("the answer has no 'weights'")
            self.base_iterations = iterations
            return self._deliver(weights, targets, out)

        def parse_lean(answer: LeanAnswer) -> W:
            self._seen(answer.iterations)
            if answer.weights is None:
                raise KeyError("the answer has no weights")
            self.base_iterations = answer.iterations
            return self._deliver(answer.weights, targets, out)

        return Call(
            "GET",
            session_path(self.id, "weights"),
            parse,
            params=params or None,
            lean=LeanRequest(lean_header, (), targets),
            parse_lean=parse_lean,
            wait=float(wait) if min_iterations is not None and wait else 0.0,
        )

    def _targets(self, out: Weights | None) -> dict[str, np.ndarray] | None:
        """``out`` (the session's form) by name, checked: writable numpy arrays."""
        if out is None:
            return None
        given = out.values() if isinstance(out, Mapping) else out
        if isinstance(given, (list, tuple)) or isinstance(out, Mapping):
            for value in given:  # before named_arrays, which would copy a list into an array
                if not isinstance(value, np.ndarray):
                    raise TypeError(
                        f"out holds a {type(value).__name__}; each entry must be a writable "
                        "numpy array"
                    )
        targets, _ = named_arrays(out, self.names, "out")
        for name, array in targets.items():
            if not isinstance(array, np.ndarray) or not array.flags.writeable:
                raise TypeError(f"out[{name!r}] must be a writable numpy array")
        return targets

    def _deliver(
        self,
        weights: dict[str, np.ndarray],
        targets: dict[str, np.ndarray] | None,
        out: Weights | None,
    ) -> W:
        """The answer's weights in the session's form; with ``out``, written into it first
        (arrays the data plane received in place need no copy)."""
        if targets is None or out is None:
            return self._shape(weights)
        missing = [name for name in targets if name not in weights]
        if missing:
            raise KeyError(f"the answer has no weights for {missing[:5]}")
        for name, target in targets.items():
            if weights[name] is not target:
                if target.shape != weights[name].shape:
                    raise ValueError(
                        f"out[{name!r}] has shape {list(target.shape)}; the weights have "
                        f"{list(weights[name].shape)}"
                    )
                np.copyto(target, weights[name], casting="same_kind")
        return cast(W, out)

    def _info_call(self) -> Call[SessionInfo]:
        def parse(reply: Reply) -> SessionInfo:
            info = SessionInfo.from_json(_json(reply))
            self._seen(info.iterations)
            self.training = info.training
            self._shapes = {n: p.shape for n, p in info.parameters.items()}
            return info

        return Call("GET", session_path(self.id), parse)

    def _state_call(self) -> Call[SessionState]:
        def parse(reply: Reply) -> SessionState:
            state = _state_message(reply)
            self._seen(state.iterations)
            return state

        return Call("GET", session_path(self.id, "state"), parse)

    def _load_state_call(self, state: SessionState) -> Call[SessionInfo]:
        def parse(reply: Reply) -> SessionInfo:
            info = SessionInfo.from_json(_json(reply))
            self.names = info.names
            self._seen(info.iterations)
            self.training = info.training
            self.base_iterations = info.iterations  # the caller holds the state's weights
            return info

        return load_state_call(self.id, state, parse)

    def _delete_call(self, *, missing_ok: bool) -> Call[None]:
        def parse(reply: Reply) -> None:
            if reply.status == 404:
                error = server_error(reply, f"DELETE {session_path(self.id)}")
                if not isinstance(error, errors.SessionNotFound):
                    raise error

        expect = frozenset({204, 404}) if missing_ok else frozenset({204})
        return Call("DELETE", session_path(self.id), parse, expect=expect)


def load_state_call(session_id: str, state: SessionState, parse: Callable[[Reply], T]) -> Call[T]:
    if not isinstance(state, SessionState):
        raise TypeError(
            f"state must be a SessionState (from session.state()), got {type(state).__name__}"
        )
    return Call(
        "PUT",
        session_path(session_id, "state"),
        parse,
        expect=frozenset({200, 201}),
        body=messages.encode_state(state),
    )


#: ``verify=``: True checks the server's certificate against the usual roots (certifi, or
#: ``SSL_CERT_FILE``), a path against that PEM CA bundle, an ``ssl.SSLContext`` as configured,
#: False not at all (testing only).
Verify: TypeAlias = "bool | str | os.PathLike[str] | ssl.SSLContext"
#: ``cert=``: the client's certificate for servers that ask for one: a PEM file holding the
#: certificate and its key, or ``(certfile, keyfile)``.
Cert: TypeAlias = "str | os.PathLike[str] | tuple[str | os.PathLike[str], str | os.PathLike[str]]"


def tls_verification(verify: Verify, cert: Cert | None) -> bool | ssl.SSLContext:
    """What httpx's ``verify=`` takes for ``verify`` and ``cert`` (httpx 0.28 wants one
    ``SSLContext`` for both); ValueError for a file that does not load."""
    if isinstance(verify, ssl.SSLContext):
        if cert is not None:
            raise ValueError("give cert= or an ssl.SSLContext in verify=, not both")
        return verify
    if isinstance(verify, bool) and cert is None:
        return verify
    if isinstance(verify, bool):
        context = ssl_context(verify)
    else:
        try:
            context = ssl.create_default_context(cafile=os.fspath(verify))
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"verify={verify!r}: cannot load the CA bundle: {exc}") from exc
    if cert is not None:
        certfile, keyfile = cert if isinstance(cert, tuple) else (cert, None)
        try:
            context.load_cert_chain(
                os.fspath(certfile), None if keyfile is None else os.fspath(keyfile)
            )
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cert={cert!r}: cannot load the certificate: {exc}") from exc
    return context


def ssl_context(verify: bool | ssl.SSLContext) -> ssl.SSLContext:
    """A client TLS context for ``verify`` as :func:`tls_verification` returns it: the usual
    roots (True), no checking (False), or the context itself."""
    if isinstance(verify, ssl.SSLContext):
        return verify
    context = ssl.create_default_context(cafile=_default_ca_bundle())
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _default_ca_bundle() -> str | None:
    """The roots httpx verifies against by default: ``SSL_CERT_FILE``, else certifi's."""
    if os.environ.get("SSL_CERT_FILE"):
        return os.environ["SSL_CERT_FILE"]
    try:
        import certifi
    except ImportError:  # pragma: no cover - httpx depends on certifi
        return None
    return str(certifi.where())


S = TypeVar("S", bound=SessionCore[Any])

#: ``GET /data-plane``, asked once per client before its first push or pull (its answer is
#: read by :func:`paramserver.client.dataplane.channel_from_announcement`, whatever the status).
ANNOUNCEMENT_CALL: Call[Reply] = Call(
    "GET", "/data-plane", lambda reply: reply, expect=frozenset(range(100, 600))
)


class ClientCore(Generic[S]):
    """Configuration and calls of a client; the twins add the ``httpx`` client and sending."""

    _session_type: type[S]

    def __init__(
        self,
        base_url: str | httpx.URL,
        *,
        timeout: float | httpx.Timeout | None,
        retries: int | RetryPolicy,
        token: str | None,
        headers: Mapping[str, str] | None,
        limits: httpx.Limits | None,
        deadline: float | None = DEFAULT_DEADLINE,
        verify: Verify = True,
        cert: Cert | None = None,
        data_plane: bool = True,
    ) -> None:
        self.base_url = httpx.URL(str(base_url))
        if self.base_url.scheme not in ("http", "https"):
            raise ValueError(f"base_url must be an http(s) URL, got {str(base_url)!r}")
        self.retry_policy = RetryPolicy.of(retries)
        self.timeout = httpx.Timeout(timeout)
        if deadline is not None and (
            isinstance(deadline, bool)
            or not isinstance(deadline, (int, float))
            or not 0 < deadline < math.inf
        ):
            raise ValueError(f"deadline must be a finite number of seconds > 0, got {deadline!r}")
        self.deadline = None if deadline is None else float(deadline)
        all_headers = {
            "User-Agent": USER_AGENT,
            "Accept": f"{wire.MSGPACK_MEDIA_TYPE}, application/json",
        }
        all_headers.update(headers or {})
        if token is not None:
            if not token or any(c in token for c in "\r\n"):
                raise ValueError("token must be a non-empty string without line breaks")
            all_headers["Authorization"] = f"Bearer {token}"
        self._headers = all_headers
        self._limits = DEFAULT_LIMITS if limits is None else limits
        self._verify = tls_verification(verify, cert)
        self._rng = random.Random()
        self._token = token
        #: The data plane: False (off: asked not to, or it cannot serve this URL), None (not
        #: asked yet), or the channel. Set by the twins.
        self._plane: Any = None if data_plane else False

    def _httpx_options(self) -> dict[str, Any]:
        return {
            "base_url": self.base_url,
            "timeout": self.timeout,
            "headers": self._headers,
            "limits": self._limits,
            "verify": self._verify,
        }

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {str(self.base_url)!r}>"

    def _usable_plane(self) -> Any:
        """The channel if it is known and not resting after a failure, else None."""
        plane = self._plane
        if plane is None or plane is False or not plane.available:
            return None
        return plane

    def _attempts(self, call: Call[Any]) -> Attempts:
        deadline, timeout = self.deadline, self.timeout
        if call.wait > 0:
            # The server answers after up to call.wait seconds on purpose: the usual read
            # timeout and deadline count from the end of that wait.
            if deadline is not None:
                deadline += call.wait
            if timeout.read is not None:
                timeout = httpx.Timeout(
                    connect=timeout.connect,
                    read=timeout.read + call.wait,
                    write=timeout.write,
                    pool=timeout.pool,
                )
        return Attempts(call, self.retry_policy, self._rng, deadline=deadline, timeout=timeout)

    def _session_parser(
        self, as_list: bool, *, has_weights: bool, joining: bool = False
    ) -> Callable[[Reply], S]:
        """Reads a session summary into a new session handle of the twin's type;
        ``has_weights``: the caller holds the weights of that iteration (it created the
        session from them), so they are the handle's ``base_iterations``."""

        def parse(reply: Reply) -> S:
            info = SessionInfo.from_json(_json(reply))
            if joining and info.shard is not None and info.shard.count > 1:
                raise errors.LayoutMismatch(
                    f"session {info.session_id!r} on {self.base_url} is shard "
                    f"{info.shard.index} of {info.shard.count} of a sharded session: use "
                    f"Client([...]) with all {info.shard.count} servers' URLs, in shard order"
                )
            session = self._session_type(self, info.session_id, info.names, as_list=as_list)
            session._seen(info.iterations)
            session.training = info.training
            session._float64 = {n for n, p in info.parameters.items() if p.dtype == "float64"}
            session._shapes = {n: p.shape for n, p in info.parameters.items()}
            if has_weights:
                session.base_iterations = info.iterations
            return session

        return parse

    def _create_call(
        self,
        weights: Weights,
        optimizer: OptimizerLike,
        session_id: str | None,
        *,
        refuse_non_finite: bool = False,
        training: Any = None,
        constraints: Mapping[str, Any] | None = None,
        sparse_updates: str = "exact",
    ) -> Call[S]:
        arrays, as_list = named_arrays(weights, None, "weights")
        body = messages.encode_create(
            optimizers.get(optimizer),
            arrays,
            session_id,
            refuse_non_finite=refuse_non_finite,
            training=modes.get(training),
            constraints=constraints,
            sparse_updates=sparse_updates,
        )

        return Call(
            "POST",
            "/sessions",
            self._session_parser(as_list, has_weights=True),
            safety=Safety.UNSENT_ONLY,
            expect=frozenset({201}),
            body=body,
        )

    def _attach_call(self, session_id: str, *, as_list: bool) -> Call[S]:
        return Call(
            "GET",
            session_path(session_id),
            self._session_parser(as_list, has_weights=False, joining=True),
        )

    def _restore_call(
        self, state: SessionState, session_id: str | None, *, as_list: bool
    ) -> Call[S]:
        session_id = uuid.uuid4().hex if session_id is None else session_id
        return load_state_call(session_id, state, self._session_parser(as_list, has_weights=True))

    def _list_call(self) -> Call[list[SessionInfo]]:
        def parse(reply: Reply) -> list[SessionInfo]:
            return [SessionInfo.from_json(s) for s in _json(reply)["sessions"]]

        return Call("GET", "/sessions", parse)

    def _health_call(self) -> Call[dict[str, Any]]:
        def parse(reply: Reply) -> dict[str, Any]:
            body = _json(reply)
            if not isinstance(body, dict):
                raise TypeError(f"expected a JSON object, got {body!r}"[:200])
            return body

        return Call("GET", "/health", parse)
