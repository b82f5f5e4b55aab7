"""Sync sessions of a real server process across SIGKILL and restarts.

With the journal, a round is one record (its mean gradient and its pushes' Idempotency-Keys),
committed before any push of it is answered: after SIGKILL the restarted server holds every
answered round bit for bit, still in sync mode, and a retried key of a round replays. Pushes
waiting in a round that never filled were never answered and are not there. With snapshots
only, the training mode survives in the snapshot (format 4).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import numpy as np

from paramserver import messages
from paramserver.server.persistence import JournalReader
from tests.harness.http_api import MSGPACK, get_state
from tests.harness.servers import ServerProcess, start_paramserver

RNG = np.random.default_rng(11)
SYNC = {"mode": "sync", "replicas_to_aggregate": 3, "total_num_replicas": 4}


def create(url: str, session_id: str) -> None:
    body = messages.wire.pack(
        {
            "session_id": session_id,
            "optimizer": messages.optimizers.get("adam").to_dict(),
            "weights": {"w": np.linspace(-1, 1, 5, dtype=np.float32)},
            "training": SYNC,
        }
    )
    r = httpx.post(f"{url}/sessions", content=body, headers=MSGPACK, timeout=30)
    assert r.status_code == 201, r.text


def push(url: str, sid: str, grads: dict[str, np.ndarray], base: int, key: str) -> httpx.Response:
    return httpx.post(
        f"{url}/sessions/{sid}/gradients",
        content=messages.encode_push(grads, base),
        headers={**MSGPACK, "Idempotency-Key": key},
        timeout=60,
    )


def a_round(url: str, sid: str, base: int) -> list[httpx.Response]:
    answers: dict[int, httpx.Response] = {}
    grads = [{"w": RNG.standard_normal(5).astype(np.float32)} for _ in range(3)]

    def worker(i: int) -> None:
        answers[i] = push(url, sid, grads[i], base, key=f"{sid}-{base}-{i}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return [answers[i] for i in range(3)]


def server(tmp_path: Path, durability: str) -> ServerProcess:
    return start_paramserver(
        tmp_path,
        "--snapshot-dir",
        str(tmp_path / "data"),
        "--durability",
        durability,
        "--snapshot-interval-seconds",
        "3600",
    )


def test_answered_rounds_survive_sigkill_as_one_journal_record_each(tmp_path: Path) -> None:
    srv = server(tmp_path, "journal")
    try:
        create(srv.url, "s")
        last = []
        for base in range(4):
            last = a_round(srv.url, "s", base)
            assert all(r.status_code == 200 for r in last), last[0].text
        saved = get_state(srv.url, "s")

        # a round that never fills: its pushes are never answered, so never acknowledged
        def never_answered() -> None:
            try:
                push(srv.url, "s", {"w": np.ones(5, np.float32)}, 4, "never")
            except httpx.TransportError:
                pass  # the server is killed while it waits

        pending = threading.Thread(target=never_answered, daemon=True)
        pending.start()
        for _ in range(200):
            summary = httpx.get(f"{srv.url}/sessions/s", timeout=30).json()
            if summary["round"]["received"] == 1:
                break
        assert summary["round"]["received"] == 1
    finally:
        srv.kill()
    records = list(JournalReader(tmp_path / "data" / "journal").records())
    ops = [r.op for r in records]
    assert ops == ["create", "round", "round", "round", "round"]
    assert [len(r.keys) for r in records[1:]] == [3, 3, 3, 3]
    assert [r.iterations for r in records[1:]] == [1, 2, 3, 4]

    restarted = server(tmp_path, "journal")
    try:
        assert get_state(restarted.url, "s") == saved
        summary = httpx.get(f"{restarted.url}/sessions/s", timeout=30).json()
        assert summary["training"] == {**SYNC, "round_timeout_seconds": 600.0}
        assert summary["iterations"] == 4 and summary["round"]["received"] == 0
        # the keys of the rounds came back with their pushes' digests: a key reused with
        # other gradients is refused (a retry with the same ones replays: the next test)
        retry = push(restarted.url, "s", {"w": np.zeros(5, np.float32)}, 3, key="s-3-0")
        assert retry.status_code == 422, retry.text
        assert retry.json()["error"]["code"] == "idempotency_key_reused"
        # and the session goes on in rounds
        answers = a_round(restarted.url, "s", 4)
        assert all(r.status_code == 200 for r in answers)
        assert messages.decode_weights(answers[0].content)[0] == 5
    finally:
        restarted.stop()


def test_a_retried_key_of_a_journaled_round_replays_after_a_restart(tmp_path: Path) -> None:
    srv = server(tmp_path, "journal")
    grads = [{"w": np.full(5, k, np.float32)} for k in (1.0, 2.0, 3.0)]
    try:
        create(srv.url, "r")
        answers: dict[int, httpx.Response] = {}

        def worker(i: int) -> None:
            answers[i] = push(srv.url, "r", grads[i], 0, key=f"key-{i}")

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(a.status_code == 200 for a in answers.values())
    finally:
        srv.kill()
    restarted = server(tmp_path, "journal")
    try:
        for i in range(3):
            retry = push(restarted.url, "r", grads[i], 0, key=f"key-{i}")
            assert retry.status_code == 200, retry.text
            assert retry.headers["idempotent-replayed"] == "true"
            assert messages.decode_weights(retry.content)[0] == 1
        assert httpx.get(f"{restarted.url}/sessions/r", timeout=30).json()["iterations"] == 1
    finally:
        restarted.stop()


def test_a_snapshot_keeps_the_training_mode(tmp_path: Path) -> None:
    srv = server(tmp_path, "snapshot")
    try:
        create(srv.url, "t")
        assert all(r.status_code == 200 for r in a_round(srv.url, "t", 0))
        r = httpx.post(f"{srv.url}/sessions/t/snapshot", timeout=30)
        assert r.status_code == 200, r.text
        saved = get_state(srv.url, "t")
    finally:
        srv.stop()
    snapshot = sorted((tmp_path / "data").glob("t.*.snapshot"))[-1]
    assert int.from_bytes(snapshot.read_bytes()[8:12], "big") == 5  # SNAPSHOT_FORMAT
    restarted = server(tmp_path, "snapshot")
    try:
        assert get_state(restarted.url, "t") == saved
        summary = httpx.get(f"{restarted.url}/sessions/t", timeout=30).json()
        assert summary["training"]["mode"] == "sync" and summary["iterations"] == 1
        assert all(r.status_code == 200 for r in a_round(restarted.url, "t", 1))
    finally:
        restarted.stop()


def test_sigterm_answers_the_pushes_waiting_in_a_round_and_exits(tmp_path: Path) -> None:
    """A graceful stop does not wait out the round: a push waiting over HTTP and one over the
    data plane are answered 503 (nothing applied; their keys are not remembered, so a retry
    after the restart joins a new round) and the server exits cleanly, before uvicorn's
    graceful-shutdown timeout (30 s) would have cut them off."""
    from paramserver.client import Client, ServiceUnavailable

    srv = server(tmp_path, "journal")
    outcomes: dict[str, object] = {}
    try:
        create(srv.url, "w")

        def http_push() -> None:
            outcomes["http"] = push(srv.url, "w", {"w": np.ones(5, np.float32)}, 0, "h")

        def plane_push() -> None:
            with Client(srv.url, retries=0) as client:
                handle = client.session("w")
                handle.pull()
                try:
                    handle.push({"w": np.ones(5, np.float32)}, idempotency_key="d")
                except ServiceUnavailable as exc:
                    outcomes["data plane"] = exc

        threads = [threading.Thread(target=f) for f in (http_push, plane_push)]
        for t in threads:
            t.start()
        for _ in range(400):
            if httpx.get(f"{srv.url}/sessions/w", timeout=30).json()["round"]["received"] == 2:
                break
            time.sleep(0.02)
        started = time.monotonic()
        assert srv.terminate() == 0, srv.log
        assert time.monotonic() - started < 25, srv.log
        for t in threads:
            t.join(30)
    finally:
        srv.stop()
    answer = outcomes["http"]
    assert isinstance(answer, httpx.Response) and answer.status_code == 503
    assert answer.json()["error"]["code"] == "service_unavailable"
    assert isinstance(outcomes["data plane"], ServiceUnavailable)
    restarted = server(tmp_path, "journal")
    try:
        summary = httpx.get(f"{restarted.url}/sessions/w", timeout=30).json()
        assert summary["iterations"] == 0 and summary["training"]["mode"] == "sync"
    finally:
        restarted.stop()
