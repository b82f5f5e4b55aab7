"""Listing, summaries and deletion over real HTTP; an unknown or deleted session is 404 everywhere.

Summaries carry the session's optimizer, iterations, parameters and UTC creation and update
times (reads do not touch them); a deleted session is ``session_not_found`` on every route and
its id is free again.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import numpy as np
import pytest

from tests.harness.http_api import (
    MSGPACK,
    MSGPACK_TYPE,
    assert_error,
    create_session,
    get_state,
    gradients_body,
    new_id,
    pull,
    pushed,
)
from tests.harness.models import gradient_sequence, model
from tests.harness.refusals import VALID_PUSH


def parse_time(text: str) -> datetime:
    when = datetime.fromisoformat(text)
    assert when.utcoffset() == timedelta(0), f"{text} is not UTC"
    return when


def test_list_and_summaries(server_factory: Callable[..., Any]) -> None:
    srv = server_factory()
    with httpx.Client(base_url=srv.url, timeout=30) as api:
        r = api.get("/sessions")
        assert r.status_code == 200
        assert r.json() == {"sessions": []}

        before = datetime.now(timezone.utc)
        a = create_session(api, "adam", model(), session_id="a")
        b = create_session(api, "sgd", {"w": np.zeros(3, np.float64)}, session_id="b")
        after = datetime.now(timezone.utc)

        listed = api.get("/sessions").json()["sessions"]
        assert sorted(s["session_id"] for s in listed) == ["a", "b"]
        for created in (a, b):
            summary = api.get(f"/sessions/{created['session_id']}").json()
            assert set(summary) == set(created) | {"created_at", "updated_at"}
            assert {k: summary[k] for k in created} == created
            assert summary in listed
            created_at = parse_time(summary["created_at"])
            assert before - timedelta(seconds=1) <= created_at <= after + timedelta(seconds=1)
            assert parse_time(summary["updated_at"]) == created_at

        first = api.get("/sessions/b").json()
        pushed(api, "b", {"w": np.ones(3)})
        second = api.get("/sessions/b").json()
        assert second["iterations"] == 1
        assert second["created_at"] == first["created_at"]
        assert parse_time(second["updated_at"]) > parse_time(first["updated_at"])
        assert {
            s["session_id"]: s["iterations"] for s in api.get("/sessions").json()["sessions"]
        } == {
            "a": 0,
            "b": 1,
        }
        # Reading does not touch a session.
        pull(api, "b")
        get_state(api, "b")
        assert api.get("/sessions/b").json() == second


def test_delete_then_404_everywhere_and_the_id_is_free_again(api: httpx.Client) -> None:
    sid = new_id()
    create_session(api, "adam", model(), session_id=sid)
    pushed(api, sid, gradient_sequence(model(), 1)[0])
    r = api.delete(f"/sessions/{sid}")
    assert r.status_code == 204
    assert r.content == b""
    grads = gradients_body(gradient_sequence(model(), 1)[0])
    for method, path, kwargs in [
        ("GET", f"/sessions/{sid}", {}),
        ("GET", f"/sessions/{sid}/weights", {}),
        ("GET", f"/sessions/{sid}/state", {}),
        (
            "POST",
            f"/sessions/{sid}/gradients",
            {"content": grads, "headers": {"Content-Type": MSGPACK_TYPE}},
        ),
        ("DELETE", f"/sessions/{sid}", {}),
    ]:
        r = api.request(method, path, **kwargs)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["code"] == "session_not_found"
    assert sid not in [s["session_id"] for s in api.get("/sessions").json()["sessions"]]
    again = create_session(api, "sgd", {"w": np.zeros(2, np.float32)}, session_id=sid)
    assert again["iterations"] == 0
    assert again["optimizer"]["class_name"] == "SGD"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/sessions/{}"),
        ("DELETE", "/sessions/{}"),
        ("POST", "/sessions/{}/gradients"),
        ("GET", "/sessions/{}/weights"),
        ("GET", "/sessions/{}/state"),
    ],
)
@pytest.mark.parametrize("sid", ["nope", "x" * 128, "bad id"])
def test_404_unknown_session(api: httpx.Client, method: str, path: str, sid: str) -> None:
    kwargs: dict[str, Any] = {}
    if method == "POST":
        kwargs = {"content": VALID_PUSH, "headers": MSGPACK}
    r = api.request(method, path.format(sid), **kwargs)
    assert_error(r, 404, "session_not_found")
