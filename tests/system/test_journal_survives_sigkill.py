"""The journal of a real server: SIGKILLed, restarted, every acknowledged push is there.

``python -m paramserver serve --durability journal`` runs as a child process; after SIGKILL
(no shutdown code runs) a restart replays the journal, and retried pushes of a known
``Idempotency-Key`` replay their answers. A torn tail, as a crash leaves it, is cut and
logged; damage before the end stops the start with a message naming the segment and offset.
The journal's format and replay in process: ``tests/persistence/test_journal.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from paramserver import wire
from paramserver.server.persistence import JournalReader
from paramserver.server.persistence.journal import list_segments
from tests.harness.http_api import HTTP, MSGPACK, create_session, get_state, push, session_ids
from tests.harness.servers import ServerProcess, start_paramserver

RNG = np.random.default_rng(7)
WEIGHTS = {"w": np.linspace(-1, 1, 6, dtype=np.float32)}


def grads() -> dict[str, np.ndarray]:
    return {"w": RNG.standard_normal(6).astype(np.float32)}


def records_of(directory: Path) -> list[Any]:
    return list(JournalReader(directory).records())


def journal_server(tmp_path: Path, *extra: str) -> ServerProcess:
    return start_paramserver(
        tmp_path,
        "--snapshot-dir",
        str(tmp_path / "data"),
        "--durability",
        "journal",
        "--snapshot-interval-seconds",
        "3600",
        *extra,
    )


@pytest.mark.parametrize("fsync", ["always", "interval"])
def test_acknowledged_pushes_survive_sigkill(tmp_path: Path, fsync: str) -> None:
    server = journal_server(tmp_path, "--journal-fsync", fsync)
    try:
        create_session(server.url, "adam", WEIGHTS, session_id="a")
        create_session(server.url, "rmsprop", WEIGHTS, session_id="b")
        for i in range(20):
            for sid in ("a", "b"):
                r = push(server.url, sid, grads(), key=f"{sid}-{i}")
                assert r.status_code == 200, r.text
        r = HTTP.put(
            f"{server.url}/sessions/c/state", content=get_state(server.url, "a"), headers=MSGPACK
        )
        assert r.status_code == 201, r.text
        saved = {sid: get_state(server.url, sid) for sid in ("a", "b", "c")}
        g = grads()
        answer = wire.unpack(push(server.url, "a", g, key="last").content)
    finally:
        server.kill()
    saved["a"] = None  # the last push changed it: compare through its retry below

    restarted = journal_server(tmp_path, "--journal-fsync", fsync)
    try:
        assert "replayed 44 of 44 journal record(s)" in restarted.log, restarted.log
        assert session_ids(restarted.url) == ["a", "b", "c"]
        for sid in ("b", "c"):
            assert get_state(restarted.url, sid) == saved[sid]
        retry = push(restarted.url, "a", g, key="last")
        assert retry.headers["idempotent-replayed"] == "true"
        assert (
            wire.unpack(retry.content) == {"iterations": answer["iterations"]} == {"iterations": 21}
        )
        weights = wire.unpack(HTTP.get(f"{restarted.url}/sessions/a/weights").content)["weights"]
        np.testing.assert_array_equal(
            wire.decode_tensor(weights["w"]), wire.decode_tensor(answer["weights"]["w"])
        )
    finally:
        assert restarted.terminate() == 0, restarted.log


def test_damaged_journal_stops_the_start_with_a_clear_message(tmp_path: Path) -> None:
    server = journal_server(tmp_path)
    try:
        create_session(server.url, "sgd", WEIGHTS, session_id="a")
        for _ in range(3):
            assert push(server.url, "a", grads()).status_code == 200
    finally:
        server.kill()
    records = records_of(tmp_path / "data" / "journal")
    path = records[1].segment
    data = bytearray(path.read_bytes())
    data[records[1].offset + 20] ^= 0xFF
    path.write_bytes(bytes(data))

    refused = ServerProcess.paramserver(
        "--snapshot-dir", str(tmp_path / "data"), log_dir=tmp_path, warm_up_kernels=False
    ).launch()
    assert refused.wait_exit() != 0, refused.log
    assert f"cannot start: journal segment {path} is damaged at offset" in refused.log


def test_torn_tail_after_sigkill_is_cut_and_the_server_starts(tmp_path: Path) -> None:
    server = journal_server(tmp_path)
    try:
        create_session(server.url, "sgd", WEIGHTS, session_id="a")
        assert push(server.url, "a", grads()).status_code == 200
        saved = get_state(server.url, "a")
    finally:
        server.kill()
    segment = list_segments(tmp_path / "data" / "journal")[-1][1]
    whole = segment.read_bytes()
    segment.write_bytes(whole + whole[12:40])  # the start of a record, as a crash leaves it

    restarted = journal_server(tmp_path)
    try:
        assert f"28 damaged bytes at the end of {segment}" in restarted.log, restarted.log
        assert any(segment.parent.glob(f"{segment.name}.*.corrupt"))
        assert get_state(restarted.url, "a") == saved
    finally:
        assert restarted.terminate() == 0, restarted.log


def test_pushes_over_the_data_plane_are_journaled_before_their_answer(tmp_path: Path) -> None:
    """The data plane's pushes go through the same write-ahead journal: after SIGKILL every
    acknowledged one is there, and a retried key replays instead of applying again."""
    from paramserver.client import Client
    from paramserver.client.dataplane import DataPlaneChannel

    server = journal_server(tmp_path)
    answers = []
    try:
        with Client(server.url) as client:
            session = client.create_session(WEIGHTS, "adam")
            for i in range(10):
                last = grads()
                answers.append(session.push(last, idempotency_key=f"dp-{i}"))
            assert isinstance(client._plane, DataPlaneChannel)
        server.kill()
        assert [r.op for r in records_of(tmp_path / "data" / "journal")].count("push") == 10
        server.start()
        with Client(server.url) as client:
            restarted = client.session(session.id)
            assert restarted.info().iterations == 10
            np.testing.assert_array_equal(restarted.pull()["w"], answers[-1]["w"])
            again = restarted.push(last, idempotency_key="dp-9")  # replayed, then pulled
            np.testing.assert_array_equal(again["w"], answers[-1]["w"])
            assert restarted.info().iterations == 10
    finally:
        server.stop()
