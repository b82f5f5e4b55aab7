"""Content types: every body endpoint takes both msgpack media types, and refuses the rest.

``application/msgpack`` and ``application/x-msgpack`` are accepted for a create, a push and a
state import; anything else (none, text, JSON where only msgpack is taken, look-alikes) gets
415 ``unsupported_media_type`` and changes nothing.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.harness.http_api import (
    assert_error,
    create_body,
    create_session,
    get_state,
    new_id,
    pushed,
)
from tests.harness.refusals import VALID_PUSH, WEIGHTS, assert_absent, assert_unchanged, snapshot

NOT_MSGPACK = [
    None,
    "text/plain",
    "application/octet-stream",
    "multipart/form-data",
    "application/msgpack-x",
]


@pytest.mark.parametrize("content_type", [*NOT_MSGPACK, "application/json"])
def test_415_push(api: httpx.Client, adam_session: str, content_type: str | None) -> None:
    before = snapshot(api, adam_session)
    headers = {} if content_type is None else {"Content-Type": content_type}
    r = api.post(f"/sessions/{adam_session}/gradients", content=VALID_PUSH, headers=headers)
    assert_error(r, 415, "unsupported_media_type")
    assert_unchanged(api, adam_session, before)


@pytest.mark.parametrize("content_type", [*NOT_MSGPACK, "application/json"])
def test_415_put_state(api: httpx.Client, adam_session: str, content_type: str | None) -> None:
    state = api.get(f"/sessions/{adam_session}/state").content
    before = snapshot(api, adam_session)
    headers = {} if content_type is None else {"Content-Type": content_type}
    for target in (adam_session, new_id()):
        r = api.put(f"/sessions/{target}/state", content=state, headers=headers)
        assert_error(r, 415, "unsupported_media_type")
    assert_unchanged(api, adam_session, before)


@pytest.mark.parametrize("content_type", NOT_MSGPACK)
def test_415_create(api: httpx.Client, content_type: str | None) -> None:
    sid = new_id()
    headers = {} if content_type is None else {"Content-Type": content_type}
    r = api.post("/sessions", content=create_body(sid, "adam", WEIGHTS), headers=headers)
    assert_error(r, 415, "unsupported_media_type")
    assert_absent(api, sid)


@pytest.mark.parametrize("content_type", ["application/msgpack", "application/x-msgpack"])
def test_msgpack_content_types_are_accepted_everywhere(
    api: httpx.Client, content_type: str
) -> None:
    sid = new_id()
    weights = {"w": np.arange(4, dtype=np.float32)}
    create_session(api, "sgd", weights, session_id=sid, content_type=content_type)
    msg = pushed(api, sid, {"w": np.ones(4, np.float32)}, content_type=content_type)
    assert msg["iterations"] == 1
    state = get_state(api, sid)
    r = api.put(
        f"/sessions/{new_id()}/state", content=state, headers={"Content-Type": content_type}
    )
    assert r.status_code == 201, r.text
