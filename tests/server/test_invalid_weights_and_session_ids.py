"""A create with weights or a session id that are not valid gets 422 and creates nothing.

Non-finite weights, dtypes outside the allow-list, data of the wrong length, parameter names
that are empty, too long or hold control characters (msgpack and JSON bodies), and session ids
outside ``[A-Za-z0-9._-]{1,128}``, in a create body or in the path of a state import.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest

from paramserver.server.errors import ServiceError
from tests.harness.http_api import MSGPACK, assert_error, create_body, new_id, packb, tensor
from tests.harness.refusals import WEIGHTS, assert_absent
from tests.harness.service import plain_service

WEIGHT_ERRORS: dict[str, tuple[dict[str, Any], str]] = {
    "no-weights": ({}, "invalid_weights"),
    "nan-weight": ({"w": np.array([1.0, np.nan], np.float32)}, "invalid_weights"),
    "inf-weight": ({"w": np.array([np.inf], np.float64)}, "invalid_weights"),
    "int32": ({"w": {"dtype": "int32", "shape": [1], "data": bytes(4)}}, "invalid_tensor"),
    "uint8": ({"w": {"dtype": "uint8", "shape": [1], "data": bytes(1)}}, "invalid_tensor"),
    "data-length": (
        {"w": {"dtype": "float32", "shape": [2, 2], "data": bytes(12)}},
        "invalid_tensor",
    ),
    "empty-name": ({"": np.zeros(1, np.float32)}, "invalid_tensor"),
    "long-name": ({"x" * 257: np.zeros(1, np.float32)}, "invalid_tensor"),
    "newline-name": ({"a\nb": np.zeros(1, np.float32)}, "invalid_tensor"),
    "nul-name": ({"a\x00": np.zeros(1, np.float32)}, "invalid_tensor"),
    "tab-name": ({"a\tb": np.zeros(1, np.float32)}, "invalid_tensor"),
}


@pytest.mark.parametrize(("weights", "code"), WEIGHT_ERRORS.values(), ids=WEIGHT_ERRORS.keys())
def test_422_invalid_weights(api: httpx.Client, weights: dict[str, Any], code: str) -> None:
    sid = new_id()
    body = packb(
        {
            "session_id": sid,
            "optimizer": "adam",
            "weights": {
                n: tensor(w) if isinstance(w, np.ndarray) else w for n, w in weights.items()
            },
        }
    )
    assert_error(api.post("/sessions", content=body, headers=MSGPACK), 422, code)
    assert_absent(api, sid)


JSON_WEIGHT_ERRORS = {
    "length": {"dtype": "float32", "shape": [3], "data": [1, 2]},
    "strings": {"dtype": "float32", "shape": [2], "data": ["1", "2"]},
    "bools": {"dtype": "float32", "shape": [2], "data": [True, False]},
    "nested": {"dtype": "float32", "shape": [2, 1], "data": [[1], [2]]},
    "int32": {"dtype": "int32", "shape": [1], "data": [1]},
    "overflow-float32": {"dtype": "float32", "shape": [1], "data": [1e39]},
    "data-as-base64": {"dtype": "float32", "shape": [1], "data": "AAAAAA=="},
}


@pytest.mark.parametrize("weight", JSON_WEIGHT_ERRORS.values(), ids=JSON_WEIGHT_ERRORS.keys())
def test_422_invalid_json_weights(api: httpx.Client, weight: dict[str, Any]) -> None:
    sid = new_id()
    r = api.post(
        "/sessions", json={"session_id": sid, "optimizer": "sgd", "weights": {"w": weight}}
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] in {"invalid_tensor", "invalid_weights"}
    assert_error(r, 422, r.json()["error"]["code"])
    assert_absent(api, sid)


@pytest.mark.parametrize(
    "sid",
    [
        "",
        "bad id!",
        "x" * 129,
        "a/b",
        "\u00fcber",
        "tab\t",
        "semi;colon",
        123,
        True,
        ["a"],
        {"a": 1},
    ],
)
@pytest.mark.parametrize("kind", ["msgpack", "json"])
def test_422_invalid_session_id_in_body(api: httpx.Client, sid: Any, kind: str) -> None:
    count = len(api.get("/sessions").json()["sessions"])
    if kind == "json":
        r = api.post(
            "/sessions",
            json={
                "session_id": sid,
                "optimizer": "sgd",
                "weights": {"w": {"dtype": "float32", "shape": [1], "data": [0]}},
            },
        )
    else:
        r = api.post("/sessions", content=create_body(sid, "sgd", WEIGHTS), headers=MSGPACK)
    assert_error(r, 422, "invalid_session_id")
    assert len(api.get("/sessions").json()["sessions"]) == count


@pytest.mark.parametrize("sid", ["x" * 129, "bad%20id", "semi%3Bcolon", "%C3%BCber"])
def test_422_invalid_session_id_in_put_state_path(
    api: httpx.Client, adam_session: str, sid: str
) -> None:
    state = api.get(f"/sessions/{adam_session}/state").content
    count = len(api.get("/sessions").json()["sessions"])
    r = api.put(f"/sessions/{sid}/state", content=state, headers=MSGPACK)
    assert_error(r, 422, "invalid_session_id")
    assert len(api.get("/sessions").json()["sessions"]) == count


# --- in process -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["msgpack", "json"])
def test_an_empty_shape_with_a_huge_dimension_is_refused(kind: str) -> None:
    """Once a 500: a shape of no elements whose other dimensions overflow when multiplied."""
    tensor = {"dtype": "float32", "shape": [0, 2**62, 2**62]}
    if kind == "json":
        body = json.dumps({"optimizer": "sgd", "weights": {"w": {**tensor, "data": []}}}).encode()
    else:
        body = msgpack.packb({"optimizer": "sgd", "weights": {"w": {**tensor, "data": b""}}})
    service = plain_service()
    with pytest.raises(ServiceError) as refused:
        service.create(body, kind)
    assert (refused.value.status, refused.value.code) == (422, "invalid_tensor")
    assert service.list() == []


def test_json_weights_beyond_float64_are_refused() -> None:
    """Once a 500: a JSON number that float64 cannot hold (1e400 here) is invalid data."""
    body = (
        '{"optimizer": "sgd", "weights": {"w": {"dtype": "float32", "shape": [1], "data": [1%s]}}}'
        % ("0" * 400)
    )
    service = plain_service()
    with pytest.raises(ServiceError) as refused:
        service.create(body.encode(), "json")
    assert refused.value.status == 422
    assert service.list() == []
