"""Every error answer is the protocol's error body, with nothing internal in it.

``{"error": {"code": str, "message": str}}`` for every status the server answers, from the
routes (unknown route, method not allowed) to the service (missing session, bad bodies), and
an unexpected exception is a generic 500 ``internal_error`` whose body says nothing of it:
no traceback, file, path or repr (:data:`tests.harness.http_api.LEAKS`).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import numpy as np

from paramserver import wire
from tests.harness.http_api import (
    MSGPACK,
    assert_error,
    create_body,
    create_session,
    gradients_body,
)
from tests.harness.models import ones, zeros
from tests.harness.servers import ServerThread


def test_unknown_routes_and_methods_use_the_error_body(
    api: httpx.Client, adam_session: str
) -> None:
    assert_error(api.get("/nothing-here"), 404, "not_found")
    assert_error(api.patch(f"/sessions/{adam_session}"), 405, "method_not_allowed")
    assert_error(api.put("/sessions"), 405, "method_not_allowed")


def test_no_error_body_carries_a_traceback(
    server_factory: Callable[..., ServerThread], http: httpx.Client
) -> None:
    srv = server_factory()
    url = srv.url
    create_session(url, "sgd", zeros(), session_id="exists")
    cases: list[tuple[httpx.Response, int]] = [
        (http.get(f"{url}/no/such/route"), 404),
        (http.get(f"{url}/sessions/missing"), 404),
        (http.get(f"{url}/sessions/missing/weights"), 404),
        (
            http.post(
                f"{url}/sessions/missing/gradients", content=gradients_body(ones()), headers=MSGPACK
            ),
            404,
        ),
        (http.delete(f"{url}/sessions/missing"), 404),
        (http.patch(f"{url}/sessions/exists"), 405),
        (http.post(f"{url}/sessions", content=b"{}", headers={"Content-Type": "text/plain"}), 415),
        (http.post(f"{url}/sessions/exists/gradients", content=gradients_body(ones())), 415),
        (http.post(f"{url}/sessions", content=b"\xc1", headers=MSGPACK), 400),
        (
            http.post(
                f"{url}/sessions", content=b"{", headers={"Content-Type": "application/json"}
            ),
            400,
        ),
        (
            http.post(
                f"{url}/sessions",
                content=b"[" * 100_000,
                headers={"Content-Type": "application/json"},
            ),
            400,
        ),
        (
            http.post(
                f"{url}/sessions", content=create_body("exists", "sgd", zeros()), headers=MSGPACK
            ),
            409,
        ),
        (
            http.post(
                f"{url}/sessions", content=create_body("bad id!", "sgd", zeros()), headers=MSGPACK
            ),
            422,
        ),
        (
            http.post(
                f"{url}/sessions",
                content=wire.pack({"optimizer": "nope", "weights": {"w": np.zeros(2, np.float32)}}),
                headers=MSGPACK,
            ),
            422,
        ),
        (
            http.post(
                f"{url}/sessions",
                content=json.dumps(
                    {"optimizer": {"class_name": "Adam", "config": {"lr": "x"}}, "weights": {}}
                ),
                headers={"Content-Type": "application/json"},
            ),
            422,
        ),
        (
            http.post(
                f"{url}/sessions/exists/gradients", content=gradients_body(ones(5)), headers=MSGPACK
            ),
            422,
        ),
        (
            http.post(
                f"{url}/sessions/exists/gradients",
                params={"return_weights": "perhaps"},
                content=gradients_body(ones()),
                headers=MSGPACK,
            ),
            422,
        ),
        (
            http.post(
                f"{url}/sessions/exists/gradients",
                content=wire.pack({"gradients": {"w": np.full(4, np.nan, np.float32)}}),
                headers=MSGPACK,
            ),
            422,
        ),
        (
            http.put(
                f"{url}/sessions/exists/state",
                content=wire.pack({"iterations": -1}),
                headers=MSGPACK,
            ),
            422,
        ),
    ]
    for r, status in cases:
        assert_error(r, status)

    def broken() -> None:
        raise RuntimeError(f"an internal detail at {__file__}")

    srv.app.state.service.list = broken  # this server only
    internal = http.get(f"{url}/sessions")
    assert assert_error(internal, 500, "internal_error")
    assert "internal detail" not in internal.text
