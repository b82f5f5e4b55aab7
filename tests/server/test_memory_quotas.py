"""Memory quotas over real HTTP: 507 when a session or all of them would hold too much.

``max_session_bytes`` bounds one session's weights and optimizer state, ``max_total_bytes``
all sessions together and ``max_sessions`` their number: a create or a state import beyond
gets 507 (``memory_quota_exceeded`` naming the bound, ``too_many_sessions``) and changes
nothing; replacing a state counts the new one instead of the old, a delete frees its bytes.
An SGD session of n float32 weights holds 8n bytes (weights and momentum); Adam holds 12n.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import numpy as np

from paramserver import wire
from tests.harness.http_api import (
    MSGPACK,
    assert_error,
    create_body,
    create_session,
    gradients_body,
    observed,
)
from tests.harness.models import ones, zeros
from tests.harness.refusals import WEIGHTS
from tests.harness.servers import ServerThread


def sgd_state(size: int, iterations: int = 0) -> bytes:
    w = np.linspace(-1, 1, size, dtype=np.float32)
    return wire.pack(
        {
            "iterations": iterations,
            "optimizer": {"class_name": "SGD", "config": {"lr": 0.01}},
            "weights": {"w": w},
            "slots": {"moment": {"w": np.zeros(size, np.float32)}},
            "scalars": {},
        }
    )


def test_per_session_quota_gets_507_and_changes_nothing(
    server_factory: Callable[..., ServerThread], http: httpx.Client
) -> None:
    url = server_factory(max_session_bytes=1000).url
    create_session(url, "sgd", zeros(100), session_id="small")  # 800 bytes
    push = http.post(
        f"{url}/sessions/small/gradients", content=gradients_body(ones(100)), headers=MSGPACK
    )
    assert push.status_code == 200
    before = observed(url)

    too_big = http.post(
        f"{url}/sessions", content=create_body("big", "sgd", zeros(200)), headers=MSGPACK
    )
    message = assert_error(too_big, 507, "memory_quota_exceeded")
    assert "1000" in too_big.json()["error"]["message"], message
    adam = http.post(
        f"{url}/sessions", content=create_body("adam", "adam", zeros(100)), headers=MSGPACK
    )
    assert_error(adam, 507, "memory_quota_exceeded")  # the optimizer's state counts
    replace = http.put(f"{url}/sessions/small/state", content=sgd_state(200), headers=MSGPACK)
    assert_error(replace, 507, "memory_quota_exceeded")
    fresh = http.put(f"{url}/sessions/fresh/state", content=sgd_state(200), headers=MSGPACK)
    assert_error(fresh, 507, "memory_quota_exceeded")

    assert observed(url) == before
    for sid in ("big", "adam", "fresh"):
        assert_error(http.get(f"{url}/sessions/{sid}"), 404, "session_not_found")
    create_session(url, "sgd", zeros(125), session_id="fits")  # exactly 1000 bytes


def test_global_quota_gets_507_and_changes_nothing(
    server_factory: Callable[..., ServerThread], http: httpx.Client
) -> None:
    url = server_factory(max_total_bytes=2000).url
    create_session(url, "sgd", zeros(100), session_id="a")
    create_session(url, "sgd", zeros(100), session_id="b")
    before = observed(url)
    refused = http.post(
        f"{url}/sessions", content=create_body("c", "sgd", zeros(100)), headers=MSGPACK
    )
    assert_error(refused, 507, "memory_quota_exceeded")
    assert "2000" in refused.json()["error"]["message"]
    grow = http.put(f"{url}/sessions/b/state", content=sgd_state(200), headers=MSGPACK)
    assert_error(grow, 507, "memory_quota_exceeded")
    assert observed(url) == before

    # Replacing a session's state counts the new state instead of the old one.
    ok = http.put(f"{url}/sessions/b/state", content=sgd_state(150, iterations=7), headers=MSGPACK)
    assert ok.status_code == 200, ok.text
    assert ok.json()["iterations"] == 7
    # Deleting a session frees its bytes.
    assert http.delete(f"{url}/sessions/a").status_code == 204
    create_session(url, "sgd", zeros(50), session_id="c")


def test_507_too_many_sessions(server_factory: Callable[..., Any]) -> None:
    srv = server_factory(max_sessions=2)
    with httpx.Client(base_url=srv.url, timeout=60) as api:
        for sid in ("one", "two"):
            r = api.post("/sessions", content=create_body(sid, "sgd", WEIGHTS), headers=MSGPACK)
            assert r.status_code == 201, r.text
        state = api.get("/sessions/one/state").content
        r = api.post("/sessions", content=create_body("three", "sgd", WEIGHTS), headers=MSGPACK)
        assert_error(r, 507, "too_many_sessions")
        r = api.post("/sessions", content=create_body(None, "sgd", WEIGHTS), headers=MSGPACK)
        assert_error(r, 507, "too_many_sessions")
        r = api.post(
            "/sessions",
            json={
                "optimizer": "sgd",
                "weights": {"w": {"dtype": "float32", "shape": [1], "data": [0]}},
            },
        )
        assert_error(r, 507, "too_many_sessions")
        r = api.put("/sessions/three/state", content=state, headers=MSGPACK)
        assert_error(r, 507, "too_many_sessions")
        assert sorted(s["session_id"] for s in api.get("/sessions").json()["sessions"]) == [
            "one",
            "two",
        ]
        # Replacing an existing session's state needs no new slot.
        r = api.put("/sessions/two/state", content=state, headers=MSGPACK)
        assert r.status_code == 200, r.text
        # A taken id is still 409, not 507.
        r = api.post("/sessions", content=create_body("one", "sgd", WEIGHTS), headers=MSGPACK)
        assert_error(r, 409, "session_exists")
        assert api.delete("/sessions/one").status_code == 204
        r = api.post("/sessions", content=create_body("three", "sgd", WEIGHTS), headers=MSGPACK)
        assert r.status_code == 201, r.text
