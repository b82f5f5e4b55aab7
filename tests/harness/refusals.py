"""A session to aim refused requests at, and the proof that a refusal changed nothing.

The ``adam_session`` fixture (``tests/conftest.py``) creates an Adam session of
:data:`WEIGHTS` (``w``: float32 (2, 3), ``b``: float32 (3,)) one step in, so that its slots are
set. :func:`snapshot` reads everything a request could change; :func:`assert_unchanged`
checks that nothing did and that the session still takes a push. Requests go through a client
made with the server's ``base_url``.
"""

from __future__ import annotations

from typing import Any

import httpx
import msgpack
import numpy as np

from tests.harness.http_api import MSGPACK, MSGPACK_TYPE, assert_error, gradients_body

__all__ = [
    "B",
    "VALID_PUSH",
    "WEIGHTS",
    "W",
    "Snapshot",
    "assert_absent",
    "assert_unchanged",
    "good_grads",
    "post_grads",
    "snapshot",
]

W = np.arange(6, dtype=np.float32).reshape(2, 3) / 10
B = np.array([0.5, -0.5, 1.0], dtype=np.float32)
WEIGHTS = {"w": W, "b": B}


def good_grads() -> dict[str, np.ndarray]:
    return {"w": np.full((2, 3), 0.25, np.float32), "b": np.ones(3, np.float32)}


VALID_PUSH = gradients_body(good_grads())

Snapshot = tuple[bytes, bytes, dict[str, Any]]


def snapshot(http: httpx.Client, sid: str) -> Snapshot:
    """The session's weights, state and summary."""
    weights = http.get(f"/sessions/{sid}/weights")
    state = http.get(f"/sessions/{sid}/state")
    summary = http.get(f"/sessions/{sid}")
    assert weights.status_code == state.status_code == summary.status_code == 200
    return weights.content, state.content, summary.json()


def assert_unchanged(http: httpx.Client, sid: str, before: Snapshot) -> None:
    """Same weights, state, iterations and summary; and the session still takes a push."""
    after = snapshot(http, sid)
    assert msgpack.unpackb(after[0]) == msgpack.unpackb(before[0]), "weights changed"
    assert msgpack.unpackb(after[1]) == msgpack.unpackb(before[1]), "optimizer state changed"
    assert after[2] == before[2], "summary changed"
    n = before[2]["iterations"]
    r = http.post(f"/sessions/{sid}/gradients", content=VALID_PUSH, headers=MSGPACK)
    assert r.status_code == 200, r.text
    assert msgpack.unpackb(r.content)["iterations"] == n + 1


def assert_absent(http: httpx.Client, sid: str) -> None:
    assert_error(http.get(f"/sessions/{sid}"), 404, "session_not_found")


def post_grads(http: httpx.Client, sid: str, body: bytes, **headers: str) -> httpx.Response:
    """POST ``body`` (any bytes) as the gradients of ``sid``."""
    return http.post(
        f"/sessions/{sid}/gradients",
        content=body,
        headers={"Content-Type": MSGPACK_TYPE, **headers},
    )
