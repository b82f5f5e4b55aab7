"""Observability against real servers on loopback: /metrics (read with prometheus-client's own
parser) moves with pushes and forgets deleted sessions; the points workers report; /stats;
tokens on the read endpoints; JSON logs with request ids."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from paramserver import messages
from paramserver.client import Client, InvalidRequest, Sync
from tests.harness.http_api import MSGPACK
from tests.harness.servers import ServerThread, start_paramserver, start_server_thread

W = {"w": np.zeros(4, np.float32)}
G = {"w": np.ones(4, np.float32)}


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerThread]:
    server = start_server_thread()
    yield server
    server.stop()


def samples(url: str, **headers: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    r = httpx.get(f"{url}/metrics", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(found: dict, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def test_metrics_move_with_pushes_and_leave_with_the_session(srv: ServerThread) -> None:
    with Client(srv.url) as client:
        s = client.create_session(W, "adam", "metrics-a")
        for _ in range(3):
            s.push(G)
        key = "k-1"
        s.push(G, idempotency_key=key)
        s.push(G, idempotency_key=key)  # a replay
        s.pull()
    found = samples(srv.url)
    labels = {"session": "metrics-a", "optimizer": "Adam"}
    assert value(found, "paramserver_session_pushes_total", **labels) == 4
    assert value(found, "paramserver_session_idempotent_replays_total", **labels) == 1
    assert value(found, "paramserver_session_iterations", **labels) == 4
    assert value(found, "paramserver_session_received_bytes_total", **labels) == 5 * 16
    assert value(found, "paramserver_session_sent_bytes_total", **labels) >= 5 * 16
    assert value(found, "paramserver_session_push_duration_seconds_count", **labels) == 4
    assert (
        value(found, "paramserver_session_push_duration_seconds_bucket", le="+Inf", **labels) == 4
    )
    assert value(found, "paramserver_sessions") >= 1
    assert value(found, "paramserver_session_held_bytes", **labels) > 0
    # requests by the route's template, never the raw path; errors by code
    httpx.get(f"{srv.url}/sessions/no-such", timeout=30)
    found = samples(srv.url)
    assert (
        value(
            found,
            "paramserver_http_requests_total",
            route="/sessions/{session_id}",
            method="GET",
            status="404",
        )
        >= 1
    )
    assert not any("no-such" in str(labels) for _, labels in found)
    assert value(found, "paramserver_errors_total", code="session_not_found") >= 1
    with Client(srv.url) as client:
        client.session("metrics-a").delete()
    found = samples(srv.url)
    assert not any(("session", "metrics-a") in labels for _, labels in found)


def test_stale_refusals_and_sync_rounds_are_counted(srv: ServerThread) -> None:
    with Client(srv.url) as client:
        s = client.create_session(W, "sgd", "metrics-stale", max_staleness=0)
        s.push(G)
        with pytest.raises(Exception, match="stale"):
            s.push(G, base_iterations=0)
        r = client.create_session(W, "sgd", "metrics-sync", training=Sync(replicas_to_aggregate=2))
        other = client.session("metrics-sync")
        other.pull()
        t = threading.Thread(target=lambda: other.push(G, metrics={"loss": 2.0}))
        t.start()
        r.push({"w": G["w"] * 3}, metrics={"loss": 1.0})
        t.join(30)
    found = samples(srv.url)
    stale = {"session": "metrics-stale", "optimizer": "SGD"}
    sync = {"session": "metrics-sync", "optimizer": "SGD"}
    assert value(found, "paramserver_session_stale_refusals_total", **stale) == 1
    assert value(found, "paramserver_session_round_duration_seconds_count", **sync) == 1
    assert value(found, "paramserver_session_pushes_total", **sync) == 2
    points = httpx.get(f"{srv.url}/sessions/metrics-sync/metrics", timeout=30).json()["points"]
    assert sorted(p["value"] for p in points) == [1.0, 2.0]
    assert {p["iterations"] for p in points} == {1}  # the round's iteration


def test_points_are_recorded_once_per_applied_push(srv: ServerThread) -> None:
    with Client(srv.url) as client:
        s = client.create_session(W, "sgd", "points")
        for i in range(5):
            s.push(G, metrics={"loss": 1.0 / (i + 1), "accuracy": i / 10})
        s.push(G, metrics={"loss": 9.0}, idempotency_key="again")
        s.push(G, metrics={"loss": 9.0}, idempotency_key="again")  # replay: no point
        for bad in (
            {"loss": math.nan},
            {"loss": "0.3"},
            {f"m{i}": 1.0 for i in range(17)},
            {"x" * 65: 1.0},
        ):
            with pytest.raises((InvalidRequest, ValueError)):
                s.push(G, metrics=bad)
        assert s.info().iterations == 6
    with Client(srv.url, data_plane=False) as over_http:  # the same over HTTP
        over_http.session("points").push(G, metrics={"loss": 0.25})
    for bad in ({"loss": True}, [1.0], {"": 1.0}, {"loss": float("inf")}):
        body = messages.wire.pack({"gradients": G, "metrics": bad})
        r = httpx.post(f"{srv.url}/sessions/points/gradients", content=body, headers=MSGPACK)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_metrics", r.text
    answer = httpx.get(f"{srv.url}/sessions/points/metrics", timeout=30).json()
    assert answer["names"] == ["loss", "accuracy"]
    losses = [p for p in answer["points"] if p["name"] == "loss"]
    assert [p["iterations"] for p in losses] == [1, 2, 3, 4, 5, 6, 7]
    assert [p["value"] for p in losses][:2] == [1.0, 0.5] and losses[-2]["value"] == 9.0
    assert losses[-1]["value"] == 0.25
    assert httpx.get(f"{srv.url}/sessions/points", timeout=30).json()["iterations"] == 7
    only = httpx.get(
        f"{srv.url}/sessions/points/metrics",
        params={"name": "loss", "since_iterations": 4, "limit": 1},
        timeout=30,
    ).json()["points"]
    assert [(p["name"], p["iterations"]) for p in only] == [("loss", 7)]
    state = messages.decode_state(
        httpx.get(f"{srv.url}/sessions/points/state", timeout=30).content,
        messages.ANSWER_LIMITS,
    )
    assert state.iterations == 7  # the state carries no points
    assert httpx.get(f"{srv.url}/sessions/none/metrics", timeout=30).status_code == 404


def test_the_ring_keeps_the_last_points_within_the_sessions_memory(
    server_factory: Any,
) -> None:
    srv = server_factory(max_session_bytes=64 * 1024)
    with Client(srv.url) as client:
        s = client.create_session(W, "sgd", "ring")
        before = httpx.get(f"{srv.url}/stats", timeout=30).json()["sessions"][0]["held_bytes"]
        for i in range(200):
            s.push(G, metrics={f"m{j}": float(i) for j in range(16)}, return_weights=False)
    points = httpx.get(f"{srv.url}/sessions/ring/metrics", timeout=30).json()["points"]
    stats = httpx.get(f"{srv.url}/stats", timeout=30).json()["sessions"][0]
    # 64 KiB less the weights and the names table's room leaves about 1,260 points of 26 bytes
    assert 1000 < len(points) < 3200
    assert points[-1]["iterations"] == 200 and points[0]["iterations"] > 1  # the newest kept
    assert before < stats["held_bytes"] <= 64 * 1024


def test_stats_describe_the_last_minute(srv: ServerThread) -> None:
    with Client(srv.url) as client:
        s = client.create_session(W, "rmsprop", "stats")
        for _ in range(10):
            s.push(G)
    stats = httpx.get(f"{srv.url}/stats", timeout=30).json()
    mine = next(x for x in stats["sessions"] if x["session_id"] == "stats")
    assert mine["optimizer"] == "RMSprop" and mine["iterations"] == 10
    assert mine["pushes"] == 10 and mine["bytes_in"] == 160 and mine["bytes_out"] >= 160
    assert mine["steps_per_second"] > 0
    assert 0 < mine["push_seconds_p50"] <= mine["push_seconds_p99"] < 10
    assert 0 <= mine["last_push_age_seconds"] < 60
    assert stats["server"]["sessions"] == len(stats["sessions"])


def test_tokens_guard_the_read_endpoints_but_not_the_dashboard(server_factory: Any) -> None:
    srv = server_factory(tokens="writer:rw,reader:ro")
    for path in ("/metrics", "/stats", "/sessions/x/metrics"):
        assert httpx.get(f"{srv.url}{path}", timeout=30).status_code == 401, path
    ro = {"Authorization": "Bearer reader"}
    assert httpx.get(f"{srv.url}/metrics", headers=ro, timeout=30).status_code == 200
    assert httpx.get(f"{srv.url}/stats", headers=ro, timeout=30).status_code == 200
    public = server_factory(tokens="writer:rw", metrics_public=True)
    assert httpx.get(f"{public.url}/metrics", timeout=30).status_code == 200
    assert httpx.get(f"{public.url}/stats", timeout=30).status_code == 401
    r = httpx.get(f"{srv.url}/dashboard", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert httpx.get(f"{srv.url}/dashboard/dashboard.js", timeout=30).status_code == 200
    assert httpx.get(f"{srv.url}/dashboard/secret.txt", timeout=30).status_code == 404
    assert httpx.get(f"{srv.url}/dashboard/..%2Fmain.py", timeout=30).status_code == 404


def test_journal_fsyncs_and_snapshots_are_timed(tmp_path: Path, server_factory: Any) -> None:
    srv = server_factory(snapshot_dir=tmp_path / "data", durability="journal")
    with Client(srv.url) as client:
        s = client.create_session(W, "sgd", "durable")
        s.push(G)
    assert value(samples(srv.url), "paramserver_last_snapshot_timestamp_seconds") == 0
    assert httpx.post(f"{srv.url}/sessions/durable/snapshot", timeout=30).status_code == 200
    found = samples(srv.url)
    assert value(found, "paramserver_journal_fsync_duration_seconds_count") >= 2
    assert value(found, "paramserver_snapshot_duration_seconds_count") >= 1
    assert time.time() - value(found, "paramserver_last_snapshot_timestamp_seconds") < 60


def test_json_logs_carry_the_request(tmp_path: Path) -> None:
    srv = start_paramserver(tmp_path, log_format="json")
    try:
        with Client(srv.url) as client:
            client.create_session(W, "sgd", "logged").push(G)
        r = httpx.get(f"{srv.url}/sessions/logged", headers={"X-Request-ID": "req-42"}, timeout=30)
        assert r.headers["x-request-id"] == "req-42"
        bad = httpx.get(f"{srv.url}/health", headers={"X-Request-ID": "<bad id>"}, timeout=30)
        assert bad.headers["x-request-id"] != "<bad id>" and len(bad.headers["x-request-id"]) == 32
        deadline = time.monotonic() + 10
        while "req-42" not in srv.log and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        srv.stop()
    lines = [json.loads(line) for line in srv.log.splitlines() if line.startswith("{")]
    assert lines and all({"time", "level", "message"} <= set(x) for x in lines)
    mine = next(x for x in lines if x.get("request_id") == "req-42")
    assert mine["method"] == "GET" and mine["path"] == "/sessions/logged"
    assert mine["status"] == 200 and mine["session_id"] == "logged"
    assert mine["duration_ms"] >= 0 and mine["bytes"] > 0
    assert not [line for line in srv.log.splitlines() if line.strip() and not line.startswith("{")]


def test_the_first_points_of_a_session_may_arrive_from_many_threads_at_once() -> None:
    """The ring allocates its arrays under its lock, before its capacity says they exist
    (found in review: threads racing on the first points raised IndexError after the push was
    applied)."""
    import sys

    from paramserver.server.observability import WorkerPoints

    errors: list[BaseException] = []
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(200):
            ring = WorkerPoints()

            def add(i: int, ring: WorkerPoints = ring) -> None:
                try:
                    ring.add({"loss": float(i + 1)}, i + 1, budget=None)
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=add, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            values = sorted(p["value"] for p in ring.points(limit=None))
            assert values == [1.0, 2.0, 3.0, 4.0]
    finally:
        sys.setswitchinterval(old)
    assert not errors
