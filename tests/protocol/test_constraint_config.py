"""The constraint configs shared by server and client (:mod:`paramserver.constraints`)."""

from __future__ import annotations

import numpy as np
import pytest

from paramserver import constraints, messages
from paramserver.codes import ErrorCode, MessageError
from paramserver.constraints import MaxNorm, MinMaxNorm, NonNeg, UnitNorm


def test_forms_round_trip() -> None:
    for c in (
        MaxNorm(),
        MaxNorm(3.5, axis=(0, 2)),
        NonNeg(),
        UnitNorm(-1),
        MinMaxNorm(0.1, 2, 0.5, 1),
    ):
        assert constraints.get(c.to_dict()) == c
        assert constraints.get({"class_name": c.class_name, "config": c.get_config()}) == c
    assert constraints.get("nonneg") == NonNeg()
    assert MaxNorm(axis=[0, 1]).get_config() == {"max_value": 2, "axis": [0, 1]}  # type: ignore[arg-type]

    class KerasStyle:  # a Keras 3 constraint object: its class name and get_config()
        def get_config(self):
            return {"max_value": 1.5, "axis": 1}

    KerasStyle.__name__ = "MaxNorm"
    assert constraints.get(KerasStyle()) == MaxNorm(1.5, axis=1)


@pytest.mark.parametrize(
    "make",
    [
        lambda: MaxNorm(float("inf")),
        lambda: MaxNorm(True),  # type: ignore[arg-type]
        lambda: UnitNorm(axis="0"),  # type: ignore[arg-type]
        lambda: UnitNorm(axis=(1, 1)),
        lambda: constraints.get("Orthogonal"),
        lambda: constraints.get({"class_name": "NonNeg", "config": {"axis": 0}}),
        lambda: constraints.get(42),
        lambda: constraints.decode_constraints({"w": {"class_name": 1}}),
        lambda: constraints.decode_constraints([]),
        lambda: MaxNorm(10**400),  # an int too large for a float (JSON allows it)
        lambda: MinMaxNorm(rate=-(10**400)),
    ],
)
def test_invalid_configs_are_refused(make) -> None:
    with pytest.raises(MessageError) as err:
        make()
    assert err.value.code is ErrorCode.INVALID_CONSTRAINT


def test_axes_are_checked_against_the_shape() -> None:
    constraints.check_axes("w", MaxNorm(axis=-2), (3, 4))
    constraints.check_axes("w", NonNeg(), ())
    for bad, shape in (
        (MaxNorm(axis=2), (3, 4)),
        (UnitNorm(axis=(0, -2)), (3, 4)),
        (UnitNorm(), ()),
    ):
        with pytest.raises(MessageError):
            constraints.check_axes("w", bad, shape)


def test_messages_carry_constraints() -> None:
    w = {"w": np.zeros((2, 2), np.float32)}
    limits = messages.ANSWER_LIMITS
    body = messages.encode_create("sgd", w, constraints={"w": MaxNorm(1.0)})
    assert messages.decode_create(body, "msgpack", limits).constraints == {"w": MaxNorm(1.0)}
    assert b"constraints" not in messages.encode_create("sgd", w)
    state = messages.SessionState(0, messages.optimizers.get("sgd"), w, constraints={"w": NonNeg()})
    assert messages.decode_state(state.to_bytes(), limits).constraints == {"w": NonNeg()}
    assert (
        messages.decode_state(
            messages.SessionState(0, messages.optimizers.get("sgd"), w).to_bytes(), limits
        ).constraints
        == {}
    )


def test_a_flood_of_unknown_arguments_gets_a_short_message() -> None:
    config = {f"k{i:06d}": 1 for i in range(100_000)}
    with pytest.raises(MessageError) as err:
        constraints.get({"class_name": "MaxNorm", "config": config})
    assert len(err.value.message) < 600 and "and 99990 more" in err.value.message
