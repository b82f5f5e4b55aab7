"""Bearer-token authentication over real HTTP: every route against every kind of credential.

The routes are enumerated from the app itself (its router tree and its OpenAPI schema), and
each one must have an entry in :data:`REQUESTS` that says how to call it, so a route added
later cannot escape these tests: :func:`test_every_route_has_a_request` fails until it has one.
Then every route is called with no token, a wrong token, malformed ``Authorization`` headers,
a read-only token and a read-write token, and every refused request is checked to have
changed nothing.
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from paramserver import wire
from paramserver.server import auth
from paramserver.server.main import create_app
from paramserver.server.settings import Settings
from tests.harness.http_api import MSGPACK, create_body, gradients_body
from tests.harness.servers import ServerThread, start_server_thread

RW_TOKEN = "rw-secret-7f3a"
PLAIN_TOKEN = "plain-secret-91c2"  # no suffix: read-write
RO_TOKEN = "ro-secret-c0de"
TOKENS = f"{RW_TOKEN}:rw,{PLAIN_TOKEN}, {RO_TOKEN}:ro"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


RW = bearer(RW_TOKEN)

# --- the routes of the app ------------------------------------------------------------------


def walk_routes(routes: list[Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(method, path) of every route, through included routers and mounts."""
    for route in routes:
        path = getattr(route, "path", None)
        methods = getattr(route, "methods", None)
        if path is not None and methods:
            for method in methods:
                yield method, prefix + path
            continue
        included = getattr(route, "original_router", None)  # FastAPI's included routers
        if included is not None:
            context = getattr(route, "include_context", None)
            yield from walk_routes(included.routes, prefix + getattr(context, "prefix", ""))
            continue
        sub = getattr(route, "routes", None)  # starlette Mount
        if sub is not None:
            yield from walk_routes(sub, prefix + (path or ""))
            continue
        raise AssertionError(f"a route this test cannot enumerate: {route!r}")


def app_routes(app: FastAPI) -> set[tuple[str, str]]:
    """Every (method, path) the app answers: its router tree plus its OpenAPI operations."""
    found = set(walk_routes(app.routes))
    for path, operations in app.openapi()["paths"].items():
        found.update((method.upper(), path) for method in operations)
    return found


ROUTES = app_routes(create_app(Settings(tokens="x", warm_up_kernels=False)))

# --- how to call each route -----------------------------------------------------------------


#: The model of every session here: an SGD session of one float32 (2, 3) parameter.
SGD = {"class_name": "SGD", "config": {"lr": 0.5}}
MODEL = {"w": np.ones((2, 3), np.float32)}


@dataclass
class World:
    """What a request may refer to: a live session and a base URL."""

    http: httpx.Client
    url: str
    session_id: str

    def snapshot(self) -> tuple[Any, ...]:
        """Everything a write could change, read with the read-write token."""
        listing = self.http.get(f"{self.url}/sessions", headers=RW).json()
        weights = self.http.get(f"{self.url}/sessions/{self.session_id}/weights", headers=RW)
        assert weights.status_code == 200, weights.text
        message = wire.unpack(weights.content)
        return (
            sorted(s["session_id"] for s in listing["sessions"]),
            message["iterations"],
            wire.decode_tensor(message["weights"]["w"]).tolist(),
        )


@dataclass(frozen=True)
class Call:
    """How to call one route and what a read-write token gets from it."""

    ok: int
    build: Callable[[World], dict[str, Any]]


def _state_of(world: World) -> dict[str, Any]:
    state = world.http.get(f"{world.url}/sessions/{world.session_id}/state", headers=RW)
    assert state.status_code == 200
    return {
        "url": f"/sessions/{world.session_id}/state",
        "content": state.content,
        "headers": MSGPACK,
    }


REQUESTS: dict[tuple[str, str], Call] = {
    ("GET", "/health"): Call(200, lambda w: {"url": "/health"}),
    ("GET", "/ready"): Call(200, lambda w: {"url": "/ready"}),
    ("GET", "/data-plane"): Call(200, lambda w: {"url": "/data-plane"}),
    ("GET", "/openapi.json"): Call(200, lambda w: {"url": "/openapi.json"}),
    ("HEAD", "/openapi.json"): Call(200, lambda w: {"url": "/openapi.json"}),
    ("GET", "/docs"): Call(200, lambda w: {"url": "/docs"}),
    ("HEAD", "/docs"): Call(200, lambda w: {"url": "/docs"}),
    ("GET", "/docs/oauth2-redirect"): Call(200, lambda w: {"url": "/docs/oauth2-redirect"}),
    ("HEAD", "/docs/oauth2-redirect"): Call(200, lambda w: {"url": "/docs/oauth2-redirect"}),
    ("GET", "/redoc"): Call(200, lambda w: {"url": "/redoc"}),
    ("HEAD", "/redoc"): Call(200, lambda w: {"url": "/redoc"}),
    ("GET", "/sessions"): Call(200, lambda w: {"url": "/sessions"}),
    ("POST", "/sessions"): Call(
        201,
        lambda w: {
            "url": "/sessions",
            "content": create_body(f"{w.session_id}-new", SGD, MODEL),
            "headers": MSGPACK,
        },
    ),
    ("GET", "/sessions/{session_id}"): Call(200, lambda w: {"url": f"/sessions/{w.session_id}"}),
    ("DELETE", "/sessions/{session_id}"): Call(204, lambda w: {"url": f"/sessions/{w.session_id}"}),
    ("POST", "/sessions/{session_id}/gradients"): Call(
        200,
        lambda w: {
            "url": f"/sessions/{w.session_id}/gradients",
            "content": gradients_body(MODEL),
            "headers": MSGPACK,
        },
    ),
    ("GET", "/sessions/{session_id}/weights"): Call(
        200, lambda w: {"url": f"/sessions/{w.session_id}/weights"}
    ),
    ("GET", "/sessions/{session_id}/state"): Call(
        200, lambda w: {"url": f"/sessions/{w.session_id}/state"}
    ),
    ("PUT", "/sessions/{session_id}/state"): Call(200, _state_of),
    # The auth server keeps no snapshots: 409 snapshots_disabled is the answer a writer gets.
    ("POST", "/sessions/{session_id}/snapshot"): Call(
        409, lambda w: {"url": f"/sessions/{w.session_id}/snapshot"}
    ),
    ("POST", "/sessions/{session_id}/weights/query"): Call(
        200,
        lambda w: {
            "url": f"/sessions/{w.session_id}/weights/query",
            "content": wire.pack({"tensors": {"w": {}}}),
            "headers": MSGPACK,
        },
    ),
    ("GET", "/metrics"): Call(200, lambda w: {"url": "/metrics"}),
    ("GET", "/stats"): Call(200, lambda w: {"url": "/stats"}),
    ("GET", "/sessions/{session_id}/metrics"): Call(
        200, lambda w: {"url": f"/sessions/{w.session_id}/metrics"}
    ),
    ("GET", "/dashboard"): Call(200, lambda w: {"url": "/dashboard"}),
    ("GET", "/dashboard/{name}"): Call(200, lambda w: {"url": "/dashboard/dashboard.js"}),
}

# Every route the app has, known to REQUESTS or not: a route without an entry is still called
# with every credential (generically), and test_every_route_has_a_request fails for it.
ROUTE_IDS = sorted(ROUTES | set(REQUESTS))
PROTECTED = [r for r in ROUTE_IDS if not auth.is_open(r[1])]
#: A partial pull is a POST that reads (its body names the rows): read-only tokens may call it.
QUERY = ("POST", "/sessions/{session_id}/weights/query")
READS = [r for r in PROTECTED if r[0] in ("GET", "HEAD") or r == QUERY]
WRITES = [r for r in PROTECTED if r not in READS]


def route_id(route: tuple[str, str]) -> str:
    return f"{route[0]} {route[1]}"


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_server() -> Iterator[ServerThread]:
    srv = start_server_thread(tokens=TOKENS)
    yield srv
    srv.stop()


@pytest.fixture
def world(auth_server: ServerThread, http: httpx.Client) -> World:
    """A fresh session on the token-protected server."""
    session_id = f"auth-{uuid.uuid4().hex[:12]}"
    r = http.post(
        f"{auth_server.url}/sessions",
        content=create_body(session_id, SGD, MODEL),
        headers={**MSGPACK, **RW},
    )
    assert r.status_code == 201, r.text
    return World(http, auth_server.url, session_id)


def generic_request(world: World, route: tuple[str, str]) -> dict[str, Any]:
    """A call of a route REQUESTS does not know: its path filled in, no body."""
    path = route[1].replace("{session_id}", world.session_id)
    return {"url": re.sub(r"\{[^}]*\}", "x", path)}


def call(
    world: World, route: tuple[str, str], headers: dict[str, str] | None = None
) -> httpx.Response:
    known = REQUESTS.get(route)
    spec = known.build(world) if known is not None else generic_request(world, route)
    merged = {**spec.get("headers", {}), **(headers or {})}
    return world.http.request(
        route[0],
        world.url + spec["url"],
        content=spec.get("content"),
        headers=merged,
        timeout=30,
    )


def unauthorized_body(r: httpx.Response) -> bytes:
    assert r.status_code == 401, (r.status_code, r.text)
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.headers["content-type"] == "application/json"
    return r.content


# --- the route table ------------------------------------------------------------------------


def test_every_route_has_a_request() -> None:
    """A new route fails here until REQUESTS says how to call it (and so it gets tested)."""
    assert ROUTES, "no routes found"
    missing = sorted(ROUTES - set(REQUESTS))
    assert not missing, f"routes without an entry in REQUESTS: {missing}"
    stale = sorted(set(REQUESTS) - ROUTES)
    assert not stale, f"REQUESTS has entries for routes that no longer exist: {stale}"


def test_the_docs_routes_are_enumerated() -> None:
    assert ("GET", "/openapi.json") in ROUTES
    assert ("GET", "/docs") in ROUTES
    assert ("POST", "/sessions/{session_id}/gradients") in ROUTES


# --- every route x every credential ---------------------------------------------------------


@pytest.mark.parametrize("route", PROTECTED, ids=route_id)
def test_no_token_gets_401_and_changes_nothing(world: World, route: tuple[str, str]) -> None:
    before = world.snapshot()
    unauthorized_body(call(world, route))
    assert world.snapshot() == before


@pytest.mark.parametrize("route", PROTECTED, ids=route_id)
def test_wrong_token_gets_401_and_changes_nothing(world: World, route: tuple[str, str]) -> None:
    before = world.snapshot()
    for token in ("wrong", RW_TOKEN[:-1], RW_TOKEN + "x", f"{RW_TOKEN}:rw", RW_TOKEN.upper()):
        unauthorized_body(call(world, route, bearer(token)))
    assert world.snapshot() == before


MALFORMED = [
    RW_TOKEN,  # no scheme
    f"Basic {RW_TOKEN}",
    f"Token {RW_TOKEN}",
    "Bearer",  # (h11 refuses to send a value with trailing whitespace)
    f"Bearer{RW_TOKEN}",
    f"Bearer {RW_TOKEN} {RW_TOKEN}",
    f"Bearer {RW_TOKEN},{RO_TOKEN}",
    "",
]


@pytest.mark.parametrize("route", PROTECTED, ids=route_id)
def test_malformed_header_gets_401_and_changes_nothing(
    world: World, route: tuple[str, str]
) -> None:
    before = world.snapshot()
    for value in MALFORMED:
        unauthorized_body(call(world, route, {"Authorization": value}))
    assert world.snapshot() == before


def assert_allowed(route: tuple[str, str], r: httpx.Response) -> None:
    known = REQUESTS.get(route)
    if known is None:  # see test_every_route_has_a_request
        assert r.status_code not in (401, 403), r.text
    else:
        assert r.status_code == known.ok, r.text


@pytest.mark.parametrize("route", READS, ids=route_id)
def test_read_only_token_may_read(world: World, route: tuple[str, str]) -> None:
    assert_allowed(route, call(world, route, bearer(RO_TOKEN)))


@pytest.mark.parametrize("route", WRITES, ids=route_id)
def test_read_only_token_may_not_write(world: World, route: tuple[str, str]) -> None:
    before = world.snapshot()
    r = call(world, route, bearer(RO_TOKEN))
    assert r.status_code == 403, r.text
    assert r.json() == {"error": {"code": "forbidden", "message": "this token is read-only"}}
    assert world.snapshot() == before
    assert (
        world.http.get(f"{world.url}/sessions/{world.session_id}-new", headers=RW).status_code
        == 404
    )


@pytest.mark.parametrize("token", [RW_TOKEN, PLAIN_TOKEN], ids=["rw", "plain"])
@pytest.mark.parametrize("route", ROUTE_IDS, ids=route_id)
def test_read_write_token_may_do_everything(
    world: World, route: tuple[str, str], token: str
) -> None:
    assert_allowed(route, call(world, route, bearer(token)))


def test_the_scheme_is_case_insensitive(world: World) -> None:
    r = world.http.get(f"{world.url}/sessions", headers={"Authorization": f"bearer {RO_TOKEN}"})
    assert r.status_code == 200


def test_read_only_token_reads_a_missing_session_as_404(world: World) -> None:
    for path in ("", "/weights", "/state"):
        r = world.http.get(f"{world.url}/sessions/no-such-session{path}", headers=bearer(RO_TOKEN))
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "session_not_found"


def test_read_only_token_may_not_write_a_missing_session_either(world: World) -> None:
    """403 comes before 404: a read-only token cannot probe which sessions exist by writing."""
    r = world.http.delete(f"{world.url}/sessions/no-such-session", headers=bearer(RO_TOKEN))
    assert r.status_code == 403


def test_non_utf8_token_gets_401(world: World) -> None:
    r = world.http.get(
        f"{world.url}/sessions",
        headers=[(b"Authorization", b"Bearer \xff\xfe" + RW_TOKEN.encode())],
    )
    unauthorized_body(r)


# --- what a refusal says --------------------------------------------------------------------


def test_every_401_body_is_the_same(world: World) -> None:
    """Missing, wrong or malformed, on any route or none: one body, so nothing leaks."""
    bodies = set()
    for route in PROTECTED:
        if route[0] == "HEAD":
            continue
        bodies.add(unauthorized_body(call(world, route)))
        bodies.add(unauthorized_body(call(world, route, bearer("wrong"))))
        bodies.add(unauthorized_body(call(world, route, {"Authorization": "Basic abc"})))
    for path in ("/no-such-route", f"/sessions/{world.session_id}", "/sessions/no-such-session"):
        bodies.add(unauthorized_body(world.http.get(world.url + path)))
        bodies.add(unauthorized_body(world.http.get(world.url + path, headers=bearer("wrong"))))
    assert len(bodies) == 1, bodies
    (body,) = bodies
    error = httpx.Response(401, content=body).json()["error"]
    assert error["code"] == "unauthorized"
    for secret in (RW_TOKEN, PLAIN_TOKEN, RO_TOKEN, "wrong", "Traceback"):
        assert secret not in body.decode()


def test_existence_of_a_session_does_not_leak_without_a_token(world: World) -> None:
    known = world.http.get(f"{world.url}/sessions/{world.session_id}")
    unknown = world.http.get(f"{world.url}/sessions/no-such-session")
    assert known.status_code == unknown.status_code == 401
    assert known.content == unknown.content


def test_health_needs_no_token(world: World) -> None:
    for headers in ({}, bearer("wrong"), {"Authorization": "Basic abc"}, bearer(RO_TOKEN)):
        r = world.http.get(f"{world.url}/health", headers=headers)
        assert r.status_code == 200
        assert r.json() == {"status": "ok"}


# --- where tokens come from -----------------------------------------------------------------


def test_tokens_file(
    server_factory: Callable[..., ServerThread], tmp_path: Path, http: httpx.Client
) -> None:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(
        "# workers\nfile-rw-token\n\n  file-spaced-token  \nfile-ro-token:ro\n"
        "# file-commented-token\nfile-explicit-rw:rw\n",
        encoding="utf-8",
    )
    srv = server_factory(tokens_file=tokens_file)
    url = srv.url
    body = create_body("from-file", SGD, MODEL)
    r = http.post(f"{url}/sessions", content=body, headers={**MSGPACK, **bearer("file-rw-token")})
    assert r.status_code == 201, r.text
    for token in ("file-spaced-token", "file-explicit-rw"):
        r = http.post(
            f"{url}/sessions/from-file/gradients",
            content=gradients_body(MODEL),
            headers={**MSGPACK, **bearer(token)},
        )
        assert r.status_code == 200, (token, r.text)
    assert http.get(f"{url}/sessions", headers=bearer("file-ro-token")).status_code == 200
    r = http.delete(f"{url}/sessions/from-file", headers=bearer("file-ro-token"))
    assert r.status_code == 403
    for token in (
        "# workers",
        "# file-commented-token",
        "file-commented-token",
        "file-ro-token:ro",
    ):
        unauthorized_body(http.get(f"{url}/sessions", headers=bearer(token)))
    unauthorized_body(http.get(f"{url}/sessions"))


def test_tokens_file_and_tokens_together(
    server_factory: Callable[..., ServerThread], tmp_path: Path, http: httpx.Client
) -> None:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("from-the-file\n", encoding="utf-8")
    srv = server_factory(tokens_file=tokens_file, tokens="from-the-env:ro")
    for token in ("from-the-file", "from-the-env"):
        assert http.get(f"{srv.url}/sessions", headers=bearer(token)).status_code == 200
    assert http.delete(f"{srv.url}/sessions/x", headers=bearer("from-the-env")).status_code == 403
    assert http.delete(f"{srv.url}/sessions/x", headers=bearer("from-the-file")).status_code == 404


def test_tokens_from_the_environment(
    server_factory: Callable[..., ServerThread],
    monkeypatch: pytest.MonkeyPatch,
    http: httpx.Client,
) -> None:
    monkeypatch.setenv("PARAMSERVER_TOKENS", "env-one,env-two:ro")
    srv = server_factory()
    unauthorized_body(http.get(f"{srv.url}/sessions"))
    assert http.get(f"{srv.url}/sessions", headers=bearer("env-one")).status_code == 200
    assert http.get(f"{srv.url}/sessions", headers=bearer("env-two")).status_code == 200
    assert http.delete(f"{srv.url}/sessions/x", headers=bearer("env-two")).status_code == 403


def test_without_tokens_everything_is_open(base_url: str, http: httpx.Client) -> None:
    assert http.get(f"{base_url}/sessions").status_code == 200
    assert http.get(f"{base_url}/openapi.json").status_code == 200
    r = http.post(
        f"{base_url}/sessions", content=create_body("open-session", SGD, MODEL), headers=MSGPACK
    )
    assert r.status_code == 201, r.text
    assert http.delete(f"{base_url}/sessions/open-session").status_code == 204


# --- start-up -------------------------------------------------------------------------------


def test_startup_says_the_server_is_open_without_tokens(
    server_factory: Callable[..., ServerThread], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="paramserver"):
        server_factory()
    open_warnings = [
        r for r in caplog.records if r.name == "paramserver" and "OPEN" in r.getMessage()
    ]
    assert len(open_warnings) == 1, caplog.text
    assert open_warnings[0].levelno == logging.WARNING
    assert "127.0.0.1" in open_warnings[0].getMessage()
    assert "not loopback" not in open_warnings[0].getMessage()


def test_startup_warns_louder_off_loopback(
    server_factory: Callable[..., ServerThread], caplog: pytest.LogCaptureFixture
) -> None:
    # The test server binds loopback whatever Settings.host says; the message follows the setting.
    with caplog.at_level(logging.INFO, logger="paramserver"):
        server_factory(host="0.0.0.0")
    messages = [r.getMessage() for r in caplog.records if r.name == "paramserver"]
    assert any("OPEN" in m and "not loopback" in m for m in messages), caplog.text


def test_startup_says_authentication_is_on_with_tokens(
    server_factory: Callable[..., ServerThread], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="paramserver"):
        server_factory(tokens="some-token")
    messages = [r.getMessage() for r in caplog.records if r.name == "paramserver"]
    assert any("authentication on" in m for m in messages), caplog.text
    assert not any("OPEN" in m for m in messages)
    assert not any("some-token" in m for m in messages)


# --- the token table ------------------------------------------------------------------------


def test_lookup_semantics() -> None:
    table = auth.load_tokens("alpha, beta:rw ,gamma:ro,,", None)
    assert len(table.entries) == 3
    assert table.lookup("alpha") is True
    assert table.lookup("beta") is True
    assert table.lookup("gamma") is False
    for unknown in ("", "alph", "alpha ", "beta:rw", "gamma:ro", "ALPHA", "delta"):
        assert table.lookup(unknown) is None, unknown
    assert not auth.load_tokens(None, None)
    assert not auth.load_tokens(" , ,", None)


def test_empty_token_is_refused() -> None:
    for tokens in (":ro", ":rw", " :ro"):
        with pytest.raises(ValueError, match="empty token"):
            auth.load_tokens(tokens, None)


def test_table_holds_hashes_not_tokens() -> None:
    table = auth.load_tokens("alpha,gamma:ro", None)
    assert table.entries == (
        (hashlib.sha256(b"alpha").digest(), True),
        (hashlib.sha256(b"gamma").digest(), False),
    )
    assert b"alpha" not in repr(table).encode()


def test_lookup_compares_digests_with_compare_digest_against_every_entry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Constant time: fixed-size digests, compared with hmac.compare_digest, no early exit."""
    real = auth.hmac.compare_digest
    calls: list[tuple[bytes, bytes]] = []

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    table = auth.load_tokens("first,second:ro,third", None)
    for presented, expected in (
        ("first", True),
        ("second", False),
        ("nope", None),
        ("x" * 5000, None),
    ):
        calls.clear()
        assert table.lookup(presented) is expected
        assert len(calls) == 3, "every entry must be compared, even after a match"
        digest = hashlib.sha256(presented.encode()).digest()
        for a, b in calls:
            assert len(a) == len(b) == 32
            assert digest in (a, b)


def test_no_scope_but_http_and_lifespan_reaches_the_app_unauthenticated():
    """A WebSocket (or any other) scope is closed by the middleware itself, whatever the
    transport might route to it: nothing reaches the app without a token check."""
    import asyncio

    reached: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["type"])

    middleware = auth.AuthMiddleware(app, auth.load_tokens(TOKENS, None))
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def run() -> None:
        await middleware({"type": "websocket", "path": "/sessions", "headers": []}, receive, send)
        await middleware({"type": "custom", "path": "/sessions"}, receive, send)
        await middleware({"type": "lifespan"}, receive, send)

    asyncio.run(run())
    assert reached == ["lifespan"]
    assert sent == [{"type": "websocket.close", "code": 1008}]
