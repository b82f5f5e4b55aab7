"""Regressions for inputs that once got a 500 or changed a session they should not have."""

from __future__ import annotations

import json

import httpx
import msgpack
import numpy as np
import pytest

from paramserver import wire

MSGPACK = {"content-type": "application/msgpack"}


def create(url: str, sid: str) -> None:
    body = wire.pack(
        {"session_id": sid, "optimizer": "adam", "weights": {"w": np.ones(3, np.float32)}}
    )
    assert httpx.post(f"{url}/sessions", content=body, headers=MSGPACK).status_code == 201


def test_state_with_an_iteration_count_beyond_2_53_is_refused(base_url: str) -> None:
    create(base_url, "iters")
    state = msgpack.unpackb(httpx.get(f"{base_url}/sessions/iters/state").content)
    for bad in (2**53, 2**64 - 1):
        state["iterations"] = bad
        r = httpx.put(
            f"{base_url}/sessions/iters/state", content=msgpack.packb(state), headers=MSGPACK
        )
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "invalid_state"
    assert httpx.get(f"{base_url}/sessions/iters").json()["iterations"] == 0
    push = wire.pack({"gradients": {"w": np.ones(3, np.float32)}})
    assert (
        httpx.post(
            f"{base_url}/sessions/iters/gradients", content=push, headers=MSGPACK
        ).status_code
        == 200
    )


@pytest.mark.parametrize("kind", ["msgpack", "json"])
def test_an_empty_shape_with_a_huge_dimension_is_422(base_url: str, kind: str) -> None:
    tensor = {"dtype": "float32", "shape": [0, 2**62, 2**62]}
    if kind == "json":
        body = json.dumps({"optimizer": "sgd", "weights": {"w": {**tensor, "data": []}}}).encode()
        headers = {"content-type": "application/json"}
    else:
        body = msgpack.packb({"optimizer": "sgd", "weights": {"w": {**tensor, "data": b""}}})
        headers = MSGPACK
    r = httpx.post(f"{base_url}/sessions", content=body, headers=headers)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_tensor"


def test_json_numbers_beyond_float64_are_422(base_url: str) -> None:
    body = (
        '{"optimizer": "sgd", "weights": {"w": {"dtype": "float32", "shape": [1], "data": [1%s]}}}'
        % ("0" * 400)
    )
    r = httpx.post(
        f"{base_url}/sessions", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 422, r.text
    body = '{"optimizer": {"class_name": "sgd", "config": {"lr": 1%s}}, "weights": {}}' % (
        "0" * 400
    )
    r = httpx.post(
        f"{base_url}/sessions", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_optimizer"


def test_json_bodies_have_their_own_smaller_limit(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory(max_json_body_bytes=4096)
    data = [0.0] * 2000
    body = json.dumps(
        {"optimizer": "sgd", "weights": {"w": {"dtype": "float32", "shape": [2000], "data": data}}}
    )
    r = httpx.post(
        f"{srv.url}/sessions", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413, r.text
    # the same model in msgpack is well within the (larger) general limit
    r = httpx.post(
        f"{srv.url}/sessions",
        content=wire.pack({"optimizer": "sgd", "weights": {"w": np.zeros(2000, np.float32)}}),
        headers=MSGPACK,
    )
    assert r.status_code == 201, r.text
