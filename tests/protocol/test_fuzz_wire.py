"""Fuzzing the wire layer in process: random bytes and mutated bodies raise only its own errors.

Random bytes, and mutations of valid create, push and state bodies (at the level of the decoded
objects, then of the bytes: :mod:`tests.harness.body_mutations`), go through
:func:`paramserver.wire.unpack` and the tensor decoder with the server's request limits: only
``MalformedBody`` and ``TensorError`` may come out, and a decoded tensor matches its map.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from paramserver import wire
from paramserver.server.protocol import decode_limits
from paramserver.server.settings import Settings
from tests.harness.body_mutations import FUZZ, msgpack_values, mutated_body, near_misses

LIMITS = decode_limits(Settings())


def unpack_and_decode(body: bytes) -> None:
    """The wire layer alone: only MalformedBody and TensorError may come out."""
    value = wire.unpack(body, LIMITS)
    if isinstance(value, dict):
        for part in value.values():
            if isinstance(part, dict):
                try:
                    arrays = wire.decode_tensor_map(part, field="x", limits=LIMITS)
                except wire.TensorError:
                    continue
                for name, arr in arrays.items():
                    tensor = part[name]
                    assert arr.dtype == wire.TENSOR_DTYPES[tensor["dtype"]]
                    assert list(arr.shape) == tensor["shape"]
                    assert arr.nbytes == len(tensor["data"])


@FUZZ
@given(
    st.binary(max_size=300) | mutated_body("push") | mutated_body("state") | mutated_body("create")
)
def test_the_wire_layer_raises_only_its_own_errors(body: bytes) -> None:
    try:
        unpack_and_decode(body)
    except (wire.MalformedBody, wire.TensorError):
        pass


@FUZZ
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "dtype": near_misses | msgpack_values,
            "shape": near_misses | msgpack_values,
            "data": near_misses | msgpack_values,
            "extra": msgpack_values,
        },
    )
)
def test_decode_tensor_raises_only_tensor_error(obj: dict[str, Any]) -> None:
    try:
        arr = wire.decode_tensor(obj, limits=LIMITS)
    except wire.TensorError:
        return
    assert arr.nbytes == len(obj["data"])
    assert list(arr.shape) == obj["shape"]
