"""The benchmarks run: each module in a tiny configuration, through ``python -m benchmarks.run``.

These tests prove that the code works (servers start and stop, every row has its keys and
sensible values, the JSON document is written). They never judge a timing or a ratio: the
figures of a tiny run on a shared machine mean nothing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest

# ``benchmarks`` is a package at the repository's root, not an installed one. The root is on the
# path: ``tests`` is a package too, and pytest puts the directory above it first.
from benchmarks import run as bench_run

TINY = bench_run.Plan(
    kernel_sizes=(1000,),
    kernel_repeats=1,
    push_sizes=(1000, 20_000),
    push_samples=3,
    push_rounds=1,
    push_quick=True,
    concurrency_workers=2,
    concurrency_parameters=1000,
    concurrency_seconds=0.2,
    concurrency_rounds=1,
    throughput_connections=2,
    throughput_client_processes=2,
    throughput_seconds=0.2,
    throughput_rounds=1,
    throughput_latency_samples=5,
    memory_sessions=2,
    memory_parameters=1000,
    memory_peak_parameters=20_000,
    memory_pushes=1,
    training_workers=2,
    training_parameters=1000,
    training_seconds=0.2,
    training_rounds=1,
    shards_counts=(1, 2),
    shards_workers=(1, 2),
    shards_receives=("new", "out"),
    shards_parameters=20_000,
    shards_seconds=0.2,
    shards_rounds=1,
    sparse_rows=2000,
    sparse_width=8,
    sparse_fractions=(0.01, 0.1),
    sparse_step_repeats=1,
    sparse_push_samples=2,
    sparse_dense_samples=1,
    sparse_push_rounds=1,
)


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One tiny run of every benchmark through the command line, and its JSON document."""
    path = tmp_path_factory.mktemp("bench") / "out.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(bench_run.PLANS, "quick", TINY)
        assert bench_run.main(["--quick", "--details", "--json", str(path)]) == 0
    yield json.loads(path.read_text())


def _positive(row: dict[str, Any], *keys: str) -> None:
    for key in keys:
        value = row[key]
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)
        assert math.isfinite(value) and value > 0, (key, value)


def _number(row: dict[str, Any], *keys: str) -> None:
    for key in keys:
        value = row[key]
        assert isinstance(value, (int, float)) and math.isfinite(value), (key, value)


def test_document_describes_the_run(document: dict[str, Any]) -> None:
    assert document["quick"] is True
    assert document["command"].startswith("python -m benchmarks.run")
    assert set(document["results"]) == {
        "kernels",
        "push",
        "concurrency",
        "throughput",
        "memory",
        "training_modes",
        "shards",
        "sparse",
    }
    machine = document["machine"]
    assert machine["nproc"] >= 1
    assert machine["cpu_model"]
    assert machine["python"]
    assert machine["versions"]["numpy"] and machine["versions"]["numba"]
    assert len(machine["loadavg"]) == 3
    _positive(document, "duration_seconds")


def test_goal_table_has_every_benchmark(document: dict[str, Any]) -> None:
    goals = document["goals"]
    assert {g["benchmark"] for g in goals} == {
        "kernels",
        "push",
        "concurrency",
        "throughput",
        "memory",
        "training_modes",
        "shards",
        "sparse",
    }
    for g in goals:
        assert set(g) == {"benchmark", "figure", "ours", "reference", "ratio", "goal", "verdict"}
        assert g["verdict"] in {"met", "NOT met", "-"}
        if g["ratio"] is not None:
            _number(g, "ratio")
    text = bench_run.format_goals(goals)
    assert "verdict" in text.splitlines()[0]


def test_kernels_rows(document: dict[str, Any]) -> None:
    rows = document["results"]["kernels"]
    optimizers = [r for r in rows if r["optimizer"] != "sum_squares"]
    assert {r["elements"] for r in rows} == {1000}
    assert len(optimizers) == len({r["optimizer"] for r in optimizers}) >= 1
    for row in optimizers:
        _positive(row, "numba_ns", "step_ns", "numpy_ns", "floor_ns", "floor_ratio")


def test_push_rows(document: dict[str, Any]) -> None:
    rows = document["results"]["push"]
    assert [r["parameters"] for r in rows] == [1000, 20_000]
    for row in rows:
        assert row["samples"] == 3
        _positive(row, "request_bytes", "response_bytes")
        for method in ("echo", "uvicorn", "raw", "frames", "client", "client_out", "http_client"):
            _positive(row, f"{method}_p50_ms", f"{method}_p99_ms", f"{method}_min_ms")
            assert row[f"{method}_min_ms"] <= row[f"{method}_p50_ms"] <= row[f"{method}_p99_ms"]
            # CPU time of 3 pushes can read 0 at /proc's tick resolution, never less
            assert row[f"{method}_server_cpu_ms"] >= 0 and row[f"{method}_worker_cpu_ms"] >= 0
        _positive(row, "client_vs_echo_p50", "client_vs_echo_p99", "raw_vs_echo_p50")
        _positive(row, "http_client_vs_raw_p50", "client_vs_frames_p50", "raw_vs_uvicorn_p50")
        assert row["client_transport"] == "data plane"
        assert isinstance(row["server_libraries"], list)


def test_concurrency_rows(document: dict[str, Any]) -> None:
    rows = document["results"]["concurrency"]
    assert [(r["mode"], r["transport"]) for r in rows] == [
        ("data_plane", "data plane"),
        ("http", "http"),
    ]
    for row in rows:
        assert row["workers"] == 2 and row["parameters"] == 1000
        _positive(row, "ours_bytes_per_s", "echo_bytes_per_s", "ratio", "request_bytes")
        assert (
            len(row["ours_rounds_pushes_per_s"]) == len(row["echo_rounds_round_trips_per_s"]) == 1
        )


def test_throughput_rows(document: dict[str, Any]) -> None:
    rows = document["results"]["throughput"]
    rates = [r for r in rows if r["figure"] == "rate"]
    assert [(r["sessions"], r["load"]) for r in rates] == [
        (mode, load)
        for mode in ("shared", "per_connection")
        for load in ("raw_http", "frames", "client")
    ]
    for row in rates:
        assert row["connections"] == 2
        assert row["transport"] == ("http" if row["load"] == "raw_http" else "data plane")
        _positive(row, "ours_per_s", "echo_per_s", "ratio", "request_bytes")
        assert len(row["ours_rounds_per_s"]) == len(row["echo_rounds_per_s"]) == 1
        assert row["ours_failed"] == 0 and row["echo_failed"] == 0
    (latency,) = [r for r in rows if r["figure"] == "latency"]
    assert latency["connections"] == 1 and latency["transport"] == "data plane"
    for method in ("echo", "client", "frames", "raw_http", "http_client"):
        _positive(latency, f"{method}_p50_us", f"{method}_p99_us")
    _positive(latency, "ratio")


def test_memory_rows(document: dict[str, Any]) -> None:
    assert [(r["figure"], r.get("transport")) for r in document["results"]["memory"]] == [
        ("session_rss", None),
        ("idempotency_rss", "http"),
        ("idempotency_rss", "data plane"),
        ("push_peak", "http"),
        ("push_peak", "data plane"),
    ]
    rows = {r["figure"]: r for r in document["results"]["memory"]}  # the data plane's rows
    session = rows["session_rss"]
    _positive(session, "weights_bytes", "slots_bytes", "session_bytes", "baseline_rss")
    _positive(session, "rss_after")
    assert session["weights_bytes"] == 4 * 1000  # one float32 parameter of 1000 elements
    _number(session, "rss_per_session", "ratio")  # RSS deltas this small can be <= 0
    _number(rows["idempotency_rss"], "rss_per_push")
    peak = rows["push_peak"]
    _positive(peak, "request_bytes", "response_bytes")
    _number(peak, "extra_peak_bytes", "extra_peak_max_bytes", "rss_growth_bytes", "ratio")
    assert peak["peak_method"]


def test_unknown_benchmark_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench_run.main(["--only", "kernels,nope"])
    assert exc.value.code == 2
    assert "nope" in capsys.readouterr().err


def test_training_modes_rows(document: dict[str, Any]) -> None:
    rows = {r["mode"]: r for r in document["results"]["training_modes"]}
    assert set(rows) == {"sync", "async"}
    for row in rows.values():
        assert row["workers"] == 2 and row["parameters"] == 1000
        _positive(row, "steps_per_s", "gradients_per_s")
    assert rows["sync"]["gradients_per_s"] == pytest.approx(2 * rows["sync"]["steps_per_s"])
    _positive(rows["sync"], "sync_vs_async_gradients")


def test_shards_rows(document: dict[str, Any]) -> None:
    rows = document["results"]["shards"]
    assert [(r["way"], r["receive"], r["workers"]) for r in rows] == [
        (way, receive, workers)
        for workers in (1, 2)
        for receive in ("new", "out")
        for way in ("plain", "S=1", "S=2")
    ]
    for row in rows:
        assert row["transport"] == "data plane"
        assert row["tensors"] == 7 and 15_000 < row["parameters"] < 25_000
        assert len(row["bytes_per_shard"]) == row["shards"]
        assert sum(row["bytes_per_shard"]) == row["push_bytes"] == 4 * row["parameters"]
        _positive(row, "pushes_per_s", "p50_ms", "p99_ms", "vs_one_shard", "vs_plain")
        assert row["min_ms"] <= row["p50_ms"] <= row["p99_ms"]
        assert row["server_cpu_per_push_ms"] >= 0 and row["worker_cpu_per_push_ms"] >= 0
        assert row["server_faults_per_push"] >= 0 and row["worker_faults_per_push"] >= 0
    one = [r for r in rows if r["way"] == "S=1"]
    assert all(r["vs_one_shard"] == 1.0 for r in one)
    assert {g["figure"] for g in document["goals"] if g["benchmark"] == "shards"} == {
        f"{w} worker{'s' if w > 1 else ''} pushing 2e+04{out} into {what} (pushes/s, reported)"
        for w in (1, 2)
        for out in ("", " with out=")
        for what in ("2 shards vs 1 shard", "1 shard, sharded client vs plain Client")
    }


def test_sparse_rows(document: dict[str, Any]) -> None:
    rows = document["results"]["sparse"]
    steps = [r for r in rows if r["figure"] == "step"]
    pushes = [r for r in rows if r["figure"] == "push"]
    assert [r["fraction"] for r in steps] == [0.01, 0.1]
    for row in steps:
        assert row["rows"] == 2000 and row["width"] == 8
        assert 0 < row["unique_rows"] <= row["pushed_rows"]
        _positive(row, "dense_ms", "exact_ms", "lazy_ms", "prepare_ms", "prepare_body_ms")
        _positive(row, "touched_share", "exact_vs_dense", "lazy_vs_share")
        _positive(row, "rows_floor_ms", "rows_floor_vs_share", "lazy_vs_rows_floor")
    assert [(r["method"], r["fraction"]) for r in pushes] == [
        ("dense", None),
        ("exact", 0.01),
        ("lazy", 0.01),
        ("exact", 0.1),
        ("lazy", 0.1),
    ]
    assert [r["transport"] for r in pushes] == ["data plane"] + ["http"] * 4
    for row in pushes:
        assert row["samples"] == (1 if row["method"] == "dense" else 2)
        _positive(row, "up_bytes", "down_bytes", "p50_ms", "p99_ms", "min_ms")
        # the answer's encoded size is what the server counted as sent
        assert row["down_bytes_counted"] == pytest.approx(row["down_bytes"], rel=0.01)
    for row in pushes[1:]:
        assert row["up_bytes"] < pushes[0]["up_bytes"]
        assert row["down_bytes"] < pushes[0]["down_bytes"]
    goals = [g for g in document["goals"] if g["benchmark"] == "sparse"]
    assert len(goals) == 3 * len(steps) + 3 * (len(pushes) - 1)
    assert any(g["goal"] == ">= 50" for g in goals)
