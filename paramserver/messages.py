"""The messages of protocol version 1, each encoded and decoded by one pair of functions.

Server and client both use these; nothing here does I/O or knows HTTP. The byte-level format
(msgpack with framed tensors) is :mod:`paramserver.wire`; this module knows what each body
holds:

=====================  ========================================  ============================
message                body                                      functions
=====================  ========================================  ============================
create                 ``{"session_id"?, "optimizer", "weights",  :func:`encode_create`,
                       "refuse_non_finite"?, "training"?,        :func:`decode_create`
                       "constraints"?}``
push                   ``{"gradients": {name: tensor},           :func:`encode_push`,
                       "base_iterations"?}``                     :func:`decode_push_message`
weights answer         ``{"iterations", "weights"?}``            :func:`encode_weights`,
                                                                 :func:`decode_weights`
state                  ``{"iterations", "optimizer", "weights",  :func:`encode_state`,
                       "slots", "scalars",                       :func:`decode_state`
                       "refuse_non_finite"?, "training"?,
                       "constraints"?}``
=====================  ========================================  ============================

Decoding checks everything and raises :class:`~paramserver.codes.MessageError` with the
protocol's code: ``bad_request`` (400) for a body that is not well-formed, ``invalid_tensor``,
``unknown_optimizer``, ``invalid_optimizer``, ``invalid_state`` or ``invalid_request`` (422)
for a well-formed body whose content is invalid. Encoding takes numpy arrays (or anything
``numpy.asarray`` accepts) and writes one copy of their bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack
import numpy as np
import xxhash

from . import constraints as weight_constraints
from . import optimizers, wire
from . import training as modes
from .codes import ErrorCode, MessageError
from .constraints import Constraint, decode_constraints
from .optimizers import InvalidOptimizerConfig, Optimizer, UnknownOptimizer
from .sharding import Shard, decode_round_order, decode_shard, decode_sum_squares
from .sparse import Rows
from .training import Async, Training, decode_training

__all__ = [
    "ANSWER_LIMITS",
    "JSON_MEDIA_TYPE",
    "MAX_ITERATIONS",
    "BodyKind",
    "CreateMessage",
    "PushLayouts",
    "PushMessage",
    "SessionState",
    "WeightsAnswers",
    "decode_create",
    "decode_optimizer",
    "decode_push",
    "decode_push_message",
    "decode_state",
    "decode_weights",
    "encode_create",
    "encode_push",
    "encode_state",
    "encode_weights",
]

JSON_MEDIA_TYPE = "application/json"

#: Iteration counts stay below 2**53: exact as floats (Keras casts them) and as msgpack ints.
#: A state holds at most ``MAX_ITERATIONS - 1``; a push onto that is refused
#: (``iterations_exhausted``), so that every state a session reaches can be imported again.
MAX_ITERATIONS = 2**53

#: Bounds for decoding answers and files a user chose to read (not untrusted requests): only
#: the shapes' rules stay. The server's limits are configurable and may be far above the
#: defaults meant for untrusted request bodies.
ANSWER_LIMITS = wire.DecodeLimits(
    max_objects=1 << 48, max_map_items=1 << 32, max_tensors=None, max_dims=64
)

BodyKind = Literal["msgpack", "json"]
Body = bytes | bytearray | memoryview


@dataclass
class SessionState:
    """Everything needed to rebuild a session exactly: the body of ``GET/PUT .../state``.

    ``weights`` and every ``slots[slot]`` map parameter names to arrays; ``optimizer`` is the
    session's optimizer configuration; ``scalars`` holds scalar optimizer state (Nadam's
    ``m_schedule``); ``refuse_non_finite``, ``training`` and ``constraints`` are the session's
    settings of those names (:mod:`paramserver.training`, :mod:`paramserver.constraints`; an
    open sync round is not state). Weights and
    slots may hold NaN or inf (Keras lets weights diverge; a state the server reached can
    always be imported again). :meth:`to_bytes` / :meth:`from_bytes` give a checkpoint file's
    contents.
    """

    iterations: int
    optimizer: Optimizer
    weights: dict[str, np.ndarray]
    slots: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    refuse_non_finite: bool = False
    training: Training = field(default_factory=Async)
    constraints: dict[str, Constraint] = field(default_factory=dict)
    shard: Shard | None = None
    #: How row-sparse gradients update: "exact" (every row, Keras 2.2) or "lazy".
    sparse_updates: str = "exact"

    def to_bytes(self) -> bytes:
        return encode_state(self)

    @classmethod
    def from_bytes(cls, data: Body) -> SessionState:
        """Read :meth:`to_bytes` output (arrays view ``data``: pass a bytearray to write them)."""
        return decode_state(data, ANSWER_LIMITS)


@dataclass(frozen=True)
class CreateMessage:
    """A decoded create body."""

    session_id: str | None
    optimizer: Optimizer
    weights: dict[str, np.ndarray]
    refuse_non_finite: bool = False
    training: Training = field(default_factory=Async)
    constraints: dict[str, Constraint] = field(default_factory=dict)
    shard: Shard | None = None
    sparse_updates: str = "exact"


@dataclass(frozen=True)
class PushMessage:
    """A decoded push body: the gradients and, when sent, the iteration count of the weights
    they were computed on (required by sync sessions and by ``max_staleness``) and the sum of
    squares of the whole push (a shard's part of a sharded push: what ``clipnorm`` clips
    with)."""

    gradients: dict[str, np.ndarray]
    base_iterations: int | None = None
    sum_squares: float | None = None
    #: The key a sync round orders this gradient by (a sharded push: the whole push's
    #: :func:`push_digest`, hex); by default the push's own digest.
    round_order: str | None = None
    #: What the worker reports with the push (``{"loss": 0.31}``: :func:`decode_metrics`).
    metrics: dict[str, float] | None = None
    #: The weights to answer instead of all of them (``"return"``: :func:`decode_query`).
    returns: dict[str, np.ndarray | None] | None = None


#: A push's ``metrics``: at most this many names, of at most this many characters.
MAX_METRICS = 16
MAX_METRIC_NAME = 64


def decode_metrics(value: Any) -> dict[str, float]:
    """A push's ``metrics``: ``{name: finite number}``, at most :data:`MAX_METRICS` names of
    1-:data:`MAX_METRIC_NAME` printable characters (422 ``invalid_metrics``)."""

    def refuse(message: str) -> MessageError:
        return MessageError(message[:300], code=ErrorCode.INVALID_METRICS)

    if not isinstance(value, dict):
        raise refuse("'metrics' must be a map of name -> number, e.g. {'loss': 0.31}")
    if len(value) > MAX_METRICS:
        raise refuse(f"'metrics' holds {len(value)} names; at most {MAX_METRICS}")
    out: dict[str, float] = {}
    for name, number in value.items():
        if (
            not isinstance(name, str)
            or not 1 <= len(name) <= MAX_METRIC_NAME
            or not name.isprintable()
        ):
            raise refuse(
                f"metrics: names are 1-{MAX_METRIC_NAME} printable characters, got {name!r}"
            )
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise refuse(f"metrics[{name!r}] must be a number, got {number!r}")
        try:
            as_float = float(number)
        except OverflowError:
            as_float = math.inf
        if not math.isfinite(as_float):
            raise refuse(f"metrics[{name!r}] must be finite, got {number!r}")
        out[name] = as_float
    return out


#: A push of at most this many bytes is digested in one call over its parts joined (a copy
#: that costs less than a hasher object and an update per part); a larger one streams.
DIGEST_JOIN_BYTES = 64 * 1024


def push_digest(gradients: Mapping[str, np.ndarray]) -> bytes:
    """A 16-byte xxh3-128 digest of a decoded push: every tensor's name, dtype, shape and
    bytes, in name order. Not a cryptographic hash: it tells a retry from another push of the
    same client, which chose the key (~0.06 ms for 4 MB), and orders a sync round's sum."""
    parts: list[Any] = []
    size = 0
    for name in sorted(gradients):
        value = gradients[name]
        if isinstance(value, Rows):  # row-sparse: its shape, indices and rows
            values = np.ascontiguousarray(value.values)
            parts.append(
                f"{len(name)}:{name}|rows|{values.dtype.str}|{value.shape}|{values.shape}|".encode()
            )
            parts.append(np.ascontiguousarray(value.indices, np.int64).view(np.uint8).data)
            if values.size:
                parts.append(values.reshape(-1).view(np.uint8).data)
            size += value.indices.size * 8 + values.nbytes
            continue
        array = np.ascontiguousarray(value)
        parts.append(f"{len(name)}:{name}|{array.dtype.str}|{array.shape}|".encode())
        if array.size:
            parts.append(array.reshape(-1).view(np.uint8).data)
            size += array.nbytes
    if size <= DIGEST_JOIN_BYTES:  # the same digest: xxh3 of the parts is xxh3 of their join
        return xxhash.xxh3_128_digest(b"".join(parts))
    digest = xxhash.xxh3_128()
    for part in parts:
        digest.update(part)
    return digest.digest()


# --- reading ---------------------------------------------------------------------------------


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise MessageError(f"duplicate JSON key {key!r}", code=ErrorCode.BAD_REQUEST)
        out[key] = value
    return out


def _reject_constant(name: str) -> float:
    raise MessageError(f"{name} is not valid JSON", code=ErrorCode.BAD_REQUEST)


def _load(body: Body, kind: BodyKind, limits: wire.DecodeLimits) -> Any:
    if kind == "msgpack":
        try:
            return wire.unpack(body, limits)
        except wire.LimitExceeded as exc:
            raise MessageError(
                f"the request exceeds this server's limits: {exc} (max_tensors="
                f"{limits.max_tensors}, max_dims={limits.max_dims})",
                code=ErrorCode.INVALID_TENSOR,
            ) from None
        except wire.MalformedBody as exc:
            raise MessageError(
                f"malformed msgpack body: {exc}", code=ErrorCode.BAD_REQUEST
            ) from None
    raw = bytes(body) if isinstance(body, memoryview) else body
    # An empty list or object is two bytes of JSON and tens of bytes of Python object, and
    # json.loads builds them all before anything is checked: counted first (an upper bound,
    # brackets inside strings included), as the msgpack decoder counts against its budget.
    containers = raw.count(b"[") + raw.count(b"{")
    if containers > limits.max_objects:
        raise MessageError(
            f"the request exceeds this server's limits: the JSON body holds {containers} "
            f"lists and objects, at most {limits.max_objects} (max_tensors="
            f"{limits.max_tensors}); send large models as msgpack",
            code=ErrorCode.BAD_REQUEST,
        )
    try:
        return json.loads(
            raw,
            object_pairs_hook=_reject_duplicates,
            parse_constant=_reject_constant,
        )
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, MessageError):
            raise
        raise MessageError(f"malformed JSON body: {exc}", code=ErrorCode.BAD_REQUEST) from None


def _top_level(
    obj: Any, *, required: frozenset[str], optional: frozenset[str] = frozenset()
) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise MessageError(
            "the body must be a map (a msgpack map or a JSON object)", code=ErrorCode.BAD_REQUEST
        )
    missing = sorted(required - set(obj))
    extra = sorted(set(obj) - required - optional)
    if missing:
        raise MessageError(f"the body is missing {', '.join(map(repr, missing))}")
    if extra:
        allowed = ", ".join(map(repr, sorted(required | optional)))
        raise MessageError(
            f"the body has unexpected key(s) {', '.join(map(repr, extra))}; allowed: {allowed}"
        )
    return obj


def _tensors(
    obj: Any,
    *,
    field: str,
    limits: wire.DecodeLimits,
    json_body: bool = False,
    rows: bool = False,
) -> dict[str, Any]:
    try:
        return wire.decode_tensor_map(obj, field=field, limits=limits, json=json_body, rows=rows)
    except wire.TensorError as exc:
        raise MessageError(str(exc), code=ErrorCode.INVALID_TENSOR) from None


def _iterations(value: Any, code: ErrorCode) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_ITERATIONS:
        raise MessageError(
            f"'iterations' must be an integer in [0, 2**53), got {value!r}", code=code
        )
    return value


def decode_optimizer(obj: Any) -> Optimizer:
    """A name (defaults) or a Keras ``{"class_name", "config"}`` object; 422 when invalid."""
    try:
        if isinstance(obj, (str, dict)):
            return optimizers.get(obj)
        raise InvalidOptimizerConfig(
            "'optimizer' must be a name such as 'adam' or a {'class_name', 'config'} object"
        )
    except UnknownOptimizer as exc:
        raise MessageError(str(exc), code=ErrorCode.UNKNOWN_OPTIMIZER) from None
    except InvalidOptimizerConfig as exc:
        raise MessageError(str(exc), code=ErrorCode.INVALID_OPTIMIZER) from None


def decode_create(body: Body, kind: BodyKind, limits: wire.DecodeLimits) -> CreateMessage:
    """``POST /sessions``: ``{"session_id"?, "optimizer", "weights"}`` (msgpack or JSON).

    The session id is returned as sent; the server checks it (``invalid_session_id``).
    """
    obj = _top_level(
        _load(body, kind, limits),
        required=frozenset({"optimizer", "weights"}),
        optional=frozenset(
            {
                "session_id",
                "refuse_non_finite",
                "training",
                "constraints",
                "shard",
                "sparse_updates",
            }
        ),
    )
    optimizer = decode_optimizer(obj["optimizer"])
    weights = _tensors(obj["weights"], field="weights", limits=limits, json_body=kind == "json")
    refuse = _flag(obj, "refuse_non_finite", ErrorCode.INVALID_REQUEST)
    mode = decode_training(obj["training"]) if "training" in obj else Async()
    constraints = decode_constraints(obj["constraints"]) if "constraints" in obj else {}
    shard = decode_shard(obj["shard"]) if "shard" in obj else None
    sparse = decode_sparse_updates(obj.get("sparse_updates", "exact"))
    return CreateMessage(
        obj.get("session_id"), optimizer, weights, refuse, mode, constraints, shard, sparse
    )


#: How a session applies row-sparse gradients.
SPARSE_UPDATES = ("exact", "lazy")


def decode_sparse_updates(value: Any, code: ErrorCode = ErrorCode.INVALID_REQUEST) -> str:
    """``"exact"`` (default: every row updated, Keras 2.2) or ``"lazy"`` (only the rows a
    gradient has, as TensorFlow's LazyAdam); 422 otherwise."""
    if value not in SPARSE_UPDATES or not isinstance(value, str):
        raise MessageError(
            f"'sparse_updates' must be 'exact' or 'lazy', got {value!r}"[:200], code=code
        )
    return value


def _flag(obj: dict[str, Any], key: str, code: ErrorCode) -> bool:
    value = obj.get(key, False)
    if not isinstance(value, bool):
        raise MessageError(f"{key!r} must be true or false, got {value!r}", code=code)
    return value


def decode_push_message(body: Body, limits: wire.DecodeLimits) -> PushMessage:
    """``POST /sessions/{id}/gradients``: msgpack ``{"gradients": {name: tensor},
    "base_iterations"?: int}``."""
    obj = _top_level(
        _load(body, "msgpack", limits),
        required=frozenset({"gradients"}),
        optional=frozenset({"base_iterations", "sum_squares", "round_order", "metrics", "return"}),
    )
    base = obj.get("base_iterations")
    if base is not None:
        base = base_iterations(base)
    squares = obj.get("sum_squares")
    if squares is not None:
        squares = decode_sum_squares(squares)
    order = obj.get("round_order")
    if order is not None:
        order = decode_round_order(order)
    metrics = decode_metrics(obj["metrics"]) if "metrics" in obj else None
    returns = decode_query(obj["return"], limits, field="return") if "return" in obj else None
    gradients = _tensors(obj["gradients"], field="gradients", limits=limits, rows=True)
    return PushMessage(gradients, base, squares, order, metrics, returns)


#: The most bytes outside the tensors' data that a :class:`PushLayouts` keeps for a layout.
MAX_LAYOUT_BYTES = 64 * 1024


@dataclass(frozen=True)
class _PushLayout:
    """Where a plain push's tensors lie in its body, and the bytes around them."""

    size: int
    #: (start, bytes) of every stretch of the body outside the tensors' data.
    pieces: tuple[tuple[int, bytes], ...]
    #: (name, dtype, element count, offset, shape) in the body's order.
    tensors: tuple[tuple[str, np.dtype, int, int, tuple[int, ...]], ...]
    limits: wire.DecodeLimits


class PushLayouts:
    """:func:`decode_push_message` for the pushes one session receives again and again.

    A worker's pushes to one session differ only in their tensors' bytes: the same names,
    dtypes and shapes, packed the same way. Once a plain push (gradients only, every tensor
    dense and non-empty) has been decoded, its layout is kept: the body's size, the bytes
    outside the tensors' data, and where each tensor's data lies. A body of that size whose
    bytes outside those stretches are the same is the same msgpack (a ``bin``'s payload is
    opaque to the parse), so it decodes to the same map with the tensors at the same
    offsets: the tensors are viewed there, as the full decode views them, and nothing else
    is parsed. Anything else is decoded in full (and its layout kept when it is plain).

    One per session; shared by threads (a layout is immutable and replaced whole).
    """

    __slots__ = ("_layout",)

    def __init__(self) -> None:
        self._layout: _PushLayout | None = None

    def decode(self, body: Body, limits: wire.DecodeLimits) -> PushMessage:
        layout = self._layout
        if layout is not None and layout.size == len(body) and layout.limits is limits:
            for start, piece in layout.pieces:
                if body[start : start + len(piece)] != piece:
                    break
            else:
                return PushMessage(
                    {
                        name: np.frombuffer(body, dtype, count, offset).reshape(shape)
                        for name, dtype, count, offset, shape in layout.tensors
                    }
                )
        message = decode_push_message(body, limits)
        self._layout = _layout_of(body, message, limits)
        return message


def _layout_of(body: Body, message: PushMessage, limits: wire.DecodeLimits) -> _PushLayout | None:
    """The layout of a plain push's body, or None (not plain, or too much around its data)."""
    if (
        message.base_iterations is not None
        or message.sum_squares is not None
        or message.round_order is not None
        or message.metrics is not None
        or message.returns is not None
    ):
        return None
    base = np.frombuffer(body, np.uint8).__array_interface__["data"][0]
    tensors = []
    for name, array in message.gradients.items():
        if type(array) is not np.ndarray or not array.size:
            return None
        offset = array.__array_interface__["data"][0] - base
        if not 0 <= offset <= len(body) - array.nbytes:  # not a view of the body: never guess
            return None
        tensors.append((name, array.dtype, array.size, offset, array.shape))
    pieces, at = [], 0
    for _, dtype, count, offset, _ in sorted(tensors, key=lambda t: t[3]):
        if offset < at:  # overlapping views cannot come from one body's bins: never guess
            return None
        pieces.append((at, bytes(body[at:offset])))
        at = offset + count * dtype.itemsize
    pieces.append((at, bytes(body[at:])))
    if sum(len(piece) for _, piece in pieces) > MAX_LAYOUT_BYTES:
        return None
    return _PushLayout(len(body), tuple(p for p in pieces if p[1]), tuple(tensors), limits)


def decode_query_message(body: Body, limits: wire.DecodeLimits) -> dict[str, np.ndarray | None]:
    """``POST /sessions/{id}/weights/query``: msgpack ``{"tensors": {name: {"rows"?: bin}}}``."""
    obj = _top_level(_load(body, "msgpack", limits), required=frozenset({"tensors"}))
    return decode_query(obj["tensors"], limits, field="tensors")


def decode_query(
    obj: Any, limits: wire.DecodeLimits, *, field: str
) -> dict[str, np.ndarray | None]:
    """Which weights to answer: ``{name: {}}`` for a whole tensor, ``{name: {"rows": <bin,
    int64 little-endian>}}`` for those rows of it (name -> row indices, or None). The names
    and the ranges are checked against the session by the server (422)."""
    if not isinstance(obj, dict) or not obj:
        raise MessageError(
            f"'{field}' must be a non-empty map of parameter name -> {{}} or {{'rows': bin}}"
        )
    if limits.max_tensors is not None and len(obj) > limits.max_tensors:
        raise MessageError(f"'{field}' names {len(obj)} tensors; at most {limits.max_tensors}")
    out: dict[str, np.ndarray | None] = {}
    for name, spec in obj.items():
        try:
            wire.check_parameter_name(name)
        except wire.TensorError as exc:
            raise MessageError(str(exc)) from None
        if not isinstance(spec, dict) or not set(spec) <= {"rows"}:
            raise MessageError(f"{field}[{name!r}] must be {{}} or {{'rows': bin}}"[:300])
        rows = spec.get("rows")
        if rows is None:
            out[name] = None
            continue
        if not isinstance(rows, (bytes, bytearray, memoryview)) or len(rows) % 8:
            raise MessageError(f"{field}[{name!r}]['rows'] must be bin of int64s"[:300])
        if limits.max_elements is not None and len(rows) // 8 > limits.max_elements:
            raise MessageError(f"{field}[{name!r}]: at most {limits.max_elements} rows"[:300])
        out[name] = np.frombuffer(rows, dtype="<i8")
    return out


def encode_query(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """The ``tensors``/``return`` map for :func:`decode_query`: name -> row indices (any
    integer array-like) or None for the whole tensor."""
    out: dict[str, Any] = {}
    for name, rows in tensors.items():
        if rows is None:
            out[name] = {}
        else:
            index = np.ascontiguousarray(np.asarray(rows), dtype="<i8")
            if index.ndim != 1:
                raise ValueError(f"rows of {name!r} must be a 1-D integer array")
            out[name] = {"rows": index.view(np.uint8).tobytes()}
    return out


def decode_push(body: Body, limits: wire.DecodeLimits) -> dict[str, np.ndarray]:
    """The gradients of a push body (:func:`decode_push_message`)."""
    return decode_push_message(body, limits).gradients


def base_iterations(value: Any) -> int:
    """A push's ``base_iterations``: an iteration count (``invalid_base_iterations``)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_ITERATIONS:
        raise MessageError(
            f"'base_iterations' must be an integer in [0, 2**53), got {value!r}",
            code=ErrorCode.INVALID_BASE_ITERATIONS,
        )
    return value


def decode_weights(
    body: Body, limits: wire.DecodeLimits = ANSWER_LIMITS
) -> tuple[int, dict[str, np.ndarray] | None]:
    """A push's or pull's answer: ``(iterations, weights)``, weights ``None`` when absent."""
    obj = _load(body, "msgpack", limits)
    if not isinstance(obj, dict) or "iterations" not in obj:
        raise MessageError("an answer with weights is a map with 'iterations'")
    iterations = _iterations(obj["iterations"], ErrorCode.INVALID_REQUEST)
    if "weights" not in obj:
        return iterations, None
    return iterations, _tensors(obj["weights"], field="weights", limits=limits, rows=True)


_STATE_KEYS = frozenset({"iterations", "optimizer", "weights", "slots", "scalars"})


def decode_state(body: Body, limits: wire.DecodeLimits) -> SessionState:
    """``GET``/``PUT /sessions/{id}/state``: the state, checked (``invalid_state``)."""
    # Weights and up to three slots of every parameter: four times a push's budget.
    state_limits = dataclasses.replace(limits, max_objects=4 * limits.max_objects)
    obj = _top_level(
        _load(body, "msgpack", state_limits),
        required=_STATE_KEYS,
        # refuse_non_finite: absent in states of version 0.1; training: absent for async
        # sessions and in states before training modes
        optional=frozenset(
            {"refuse_non_finite", "training", "constraints", "shard", "sparse_updates"}
        ),
    )
    iterations = _iterations(obj["iterations"], ErrorCode.INVALID_STATE)
    optimizer = decode_optimizer(obj["optimizer"])
    weights = _tensors(obj["weights"], field="weights", limits=limits)
    slots_obj = obj["slots"]
    if not isinstance(slots_obj, dict):
        raise MessageError(
            "'slots' must be a map of slot name to tensors", code=ErrorCode.INVALID_STATE
        )
    slots = {
        str(slot): _tensors(per, field=f"slots[{slot!r}]", limits=limits)
        for slot, per in slots_obj.items()
    }
    scalars = obj["scalars"]
    if not isinstance(scalars, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for v in scalars.values()
    ):
        raise MessageError(
            "'scalars' must be a map of finite numbers", code=ErrorCode.INVALID_STATE
        )
    return SessionState(
        iterations=iterations,
        optimizer=optimizer,
        weights=weights,
        slots=slots,
        scalars={str(k): float(v) for k, v in scalars.items()},
        refuse_non_finite=_flag(obj, "refuse_non_finite", ErrorCode.INVALID_STATE),
        training=_state_training(obj),
        constraints=_state_constraints(obj),
        shard=_state_shard(obj),
        sparse_updates=decode_sparse_updates(
            obj.get("sparse_updates", "exact"), ErrorCode.INVALID_STATE
        ),
    )


def _state_shard(obj: dict[str, Any]) -> Shard | None:
    if "shard" not in obj:
        return None
    try:
        return decode_shard(obj["shard"])
    except MessageError as exc:
        raise MessageError(exc.message, code=ErrorCode.INVALID_STATE) from None


def _state_constraints(obj: dict[str, Any]) -> dict[str, Constraint]:
    if "constraints" not in obj:
        return {}
    try:
        return decode_constraints(obj["constraints"])
    except MessageError as exc:
        raise MessageError(exc.message, code=ErrorCode.INVALID_STATE) from None


def _state_training(obj: dict[str, Any]) -> Training:
    if "training" not in obj:
        return Async()
    try:
        return decode_training(obj["training"])
    except MessageError as exc:
        raise MessageError(exc.message, code=ErrorCode.INVALID_STATE) from None


# --- writing ---------------------------------------------------------------------------------


def arrays(values: Mapping[str, Any], what: str) -> dict[str, np.ndarray]:
    """``{name: array}`` from a mapping of names to array-likes; names must be strings."""
    out: dict[str, np.ndarray] = {}
    for name, value in values.items():
        if not isinstance(name, str):
            raise TypeError(f"{what}: names must be strings, got {name!r}")
        if value is None:
            raise TypeError(
                f"{what}: {name!r} is None: that parameter got no gradient (it does not reach "
                "the loss, or it is frozen). Nothing was sent: zeros are not neutral for most "
                "optimizers (momentum, moments and decay still move a parameter), so give it a "
                "gradient or leave it out of the session"
            )
        if isinstance(value, Rows):  # row-sparse: its rows travel as they are
            wire.dtype_name(value.values.dtype, f"{what}[{name!r}]")
            out[name] = value  # type: ignore[assignment]
            continue
        array = value if isinstance(value, np.ndarray) else np.asarray(value)
        if array.dtype not in wire.WIRE_DTYPES:
            wire.dtype_name(array.dtype, f"{what}[{name!r}]")  # a dtype that cannot travel, named
        out[name] = array
    return out


def encode_create(
    optimizer: Optimizer | str | Mapping[str, Any],
    weights: Mapping[str, Any],
    session_id: str | None = None,
    *,
    refuse_non_finite: bool = False,
    training: Any = None,
    constraints: Mapping[str, Any] | None = None,
    shard: Shard | None = None,
    sparse_updates: str = "exact",
) -> bytes:
    """The create body; the optimizer, the training mode and the constraints are validated
    (and normalised) on the way."""
    message: dict[str, Any] = {
        "optimizer": optimizers.get(optimizer).to_dict(),
        "weights": arrays(weights, "weights"),
    }
    if session_id is not None:
        message["session_id"] = session_id
    if refuse_non_finite:
        message["refuse_non_finite"] = True
    mode = modes.get(training)
    if mode != Async():
        message["training"] = mode.to_dict()
    if constraints:
        message["constraints"] = _constraints_out(constraints)
    if shard is not None:
        message["shard"] = shard.to_dict()
    if sparse_updates != "exact":
        message["sparse_updates"] = decode_sparse_updates(sparse_updates)
    return wire.pack(message)


def _constraints_out(constraints: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for name, value in constraints.items():
        if not isinstance(name, str):
            raise TypeError(f"constraints: names must be strings, got {name!r}")
        out[name] = weight_constraints.get(value).to_dict()
    return out


def encode_push(
    gradients: Mapping[str, Any],
    base_iterations: int | None = None,
    sum_squares: float | None = None,
    round_order: str | None = None,
    metrics: Mapping[str, float] | None = None,
    returns: Mapping[str, Any] | None = None,
) -> bytes:
    message: dict[str, Any] = {"gradients": arrays(gradients, "gradients")}
    if base_iterations is not None:
        message["base_iterations"] = base_iterations
    if sum_squares is not None:
        message["sum_squares"] = float(sum_squares)
    if round_order is not None:
        message["round_order"] = round_order
    if metrics:
        message["metrics"] = decode_metrics(dict(metrics))
    if returns is not None:
        message["return"] = encode_query(returns)
    return wire.pack(message)


def encode_weights(iterations: int, weights: Mapping[str, np.ndarray] | None) -> bytes:
    """``{"iterations", "weights"?}``: one copy of the weights' bytes, straight from memory."""
    if weights is None:
        return wire.pack({"iterations": iterations})
    return wire.pack({"iterations": iterations, "weights": weights})


class WeightsAnswers:
    """:func:`encode_weights` for the answers one session sends again and again: the same
    names, dtypes and shapes each time, only the iteration count and the weights' bytes
    change. The bytes around them are packed once (by :func:`wire.pack`, so they are its
    bytes) and kept; an answer is then those pieces, the count and each array's memory,
    joined. Weights of another layout are packed in full (and their layout kept when every
    array is a non-empty, C-contiguous float16/32/64 in the machine's little-endian order).

    One per session; shared by threads (a layout is immutable and replaced whole)."""

    __slots__ = ("_layout",)

    def __init__(self) -> None:
        self._layout: _AnswerLayout | None = None

    def encode(self, iterations: int, weights: Mapping[str, np.ndarray]) -> bytes:
        layout = self._layout
        if layout is not None and type(iterations) is int:
            specs, head, pieces = layout
            if len(specs) == len(weights):
                parts: list[Any] = [head, msgpack.packb(iterations)]
                for (name, dtype, shape), piece, (key, array) in zip(
                    specs, pieces, weights.items(), strict=False
                ):
                    if (
                        key != name
                        or array.dtype != dtype
                        or array.shape != shape
                        or not array.flags.c_contiguous
                    ):
                        break
                    parts += (piece, array)
                else:
                    parts.append(pieces[-1])
                    return b"".join(parts)
        self._layout = _answer_layout(weights)
        return encode_weights(iterations, weights)


_PLAIN_FLOATS = frozenset(np.dtype(t) for t in ("<f2", "<f4", "<f8"))
#: Each tensor's (name, dtype, shape); the bytes before the count; the bytes before each
#: array's memory, and after the last.
_AnswerLayout = tuple[tuple[tuple[str, np.dtype, tuple[int, ...]], ...], bytes, tuple[bytes, ...]]


def _answer_layout(weights: Mapping[str, np.ndarray]) -> _AnswerLayout | None:
    """The layout :class:`WeightsAnswers` keeps for ``weights``, or None."""
    specs = []
    for name, array in weights.items():
        if (
            type(array) is not np.ndarray
            or array.dtype not in _PLAIN_FLOATS
            or not array.flags.c_contiguous
            or not array.size
        ):
            return None
        specs.append((name, array.dtype, array.shape))
    if not specs:
        return None
    chunks = list(wire.pack_chunks({"iterations": 0, "weights": weights}))
    head = bytes(chunks[0]) + bytes(chunks[1])  # the map's header and "iterations"
    pieces, piece = [], bytearray()
    for chunk in chunks[3:]:  # after the count: bytes, and each array's memory
        if isinstance(chunk, memoryview):
            pieces.append(bytes(piece))
            piece = bytearray()
        else:
            piece += chunk
    pieces.append(bytes(piece))
    if len(pieces) != len(specs) + 1:
        return None
    return tuple(specs), head, tuple(pieces)


def encode_state(state: SessionState) -> bytes:
    """The state body. The optimizer may also be given as a name or a Keras config (it is
    validated on the way); the iteration count and arrays are sent as they are, for the
    server to check."""
    message: dict[str, Any] = {
        "iterations": state.iterations,
        "optimizer": optimizers.get(state.optimizer).to_dict(),
        "weights": arrays(state.weights, "weights"),
        "slots": {slot: arrays(per, f"slots[{slot!r}]") for slot, per in state.slots.items()},
        "scalars": dict(state.scalars),
        "refuse_non_finite": bool(state.refuse_non_finite),
    }
    mode = modes.get(state.training)
    if mode != Async():  # an async state reads as before training modes (and on such servers)
        message["training"] = mode.to_dict()
    if state.constraints:
        message["constraints"] = _constraints_out(state.constraints)
    if state.shard is not None:
        message["shard"] = state.shard.to_dict()
    if state.sparse_updates != "exact":  # an exact state reads as before sparse rows
        message["sparse_updates"] = decode_sparse_updates(state.sparse_updates)
    return wire.pack(message)
