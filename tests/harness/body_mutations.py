"""Hypothesis strategies of request bodies: valid ones, and mutations of them.

:data:`VALID` holds a valid body of each kind (a create, a JSON create, a push to the session
``alpha`` or ``beta`` of :data:`PROTECTED`, a state), as decoded objects. :func:`mutated_body`
mutates one as an object (values replaced, deleted or added, often by near misses of what a
tensor map holds) and then as bytes; what the fuzzers feed the decoder, the parsers and a
live server.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from paramserver import wire

__all__ = [
    "ALPHA_WEIGHTS",
    "BETA_WEIGHTS",
    "FUZZ",
    "PROTECTED",
    "VALID",
    "msgpack_values",
    "mutated_body",
    "near_misses",
    "pack_any",
    "plain",
]

#: The hypothesis settings of the fuzzers.
FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

#: The sessions of a fuzzed server that no request may change unless it succeeds.
PROTECTED = ("alpha", "beta")

ALPHA_WEIGHTS = {
    "w": np.arange(6, dtype=np.float32).reshape(2, 3) / 10,
    "b": np.array([0.5, -0.5, 1.0], np.float32),
}
BETA_WEIGHTS = {"kernel": np.linspace(-1, 1, 4)}  # float64


def plain(value: Any) -> Any:
    """A decoded message with bins as bytes, so that it can be edited and packed again."""
    if isinstance(value, memoryview):
        return value.tobytes()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def _valid_bodies() -> dict[str, Any]:
    from paramserver.optimizers import get as get_optimizer
    from paramserver.server.training import build_trainer

    trainer = build_trainer(get_optimizer("adam"), dict(ALPHA_WEIGHTS))
    trainer.apply(trainer.check_gradients({k: np.ones_like(v) for k, v in ALPHA_WEIGHTS.items()}))
    state = trainer.state()
    state_body = wire.pack(
        {
            "iterations": state.iterations,
            "optimizer": state.optimizer.to_dict(),
            "weights": state.weights,
            "slots": state.slots,
            "scalars": state.scalars,
        }
    )
    return {
        "create": plain(
            wire.unpack(
                wire.pack({"session_id": "new", "optimizer": "adam", "weights": ALPHA_WEIGHTS})
            )
        ),
        "create_json": {
            "session_id": "new",
            "optimizer": {"class_name": "SGD", "config": {"lr": 0.1}},
            "weights": {"w": {"dtype": "float32", "shape": [2], "data": [1.0, 2.0]}},
        },
        "push": plain(
            wire.unpack(
                wire.pack({"gradients": {k: np.ones_like(v) for k, v in ALPHA_WEIGHTS.items()}})
            )
        ),
        "push_beta": plain(wire.unpack(wire.pack({"gradients": {"kernel": np.full(4, 0.25)}}))),
        "state": plain(wire.unpack(state_body)),
    }


VALID = _valid_bodies()

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=24),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
# Values that look like parts of a tensor map: the validation a random value rarely reaches.
near_misses = st.one_of(
    st.sampled_from(["float32", "float64", "float16", "int32", "<f4", "f4", "", "FLOAT32"]),
    st.lists(st.integers(-3, 2**33), max_size=4),
    st.lists(st.sampled_from([0, 1, 2, 3, 2**31, 2**62]), max_size=34),
    st.binary(max_size=64),
    st.sampled_from([math.nan, math.inf, -math.inf, 2**70, -1, True, 1e308]),
    st.sampled_from(["sgd", "adam", "nadam", "nope", {"class_name": "SGD", "config": {}}]),
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _replace(value[head], rest, new)}
    out = list(value)
    out[head] = _replace(value[head], rest, new)
    return out


def _delete(value: Any, path: tuple[Any, ...]) -> Any:
    if len(path) == 1:
        if isinstance(value, dict):
            return {k: v for k, v in value.items() if k != path[0]}
        return [v for i, v in enumerate(value) if i != path[0]]
    head = path[0]
    return _replace(value, (head,), _delete(value[head], path[1:]))


@st.composite
def mutated_object(draw: st.DrawFn, base: Any) -> Any:
    """``base`` with up to three values replaced, deleted or added somewhere in its tree."""
    value = base
    for _ in range(draw(st.integers(0, 3))):
        paths = list(_paths(value))
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "near", "delete", "add"]))
        if action == "delete" and path:
            value = _delete(value, path)
        elif action == "add":
            target = value
            for step in path:
                target = target[step]
            if isinstance(target, dict):
                extra = draw(st.text(max_size=8))
                value = _replace(value, path, {**target, extra: draw(msgpack_values)})
            elif isinstance(target, list):
                value = _replace(value, path, [*target, draw(msgpack_values)])
        else:
            new = draw(near_misses if action == "near" else msgpack_values)
            value = _replace(value, path, new)
    return value


def pack_any(value: Any) -> bytes:
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (OverflowError, TypeError, ValueError):
        return b"\xc1"


edit = st.tuples(
    st.sampled_from(["set", "insert", "delete", "cut"]),
    st.integers(0, 2**20),
    st.binary(min_size=1, max_size=8),
)


def edited(body: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    out = bytearray(body)
    for kind, pos, data in edits:
        i = pos % (len(out) + 1)
        if kind == "set":
            out[i : i + len(data)] = data
        elif kind == "insert":
            out[i:i] = data
        elif kind == "delete":
            del out[i : i + len(data)]
        else:
            del out[i:]
    return bytes(out)


@st.composite
def mutated_body(draw: st.DrawFn, name: str) -> bytes:
    """A valid body of kind ``name``, mutated as an object and then as bytes."""
    base = VALID[name]
    value = draw(mutated_object(base))
    body = json.dumps(value, default=str).encode() if name == "create_json" else pack_any(value)
    return edited(body, draw(st.lists(edit, max_size=3)))
