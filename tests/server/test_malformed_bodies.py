"""Bodies that are not well-formed msgpack or JSON get 400 ``bad_request``, and change nothing.

Truncated, trailing, ext-typed, duplicated, non-UTF-8, non-string-keyed, deeply nested, or not
a map at all: over real HTTP, built with the reference ``msgpack`` package or byte by byte,
against the push, create and state endpoints. The session aimed at (``adam_session``) keeps
its weights, optimizer state, iterations and summary, and still takes a push.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest

from tests.harness.http_api import (
    MSGPACK,
    assert_error,
    create_body,
    create_session,
    new_id,
    packb,
    tensor,
)
from tests.harness.models import zeros
from tests.harness.refusals import (
    VALID_PUSH,
    WEIGHTS,
    B,
    assert_absent,
    assert_unchanged,
    good_grads,
    post_grads,
    snapshot,
)


def _dup_push() -> bytes:
    # {"gradients": {"w": .., "w": .., "b": ..}}: the second "w" would win in a lax decoder.
    g = good_grads()
    inner = (
        b"\x83"
        + packb("w")
        + packb(tensor(g["w"]))
        + packb("w")
        + packb(tensor(np.full((2, 3), 100, np.float32)))
        + packb("b")
        + packb(tensor(g["b"]))
    )
    return b"\x81" + packb("gradients") + inner


MALFORMED_PUSHES = {
    "truncated": VALID_PUSH[: len(VALID_PUSH) // 2],
    "truncated-by-one": VALID_PUSH[:-1],
    "empty": b"",
    "trailing-bytes": VALID_PUSH + b"\xc0",
    "two-messages": VALID_PUSH + VALID_PUSH,
    "ext-type-top": packb(msgpack.ExtType(1, b"abc")),
    "ext-type-in-tensor": packb(
        {
            "gradients": {
                "w": {**tensor(good_grads()["w"]), "data": msgpack.ExtType(2, b"x" * 24)},
                "b": tensor(B),
            }
        }
    ),
    "timestamp-ext": msgpack.packb({"gradients": msgpack.Timestamp(0, 0)}),
    "duplicate-top-key": b"\x82" + packb("gradients") + packb({}) + packb("gradients") + packb({}),
    "duplicate-parameter": _dup_push(),
    "int-key": packb({1: 2}),
    "bin-key": packb({b"gradients": {}}),
    "invalid-utf8": b"\x81\xa9gradient\xff\x80",
    "never-used-byte": b"\xc1",
    "lying-array32": b"\x81" + packb("gradients") + b"\xdd\xff\xff\xff\xff",
    "deep-nesting": b"\x91" * 10_000 + b"\xc0",
    "json-instead": b'{"gradients": {}}',
}


@pytest.mark.parametrize("body", MALFORMED_PUSHES.values(), ids=MALFORMED_PUSHES.keys())
def test_400_malformed_push(api: httpx.Client, adam_session: str, body: bytes) -> None:
    before = snapshot(api, adam_session)
    assert_error(post_grads(api, adam_session, body), 400, "bad_request")
    assert_unchanged(api, adam_session, before)


@pytest.mark.parametrize(
    "value",
    [[1, 2], "gradients", 7, None, True, b"\x00"],
    ids=["array", "str", "int", "nil", "bool", "bin"],
)
def test_400_push_body_that_is_not_a_map(api: httpx.Client, adam_session: str, value: Any) -> None:
    before = snapshot(api, adam_session)
    assert_error(post_grads(api, adam_session, packb(value)), 400, "bad_request")
    assert_unchanged(api, adam_session, before)


MALFORMED_CREATES = {
    "truncated": create_body("t-1", "adam", WEIGHTS)[:-5],
    "trailing": create_body("t-2", "adam", WEIGHTS) + b"\x00",
    "ext": packb({"session_id": "t-3", "optimizer": msgpack.ExtType(1, b"a"), "weights": {}}),
    "duplicate": b"\x83"
    + packb("session_id")
    + packb("t-4")
    + packb("optimizer")
    + packb("sgd")
    + packb("optimizer")
    + packb("adam"),
    "not-a-map": packb(["t-5", "sgd"]),
}


@pytest.mark.parametrize("body", MALFORMED_CREATES.values(), ids=MALFORMED_CREATES.keys())
def test_400_malformed_msgpack_create(api: httpx.Client, body: bytes) -> None:
    count = len(api.get("/sessions").json()["sessions"])
    assert_error(api.post("/sessions", content=body, headers=MSGPACK), 400, "bad_request")
    assert len(api.get("/sessions").json()["sessions"]) == count
    for i in range(1, 6):
        assert_absent(api, f"t-{i}")


GOOD_JSON = json.dumps(
    {
        "session_id": "j-ok",
        "optimizer": "sgd",
        "weights": {"w": {"dtype": "float32", "shape": [1], "data": [1]}},
    }
)


BAD_JSONS = {
    "syntax": b'{"optimizer": "sgd",',
    "empty": b"",
    "trailing-garbage": GOOD_JSON.encode() + b" x",
    "nan-literal": GOOD_JSON.replace("[1]}", "[NaN]}").encode(),
    "infinity-literal": GOOD_JSON.replace("[1]}", "[Infinity]}").encode(),
    "duplicate-key": (
        b'{"session_id": "j-1", "session_id": "j-2", "optimizer": "sgd", "weights": {}}'
    ),
    "duplicate-parameter": GOOD_JSON.replace(
        '{"w": ', '{"w": {"dtype": "float32", "shape": [1], "data": [2]}, "w": '
    ).encode(),
    "invalid-utf8": GOOD_JSON.encode().replace(b"sgd", b"sg\xff"),
    "top-level-array": b'["sgd"]',
    "top-level-string": b'"sgd"',
    "deep": b"[" * 100_000 + b"]" * 100_000,
}


@pytest.mark.parametrize("body", BAD_JSONS.values(), ids=BAD_JSONS.keys())
def test_400_bad_json_create(api: httpx.Client, body: bytes) -> None:
    r = api.post("/sessions", content=body, headers={"Content-Type": "application/json"})
    assert_error(r, 400, "bad_request")
    for sid in ("j-ok", "j-1", "j-2"):
        assert_absent(api, sid)


def test_400_malformed_state_leaves_the_session_alone(api: httpx.Client, adam_session: str) -> None:
    state = api.get(f"/sessions/{adam_session}/state").content
    before = snapshot(api, adam_session)
    for body in (state[:-1], state + b"\xc0", state[:10], b"\xc1" + state[1:]):
        r = api.put(f"/sessions/{adam_session}/state", content=body, headers=MSGPACK)
        assert_error(r, 400, "bad_request")
    assert_unchanged(api, adam_session, before)
    fresh = new_id()
    assert_error(
        api.put(f"/sessions/{fresh}/state", content=state[:-1], headers=MSGPACK),
        400,
        "bad_request",
    )
    assert_absent(api, fresh)


@pytest.mark.parametrize("wrap", [lambda b: [b], lambda b: b], ids=["array", "bin"])
def test_400_state_body_that_is_not_a_map(
    api: httpx.Client, adam_session: str, wrap: Callable[[bytes], Any]
) -> None:
    state = api.get(f"/sessions/{adam_session}/state").content
    before = snapshot(api, adam_session)
    r = api.put(f"/sessions/{adam_session}/state", content=packb(wrap(state)), headers=MSGPACK)
    assert_error(r, 400, "bad_request")
    assert_unchanged(api, adam_session, before)


def test_an_ext_type_in_a_push_gets_400(base_url: str) -> None:
    create_session(base_url, "sgd", zeros(2), session_id="no-pickle")
    body = msgpack.packb({"gradients": {"w": msgpack.ExtType(1, b"\x80\x04K\x01.")}})
    r = httpx.post(f"{base_url}/sessions/no-pickle/gradients", content=body, headers=MSGPACK)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "bad_request"
    assert "ext types" in r.json()["error"]["message"]
    assert httpx.get(f"{base_url}/sessions/no-pickle").json()["iterations"] == 0
