"""Pydantic models of the JSON messages, for the OpenAPI schema served at ``/docs``.

Bodies are parsed by :mod:`paramserver.server.protocol` (the same code for JSON and msgpack); these
models document them and shape the JSON responses.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from paramserver.codes import SESSION_ID_PATTERN, SESSION_ID_RULE
from paramserver.wire import MSGPACK_MEDIA_TYPE


class TensorMeta(BaseModel):
    dtype: Literal["float32", "float64", "float16"]
    shape: list[int]


class JsonTensor(TensorMeta):
    data: list[float] = Field(description="The elements, flat, in C order.")


class OptimizerSpec(BaseModel):
    class_name: str = Field(examples=["Adam"])
    config: dict[str, Any] = Field(default_factory=dict, examples=[{"lr": 0.001, "amsgrad": True}])


class CreateSessionRequest(BaseModel):
    # The session-id pattern excludes "." and ".." with a look-ahead, which pydantic's default
    # (Rust) regex engine does not support.
    model_config = ConfigDict(regex_engine="python-re")

    session_id: str | None = Field(
        None,
        pattern=SESSION_ID_PATTERN,
        description=f"{SESSION_ID_RULE}; a uuid4 hex is generated if absent.",
    )
    optimizer: str | OptimizerSpec = Field(
        description="A name ('sgd', 'Adam', ... case-insensitive; defaults used) or a Keras "
        "config {class_name, config}.",
        examples=["adam"],
    )
    weights: dict[str, JsonTensor] = Field(
        description="Parameter name -> tensor. In msgpack, 'data' is bin (little-endian bytes)."
    )
    refuse_non_finite: bool = Field(
        False,
        description="Refuse (422 non_finite_result, nothing changed) a step whose weights or "
        "slots would hold NaN or inf. Costs a copy of weights and slots per step and twice "
        "the session's memory. Not available for TFOptimizer.",
    )
    training: TrainingSpec | None = Field(
        None,
        description="The training mode: {'mode': 'async', 'max_staleness'?} (default) or "
        "{'mode': 'sync', 'replicas_to_aggregate', 'total_num_replicas'?, "
        "'round_timeout_seconds'?}. 422 invalid_training when invalid.",
    )
    sparse_updates: Literal["exact", "lazy"] = Field(
        "exact",
        description="How row-sparse gradients ({dtype, shape, indices, data}) update: "
        "'exact' (default), as their dense equivalent with zeros elsewhere (Keras 2.2: every "
        "row's slots decay); 'lazy', only the rows present (TensorFlow's LazyAdam), differing "
        "from Keras 2.2 for untouched rows. 'lazy' is refused with a norm-based constraint "
        "(422 invalid_constraint) and for TFOptimizer (422 invalid_optimizer).",
    )
    shard: ShardSpec | None = Field(
        None,
        description="This session is part index of count of a sharded session (the client "
        "owns the partition). Sync rounds with backup workers or with clipnorm are refused "
        "for shards (422 invalid_training), so is a TFOptimizer's global_clipnorm.",
    )
    constraints: dict[str, ConstraintSpec] | None = Field(
        None,
        description="Parameter name -> a Keras 2.2.4 constraint, applied after every step as "
        "Keras's update applies it (names case-insensitive, Keras's aliases accepted). 422 "
        "invalid_constraint for an unknown class or argument, a parameter the session does "
        "not have, an axis it does not have, or a TFOptimizer session.",
    )


class TrainingSpec(BaseModel):
    """A session's training mode (``paramserver.training``)."""

    mode: Literal["async", "sync"] = Field(
        "async",
        description="'async' (default): each push is one step. 'sync': rounds of "
        "replicas_to_aggregate gradients of the current weights, applied as their mean.",
    )
    max_staleness: int | None = Field(
        None,
        ge=0,
        description="async: refuse (409 stale_gradient) a push whose base_iterations is more "
        "than this many steps behind the session.",
    )
    replicas_to_aggregate: int | None = Field(
        None, ge=1, le=1024, description="sync: N, the gradients a round applies."
    )
    total_num_replicas: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="sync: M >= N workers (default N); the M - N late gradients of a round "
        "are refused as stale.",
    )
    round_timeout_seconds: float | None = Field(
        None,
        gt=0,
        le=86400,
        description="sync: a round not full within this many seconds (default 600) answers "
        "its pushes 503 round_timeout and applies nothing.",
    )


class ConstraintSpec(BaseModel):
    """A Keras 2.2.4 constraint (``paramserver.constraints``)."""

    class_name: str = Field(
        description="MaxNorm, NonNeg, UnitNorm or MinMaxNorm (case-insensitive; Keras's "
        "aliases such as max_norm are accepted, and a bare name in place of the object takes "
        "the defaults). Summaries answer the canonical class name.",
        examples=["MaxNorm"],
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Keras 2.2.4's arguments: MaxNorm max_value=2, axis=0; UnitNorm axis=0; "
        "MinMaxNorm min_value=0.0, max_value=1.0, rate=1.0, axis=0; NonNeg none.",
        examples=[{"max_value": 2.0, "axis": 0}],
    )


class ShardPart(BaseModel):
    """One parameter of a shard's session, as a piece of the model."""

    source: str = Field(description="The model's parameter this is (or a slice of).")
    position: int = Field(ge=0, description="That parameter's index in the model's order.")
    rows: list[int] | None = Field(
        None, min_length=2, max_length=2, description="[start, stop): rows of a split tensor."
    )


class ShardSpec(BaseModel):
    """Which part of a sharded session a session is (``paramserver.sharding``)."""

    index: int = Field(ge=0, description="This shard's index, in [0, count).")
    count: int = Field(ge=1, le=1024, description="How many shards the session has.")
    layout: str = Field(
        pattern="^[0-9a-f]{8,128}$",
        description="The hash of the partition the client computed (8-128 hex digits).",
    )
    parts: dict[str, ShardPart] | None = Field(
        None,
        description="What each of this session's parameters is, in their order: the model's "
        "parameter 'source' (its 'position' in the model) whole, or its rows [start, stop). "
        "Lets a client joining by id rebuild the model; a slice's rows must match its "
        "parameter's first axis, and a TFOptimizer session's tensors stay whole.",
    )


class RoundStatus(BaseModel):
    received: int = Field(description="Gradients the open round holds.")
    needed: int = Field(description="replicas_to_aggregate.")
    age_seconds: float = Field(description="Since the open round's first gradient (0 if none).")


class CreateSessionResponse(BaseModel):
    session_id: str
    optimizer: OptimizerSpec
    iterations: int
    refuse_non_finite: bool
    training: TrainingSpec
    constraints: dict[str, ConstraintSpec] = Field(
        default_factory=dict, description="Parameter name -> its constraint."
    )
    round: RoundStatus | None = Field(None, description="Sync sessions: the open round.")
    sparse_updates: Literal["exact", "lazy"] = Field(
        "exact", description="How row-sparse gradients update."
    )
    shard: ShardSpec | None = Field(None, description="A shard of a sharded session: which one.")
    parameters: dict[str, TensorMeta]


class SessionSummary(CreateSessionResponse):
    created_at: str = Field(description="ISO 8601, UTC.")
    updated_at: str = Field(description="ISO 8601, UTC.")


class SessionList(BaseModel):
    sessions: list[SessionSummary]


class ErrorDetail(BaseModel):
    code: str
    message: str
    iterations: int | None = Field(
        None, description="stale_gradient: the session's iteration count."
    )


class ErrorBody(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"]


class DataPlaneAnnouncement(BaseModel):
    """Where the data plane listens (on this server's host) and how to speak to it."""

    port: int = Field(description="TCP port of the data plane, on the same host as this API")
    tls: bool = Field(description="whether the data plane speaks TLS (as the API does)")
    version: int = Field(description="the frame version (paramserver.frames.VERSION)")


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route can answer."""
    text = {
        400: "Malformed body (not msgpack/JSON of the protocol's kinds).",
        401: "Missing or wrong bearer token.",
        403: "The token may not do this.",
        404: "No such session.",
        409: "Conflict: the session id is taken (session_exists), the gradient is stale "
        "(stale_gradient, with the session's iterations), the round was aborted by a state "
        "import (round_aborted), or the session cannot count further (iterations_exhausted).",
        413: "The body is over the size limit.",
        415: "Wrong Content-Type.",
        422: "Well-formed but invalid: optimizer, tensors, parameters or non-finite values.",
        503: "Not processed: overloaded or busy (retry after Retry-After), or a sync round "
        "that timed out (round_timeout) or already had total_num_replicas pushes (round_full).",
        507: "A session or memory limit would be exceeded.",
    }
    return {s: {"model": ErrorBody, "description": text[s]} for s in statuses}


_TENSOR_MSGPACK = {
    "type": "object",
    "required": ["dtype", "shape", "data"],
    "properties": {
        "dtype": {"type": "string", "enum": ["float32", "float64", "float16"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "data": {
            "type": "string",
            "format": "binary",
            "description": "msgpack bin: prod(shape) * itemsize little-endian bytes",
        },
    },
}

_WEIGHTS_MESSAGE = {
    "type": "object",
    "required": ["iterations"],
    "properties": {
        "iterations": {"type": "integer"},
        "weights": {"type": "object", "additionalProperties": _TENSOR_MSGPACK},
    },
}

_STATE_MESSAGE = {
    "type": "object",
    "required": ["iterations", "optimizer", "weights", "slots", "scalars"],
    "properties": {
        "iterations": {"type": "integer", "minimum": 0},
        "optimizer": {"type": "object", "description": "{class_name, config}"},
        "weights": {"type": "object", "additionalProperties": _TENSOR_MSGPACK},
        "slots": {
            "type": "object",
            "description": "slot name (m, v, ...) -> parameter name -> tensor",
            "additionalProperties": {"type": "object", "additionalProperties": _TENSOR_MSGPACK},
        },
        "scalars": {
            "type": "object",
            "description": "scalar optimizer state, e.g. Nadam's m_schedule",
            "additionalProperties": {"type": "number"},
        },
    },
}


def msgpack_body(
    schema: dict[str, Any], *, also_json: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads a raw msgpack (and maybe JSON) body."""
    content: dict[str, Any] = {
        MSGPACK_MEDIA_TYPE: {"schema": schema},
        "application/x-msgpack": {"schema": schema},
    }
    if also_json is not None:
        content["application/json"] = {"schema": also_json}
    return {"requestBody": {"required": True, "content": content}}


def msgpack_response_doc(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {MSGPACK_MEDIA_TYPE: {"schema": schema}}}


_ROWS_MSGPACK = {
    "type": "object",
    "description": "A row-sparse tensor: rows 'indices' of a tensor of 'shape'.",
    "required": ["dtype", "shape", "indices", "data"],
    "properties": {
        "dtype": {"type": "string", "enum": ["float32", "float64", "float16", "bfloat16"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "indices": {
            "type": "string",
            "format": "binary",
            "description": "msgpack bin: int64 little-endian row indices in [0, shape[0])",
        },
        "data": {
            "type": "string",
            "format": "binary",
            "description": "msgpack bin: len(indices) rows of shape[1:], little-endian",
        },
    },
}
_SELECTION = {
    "type": "object",
    "description": "name -> {} (the whole tensor) or {'rows': bin of int64} (those rows)",
    "additionalProperties": {
        "type": "object",
        "properties": {"rows": {"type": "string", "format": "binary"}},
    },
}
GRADIENTS_BODY = msgpack_body(
    {
        "type": "object",
        "required": ["gradients"],
        "properties": {
            "gradients": {
                "type": "object",
                "additionalProperties": {"oneOf": [_TENSOR_MSGPACK, _ROWS_MSGPACK]},
            },
            "base_iterations": {"type": "integer", "minimum": 0},
            "metrics": {
                "type": "object",
                "description": "what the worker measured: at most 16 names -> finite numbers",
                "additionalProperties": {"type": "number"},
            },
            "return": _SELECTION,
        },
    }
)
QUERY_BODY = msgpack_body(
    {"type": "object", "required": ["tensors"], "properties": {"tensors": _SELECTION}}
)
CREATE_BODY = msgpack_body(
    {
        "type": "object",
        "required": ["optimizer", "weights"],
        "properties": {
            "session_id": {"type": "string"},
            "optimizer": {"description": "a name or {class_name, config}"},
            "weights": {"type": "object", "additionalProperties": _TENSOR_MSGPACK},
        },
    },
    also_json={"$ref": "#/components/schemas/CreateSessionRequest"},
)
STATE_BODY = msgpack_body(_STATE_MESSAGE)
WEIGHTS_RESPONSE = msgpack_response_doc(_WEIGHTS_MESSAGE, "The step's iteration count and weights.")
STATE_RESPONSE = msgpack_response_doc(_STATE_MESSAGE, "Everything needed to rebuild the session.")
