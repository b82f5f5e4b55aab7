"""Snapshots: bit-exact round trips, refused damaged files, keep-last-N, deletes and
``POST /sessions/{id}/snapshot``.

Most tests drive :class:`paramserver.server.service.SessionService` with a :class:`Durability`
directly (no HTTP), restarted on the same directory. The final snapshots of a real server on
SIGTERM, and two servers on one directory: ``tests/system/test_snapshots_across_restarts.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from paramserver import wire
from paramserver.server.errors import ServiceUnavailable
from paramserver.server.persistence import CorruptSnapshot, RecoveryError
from paramserver.server.persistence.snapshots import decode_snapshot, encode_snapshot
from tests.harness.http_api import HTTP, create_session, push
from tests.harness.service import DurableService

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


def snapshot_files(directory: Path, suffix: str = ".snapshot") -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.endswith(suffix))


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=OPTIMIZER_IDS)
def test_round_trip_is_bit_exact_and_continues_identically(
    durable_services: Callable[..., DurableService], optimizer: Any
) -> None:
    first = durable_services()
    weights = weights_of(("float32", "float32", "float64"))
    first.create("s", optimizer, weights)
    for _ in range(4):
        first.push("s", grads_like(weights))
    first.close()  # the final snapshot
    before = first.state("s")

    second = durable_services()
    assert second.state("s") == before
    for _ in range(3):  # the same gradients on the saved session and on the restored one
        grads = grads_like(weights)
        assert first.push("s", grads)[0] == second.push("s", grads)[0]
    assert second.state("s") == first.state("s")


@pytest.mark.parametrize("dtypes", [("float16", "float64"), ("float32",), ("float64",)])
def test_nadam_m_schedule_survives_in_every_compute_dtype(
    durable_services: Callable[..., DurableService], dtypes: tuple[str, ...]
) -> None:
    first = durable_services()
    weights = weights_of(dtypes)
    first.create("n", "nadam", weights)
    for _ in range(5):
        first.push("n", grads_like(weights))
    first.close()
    saved = wire.unpack(first.state("n"))
    assert saved["scalars"]["m_schedule"] != 1.0

    second = durable_services()
    assert second.state("n") == first.state("n")
    grads = grads_like(weights)
    assert first.push("n", grads)[0] == second.push("n", grads)[0]


def test_snapshot_holds_the_state_and_the_header(
    durable_services: Callable[..., DurableService],
) -> None:
    server = durable_services()
    weights = weights_of()
    server.create("h", "adam", weights)
    server.push("h", grads_like(weights), key="key-1")
    info = server.snapshot("h")
    assert info["session_id"] == "h" and info["iterations"] == 1 and info["file"]
    header, body = decode_snapshot(server.settings.snapshot_dir.joinpath(info["file"]).read_bytes())  # type: ignore[union-attr]
    assert bytes(body) == server.state("h")
    assert header["session_id"] == "h" and header["iterations"] == 1 and header["format"] == 5
    assert [k[:2] for k in header["idempotency"]] == [["key-1", 1]]


def test_idempotency_keys_survive_a_restart(
    durable_services: Callable[..., DurableService],
) -> None:
    first = durable_services()
    weights = weights_of()
    first.create("k", "sgd", weights)
    grads = grads_like(weights)
    first.push("k", grads, key="once")
    first.close()
    second = durable_services()
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
def test_damaged_newest_snapshot_stops_the_start_up_unless_fallback_is_asked_for(
    durable_services: Callable[..., DurableService],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[Path], None],
) -> None:
    first = durable_services()
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

    # By default the server refuses to start: coming back older would lose acknowledged pushes.
    with pytest.raises(RecoveryError, match="--snapshot-fallback") as refused_start:
        durable_services()
    assert str(newest) in str(refused_start.value)
    aside = newest.with_name(newest.name + ".corrupt")
    assert aside.exists() and not newest.exists()
    # The operator asks for the previous snapshot: loaded, and said at ERROR.
    aside.rename(newest)
    with caplog.at_level(logging.WARNING, logger="paramserver.persistence"):
        second = durable_services(snapshot_fallback=True)
    assert second.state("d") == good
    refused = [r for r in caplog.records if "refusing snapshot" in r.getMessage()]
    assert len(refused) == 1 and str(newest) in refused[0].getMessage(), caplog.text
    assert refused[0].levelno == logging.ERROR
    assert "using the previous one" in refused[0].getMessage()
    assert aside.exists() and not newest.exists()


def test_session_without_any_valid_snapshot_stops_the_start_up_or_is_skipped_on_request(
    durable_services: Callable[..., DurableService],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = durable_services(snapshot_keep=1)
    first.create("bad", "sgd", weights_of())
    first.create("fine", "sgd", weights_of())
    first.close()
    for path in snapshot_files(tmp_path / "snapshots"):
        if path.name.startswith("bad."):
            _flip(path, 0.5)
    with pytest.raises(RecoveryError, match="session 'bad'"):
        durable_services()
    for aside in (tmp_path / "snapshots").glob("bad.*.corrupt"):
        aside.rename(aside.with_suffix(""))  # as an operator would, to retry with the flag
    with caplog.at_level(logging.WARNING, logger="paramserver.persistence"):
        second = durable_services(snapshot_fallback=True)
    assert [s.id for s in second.service.store.list()] == ["fine"]
    assert "session 'bad': none of its 1 snapshot(s) could be loaded" in caplog.text


def test_leftover_temporary_files_are_removed(
    durable_services: Callable[..., DurableService], tmp_path: Path
) -> None:
    first = durable_services()
    first.create("t", "sgd", weights_of())
    first.close()
    leftover = tmp_path / "snapshots" / "t.0000000000000099.snapshot.tmp"
    leftover.write_bytes(b"half a snapshot")
    second = durable_services()
    assert not leftover.exists()
    assert [s.id for s in second.service.store.list()] == ["t"]


# --- keep-last-N, deletes ------------------------------------------------------------------


def test_only_the_last_n_snapshots_are_kept(
    durable_services: Callable[..., DurableService], tmp_path: Path
) -> None:
    server = durable_services(snapshot_keep=2)
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
    durable_services: Callable[..., DurableService], tmp_path: Path
) -> None:
    server = durable_services()
    server.create("gone", "sgd", weights_of())
    server.create("gone.too", "sgd", weights_of())  # a name that starts like the other
    server.snapshot("gone")
    server.service.delete("gone")
    names = [p.name for p in snapshot_files(tmp_path / "snapshots")]
    assert names and all(n.startswith("gone.too.") for n in names)
    server.close()
    assert [s.id for s in durable_services().service.store.list()] == ["gone.too"]


def test_unchanged_sessions_are_not_written_again(
    durable_services: Callable[..., DurableService], tmp_path: Path
) -> None:
    server = durable_services()
    weights = weights_of()
    server.create("busy", "sgd", weights)
    server.create("idle", "sgd", weights)
    server.push("busy", grads_like(weights))
    assert server.durability.snapshot_changed() == 1
    assert server.durability.snapshot_changed() == 0
    assert len(snapshot_files(tmp_path / "snapshots")) == 3


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


def test_a_create_that_cannot_be_saved_is_undone(
    durable_services: Callable[..., DurableService], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = durable_services()

    def disk_full(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(server.durability.snapshots, "_write_file", disk_full)
    with pytest.raises(ServiceUnavailable, match="No space left on device") as raised:
        server.create("lost", "sgd", weights_of())
    assert raised.value.code == "snapshot_failed"
    assert server.service.store.find("lost") is None
