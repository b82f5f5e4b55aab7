"""Creating a session over real HTTP: by name or Keras config, msgpack or JSON, ids and names.

Bodies are built with the reference ``msgpack`` package, not with our client or codec, so
these tests check the wire format as a third party would speak it. A name fills in every
Keras 2.2.4 default; a generated id is a uuid4; any id of the alphabet and any printable
parameter name is kept; a taken id gets 409 and leaves the session alone.
"""

from __future__ import annotations

import uuid

import httpx
import numpy as np
import pytest

from tests.harness.http_api import (
    MSGPACK,
    arrays,
    assert_error,
    create_body,
    create_session,
    new_id,
    pull,
    pushed,
)
from tests.harness.models import DEFAULT_CONFIGS, assert_bitwise_equal, model
from tests.harness.refusals import assert_unchanged, snapshot


@pytest.mark.parametrize("name", sorted(DEFAULT_CONFIGS))
def test_create_by_name_fills_in_every_default(api: httpx.Client, name: str) -> None:
    sid = new_id()
    weights = model()
    summary = create_session(api, name, weights, session_id=sid)
    class_name, config = DEFAULT_CONFIGS[name]
    assert summary == {
        "session_id": sid,
        "optimizer": {"class_name": class_name, "config": config},
        "iterations": 0,
        "refuse_non_finite": False,
        "training": {"mode": "async"},
        "sparse_updates": "exact",
        "constraints": {},
        "parameters": {
            "dense/kernel": {"dtype": "float32", "shape": [3, 4]},
            "dense/bias": {"dtype": "float32", "shape": [4]},
            "scale": {"dtype": "float32", "shape": []},
        },
    }
    iterations, got = pull(api, sid)
    assert iterations == 0
    assert_bitwise_equal(got, weights)


def test_create_names_are_case_insensitive_and_configs_partial(api: httpx.Client) -> None:
    summary = create_session(api, "ADAM", model())
    assert summary["optimizer"]["class_name"] == "Adam"
    partial = {"class_name": "sgd", "config": {"momentum": 0.5, "nesterov": True}}
    summary = create_session(api, partial, model())
    assert summary["optimizer"] == {
        "class_name": "SGD",
        "config": {"lr": 0.01, "momentum": 0.5, "decay": 0.0, "nesterov": True},
    }
    summary = create_session(api, {"class_name": "Adam", "config": {"clipnorm": 1.0}}, model())
    assert summary["optimizer"]["config"]["clipnorm"] == 1.0
    assert summary["optimizer"]["config"]["lr"] == 0.001


def test_create_with_json(api: httpx.Client) -> None:
    sid = new_id()
    body = {
        "session_id": sid,
        "optimizer": {"class_name": "SGD", "config": {"lr": 0.5}},
        "weights": {
            "w": {"dtype": "float32", "shape": [2, 3], "data": [1, 2.5, -3, 0.1, 1e-3, 7]},
            "d": {"dtype": "float64", "shape": [2], "data": [0.1, -1e300]},
            "h": {"dtype": "float16", "shape": [], "data": [0.5]},
        },
    }
    r = api.post("/sessions", json=body)
    assert r.status_code == 201, r.text
    assert r.json() == {
        "session_id": sid,
        "optimizer": {
            "class_name": "SGD",
            "config": {"lr": 0.5, "momentum": 0.0, "decay": 0.0, "nesterov": False},
        },
        "iterations": 0,
        "refuse_non_finite": False,
        "training": {"mode": "async"},
        "sparse_updates": "exact",
        "constraints": {},
        "parameters": {
            "w": {"dtype": "float32", "shape": [2, 3]},
            "d": {"dtype": "float64", "shape": [2]},
            "h": {"dtype": "float16", "shape": []},
        },
    }
    iterations, got = pull(api, sid)
    assert iterations == 0
    assert_bitwise_equal(
        got,
        {
            "w": np.array([[1, 2.5, -3], [0.1, 1e-3, 7]], dtype=np.float32),
            "d": np.array([0.1, -1e300], dtype=np.float64),
            "h": np.array(0.5, dtype=np.float16),
        },
    )
    # JSON and msgpack sessions then train alike.
    grads = {"w": np.ones((2, 3), np.float32), "d": np.ones(2), "h": np.array(1, np.float16)}
    after = arrays(pushed(api, sid, grads)["weights"])
    np.testing.assert_array_equal(after["w"], got["w"] - np.float32(0.5))
    np.testing.assert_array_equal(after["h"], np.array(0.0, dtype=np.float16))


def test_generated_session_ids_are_uuid4_hex(api: httpx.Client) -> None:
    ids = set()
    for _ in range(3):
        sid = create_session(api, "sgd", {"w": np.zeros(2, np.float32)})["session_id"]
        assert len(sid) == 32
        assert uuid.UUID(hex=sid).hex == sid
        assert uuid.UUID(hex=sid).version == 4
        assert api.get(f"/sessions/{sid}").status_code == 200
        ids.add(sid)
    assert len(ids) == 3


@pytest.mark.parametrize("sid", ["a", "A-z_0.9", "x" * 128, "...", "-"])
def test_session_id_alphabet(api: httpx.Client, sid: str) -> None:
    sid = sid if len(sid) == 128 else f"{sid}{uuid.uuid4().hex[:6]}"
    assert (
        create_session(api, "sgd", {"w": np.zeros(1, np.float32)}, session_id=sid)["session_id"]
        == sid
    )
    assert api.get(f"/sessions/{sid}").json()["session_id"] == sid
    assert api.delete(f"/sessions/{sid}").status_code == 204


def test_parameter_names_may_be_any_printable_text(api: httpx.Client) -> None:
    names = ["x" * 256, "conv2d_1/kernel:0", "weights with spaces", "\u00e9\u4e2d\U0001f600", "a"]
    weights = {n: np.full(2, i, dtype=np.float32) for i, n in enumerate(names)}
    sid = new_id()
    summary = create_session(api, "sgd", weights, session_id=sid)
    assert list(summary["parameters"]) == names
    _, got = pull(api, sid)
    assert_bitwise_equal(got, weights)


def test_409_taken_id(api: httpx.Client, adam_session: str) -> None:
    before = snapshot(api, adam_session)
    other_weights = {"x": np.zeros(4, np.float64)}
    r = api.post(
        "/sessions", content=create_body(adam_session, "sgd", other_weights), headers=MSGPACK
    )
    assert adam_session in assert_error(r, 409, "session_exists")
    r = api.post(
        "/sessions",
        json={
            "session_id": adam_session,
            "optimizer": "sgd",
            "weights": {"x": {"dtype": "float64", "shape": [1], "data": [0]}},
        },
    )
    assert_error(r, 409, "session_exists")
    assert_unchanged(api, adam_session, before)
