"""A session's state exported and imported over real HTTP continues bit for bit.

``GET /sessions/{id}/state`` holds the iterations, the optimizer, the weights, every slot (of
the parameters' shapes and dtypes) and the scalars; ``PUT`` creates a session from it (201) or
replaces one (200), and the original, the copy and the replaced session then take identical
steps. Importing a session's own state changes nothing.
"""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest

from tests.harness.http_api import (
    MSGPACK_TYPE,
    array,
    arrays,
    create_session,
    get_state,
    new_id,
    pushed,
    unpackb,
)
from tests.harness.models import assert_bitwise_equal, engine_trajectory, gradient_sequence, model

STATE_CASES = {
    "adam-decay": {"class_name": "Adam", "config": {"lr": 0.01, "decay": 0.05}},
    "amsgrad": {"class_name": "Adam", "config": {"lr": 0.01, "amsgrad": True}},
    "nadam": {"class_name": "Nadam", "config": {"lr": 0.01}},
    "sgd-nesterov": {
        "class_name": "SGD",
        "config": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "decay": 0.01},
    },
    "rmsprop": "rmsprop",
    "adagrad": "adagrad",
    "adadelta": "adadelta",
    "adamax": "adamax",
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", sorted(STATE_CASES))
def test_state_export_and_import_continue_bit_for_bit(
    api: httpx.Client, case: str, dtype: Any
) -> None:
    optimizer = STATE_CASES[case]
    weights = model(seed=31, dtype=dtype)
    grads = gradient_sequence(weights, 7, seed=32)
    original = create_session(api, optimizer, weights)["session_id"]
    for g in grads[:3]:
        pushed(api, original, g)
    exported = get_state(api, original)
    state = unpackb(exported)
    assert set(state) == {
        "iterations",
        "optimizer",
        "weights",
        "slots",
        "scalars",
        "refuse_non_finite",
    }
    assert state["refuse_non_finite"] is False
    assert state["iterations"] == 3
    summary = api.get(f"/sessions/{original}").json()
    assert state["optimizer"] == summary["optimizer"]
    for per_param in state["slots"].values():
        assert set(per_param) == set(weights)
        for name, t in per_param.items():
            assert array(t).shape == weights[name].shape
            assert array(t).dtype == weights[name].dtype
    if case == "nadam":
        assert set(state["scalars"]) == {"m_schedule"}

    # Into a free id: created (201).
    fresh = new_id("fresh")
    r = api.put(
        f"/sessions/{fresh}/state", content=exported, headers={"Content-Type": MSGPACK_TYPE}
    )
    assert r.status_code == 201, r.text
    imported = r.json()
    assert imported["session_id"] == fresh
    assert imported["iterations"] == 3
    assert imported["optimizer"] == state["optimizer"]
    assert imported["parameters"] == summary["parameters"]
    assert {"created_at", "updated_at"} <= set(imported)

    # Into a taken id whose session is entirely different: replaced (200).
    taken = create_session(api, "sgd", {"other": np.zeros(5, np.float16)})["session_id"]
    pushed(api, taken, {"other": np.ones(5, np.float16)})
    r = api.put(
        f"/sessions/{taken}/state", content=exported, headers={"Content-Type": MSGPACK_TYPE}
    )
    assert r.status_code == 200, r.text
    assert r.json()["session_id"] == taken
    assert r.json()["iterations"] == 3
    assert r.json()["parameters"] == summary["parameters"]

    # The imported state is exactly the exported one...
    for sid in (fresh, taken):
        assert unpackb(get_state(api, sid)) == state
    # ... and all three continue identically, step after step.
    want = engine_trajectory(optimizer, weights, grads)
    for step, g in enumerate(grads[3:], start=3):
        answers = [pushed(api, sid, g) for sid in (original, fresh, taken)]
        for msg in answers:
            assert msg["iterations"] == step + 1
            assert_bitwise_equal(arrays(msg["weights"]), want[step])
    final = [unpackb(get_state(api, sid)) for sid in (original, fresh, taken)]
    assert final[0] == final[1] == final[2]


def test_state_round_trip_is_idempotent(api: httpx.Client) -> None:
    weights = model(seed=41)
    sid = create_session(api, "nadam", weights)["session_id"]
    for g in gradient_sequence(weights, 2, seed=42):
        pushed(api, sid, g)
    exported = get_state(api, sid)
    state = unpackb(exported)
    r = api.put(f"/sessions/{sid}/state", content=exported, headers={"Content-Type": MSGPACK_TYPE})
    assert r.status_code == 200, r.text
    assert unpackb(get_state(api, sid)) == state
