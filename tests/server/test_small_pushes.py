"""Small pushes served on the event loop (:mod:`paramserver.server.api.fastpath`).

A small push of a small session skips FastAPI's routing and the hop to a worker thread; it must
behave exactly as the route does. The decisions (what is served there, what goes to the route)
are tested in process against the app's own middleware; the behaviour is tested over real HTTP
on loopback, against a server whose kernels are loaded, comparing each answer with the route's
answer to the same push (``?return_weights=True`` is not one of the query strings the fast path
takes, so it sends the same push through the route).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from paramserver import wire
from paramserver.server.api import fastpath
from paramserver.server.idempotency import DeferredDigest
from paramserver.server.main import create_app
from paramserver.server.settings import Settings
from paramserver.sparse import Rows
from tests.harness.http_api import MSGPACK, create_body, gradients_body, new_id, unpackb
from tests.harness.servers import ServerThread, start_server_thread, warm_kernels

RW, RO = "fast-rw-token", "fast-ro-token"
WEIGHTS = {"w": np.linspace(-1, 1, 10, dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}
GRADS = {"w": np.full(10, 0.25, dtype=np.float32), "b": np.array([1, -2, 3], dtype=np.float32)}


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerThread]:
    warm_kernels()
    server = start_server_thread()
    yield server
    server.stop()


@pytest.fixture
def threads(srv: ServerThread) -> Iterator[list[str]]:
    """The name of the thread each ``service.push`` of ``srv`` runs in, in order."""
    service = srv.app.state.service
    original = service.push
    seen: list[str] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(threading.current_thread().name)
        return original(*args, **kwargs)

    service.push = spy
    yield seen
    del service.push  # the class's method again


def _session(url: str, optimizer: Any = "adam", weights: dict[str, np.ndarray] = WEIGHTS) -> str:
    sid = new_id("fp")
    r = httpx.post(f"{url}/sessions", content=create_body(sid, optimizer, weights), headers=MSGPACK)
    assert r.status_code == 201, r.text
    return sid


def _push(
    url: str, sid: str, body: bytes, query: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    return httpx.post(
        f"{url}/sessions/{sid}/gradients{query}",
        content=body,
        headers={**MSGPACK, **(headers or {})},
        timeout=60,
    )


def _iterations(url: str, sid: str, headers: dict[str, str] | None = None) -> int:
    r = httpx.get(f"{url}/sessions/{sid}", headers=headers)
    assert r.status_code == 200, r.text
    return int(r.json()["iterations"])


def _on_the_loop(seen: list[str]) -> list[bool]:
    """For each push seen: whether it ran on the server's event loop (not a worker thread)."""
    return [not name.startswith("AnyIO") for name in seen]


# --- the same answers as the route ---------------------------------------------------------


BODIES: dict[str, Callable[[], bytes]] = {
    "a step": lambda: gradients_body(GRADS),
    "a wrong shape (422)": lambda: gradients_body({"w": np.zeros(9, np.float32), "b": GRADS["b"]}),
    "a missing parameter (422)": lambda: gradients_body({"w": GRADS["w"]}),
    "not msgpack (400)": lambda: b"\xc1\x00\x01",
    "an empty body (400)": lambda: b"",
    "trailing bytes (400)": lambda: gradients_body(GRADS) + b"\x00",
    "a non-finite gradient": lambda: gradients_body({"w": GRADS["w"] * np.inf, "b": GRADS["b"]}),
}


@pytest.mark.parametrize("name", list(BODIES))
def test_a_small_push_answers_as_the_route_does_and_runs_on_the_loop(
    srv: ServerThread, threads: list[str], name: str
) -> None:
    fast, routed = _session(srv.url), _session(srv.url)
    body = BODIES[name]()
    for step in range(3):
        a = _push(srv.url, fast, body, "?return_weights=true")
        b = _push(srv.url, routed, body, "?return_weights=True")
        assert (a.status_code, a.content) == (b.status_code, b.content), (step, a.text, b.text)
        assert a.headers["content-type"] == b.headers["content-type"]
        assert a.headers["content-length"] == b.headers["content-length"]
        assert "x-request-id" in a.headers
    assert _iterations(srv.url, fast) == _iterations(srv.url, routed)
    # the first of each pair of pushes ran on the loop, the second in a worker thread
    assert _on_the_loop(threads) == [True, False] * 3


@pytest.mark.parametrize("query", ["", "?return_weights=false", "?return_weights=0"])
def test_return_weights_and_idempotent_replays_on_the_loop(
    srv: ServerThread, threads: list[str], query: str
) -> None:
    fast, routed = _session(srv.url), _session(srv.url)
    body = gradients_body(GRADS)
    route_query = "?return_weights=False" if "false" in query or "0" in query else "?x=1"
    for _ in range(2):  # the second push of each key is a replay: nothing applied
        a = _push(srv.url, fast, body, query, {"Idempotency-Key": "k-1"})
        b = _push(srv.url, routed, body, route_query, {"Idempotency-Key": "k-1"})
        assert (a.status_code, a.content) == (b.status_code, b.content)
        assert a.headers.get("idempotent-replayed") == b.headers.get("idempotent-replayed")
    assert a.headers["idempotent-replayed"] == "true"
    assert _iterations(srv.url, fast) == _iterations(srv.url, routed) == 1
    assert _on_the_loop(threads) == [True, False] * 2


def test_sync_rounds_complete_with_pushes_served_on_the_loop(
    srv: ServerThread, threads: list[str]
) -> None:
    create = wire.pack(
        {
            "session_id": (sid := new_id("fps")),
            "optimizer": "sgd",
            "weights": {"w": np.zeros(4, np.float32)},
            "training": {"mode": "sync", "replicas_to_aggregate": 2},
        }
    )
    assert httpx.post(f"{srv.url}/sessions", content=create, headers=MSGPACK).status_code == 201
    results: list[httpx.Response] = []

    def worker(value: float) -> None:
        body = wire.pack({"gradients": {"w": np.full(4, value, np.float32)}, "base_iterations": 0})
        results.append(_push(srv.url, sid, body, ""))

    pushes = [threading.Thread(target=worker, args=(v,)) for v in (1.0, 3.0)]
    for t in pushes:
        t.start()
    for t in pushes:
        t.join(60)
    assert [r.status_code for r in results] == [200, 200], [r.text for r in results]
    answers = [unpackb(r.content) for r in results]
    assert answers[0] == answers[1] and answers[0]["iterations"] == 1
    # SGD lr 0.01 of the mean gradient 2.0
    w = np.frombuffer(answers[0]["weights"]["w"]["data"], np.float32)
    np.testing.assert_array_equal(w, np.zeros(4, np.float32) - np.float32(0.01) * np.float32(2.0))
    assert _on_the_loop(threads) == [True, True]


def test_the_metrics_count_a_small_push_under_its_route(
    srv: ServerThread, threads: list[str]
) -> None:
    def pushes_counted() -> float:
        text = httpx.get(f"{srv.url}/metrics").text
        total = 0.0
        for line in text.splitlines():
            if line.startswith("paramserver_http_requests_total{") and (
                'route="/sessions/{session_id}/gradients"' in line and 'status="200"' in line
            ):
                total += float(line.rsplit(" ", 1)[1])
        return total

    sid = _session(srv.url)
    before = pushes_counted()
    for _ in range(3):
        assert _push(srv.url, sid, gradients_body(GRADS), "").status_code == 200
    assert pushes_counted() - before == 3
    assert _on_the_loop(threads) == [True] * 3


def _push_while_the_loop_answers(
    srv: ServerThread, threads: list[str], sid: str, headers: dict[str, str]
) -> tuple[threading.Thread, list[httpx.Response]]:
    """Start a push of GRADS to ``sid`` in a thread, let it reach the service (in a worker
    thread), then check that the loop is free meanwhile: another session's read answers and
    the push has not. Returns the thread and the list its answer will be put in."""
    answered: list[httpx.Response] = []
    pusher = threading.Thread(
        target=lambda: answered.append(_push(srv.url, sid, gradients_body(GRADS), "", headers))
    )
    pusher.start()
    for _ in range(200):  # the push reached the service (in a worker thread) or not yet
        if threads:
            break
        threading.Event().wait(0.01)
    other = _session(srv.url)
    assert httpx.get(f"{srv.url}/sessions/{other}", timeout=30).status_code == 200
    assert not answered
    return pusher, answered


def test_the_loop_keeps_serving_while_another_thread_holds_the_session(
    srv: ServerThread, threads: list[str]
) -> None:
    """A push of a session whose lock another thread holds (a data-plane connection, an
    export) waits in a worker thread: the loop answers other requests meanwhile."""
    sid = _session(srv.url)
    session = srv.app.state.service.store.get(sid)
    with session.lock:
        pusher, answered = _push_while_the_loop_answers(srv, threads, sid, {})
    pusher.join(60)
    assert [r.status_code for r in answered] == [200]
    assert _on_the_loop(threads) == [False]


def test_a_retry_meeting_a_digest_still_computed_waits_in_a_worker_thread(
    srv: ServerThread, threads: list[str]
) -> None:
    """A data-plane push's key is remembered before its digest (``DeferredDigest``, settled
    once its answer has left): an HTTP retry that meets the key meanwhile waits for the
    digest in a worker thread, not on the loop, and is answered as a replay."""
    sid = _session(srv.url)
    service = srv.app.state.service
    session = service.store.get(sid)
    later = DeferredDigest(GRADS)
    service.push_gradients(  # what the data plane does, its digest left unsettled
        session,
        GRADS,
        journal_body=lambda: gradients_body(GRADS),
        idempotency_key="k-later",
        answer=lambda trainer: trainer.iterations,
        remember=lambda value: None,
        digest_later=later,
    )
    assert service.idempotency.pending(sid, "k-later")
    retry, answered = _push_while_the_loop_answers(
        srv, threads, sid, {"Idempotency-Key": "k-later"}
    )
    later.settle()
    retry.join(60)
    assert [r.status_code for r in answered] == [200]
    assert answered[0].headers["idempotent-replayed"] == "true"
    assert not service.idempotency.pending(sid, "k-later")
    assert _iterations(srv.url, sid) == 1
    assert _on_the_loop(threads) == [False]


def test_tokens_are_checked_before_a_small_push() -> None:
    warm_kernels()
    server = start_server_thread(tokens=f"{RW}:rw,{RO}:ro")
    try:
        rw = {"Authorization": f"Bearer {RW}"}
        sid = new_id("fpt")
        r = httpx.post(
            f"{server.url}/sessions",
            content=create_body(sid, "adam", WEIGHTS),
            headers={**MSGPACK, **rw},
        )
        assert r.status_code == 201, r.text
        body = gradients_body(GRADS)
        assert _push(server.url, sid, body, "").status_code == 401
        ro = {"Authorization": f"Bearer {RO}"}
        assert _push(server.url, sid, body, "", ro).status_code == 403
        assert _push(server.url, sid, body, "", {"Authorization": "Bearer nope"}).status_code == 401
        assert _iterations(server.url, sid, rw) == 0
        assert _push(server.url, sid, body, "", rw).status_code == 200
        assert _iterations(server.url, sid, rw) == 1
    finally:
        server.stop()


# --- what goes to the route ------------------------------------------------------------------


class _Recorder:
    """The app below the middleware: records that it was called, answers 299."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls += 1
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def _scope(path: str, headers: list[tuple[bytes, bytes]], query: bytes = b"") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }


async def _call(app: Any, scope: dict[str, Any], body: bytes) -> int:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return int(sent[0]["status"])


def _headers(body: bytes, **extra: bytes) -> list[tuple[bytes, bytes]]:
    out = [(b"content-type", b"application/msgpack"), (b"content-length", str(len(body)).encode())]
    return out + [(k.replace("_", "-").encode(), v) for k, v in extra.items()]


ROUTED: dict[str, Callable[[str, bytes], tuple[str, list[tuple[bytes, bytes]], bytes]]] = {
    "another query string": lambda s, b: (s, _headers(b), b"return_weights=True"),
    "two query parameters": lambda s, b: (s, _headers(b), b"return_weights=true&x=1"),
    "JSON": lambda s, b: (
        s,
        [(b"content-type", b"application/json"), (b"content-length", str(len(b)).encode())],
        b"",
    ),
    "no Content-Type": lambda s, b: (s, [(b"content-length", str(len(b)).encode())], b""),
    "chunked": lambda s, b: (
        s,
        [(b"content-type", b"application/msgpack"), (b"transfer-encoding", b"chunked")],
        b"",
    ),
    "two Content-Lengths": lambda s, b: (
        s,
        _headers(b) + [(b"content-length", str(len(b)).encode())],
        b"",
    ),
    "a bad Idempotency-Key": lambda s, b: (s, _headers(b, idempotency_key=b"\x01bad"), b""),
    # the route reads the first Content-Type (JSON here: 415), so the route must answer
    "two Content-Types": lambda s, b: (
        s,
        [(b"content-type", b"application/json"), *_headers(b)],
        b"",
    ),
    "a body over 64 KiB": lambda s, b: (
        s,
        [(b"content-type", b"application/msgpack"), (b"content-length", b"70000")],
        b"",
    ),
    "an unknown session": lambda s, b: ("no-such-session", _headers(b), b""),
}


@pytest.fixture(scope="module")
def in_process() -> Iterator[tuple[Any, asyncio.AbstractEventLoop]]:
    warm_kernels()
    app = create_app(Settings(warm_up_kernels=False, data_plane_port=None))
    loop = asyncio.new_event_loop()
    lifespan = app.router.lifespan_context(app)
    loop.run_until_complete(lifespan.__aenter__())
    yield app, loop
    loop.run_until_complete(lifespan.__aexit__(None, None, None))
    loop.close()


def _create(app: Any, weights: dict[str, np.ndarray], optimizer: str = "adam") -> str:
    sid = new_id("fpi")
    app.state.service.create(create_body(sid, optimizer, weights), "msgpack")
    return sid


def test_a_plain_small_push_never_reaches_the_router(in_process: Any) -> None:
    app, loop = in_process
    recorder = _Recorder()
    middleware = fastpath.SmallPushes(recorder, fastapi=app)
    sid = _create(app, WEIGHTS)
    body = gradients_body(GRADS)
    path = f"/sessions/{sid}/gradients"
    for query in (b"", b"return_weights=true", b"return_weights=false"):
        assert loop.run_until_complete(_call(middleware, _scope(path, _headers(body), query), body))
    assert recorder.calls == 0
    assert app.state.service.store.get(sid).trainer.iterations == 3


@pytest.mark.parametrize("case", list(ROUTED))
def test_anything_but_the_plain_case_goes_to_the_route_untouched(
    in_process: Any, case: str
) -> None:
    app, loop = in_process
    recorder = _Recorder()
    middleware = fastpath.SmallPushes(recorder, fastapi=app)
    sid = _create(app, WEIGHTS)
    body = gradients_body(GRADS)
    target, headers, query = ROUTED[case](sid, body)
    scope = _scope(f"/sessions/{target}/gradients", headers, query)
    assert loop.run_until_complete(_call(middleware, scope, body)) == 299
    assert recorder.calls == 1
    assert app.state.service.store.get(sid).trainer.iterations == 0


def test_a_large_session_goes_to_the_route(in_process: Any) -> None:
    """Over 1 MiB of weights and slots: its step (a row push of a big table, say) runs in a
    worker thread, not on the loop."""
    app, loop = in_process
    recorder = _Recorder()
    middleware = fastpath.SmallPushes(recorder, fastapi=app)
    rows = fastpath.MAX_SESSION_BYTES // (3 * 4 * 8) + 1  # weights and Adam's two slots
    sid = _create(app, {"w": np.zeros((rows, 8), np.float32)})
    row = Rows(np.array([0], np.int64), np.ones((1, 8), np.float32)).with_shape((rows, 8))
    body = wire.pack({"gradients": {"w": row}})
    path = f"/sessions/{sid}/gradients"
    assert loop.run_until_complete(_call(middleware, _scope(path, _headers(body)), body)) == 299
    assert recorder.calls == 1


def test_with_a_journal_every_push_goes_to_the_route(tmp_path: Any) -> None:
    """A journal append and its fsync never run on the loop."""
    warm_kernels()
    app = create_app(
        Settings(warm_up_kernels=False, data_plane_port=None, snapshot_dir=str(tmp_path))
    )

    async def run() -> tuple[int, int]:
        async with app.router.lifespan_context(app):
            recorder = _Recorder()
            middleware = fastpath.SmallPushes(recorder, fastapi=app)
            sid = _create(app, WEIGHTS)
            body = gradients_body(GRADS)
            path = f"/sessions/{sid}/gradients"
            status = await _call(middleware, _scope(path, _headers(body)), body)
            return status, recorder.calls

    assert asyncio.run(run()) == (299, 1)


def test_until_every_kernel_is_loaded_pushes_go_to_the_route(
    in_process: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel compiled on first use takes seconds: never on the loop."""
    app, loop = in_process

    class Compiling:
        loaded = False

    monkeypatch.setattr(fastpath, "default_backend", lambda: Compiling())
    recorder = _Recorder()
    middleware = fastpath.SmallPushes(recorder, fastapi=app)
    sid = _create(app, WEIGHTS)
    body = gradients_body(GRADS)
    path = f"/sessions/{sid}/gradients"
    assert loop.run_until_complete(_call(middleware, _scope(path, _headers(body)), body)) == 299
    assert recorder.calls == 1


def test_a_session_made_large_while_its_body_arrives_steps_in_a_worker_thread(
    in_process: Any,
) -> None:
    """A state put between the push's headers and its body replaces the small session's
    trainer with a large one: the step then runs off the loop."""
    app, loop = in_process
    service = app.state.service
    sid = _create(app, {"w": np.zeros((4, 8), np.float32)})
    rows = fastpath.MAX_SESSION_BYTES // (3 * 4 * 8) + 1
    big = new_id("fpb")
    service.create(create_body(big, "adam", {"w": np.zeros((rows, 8), np.float32)}), "msgpack")
    state = service.state(service.store.get(big))
    row = Rows(np.array([1], np.int64), np.ones((1, 8), np.float32)).with_shape((rows, 8))
    body = wire.pack({"gradients": {"w": row}})
    seen: list[str] = []
    original = service.push

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(threading.current_thread().name)
        return original(*args, **kwargs)

    async def receive() -> dict[str, Any]:
        service.load_state(sid, state)  # while the body "arrives"
        return {"type": "http.request", "body": body, "more_body": False}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    middleware = fastpath.SmallPushes(_Recorder(), fastapi=app)
    scope = _scope(f"/sessions/{sid}/gradients", _headers(body), b"return_weights=false")
    service.push = spy
    try:
        loop.run_until_complete(middleware(scope, receive, send))
    finally:
        del service.push
    assert sent[0]["status"] == 200, sent
    assert service.store.get(sid).trainer.nbytes() > fastpath.MAX_SESSION_BYTES
    assert len(seen) == 1 and seen[0] != threading.current_thread().name


# --- the body's read on the loop -----------------------------------------------------------


def _read_on_the_loop(
    parts: list[bytes], *, hang: bool = False, timeout: float = 120.0, declared: int | None = None
) -> tuple[list[dict[str, Any]], int, int]:
    """A push whose body comes in ``parts`` (then, with ``hang``, nothing more) through the
    middleware of an app with ``request_timeout_seconds=timeout``: what it sent, the calls
    that reached the route and the session's iterations after it."""
    warm_kernels()
    app = create_app(
        Settings(warm_up_kernels=False, data_plane_port=None, request_timeout_seconds=timeout)
    )
    loop = asyncio.new_event_loop()
    lifespan = app.router.lifespan_context(app)
    loop.run_until_complete(lifespan.__aenter__())
    try:
        sid = _create(app, WEIGHTS)
        size = sum(map(len, parts)) if declared is None else declared
        headers = [(b"content-type", b"application/msgpack"), (b"content-length", b"%d" % size)]
        pending = list(parts)

        async def receive() -> dict[str, Any]:
            if pending:
                part = pending.pop(0)
                return {"type": "http.request", "body": part, "more_body": bool(pending) or hang}
            await asyncio.sleep(3600)  # the rest never comes
            raise AssertionError("the body's timeout did not fire")

        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        recorder = _Recorder()
        middleware = fastpath.SmallPushes(recorder, fastapi=app)
        scope = _scope(f"/sessions/{sid}/gradients", headers)
        loop.run_until_complete(asyncio.wait_for(middleware(scope, receive, send), 30))
        return sent, recorder.calls, app.state.service.store.get(sid).trainer.iterations
    finally:
        loop.run_until_complete(lifespan.__aexit__(None, None, None))
        loop.close()


def _error_of(sent: list[dict[str, Any]]) -> tuple[int, str, dict[bytes, bytes]]:
    body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    return int(sent[0]["status"]), body["error"]["code"], dict(sent[0]["headers"])


def test_a_body_in_several_parts_is_stepped_on_the_loop() -> None:
    body = gradients_body(GRADS)
    sent, routed, iterations = _read_on_the_loop([body[:3], body[3:20], body[20:]])
    assert sent[0]["status"] == 200 and routed == 0 and iterations == 1
    assert unpackb(sent[1]["body"])["iterations"] == 1


def test_a_body_that_stops_coming_gets_408_on_the_loop_and_changes_nothing() -> None:
    body = gradients_body(GRADS)
    sent, routed, iterations = _read_on_the_loop([body[:5]], hang=True, timeout=0.2)
    status, code, headers = _error_of(sent)
    assert (status, code, routed, iterations) == (408, "request_timeout", 0, 0)
    assert headers[b"connection"] == b"close"


@pytest.mark.parametrize(
    ("declared", "message"), [(-3, "longer than its Content-Length"), (+3, "shorter")]
)
def test_a_body_unlike_its_content_length_gets_400_on_the_loop(declared: int, message: str) -> None:
    body = gradients_body(GRADS)
    sent, routed, iterations = _read_on_the_loop([body], declared=len(body) + declared)
    status, code, _ = _error_of(sent)
    assert (status, code, routed, iterations) == (400, "bad_request", 0, 0)
    assert message in b"".join(m.get("body", b"") for m in sent[1:]).decode()
