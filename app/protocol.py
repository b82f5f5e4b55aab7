"""Protocol version 1: turn request bodies into domain values and domain values into bodies.

The byte-level format lives in :mod:`paramserver.wire`; this module knows the messages (what a
create, a push or a state body holds) and maps every problem to the protocol's error codes:
400 for a body that is not well-formed, 415 for a content type we do not speak, 422 for a
well-formed body whose content is invalid.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from paramserver import wire
from paramserver.optimizers import InvalidOptimizerConfig, UnknownOptimizer
from paramserver.optimizers import Optimizer as OptimizerConfig
from paramserver.optimizers import get as get_optimizer

from .errors import BadRequest, InvalidRequest, UnsupportedMediaType
from .settings import Settings
from .training import SessionState

__all__ = [
    "JSON_MEDIA_TYPE",
    "body_kind",
    "decode_limits",
    "parse_create",
    "parse_gradients",
    "parse_optimizer",
    "parse_state",
    "state_message",
    "weights_message",
]

JSON_MEDIA_TYPE = "application/json"

#: Iteration counts stay below 2**53: exact as floats (Keras casts them) and as msgpack ints.
MAX_ITERATIONS = 2**53


def decode_limits(settings: Settings) -> wire.DecodeLimits:
    return wire.DecodeLimits(
        # A push or create body holds one map of tensors, each a map of three entries (~8
        # values) and a shape of a few dimensions; deeper shapes draw on the same budget. The
        # budget bounds the Python objects, and so the time, one hostile body can cost.
        # parse_state allows four times as much (weights and up to three slots).
        max_objects=1024 + settings.max_tensors * 16,
        max_map_items=max(settings.max_tensors, 64),
        max_array_items=max(settings.max_dims, 64),
        scalar_arrays=True,
        max_tensors=settings.max_tensors,
        max_dims=settings.max_dims,
        max_elements=settings.max_elements,
    )


def body_kind(content_type: str | None, *, allow_json: bool) -> str:
    """``"msgpack"`` or ``"json"`` for a Content-Type header; 415 for anything else."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media in wire.MSGPACK_CONTENT_TYPES:
        return "msgpack"
    if allow_json and media == JSON_MEDIA_TYPE:
        return "json"
    accepted = "application/msgpack" + (" or application/json" if allow_json else "")
    raise UnsupportedMediaType(
        f"Content-Type {content_type or '(none)'!r} is not accepted here; send {accepted}"
    )


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise BadRequest(f"duplicate JSON key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> float:
    raise BadRequest(f"{name} is not valid JSON")


def _load(body: bytes | bytearray | memoryview, kind: str, limits: wire.DecodeLimits) -> Any:
    if kind == "msgpack":
        try:
            return wire.unpack(body, limits)
        except wire.LimitExceeded as exc:
            raise InvalidRequest(
                f"the request exceeds this server's limits: {exc} (max_tensors="
                f"{limits.max_tensors}, max_dims={limits.max_dims})",
                code="invalid_tensor",
            ) from None
        except wire.MalformedBody as exc:
            raise BadRequest(f"malformed msgpack body: {exc}") from None
    try:
        return json.loads(
            bytes(body) if isinstance(body, memoryview) else body,
            object_pairs_hook=_reject_duplicates,
            parse_constant=_reject_constant,
        )
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"malformed JSON body: {exc}") from None


def _top_level(obj: Any, *, required: set[str], optional: set[str] = frozenset()) -> dict[str, Any]:  # type: ignore[assignment]
    if not isinstance(obj, dict):
        raise BadRequest("the body must be a map (a msgpack map or a JSON object)")
    missing = sorted(required - set(obj))
    extra = sorted(set(obj) - required - optional)
    if missing:
        raise InvalidRequest(f"the body is missing {', '.join(map(repr, missing))}")
    if extra:
        allowed = ", ".join(map(repr, sorted(required | optional)))
        raise InvalidRequest(
            f"the body has unexpected key(s) {', '.join(map(repr, extra))}; allowed: {allowed}"
        )
    return obj


def parse_optimizer(obj: Any) -> OptimizerConfig:
    """A name (defaults) or a Keras ``{"class_name", "config"}`` object; 422 when invalid."""
    try:
        if isinstance(obj, (str, dict)):
            return get_optimizer(obj)
        raise InvalidOptimizerConfig(
            "'optimizer' must be a name such as 'adam' or a {'class_name', 'config'} object"
        )
    except UnknownOptimizer as exc:
        raise InvalidRequest(str(exc), code="unknown_optimizer") from None
    except InvalidOptimizerConfig as exc:
        raise InvalidRequest(str(exc), code="invalid_optimizer") from None


def _tensors(
    obj: Any, *, field: str, limits: wire.DecodeLimits, json_body: bool
) -> dict[str, np.ndarray]:
    try:
        return wire.decode_tensor_map(obj, field=field, limits=limits, json=json_body)
    except wire.TensorError as exc:
        raise InvalidRequest(str(exc), code="invalid_tensor") from None


def parse_create(
    body: bytes | bytearray | memoryview, kind: str, limits: wire.DecodeLimits
) -> tuple[str | None, OptimizerConfig, dict[str, np.ndarray]]:
    """``POST /sessions``: ``{"session_id"?, "optimizer", "weights"}`` (msgpack or JSON)."""
    obj = _top_level(
        _load(body, kind, limits), required={"optimizer", "weights"}, optional={"session_id"}
    )
    optimizer = parse_optimizer(obj["optimizer"])
    weights = _tensors(obj["weights"], field="weights", limits=limits, json_body=kind == "json")
    return obj.get("session_id"), optimizer, weights


def parse_gradients(
    body: bytes | bytearray | memoryview, limits: wire.DecodeLimits
) -> dict[str, np.ndarray]:
    """``POST /sessions/{id}/gradients``: msgpack ``{"gradients": {name: tensor}}``."""
    obj = _top_level(_load(body, "msgpack", limits), required={"gradients"})
    return _tensors(obj["gradients"], field="gradients", limits=limits, json_body=False)


def parse_state(body: bytes | bytearray | memoryview, limits: wire.DecodeLimits) -> SessionState:
    """``PUT /sessions/{id}/state``: the body ``GET .../state`` returns."""
    state_limits = dataclasses.replace(limits, max_objects=4 * limits.max_objects)
    obj = _top_level(
        _load(body, "msgpack", state_limits),
        required={"iterations", "optimizer", "weights", "slots", "scalars"},
    )
    iterations = obj["iterations"]
    if (
        isinstance(iterations, bool)
        or not isinstance(iterations, int)
        or not 0 <= iterations < MAX_ITERATIONS
    ):
        raise InvalidRequest(
            f"'iterations' must be an integer in [0, 2**53), got {iterations!r}",
            code="invalid_state",
        )
    optimizer = parse_optimizer(obj["optimizer"])
    weights = _tensors(obj["weights"], field="weights", limits=limits, json_body=False)
    slots_obj = obj["slots"]
    if not isinstance(slots_obj, dict):
        raise InvalidRequest("'slots' must be a map of slot name to tensors", code="invalid_state")
    slots = {
        str(slot): _tensors(per, field=f"slots[{slot!r}]", limits=limits, json_body=False)
        for slot, per in slots_obj.items()
    }
    scalars = obj["scalars"]
    if not isinstance(scalars, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for v in scalars.values()
    ):
        raise InvalidRequest("'scalars' must be a map of finite numbers", code="invalid_state")
    return SessionState(
        optimizer=optimizer,
        weights=weights,
        iterations=iterations,
        slots=slots,
        scalars={k: v for k, v in scalars.items()},
    )


def weights_message(iterations: int, weights: Mapping[str, np.ndarray] | None) -> bytes:
    """``{"iterations", "weights"?}``: one copy of the weights' bytes, straight from memory."""
    if weights is None:
        return wire.pack({"iterations": iterations})
    return wire.pack({"iterations": iterations, "weights": weights})


def state_message(state: SessionState) -> bytes:
    return wire.pack(
        {
            "iterations": state.iterations,
            "optimizer": state.optimizer.to_dict(),
            "weights": state.weights,
            "slots": state.slots,
            "scalars": state.scalars,
        }
    )
