"""The request limits on tensors (``max_tensors``, ``max_dims``, ``max_elements``): 422 beyond.

A create or a push with more tensors, more dimensions or more elements than the server's
limits gets 422 ``invalid_tensor`` naming the limit, however far beyond it; exactly at the
limit it is accepted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from tests.harness.http_api import (
    MSGPACK,
    assert_error,
    create_body,
    gradients_body,
    new_id,
    packb,
    tensor,
)
from tests.harness.refusals import assert_absent, post_grads


@pytest.fixture
def limited(server_factory: Callable[..., Any]) -> Iterator[httpx.Client]:
    srv = server_factory(max_tensors=2, max_dims=2, max_elements=10)
    with httpx.Client(base_url=srv.url, timeout=60) as client:
        yield client


@pytest.mark.parametrize(
    ("weights", "fragment"),
    [
        ({"a": np.zeros(1), "b": np.zeros(1), "c": np.zeros(1)}, "tensors"),
        ({"a": np.zeros((1, 1, 1))}, "dimensions"),
        ({"a": np.zeros(11)}, "elements"),
        ({"a": np.zeros((4, 3))}, "elements"),
    ],
    ids=["tensors", "dims", "elements", "elements-2d"],
)
def test_422_request_limits(limited: httpx.Client, weights: dict[str, Any], fragment: str) -> None:
    sid = new_id()
    r = limited.post("/sessions", content=create_body(sid, "sgd", weights), headers=MSGPACK)
    assert fragment in assert_error(r, 422, "invalid_tensor")
    assert_absent(limited, sid)


@pytest.mark.parametrize("count", [3, 65, 200])
def test_422_too_many_tensors_whatever_the_count(limited: httpx.Client, count: int) -> None:
    # max_tensors=2: every count above it is the same error, however far above.
    sid = new_id()
    weights = {f"p{i}": np.zeros(1, np.float32) for i in range(count)}
    r = limited.post("/sessions", content=create_body(sid, "sgd", weights), headers=MSGPACK)
    assert_error(r, 422, "invalid_tensor")
    assert_absent(limited, sid)


@pytest.mark.parametrize("dims", [3, 65, 200])
def test_422_too_many_dims_whatever_the_count(limited: httpx.Client, dims: int) -> None:
    sid = new_id()
    weight = {"dtype": "float32", "shape": [1] * dims, "data": bytes(4)}
    r = limited.post("/sessions", content=create_body(sid, "sgd", {"w": weight}), headers=MSGPACK)
    assert_error(r, 422, "invalid_tensor")
    assert_absent(limited, sid)


def test_too_many_tensors_at_the_default_limit(api: httpx.Client, server: Any) -> None:
    # Exactly max_tensors tensors are accepted; one more is a well-formed, invalid body (422).
    limit = server.app.state.settings.max_tensors
    one = tensor(np.zeros(1, np.float32))
    sid = new_id()
    weights = {f"p{i}": one for i in range(limit)}
    body = packb({"session_id": sid, "optimizer": "sgd", "weights": weights})
    r = api.post("/sessions", content=body, headers=MSGPACK)
    assert r.status_code == 201, r.text
    assert len(r.json()["parameters"]) == limit
    assert api.delete(f"/sessions/{sid}").status_code == 204
    weights[f"p{limit}"] = one
    body = packb({"session_id": sid, "optimizer": "sgd", "weights": weights})
    r = api.post("/sessions", content=body, headers=MSGPACK)
    assert_error(r, 422, "invalid_tensor")
    assert_absent(api, sid)


def test_request_limits_on_push_and_the_largest_allowed(limited: httpx.Client) -> None:
    sid = new_id()
    weights = {"a": np.zeros((2, 5), np.float32), "b": np.zeros(10, np.float32)}
    r = limited.post("/sessions", content=create_body(sid, "sgd", weights), headers=MSGPACK)
    assert r.status_code == 201, r.text
    before = limited.get(f"/sessions/{sid}/weights").content
    too_many = {**weights, "c": np.zeros(1, np.float32)}
    assert_error(post_grads(limited, sid, gradients_body(too_many)), 422, "invalid_tensor")
    too_long = {"a": np.zeros((2, 5), np.float32), "b": np.zeros(11, np.float32)}
    assert_error(post_grads(limited, sid, gradients_body(too_long)), 422, "invalid_tensor")
    assert limited.get(f"/sessions/{sid}/weights").content == before
    r = post_grads(
        limited,
        sid,
        gradients_body({"a": np.ones((2, 5), np.float32), "b": np.ones(10, np.float32)}),
    )
    assert r.status_code == 200, r.text
