"""Snapshots: bit-exact round trips, refused damaged files, keep-last-N, the directory lock,
``POST /sessions/{id}/snapshot`` and the final snapshot on SIGTERM.

Most tests drive :class:`paramserver.server.service.SessionService` with a :class:`Durability`
directly (no HTTP); the lock and SIGTERM tests run ``python -m paramserver serve`` as a child
process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from paramserver.server.errors import ServiceUnavailable
from paramserver.server.persistence import CorruptSnapshot, DirectoryLock, DirectoryLocked
from paramserver.server.persistence.snapshots import decode_snapshot, encode_snapshot

from paramserver import wire
from tests.harness.http_api import HTTP, MSGPACK, create_session, get_state, push, session_ids
from tests.harness.servers import ServerProcess, start_paramserver
from tests.harness.service import DurableService, opened_services

OPTIMIZERS: list[Any] = [
    "sgd",
    {"class_name": "SGD", "config": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "decay": 0.01}},
    {"class_name": "RMSprop", "config": {"decay": 0.001}},
    "adagrad",
    "adadelta",
    "adam",
    {"class_name": "Adam", "config": {"amsgrad": True, "decay": 0.001}},
    "adamax",
    "nadam",
]
OPTIMIZER_IDS = ["sgd", "sgd-nesterov", "rmsprop", "adagrad", "adadelta", "adam", "amsgrad",
                 "adamax", "nadam"]  # fmt: skip

RNG = np.random.default_rng(20240611)


def weights_of(dtypes: tuple[str, ...] = ("float32", "float32")) -> dict[str, np.ndarray]:
    shapes = [(3, 4), (5,), (2, 2, 2)]
    return {f"p{i}": RNG.standard_normal(shapes[i]).astype(dt) for i, dt in enumerate(dtypes)}


def grads_like(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: RNG.standard_normal(w.shape).astype(w.dtype) for n, w in weights.items()}


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., DurableService]]:
    with opened_services(tmp_path) as make:
        yield make


def snapshot_files(directory: Path, suffix: str = ".snapshot") -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.endswith(suffix))


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=OPTIMIZER_IDS)
def test_round_trip_is_bit_exact_and_continues_identically(
    servers: Callable[..., DurableService], optimizer: Any
) -> None:
    first = servers()
    weights = weights_of(("float32", "float32", "float64"))
    first.create("s", optimizer, weights)
    for _ in range(4):
        first.push("s", grads_like(weights))
    first.close()  # the final snapshot
    before = first.state("s")

    second = servers()
    assert second.state("s") == before
    for _ in range(3):  # the same gradients on the saved session and on the restored one
        grads = grads_like(weights)
        assert first.push("s", grads)[0] == second.push("s", grads)[0]
    assert second.state("s") == first.state("s")


@pytest.mark.parametrize("dtypes", [("float16", "float64"), ("float32",), ("float64",)])
def test_nadam_m_schedule_survives_in_every_compute_dtype(
    servers: Callable[..., DurableService], dtypes: tuple[str, ...]
) -> None:
    first = servers()
    weights = weights_of(dtypes)
    first.create("n", "nadam", weights)
    for _ in range(5):
        first.push("n", grads_like(weights))
    first.close()
    saved = wire.unpack(first.state("n"))
    assert saved["scalars"]["m_schedule"] != 1.0

    second = servers()
    assert second.state("n") == first.state("n")
    grads = grads_like(weights)
    assert first.push("n", grads)[0] == second.push("n", grads)[0]


def test_snapshot_holds_the_state_and_the_header(servers: Callable[..., DurableService]) -> None:
    server = servers()
    weights = weights_of()
    server.create("h", "adam", weights)
    server.push("h", grads_like(weights), key="key-1")
    info = server.snapshot("h")
    assert info["session_id"] == "h" and info["iterations"] == 1 and info["file"]
    header, body = decode_snapshot(server.settings.snapshot_dir.joinpath(info["file"]).read_bytes())  # type: ignore[union-attr]
    assert bytes(body) == server.state("h")
    assert header["session_id"] == "h" and header["iterations"] == 1 and header["format"] == 1
    assert [k[:2] for k in header["idempotency"]] == [["key-1", 1]]


def test_idempotency_keys_survive_a_restart(servers: Callable[..., DurableService]) -> None:
    first = servers()
    weights = weights_of()
    first.create("k", "sgd", weights)
    grads = grads_like(weights)
    first.push("k", grads, key="once")
    first.close()
    second = servers()
    answer, replayed = second.push("k", grads, key="once")
    assert replayed and answer == {"iterations": 1}
    assert second.push("k", grads, key="twice")[0]["iterations"] == 2


# --- damaged files -------------------------------------------------------------------------


def test_every_truncation_and_bit_flip_of_a_snapshot_file_is_refused() -> None:
    body = wire.pack({"weights": {"w": np.arange(6, dtype=np.float32)}, "iterations": 3})
    data = b"".join(encode_snapshot({"format": 1, "session_id": "x", "lsn": 0}, body))
    header, decoded = decode_snapshot(data)
    assert header["session_id"] == "x" and bytes(decoded) == body
    for cut in range(len(data)):
        with pytest.raises(CorruptSnapshot, match="truncated|magic|lengths"):
            decode_snapshot(data[:cut])
    for offset in range(len(data)):
        for bit in (0, 5):
            flipped = bytearray(data)
            flipped[offset] ^= 1 << bit
            with pytest.raises(CorruptSnapshot):
                decode_snapshot(bytes(flipped))
    with pytest.raises(CorruptSnapshot, match="trailing bytes"):
        decode_snapshot(data + b"\0")


def _truncate(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def _flip(path: Path, fraction: float) -> None:
    data = bytearray(path.read_bytes())
    data[min(int(len(data) * fraction), len(data) - 1)] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGE = {
    "empty": lambda p: p.write_bytes(b""),
    "truncated-in-header": lambda p: _truncate(p, 0.05),
    "truncated-in-body": lambda p: _truncate(p, 0.5),
    "last-byte-missing": lambda p: p.write_bytes(p.read_bytes()[:-1]),
    "bit-flip-in-magic": lambda p: _flip(p, 0.0),
    "bit-flip-in-header": lambda p: _flip(p, 0.1),
    "bit-flip-in-body": lambda p: _flip(p, 0.7),
    "bit-flip-in-checksum": lambda p: _flip(p, 1.0),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_damaged_newest_snapshot_is_refused_and_the_previous_one_used(
    servers: Callable[..., DurableService],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[Path], None],
) -> None:
    first = servers()
    weights = weights_of()
    first.create("d", "adam", weights)  # snapshot 1: iteration 0
    for _ in range(3):
        first.push("d", grads_like(weights))
    first.snapshot("d")  # snapshot 2: iteration 3
    good = first.state("d")
    first.push("d", grads_like(weights))
    first.close()  # snapshot 3: iteration 4
    newest = snapshot_files(tmp_path / "snapshots")[-1]
    damage(newest)

    with caplog.at_level(logging.WARNING, logger="paramserver.persistence"):
        second = servers()
    assert second.state("d") == good
    refused = [r.getMessage() for r in caplog.records if "refusing snapshot" in r.getMessage()]
    assert len(refused) == 1 and str(newest) in refused[0], caplog.text
    assert "using the previous one" in refused[0]
    assert newest.with_name(newest.name + ".corrupt").exists() and not newest.exists()


def test_session_without_any_valid_snapshot_is_reported_and_skipped(
    servers: Callable[..., DurableService], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = servers(snapshot_keep=1)
    first.create("bad", "sgd", weights_of())
    first.create("fine", "sgd", weights_of())
    first.close()
    for path in snapshot_files(tmp_path / "snapshots"):
        if path.name.startswith("bad."):
            _flip(path, 0.5)
    with caplog.at_level(logging.WARNING, logger="paramserver.persistence"):
        second = servers()
    assert [s.id for s in second.service.store.list()] == ["fine"]
    assert "session 'bad': none of its 1 snapshot(s) could be loaded" in caplog.text


def test_leftover_temporary_files_are_removed(
    servers: Callable[..., DurableService], tmp_path: Path
) -> None:
    first = servers()
    first.create("t", "sgd", weights_of())
    first.close()
    leftover = tmp_path / "snapshots" / "t.0000000000000099.snapshot.tmp"
    leftover.write_bytes(b"half a snapshot")
    second = servers()
    assert not leftover.exists()
    assert [s.id for s in second.service.store.list()] == ["t"]


# --- keep-last-N, deletes ------------------------------------------------------------------


def test_only_the_last_n_snapshots_are_kept(
    servers: Callable[..., DurableService], tmp_path: Path
) -> None:
    server = servers(snapshot_keep=2)
    weights = weights_of()
    server.create("a", "adam", weights)
    server.create("b", "adam", weights)
    names = []
    for _ in range(5):
        server.push("a", grads_like(weights))
        names.append(server.snapshot("a")["file"])
    kept = [p.name for p in snapshot_files(tmp_path / "snapshots")]
    assert sorted(n for n in kept if n.startswith("a.")) == names[-2:]
    assert len([n for n in kept if n.startswith("b.")]) == 1


def test_deleting_a_session_deletes_its_snapshots(
    servers: Callable[..., DurableService], tmp_path: Path
) -> None:
    server = servers()
    server.create("gone", "sgd", weights_of())
    server.create("gone.too", "sgd", weights_of())  # a name that starts like the other
    server.snapshot("gone")
    server.service.delete("gone")
    names = [p.name for p in snapshot_files(tmp_path / "snapshots")]
    assert names and all(n.startswith("gone.too.") for n in names)
    server.close()
    assert [s.id for s in servers().service.store.list()] == ["gone.too"]


def test_unchanged_sessions_are_not_written_again(
    servers: Callable[..., DurableService], tmp_path: Path
) -> None:
    server = servers()
    weights = weights_of()
    server.create("busy", "sgd", weights)
    server.create("idle", "sgd", weights)
    server.push("busy", grads_like(weights))
    assert server.durability.snapshot_changed() == 1
    assert server.durability.snapshot_changed() == 0
    assert len(snapshot_files(tmp_path / "snapshots")) == 3


# --- the lock -----------------------------------------------------------------------------


def test_directory_lock_is_exclusive(tmp_path: Path) -> None:
    first = DirectoryLock(tmp_path)
    first.acquire()
    with pytest.raises(
        DirectoryLocked, match=f"in use by another paramserver \\(pid {os.getpid()}"
    ):
        DirectoryLock(tmp_path).acquire()
    first.release()
    again = DirectoryLock(tmp_path)
    again.acquire()
    again.release()


def test_second_server_on_the_same_directory_refuses_to_start(tmp_path: Path) -> None:
    directory = tmp_path / "shared"
    first = start_paramserver(tmp_path, "--snapshot-dir", str(directory))
    try:
        second = ServerProcess.paramserver(
            "--snapshot-dir", str(directory), log_dir=tmp_path, warm_up_kernels=False
        ).launch()
        code = second.wait_exit(timeout=60)
        assert code != 0, second.log
        assert f"cannot start: the snapshot directory {directory} is in use" in second.log
        assert f"pid {first.proc.pid}" in second.log
        assert HTTP.get(f"{first.url}/health").status_code == 200
    finally:
        assert first.terminate() == 0, first.log


# --- HTTP ----------------------------------------------------------------------------------


def test_snapshot_endpoint(server_factory: Callable[..., Any], tmp_path: Path) -> None:
    srv = server_factory(snapshot_dir=tmp_path / "snaps", snapshot_interval_seconds=3600)
    weights = {"w": np.arange(4, dtype=np.float32)}
    create_session(srv.url, "adam", weights, session_id="e")
    assert push(srv.url, "e", {"w": np.ones(4, np.float32)}).status_code == 200
    r = HTTP.post(f"{srv.url}/sessions/e/snapshot")
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["session_id"] == "e" and info["iterations"] == 1 and info["lsn"] == 0
    assert (tmp_path / "snaps" / info["file"]).is_file()
    missing = HTTP.post(f"{srv.url}/sessions/nope/snapshot")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "session_not_found"

    plain = server_factory()
    create_session(plain.url, "adam", weights, session_id="e")
    r = HTTP.post(f"{plain.url}/sessions/e/snapshot")
    assert r.status_code == 409 and r.json()["error"]["code"] == "snapshots_disabled"


def test_delete_endpoint_removes_snapshots(
    server_factory: Callable[..., Any], tmp_path: Path
) -> None:
    srv = server_factory(snapshot_dir=tmp_path / "snaps")
    create_session(srv.url, "sgd", {"w": np.zeros(2, np.float32)}, session_id="x")
    assert snapshot_files(tmp_path / "snaps")
    assert HTTP.delete(f"{srv.url}/sessions/x").status_code == 204
    assert not snapshot_files(tmp_path / "snaps")
    assert HTTP.delete(f"{srv.url}/sessions/x").status_code == 404


def test_sigterm_writes_final_snapshots_that_a_restart_loads(tmp_path: Path) -> None:
    directory = tmp_path / "snaps"
    args = ("--snapshot-dir", str(directory), "--snapshot-interval-seconds", "3600")
    server = start_paramserver(tmp_path, *args)
    states = {}
    try:
        for index, optimizer in enumerate(OPTIMIZERS):
            sid = f"s{index}"
            weights = weights_of()
            create_session(server.url, optimizer, weights, session_id=sid)
            for _ in range(index + 1):
                r = push(server.url, sid, grads_like(weights))
                assert r.status_code == 200, r.text
            states[sid] = get_state(server.url, sid)
        r = HTTP.put(f"{server.url}/sessions/loaded/state", content=states["s3"], headers=MSGPACK)
        assert r.status_code == 201, r.text
        states["loaded"] = states["s3"]
    finally:
        code = server.terminate()
    assert code == 0, server.log
    # The nine pushed sessions; the one created by PUT was saved then and has not changed.
    assert "final snapshots written: 9 session(s)" in server.log, server.log

    restarted = start_paramserver(tmp_path, *args)
    try:
        assert session_ids(restarted.url) == sorted(states)
        for sid, saved in states.items():
            assert get_state(restarted.url, sid) == saved, sid
    finally:
        assert restarted.terminate() == 0, restarted.log


def test_a_create_that_cannot_be_saved_is_undone(
    servers: Callable[..., DurableService], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = servers()

    def disk_full(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(server.durability.snapshots, "_write_file", disk_full)
    with pytest.raises(ServiceUnavailable, match="No space left on device") as raised:
        server.create("lost", "sgd", weights_of())
    assert raised.value.code == "snapshot_failed"
    assert server.service.store.find("lost") is None
