"""Each message of the protocol, encoded and decoded by the one pair of functions that server
and client share (:mod:`paramserver.messages`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from paramserver import messages, optimizers, wire
from paramserver.codes import ErrorCode, MessageError
from paramserver.messages import ANSWER_LIMITS, SessionState
from paramserver.sparse import Rows

LIMITS = wire.DecodeLimits(max_tensors=64, scalar_arrays=True)


def weights() -> dict[str, np.ndarray]:
    return {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array([0.5, -1.0], np.float64),
    }


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype
        np.testing.assert_array_equal(a[name], b[name])


def test_create_round_trip_msgpack_and_json() -> None:
    body = messages.encode_create(optimizers.Adam(lr=0.01), weights(), "run-1")
    got = messages.decode_create(body, "msgpack", LIMITS)
    assert got.session_id == "run-1" and got.optimizer == optimizers.Adam(lr=0.01)
    same(got.weights, weights())
    as_json = json.dumps(
        {"optimizer": "sgd", "weights": {"w": {"dtype": "float32", "shape": [2], "data": [1, 2]}}}
    ).encode()
    got = messages.decode_create(as_json, "json", LIMITS)
    assert got.session_id is None and got.optimizer.class_name == "SGD"
    np.testing.assert_array_equal(got.weights["w"], np.array([1, 2], np.float32))


def test_push_round_trip_takes_array_likes() -> None:
    body = messages.encode_push({"w": [[1.0, 2.0]], "b": np.ones(2)})
    got = messages.decode_push(body, LIMITS)
    np.testing.assert_array_equal(got["w"], [[1.0, 2.0]])
    assert got["b"].dtype == np.float64


def test_weights_answer_with_and_without_weights() -> None:
    iterations, got = messages.decode_weights(messages.encode_weights(7, weights()))
    assert iterations == 7 and got is not None
    same(got, weights())
    assert messages.decode_weights(messages.encode_weights(3, None)) == (3, None)
    # A newer server may add keys to an answer; an older client still reads it.
    extended = wire.pack({"iterations": 2, "weights": weights(), "later": {"x": 1}})
    assert messages.decode_weights(extended)[0] == 2


def test_state_round_trip_and_the_checkpoint_bytes() -> None:
    state = SessionState(
        iterations=4,
        optimizer=optimizers.Nadam(),
        weights=weights(),
        slots={"m": weights(), "v": weights()},
        scalars={"m_schedule": 0.25},
    )
    again = SessionState.from_bytes(bytearray(state.to_bytes()))
    assert again.iterations == 4 and again.optimizer == optimizers.Nadam()
    same(again.weights, state.weights)
    same(again.slots["v"], state.slots["v"])
    assert again.scalars == {"m_schedule": 0.25}
    assert messages.decode_state(messages.encode_state(state), LIMITS).iterations == 4
    # The optimizer may be given as a name or a Keras config; it is validated on the way.
    by_name = SessionState(iterations=0, optimizer="adam", weights=weights())  # type: ignore[arg-type]
    assert SessionState.from_bytes(by_name.to_bytes()).optimizer == optimizers.Adam()
    with pytest.raises(optimizers.UnknownOptimizer):
        SessionState(iterations=0, optimizer="nope", weights={}).to_bytes()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"\xc1", ErrorCode.BAD_REQUEST),
        (wire.pack([1, 2]), ErrorCode.BAD_REQUEST),
        (wire.pack({}), ErrorCode.INVALID_REQUEST),
        (wire.pack({"gradients": {}, "extra": 1}), ErrorCode.INVALID_REQUEST),
        (
            wire.pack({"gradients": {"w": {"dtype": "int8", "shape": [], "data": b"x"}}}),
            ErrorCode.INVALID_TENSOR,
        ),
    ],
)
def test_push_errors_carry_their_code(body: bytes, code: ErrorCode) -> None:
    with pytest.raises(MessageError) as err:
        messages.decode_push(body, LIMITS)
    assert err.value.code is code


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"iterations": -1}, ErrorCode.INVALID_STATE),
        ({"iterations": 2**53}, ErrorCode.INVALID_STATE),
        ({"iterations": True}, ErrorCode.INVALID_STATE),
        ({"optimizer": "nope"}, ErrorCode.UNKNOWN_OPTIMIZER),
        ({"optimizer": {"class_name": "SGD", "config": {"lr": -1}}}, ErrorCode.INVALID_OPTIMIZER),
        ({"slots": []}, ErrorCode.INVALID_STATE),
        ({"scalars": {"m_schedule": float("nan")}}, ErrorCode.INVALID_STATE),
    ],
)
def test_state_errors_carry_their_code(change: dict[str, object], code: ErrorCode) -> None:
    message = {
        "iterations": 1,
        "optimizer": optimizers.SGD().to_dict(),
        "weights": weights(),
        "slots": {},
        "scalars": {},
        **change,
    }
    with pytest.raises(MessageError) as err:
        messages.decode_state(wire.pack(message), ANSWER_LIMITS)
    assert err.value.code is code


def test_json_bodies_refuse_duplicates_and_constants() -> None:
    for body in (b'{"optimizer": "sgd", "optimizer": "adam", "weights": {}}', b"[NaN]", b"{"):
        with pytest.raises(MessageError) as err:
            messages.decode_create(body, "json", LIMITS)
        assert err.value.code is ErrorCode.BAD_REQUEST and err.value.status == 400


@pytest.mark.parametrize(
    ("gradients", "expected"),
    [
        ({"w": np.arange(10, dtype=np.float32) / 7}, "b10e28f0363af0dfbf3cb93b2962e76d"),
        (
            {
                "b": np.zeros(0, np.float16),
                "a": np.arange(12, dtype=np.float64).reshape(3, 4) - 5.5,
            },
            "4fb48539edd3d6680fe02ee895389ec2",
        ),
        (  # over DIGEST_JOIN_BYTES: streamed, the same digest
            {"big": np.arange(20000, dtype=np.float32) * 0.25, "s": np.asarray(np.float32(2))},
            "8c79e59959b1b63ec9455d7bcb6503af",
        ),
        (
            {"e": Rows(np.array([1, 3]), np.arange(8, dtype=np.float32).reshape(2, 4), (5, 4))},
            "b2d24b04e49e23e419d55e5b8f626efb",
        ),
        (
            {"x": np.asfortranarray(np.arange(15, dtype=np.float64).reshape(3, 5))},
            "0e0adb7197f142755f0c3f5d9a1cd996",
        ),
    ],
)
def test_push_digests_are_pinned(gradients, expected):
    """Digests are kept with keys in snapshots and the journal: a digest must never change
    for the same push (these were computed by the streaming implementation of 2026-12-02)."""
    assert messages.push_digest(gradients).hex() == expected
