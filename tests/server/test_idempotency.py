"""Idempotent pushes over real HTTP: a repeated ``Idempotency-Key`` applies once.

The last test is the one that matters in production: workers whose connections drop after
the request was sent (so they cannot know whether the step was applied) retry with the same
key until they get an answer, through a TCP proxy that drops connections at random; in the
end the session has taken exactly one step per key.
"""

from __future__ import annotations

import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest

from paramserver import wire
from tests.harness import http_api
from tests.harness.http_api import REPLAYED, create_session, new_id
from tests.harness.models import zeros
from tests.harness.servers import ServerThread

LR = 0.5
SGD = {"class_name": "SGD", "config": {"lr": LR}}


def create(url: str, session_id: str, size: int = 4) -> None:
    """An SGD session of one float64 parameter ``w`` of zeros."""
    create_session(url, SGD, zeros(size, np.float64), session_id=session_id)


def push(
    http: httpx.Client,
    url: str,
    session_id: str,
    key: str | bytes | None,
    value: float = 1.0,
    *,
    size: int = 4,
    return_weights: bool = True,
) -> httpx.Response:
    """Push a gradient of ``value``s through ``http``, with ``key`` unless it is None."""
    grads = {"w": np.full(size, value, np.float64)}
    return http_api.push(url, session_id, grads, key=key, return_weights=return_weights, via=http)


def pulled(url: str, session_id: str) -> tuple[int, np.ndarray]:
    iterations, weights = http_api.pull(url, session_id)
    return iterations, weights["w"].copy()


# --- one key, one step ----------------------------------------------------------------------


def test_same_key_twice_applies_once_and_replays_the_body(
    base_url: str, http: httpx.Client
) -> None:
    sid = new_id()
    create(base_url, sid)
    first = push(http, base_url, sid, "key-1", 1.0)
    assert first.status_code == 200, first.text
    assert REPLAYED not in first.headers
    second = push(http, base_url, sid, "key-1", 1.0)
    assert second.status_code == 200, second.text
    assert second.headers[REPLAYED] == "true"
    assert second.content == first.content
    assert second.headers["content-type"] == first.headers["content-type"]
    iterations, w = pulled(base_url, sid)
    assert iterations == 1
    np.testing.assert_array_equal(w, np.full(4, -LR))


def test_the_same_key_with_other_gradients_is_refused_and_applies_nothing(
    base_url: str, http: httpx.Client
) -> None:
    """A key names one push: the same key with other gradients is a client bug, not a
    retry. It is refused (422 ``idempotency_key_reused``) instead of answered with the first
    push's result, and the session does not move."""
    sid = new_id()
    create(base_url, sid)
    first = push(http, base_url, sid, "key-1", 1.0)
    assert first.status_code == 200
    second = push(http, base_url, sid, "key-1", 8.0)
    assert second.status_code == 422, second.text
    error = second.json()["error"]
    assert error["code"] == "idempotency_key_reused"
    assert "'key-1'" in error["message"] and "step 1" in error["message"]
    assert pulled(base_url, sid)[0] == 1
    again = push(http, base_url, sid, "key-1", 1.0)  # the real retry still replays
    assert again.headers[REPLAYED] == "true" and again.content == first.content


def test_a_retry_matches_its_key_whatever_the_framing_or_options(
    base_url: str, http: httpx.Client
) -> None:
    """The digest is of the decoded push, not of its bytes: a retry whose msgpack is framed
    differently (map order, bin width) or that asks for no weights still replays."""
    sid = new_id()
    create(base_url, sid)
    data = np.ones(4, np.float64).tobytes()
    compact = msgpack.packb({"gradients": {"w": {"dtype": "float64", "shape": [4], "data": data}}})
    reordered = msgpack.packb(
        {"gradients": {"w": {"data": data, "shape": [4], "dtype": "float64"}}}
    )
    bin8 = b"\xc4\x20" + data
    assert reordered.count(bin8) == 1
    reordered = reordered.replace(bin8, b"\xc6\x00\x00\x00\x20" + data)  # as bin 32
    assert compact != reordered
    url = f"{base_url}/sessions/{sid}/gradients"
    headers = {"content-type": "application/msgpack", "idempotency-key": "framed"}
    first = http.post(url, content=compact, headers=headers)
    assert first.status_code == 200, first.text
    second = http.post(url, content=reordered, headers=headers, params={"return_weights": "false"})
    assert second.status_code == 200, second.text
    assert second.headers[REPLAYED] == "true"
    assert pulled(base_url, sid)[0] == 1


def test_a_key_reused_for_a_push_of_another_shape_or_dtype_is_refused(
    base_url: str, http: httpx.Client
) -> None:
    sid = new_id()
    create_session(base_url, SGD, {"w": np.zeros(4, np.float32)}, session_id=sid)
    url = f"{base_url}/sessions/{sid}/gradients"
    headers = {"content-type": "application/msgpack", "idempotency-key": "k"}
    zeros4 = bytes(16)

    def body(dtype: str, shape: list[int]) -> bytes:
        return msgpack.packb({"gradients": {"w": {"dtype": dtype, "shape": shape, "data": zeros4}}})

    assert http.post(url, content=body("float32", [4]), headers=headers).status_code == 200
    for dtype, shape in (("float32", [2, 2]), ("float64", [2]), ("float16", [8])):
        answer = http.post(url, content=body(dtype, shape), headers=headers)
        assert answer.status_code == 422
        assert answer.json()["error"]["code"] == "idempotency_key_reused"


def test_different_keys_apply_two_steps(base_url: str, http: httpx.Client) -> None:
    sid = new_id()
    create(base_url, sid)
    a = push(http, base_url, sid, "key-a", 1.0)
    b = push(http, base_url, sid, "key-b", 2.0)
    assert REPLAYED not in a.headers and REPLAYED not in b.headers
    assert wire.unpack(a.content)["iterations"] == 1
    assert wire.unpack(b.content)["iterations"] == 2
    iterations, w = pulled(base_url, sid)
    assert iterations == 2
    np.testing.assert_array_equal(w, np.full(4, -LR * 3.0))


def test_no_key_applies_every_time(base_url: str, http: httpx.Client) -> None:
    sid = new_id()
    create(base_url, sid)
    for _ in range(3):
        r = push(http, base_url, sid, None)
        assert REPLAYED not in r.headers
    assert pulled(base_url, sid)[0] == 3


def test_the_same_key_on_another_session_is_independent(base_url: str, http: httpx.Client) -> None:
    one, two = new_id(), new_id()
    create(base_url, one)
    create(base_url, two)
    r1 = push(http, base_url, one, "shared-key", 1.0)
    r2 = push(http, base_url, two, "shared-key", 2.0)
    assert REPLAYED not in r1.headers and REPLAYED not in r2.headers
    assert pulled(base_url, one)[0] == 1
    assert pulled(base_url, two)[0] == 1
    np.testing.assert_array_equal(pulled(base_url, two)[1], np.full(4, -LR * 2.0))
    assert push(http, base_url, one, "shared-key").content == r1.content
    assert push(http, base_url, two, "shared-key", 2.0).content == r2.content


def test_racing_pushes_with_one_key_apply_once(base_url: str, http: httpx.Client) -> None:
    sid = new_id()
    create(base_url, sid)
    barrier = threading.Barrier(8)
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(timeout=30) as own:
            barrier.wait()
            r = push(own, base_url, sid, "racing-key")
        with lock:
            answers.append(r)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(answers) == 8
    assert all(r.status_code == 200 for r in answers)
    assert sum(REPLAYED not in r.headers for r in answers) == 1
    assert len({r.content for r in answers}) == 1
    assert pulled(base_url, sid)[0] == 1


def test_a_refused_push_does_not_use_up_its_key(base_url: str, http: httpx.Client) -> None:
    sid = new_id()
    create(base_url, sid)
    bad = push(http, base_url, sid, "key-1", size=5)  # wrong shape: 422
    assert bad.status_code == 422, bad.text
    good = push(http, base_url, sid, "key-1")
    assert good.status_code == 200
    assert REPLAYED not in good.headers
    assert pulled(base_url, sid)[0] == 1


@pytest.mark.parametrize(
    "key",
    ["", "k" * 256, b"caf\xc3\xa9", b"\xa0", b"tab\tinside"],
    ids=["empty", "256-chars", "non-ascii", "latin-1", "tab"],
)
def test_invalid_key_is_refused_and_applies_nothing(
    base_url: str, http: httpx.Client, key: str | bytes
) -> None:
    sid = new_id()
    create(base_url, sid)
    r = push(http, base_url, sid, key)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_idempotency_key"
    assert pulled(base_url, sid)[0] == 0


def test_the_longest_and_oddest_valid_keys(base_url: str, http: httpx.Client) -> None:
    sid = new_id()
    create(base_url, sid)
    for key in ("k" * 255, "a b ~!@#$%^&*()", str(uuid.uuid4())):
        assert REPLAYED not in push(http, base_url, sid, key).headers
        assert push(http, base_url, sid, key).headers[REPLAYED] == "true"
    assert pulled(base_url, sid)[0] == 3


# --- how long and how many keys are remembered ----------------------------------------------


def test_a_key_is_forgotten_after_the_window(
    server_factory: Callable[..., ServerThread], http: httpx.Client
) -> None:
    url = server_factory(idempotency_window_seconds=0.3).url
    sid = new_id()
    create(url, sid)
    push(http, url, sid, "key-1")
    assert push(http, url, sid, "key-1").headers[REPLAYED] == "true"
    time.sleep(0.5)
    again = push(http, url, sid, "key-1")
    assert REPLAYED not in again.headers
    assert wire.unpack(again.content)["iterations"] == 2


def test_a_zero_window_remembers_nothing(
    server_factory: Callable[..., ServerThread], http: httpx.Client
) -> None:
    url = server_factory(idempotency_window_seconds=0).url
    sid = new_id()
    create(url, sid)
    push(http, url, sid, "key-1")
    assert REPLAYED not in push(http, url, sid, "key-1").headers
    assert pulled(url, sid)[0] == 2


def test_keys_are_forgotten_when_the_session_is_deleted(base_url: str, http: httpx.Client) -> None:
    sid = new_id()
    create(base_url, sid)
    push(http, base_url, sid, "key-1")
    push(http, base_url, sid, "key-2")
    assert http.delete(f"{base_url}/sessions/{sid}").status_code == 204
    create(base_url, sid)  # a new session under the old id
    r = push(http, base_url, sid, "key-1")
    assert r.status_code == 200
    assert REPLAYED not in r.headers
    assert wire.unpack(r.content)["iterations"] == 1


def test_a_session_at_its_key_bound_refuses_new_keys_and_evicts_none(
    server_factory: Callable[..., ServerThread], http: httpx.Client
) -> None:
    url = server_factory(idempotency_max_keys=10, idempotency_max_keys_per_session=3).url
    a, b = new_id(), new_id()
    create(url, a)
    create(url, b)
    assert push(http, url, b, "b1").status_code == 200
    first = {key: push(http, url, a, key).content for key in ("k1", "k2", "k3")}
    refused = push(http, url, a, "k4")
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "too_many_idempotency_keys"
    assert int(refused.headers["retry-after"]) >= 1
    assert pulled(url, a)[0] == 3  # the refused push was not applied
    for key in ("k1", "k2", "k3"):  # no live key was forgotten: retries replay
        r = push(http, url, a, key)
        assert r.headers[REPLAYED] == "true" and r.content == first[key]
    again = push(http, url, b, "b1")  # nor another session's
    assert again.headers[REPLAYED] == "true"
    assert push(http, url, b, "b2").status_code == 200  # which has room of its own
    assert push(http, url, a, None).status_code == 200  # and pushes without a key go on
    assert pulled(url, a)[0] == 4


def test_the_server_wide_key_bound_refuses_rather_than_evicts(
    server_factory: Callable[..., ServerThread], http: httpx.Client
) -> None:
    url = server_factory(idempotency_max_keys=3, idempotency_max_keys_per_session=3).url
    a, b = new_id(), new_id()
    create(url, a)
    create(url, b)
    for key in ("k1", "k2", "k3"):
        assert push(http, url, a, key).status_code == 200
    r = push(http, url, b, "b1")
    assert r.status_code == 503 and r.json()["error"]["code"] == "too_many_idempotency_keys"
    assert push(http, url, a, "k1").headers[REPLAYED] == "true"


def test_keys_make_room_when_their_window_ends(
    server_factory: Callable[..., ServerThread], http: httpx.Client
) -> None:
    url = server_factory(idempotency_window_seconds=0.5, idempotency_max_keys_per_session=1).url
    sid = new_id()
    create(url, sid)
    assert push(http, url, sid, "k1").status_code == 200
    assert push(http, url, sid, "k2").status_code == 503
    time.sleep(0.6)  # past k1's window
    assert push(http, url, sid, "k2").status_code == 200
    assert pulled(url, sid)[0] == 2


def test_the_bytes_of_remembered_answers_are_bounded(
    server_factory: Callable[..., ServerThread], http: httpx.Client
) -> None:
    """Past idempotency_max_bytes the oldest answers shrink to {iterations}, still replayed."""
    size = 64  # 512 bytes of float64 weights per answer
    url = server_factory(idempotency_max_bytes=1200).url
    sid = new_id()
    create(url, sid, size=size)
    first = {key: push(http, url, sid, key, size=size).content for key in ("k1", "k2", "k3")}
    assert all(len(body) > 512 for body in first.values())
    shrunk = push(http, url, sid, "k1", size=size)
    assert shrunk.headers[REPLAYED] == "true"
    assert wire.unpack(shrunk.content) == {"iterations": 1}
    for key in ("k2", "k3"):
        kept = push(http, url, sid, key, size=size)
        assert kept.headers[REPLAYED] == "true"
        assert kept.content == first[key]
    assert pulled(url, sid)[0] == 3


def test_an_answer_larger_than_the_bound_is_replayed_as_iterations(
    server_factory: Callable[..., ServerThread], http: httpx.Client
) -> None:
    url = server_factory(idempotency_max_bytes=16).url
    sid = new_id()
    create(url, sid)
    push(http, url, sid, "k1")
    push(http, url, sid, "k2")
    r = push(http, url, sid, "k1")
    assert r.headers[REPLAYED] == "true"
    assert wire.unpack(r.content) == {"iterations": 1}
    assert pulled(url, sid)[0] == 2


# --- retries through a connection that drops ------------------------------------------------


@dataclass
class DroppingProxy:
    """A TCP proxy on loopback that drops a random subset of connections.

    Each connection carries one request (the clients send ``Connection: close``). A connection
    is, at random, dropped *before* the request reaches the server (the server never sees it),
    dropped *after* (the server applied the push, the client never hears of it: the case
    idempotency keys exist for), or forwarded both ways.
    """

    target: tuple[str, int]
    drop_before: float
    drop_after: float
    seed: int
    counts: dict[str, int] = field(default_factory=lambda: {"before": 0, "after": 0, "ok": 0})

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def close(self) -> None:
        self._stopping.set()
        self._acceptor.join(timeout=10)
        for t in self._threads:
            t.join(timeout=10)
        self._listener.close()

    def _fate(self) -> str:
        with self._lock:
            x = self._rng.random()
            fate = (
                "before"
                if x < self.drop_before
                else "after"
                if x < self.drop_before + self.drop_after
                else "ok"
            )
            self.counts[fate] += 1
            return fate

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    @staticmethod
    def _shutdown(*socks: socket.socket) -> None:
        """Wake any thread blocked on these sockets; close them only once it has let go.

        (Closing a socket another thread is about to poll frees its descriptor for the next
        connection, which that thread would then wait on.)
        """
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass

    def _serve(self, client: socket.socket) -> None:
        fate = self._fate()
        client.settimeout(30)
        if fate == "before":
            try:
                client.recv(65536)  # take (some of) the request, never forward it
            except OSError:
                pass
            self._shutdown(client)
            client.close()
            return
        upstream = socket.create_connection(self.target, timeout=30)
        uploader = threading.Thread(target=self._pump, args=(client, upstream), daemon=True)
        uploader.start()
        try:
            first = upstream.recv(65536)  # the server answers only after it applied the push
            if fate == "after" or not first:
                return
            client.sendall(first)
            self._pump(upstream, client)
        except OSError:
            pass
        finally:
            self._shutdown(client, upstream)
            uploader.join(timeout=30)
            client.close()
            upstream.close()


@pytest.fixture
def dropping_proxy() -> Iterator[Callable[..., DroppingProxy]]:
    made: list[DroppingProxy] = []

    def make(url: str, **kwargs: Any) -> DroppingProxy:
        host, port = url.removeprefix("http://").split(":")
        proxy = DroppingProxy((host, int(port)), **kwargs)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()


def test_retries_after_dropped_connections_apply_each_key_once(
    base_url: str, http: httpx.Client, dropping_proxy: Callable[..., DroppingProxy]
) -> None:
    workers, per_worker, size = 8, 25, 16
    sid = new_id()
    create(base_url, sid, size=size)
    proxy = dropping_proxy(base_url, drop_before=0.15, drop_after=0.25, seed=20240508)
    answers: dict[str, tuple[int, bool]] = {}  # key -> (iterations answered, was a replay)
    retries: list[int] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def gradient(worker: int, j: int) -> float:
        return float(worker * per_worker + j + 1)

    def worker(i: int) -> None:
        tries = 0
        try:
            with httpx.Client(timeout=30, headers={"Connection": "close"}) as own:
                for j in range(per_worker):
                    key = f"worker-{i}-push-{j}"
                    for _attempt in range(100):
                        try:
                            r = push(own, proxy.url, sid, key, gradient(i, j), size=size)
                        except httpx.TransportError:
                            tries += 1
                            continue
                        assert r.status_code == 200, r.text
                        message = wire.unpack(r.content)
                        with lock:
                            answers[key] = (message["iterations"], REPLAYED in r.headers)
                        break
                    else:
                        raise AssertionError(f"{key}: no answer after 100 attempts")
        except BaseException as exc:  # reported by the main thread
            with lock:
                failures.append(exc)
        with lock:
            retries.append(tries)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures
    total = workers * per_worker
    assert len(answers) == total
    print(f"proxy fates: {proxy.counts}; retries per worker: {retries}")
    assert proxy.counts["before"] > 0 and proxy.counts["after"] > 0, proxy.counts

    iterations, w = pulled(base_url, sid)
    assert iterations == total
    # Every key was answered with the iteration of its one step: all distinct, 1..total.
    assert sorted(it for it, _ in answers.values()) == list(range(1, total + 1))
    # A retry after a drop past the server got the replay; the others were fresh steps.
    replays = sum(replayed for _, replayed in answers.values())
    assert 0 < replays <= proxy.counts["after"]
    expected = -LR * sum(gradient(i, j) for i in range(workers) for j in range(per_worker))
    np.testing.assert_array_equal(w, np.full(size, expected))
