"""The training-mode configs shared by server and client (:mod:`paramserver.training`) and how
the create and state messages carry them."""

from __future__ import annotations

import numpy as np
import pytest

from paramserver import messages, training
from paramserver.codes import ErrorCode, MessageError
from paramserver.training import Async, Sync


def test_defaults_and_wire_forms() -> None:
    assert Sync(4) == Sync(replicas_to_aggregate=4, total_num_replicas=4, round_timeout_seconds=600)
    assert Sync(4).to_dict() == {
        "mode": "sync",
        "replicas_to_aggregate": 4,
        "total_num_replicas": 4,
        "round_timeout_seconds": 600.0,
    }
    assert Sync(2, 5).backups == 3
    assert Async().to_dict() == {"mode": "async"} and not Async().needs_base
    assert Async(0).to_dict() == {"mode": "async", "max_staleness": 0} and Async(0).needs_base
    for config in (Sync(3, 4, 12.5), Async(), Async(7)):
        assert training.decode_training(config.to_dict()) == config
        assert type(config).from_config(config.get_config()) == config
        assert training.get(config.get_config()) == config
    assert training.get(None) == Async()
    assert training.decode_training({}) == Async()
    assert training.decode_training({"mode": "sync", "replicas_to_aggregate": 2}) == Sync(2)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Sync(0),
        lambda: Sync(2000),
        lambda: Sync(3, 2),
        lambda: Sync(2, round_timeout_seconds=0),
        lambda: Sync(2, round_timeout_seconds=float("nan")),
        lambda: Sync(2, round_timeout_seconds=float("inf")),
        lambda: Sync(True),  # type: ignore[arg-type]
        lambda: Async(-1),
        lambda: Async(1.5),  # type: ignore[arg-type]
        lambda: Sync.from_config({"mode": "async"}),
        lambda: Async.from_config({"mode": "sync", "replicas_to_aggregate": 1}),
    ],
)
def test_invalid_configs_name_the_argument(make) -> None:
    with pytest.raises(MessageError) as err:
        make()
    assert err.value.code is ErrorCode.INVALID_TRAINING and err.value.status == 422


def test_an_object_with_get_config_and_other_types() -> None:
    class Keras:
        def get_config(self):
            return {"mode": "async", "max_staleness": 2}

    assert training.get(Keras()) == Async(2)
    with pytest.raises(TypeError):
        training.get(4)


def test_create_and_state_messages_carry_the_mode() -> None:
    w = {"w": np.zeros(2, np.float32)}
    limits = messages.ANSWER_LIMITS
    plain = messages.decode_create(messages.encode_create("sgd", w), "msgpack", limits)
    assert plain.training == Async()
    body = messages.encode_create("sgd", w, training=Sync(2, 3))
    assert messages.decode_create(body, "msgpack", limits).training == Sync(2, 3)
    assert b"training" not in messages.encode_create("sgd", w, training=Async())
    state = messages.SessionState(0, messages.optimizers.get("sgd"), w, training=Sync(2))
    assert messages.decode_state(state.to_bytes(), limits).training == Sync(2)
    # an async state is written as before training modes, and such a state reads as async
    old = messages.SessionState(0, messages.optimizers.get("sgd"), w)
    assert b"training" not in old.to_bytes()
    assert messages.decode_state(old.to_bytes(), limits).training == Async()
    broken = messages.wire.pack(
        {
            "iterations": 0,
            "optimizer": "sgd",
            "weights": w,
            "slots": {},
            "scalars": {},
            "training": {"mode": "sync"},
        }
    )
    with pytest.raises(MessageError) as err:
        messages.decode_state(broken, limits)
    assert err.value.code is ErrorCode.INVALID_STATE


def test_push_messages_carry_base_iterations() -> None:
    g = {"w": np.ones(2, np.float32)}
    limits = messages.ANSWER_LIMITS
    assert messages.decode_push_message(messages.encode_push(g), limits).base_iterations is None
    assert messages.decode_push_message(messages.encode_push(g, 7), limits).base_iterations == 7
    for bad in (-1, 2**53, True, 1.0, "1"):
        body = messages.wire.pack({"gradients": g, "base_iterations": bad})
        with pytest.raises(MessageError) as err:
            messages.decode_push_message(body, limits)
        assert err.value.code is ErrorCode.INVALID_BASE_ITERATIONS
